"""Checkpoints: exact resume after SIGTERM, atomic saves, retention, and clear errors on bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.pretrain.test_trainer import TINY, metrics, train

STEPS = 6


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in metrics(run_dir) if "loss" in row]


# Two runs of the same one-process fp32 command have given step-1 losses 10.791873931884766 and
# 10.791877746582031 (3.5e-7 apart, before any resume; seen in two full-suite runs, never alone; cause not
# found), so "the same curve" is within 1e-6: a resume that lost any state moves the loss far more.
SAME = 1e-6


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards):
    run_dir = tmp_path_factory.mktemp("straight")
    result = train(run_dir, shards, f"train.max_steps={STEPS}", "checkpoint.interval=2")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def start(run_dir: Path, shards: str, *settings: str, nproc: int = 1) -> subprocess.Popen:
    module = ["-m", "pretrain.launch", "--nproc", str(nproc)] if nproc > 1 else ["-m", "pretrain"]
    command = [sys.executable, *module, "--config", TINY, "--set", f"data.prefixes=[{shards}]", f"run.dir={run_dir}",
               "eval.interval=0", f"train.max_steps={STEPS}", "checkpoint.interval=100", *settings]
    return subprocess.Popen(command, cwd=REPO, env=dict(os.environ, DS_ACCELERATOR="cpu"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def interrupt_after_two_steps(process: subprocess.Popen, run_dir: Path) -> str:
    """SIGTERM once two steps are logged. Never earlier: on a slow, busy machine start-up alone can take
    minutes, and a signal during start-up stops the run before training (its own test, below)."""
    deadline = time.monotonic() + 900
    path = run_dir / "metrics.jsonl"
    while process.poll() is None and not (path.is_file() and len(path.read_text().splitlines()) >= 2):
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the run logged fewer than 2 steps in 900 s: {process.communicate()[1][-3000:]}")
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return stderr


@pytest.mark.slow
@pytest.mark.parametrize("nproc,settings", [(1, []), (2, ["parallel.pipeline_parallel_size=2"])], ids=["1x1x1", "1x2x1"])
def test_sigterm_saves_and_the_rerun_continues_the_same_curve(tmp_path, shards, straight, nproc, settings):
    stderr = interrupt_after_two_steps(start(tmp_path, shards, *settings, nproc=nproc), tmp_path)
    assert "saving a checkpoint after this step" in stderr
    stopped_at = int((tmp_path / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 2 <= stopped_at < STEPS, "the signal should land mid-run"
    resumed = train(tmp_path, shards, f"train.max_steps={STEPS}", "checkpoint.interval=100", *settings, nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step_{stopped_at:07d} at step {stopped_at}" in resumed.stderr
    assert [row["step"] for row in metrics(tmp_path)] == list(range(1, STEPS + 1))
    if nproc == 1:
        assert losses(tmp_path) == pytest.approx(losses(straight), rel=SAME)  # same layout, fp32
    else:
        assert losses(tmp_path) == pytest.approx(losses(straight), rel=1e-5)


@pytest.mark.slow
def test_exit_after_minutes_saves_records_why_and_the_rerun_continues_exactly(tmp_path, shards, straight):
    """A wall-time budget (for clusters whose signals are unreliable): save, exit 0, say why in exit.json."""
    stopped = train(tmp_path, shards, f"train.max_steps={STEPS}", "checkpoint.interval=100",
                    "train.exit_after_minutes=0.001")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    record = json.loads((tmp_path / "exit.json").read_text())
    assert record == {"reason": "exit_after_minutes", "step": 1, "first_step": 0, "max_steps": STEPS}
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    assert "stopped at step 1 (exit_after_minutes) with a checkpoint" in stopped.stderr

    resumed = train(tmp_path, shards, f"train.max_steps={STEPS}", "checkpoint.interval=100")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "exit.json").read_text())["reason"] == "finished"
    assert losses(tmp_path) == pytest.approx(losses(straight), rel=SAME)  # same layout, fp32


@pytest.mark.slow
def test_a_signal_during_start_up_stops_the_run_cleanly_before_training(tmp_path, shards):
    """A preemption while the rank is still importing torch and building the model must not kill it."""
    process = start(tmp_path, shards)
    time.sleep(1.5)  # python -m pretrain is still importing its libraries
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "received SIGUSR1" in stderr
    assert json.loads((tmp_path / "exit.json").read_text())["reason"] == "signal:SIGUSR1"
    assert not (tmp_path / "checkpoints" / "latest").exists()  # nothing trained, nothing to save


@pytest.mark.slow
def test_a_kill_switch_present_at_start_trains_nothing_and_says_so(tmp_path, shards):
    (tmp_path / "STOP").touch()
    result = train(tmp_path, shards, f"train.max_steps={STEPS}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped at step 0 by the kill switch" in result.stderr
    assert json.loads((tmp_path / "exit.json").read_text())["reason"] == "stop_file"
    assert not (tmp_path / "metrics.jsonl").read_text() and not (tmp_path / "checkpoints" / "latest").exists()


@pytest.fixture
def finished_copy(tmp_path, straight):
    """A copy of the straight run, to damage."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    return run_dir


@pytest.mark.slow
def test_retention_keeps_the_last_k_and_every_mth(straight):
    kept = sorted(p.name for p in (straight / "checkpoints").glob("step_*"))
    assert kept == ["step_0000004", "step_0000006"]  # interval 2, keep_last 2 (default), keep_every 0
    manifest = json.loads((straight / "checkpoints" / "step_0000006" / "manifest.json").read_text())
    assert manifest["step"] == 6 and manifest["consumed_samples"] == 48
    assert manifest["layout"] == {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "data_parallel_size": 1,
                                  "zero_stage": 1}
    assert manifest["data"]["tokenizer_sha256"] and len(manifest["config_sha256"]) == 64
    assert manifest["config"]["train"]["max_steps"] == STEPS and manifest["config"]["checkpoint"]["interval"] == 2
    assert any(name.endswith("optim_states.pt") for name in manifest["files"])


def kill_mid_save(process: subprocess.Popen, checkpoints: Path) -> Path:
    """SIGKILL the run the moment a save after step 2 is under way; returns the unfinished directory."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        partial = [p for p in checkpoints.glob(".tmp-step_*") if int(p.name.split("_")[1]) > 2]
        if partial:
            process.kill()
            process.wait()
            return partial[0]
        time.sleep(0.0005)
    raise AssertionError(f"no save after step 2 was seen in {checkpoints}; run exit code {process.poll()}")


@pytest.mark.slow
def test_a_kill_mid_save_leaves_the_previous_checkpoint_and_the_rerun_continues_exactly(tmp_path, shards, straight):
    checkpoints = tmp_path / "checkpoints"
    partial = kill_mid_save(start(tmp_path, shards, "checkpoint.interval=1"), checkpoints)
    assert partial.exists(), "the kill should land while the save is still under way"
    assert not (partial / "manifest.json").exists()
    previous = (checkpoints / "latest").read_text().strip()
    assert int(previous.split("_")[1]) == int(partial.name.split("_")[1]) - 1
    assert (checkpoints / previous / "manifest.json").is_file()

    resumed = train(tmp_path, shards, f"train.max_steps={STEPS}", "checkpoint.interval=100")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "an unfinished save" in resumed.stderr and not partial.exists()
    assert f"resumed from {previous}" in resumed.stderr
    assert [row["step"] for row in metrics(tmp_path)] == list(range(1, STEPS + 1))
    assert losses(tmp_path) == pytest.approx(losses(straight), rel=SAME)  # same layout, fp32


@pytest.mark.slow
@pytest.mark.parametrize("damage,message", [
    ("truncate", "has 100 bytes, the manifest says"),
    ("delete", "is missing mp_rank_00_model_states.pt"),
    ("overwrite", "mp_rank_00_model_states.pt cannot be read (RuntimeError: PytorchStreamReader failed"),
    ("shape", "holds a different model; (checkpoint, config): {'n_layer': (4, 2)}"),
])
def test_a_damaged_or_incompatible_checkpoint_is_an_error_naming_it(finished_copy, shards, damage, message):
    """Refused at start-up, naming the file or setting; the run directory stays as it was (its config.yaml,
    and the exit record that slurm/pretrain.sbatch reads)."""
    latest = finished_copy / "checkpoints" / "step_0000006"
    settings = [f"train.max_steps={STEPS + 2}"]
    states = latest / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        with open(states, "r+b") as f:
            f.truncate(100)
    elif damage == "delete":
        states.unlink()
    elif damage == "overwrite":  # damaged in place: the size the manifest records is still right
        with open(states, "r+b") as f:
            f.seek(-5000, os.SEEK_END)
            f.write(bytes(5000))
    else:
        settings.append("model.n_layer=2")
    before = {name: (finished_copy / name).read_text() for name in ("config.yaml", "exit.json")}
    result = train(finished_copy, shards, *settings, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and result.stderr.count("Traceback") == 0
    if damage != "overwrite":  # refused before the start is recorded
        assert {name: (finished_copy / name).read_text() for name in before} == before


@pytest.mark.slow
def test_a_dropout_run_resumes_with_its_random_state_exactly(tmp_path, shards):
    common = ["model.dropout=0.1", "schedule.decay=constant", "checkpoint.interval=2"]  # lr: not tied to max_steps
    straight_run = train(tmp_path / "straight", shards, "train.max_steps=4", *common)
    assert straight_run.returncode == 0, straight_run.stderr[-3000:]
    for steps in (2, 4):
        part = train(tmp_path / "resumed", shards, f"train.max_steps={steps}", *common)
        assert part.returncode == 0, part.stderr[-3000:]
    assert "resumed from step_0000002" in part.stderr
    # the same dropout masks (other masks move the loss by far more than SAME)
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), rel=SAME)


@pytest.mark.slow
@pytest.mark.parametrize("change,message", [
    ("train.seed=99", "train.seed: 1234 -> 99"),
    ("data.split=80,20,0", "data.split: '90,10,0' -> '80,20,0'"),
    ("data.prefixes=[{shards}_00000]", "data.prefixes: ['{shards}'] -> ['{shards}_00000']"),
], ids=["seed", "split", "prefixes"])
def test_resuming_on_other_data_is_refused_naming_the_key_unless_allowed(finished_copy, shards, change,
                                                                         message):
    change, message = change.format(shards=shards), message.format(shards=shards)
    refused = train(finished_copy, shards, f"train.max_steps={STEPS + 1}", change, timeout=300)
    assert refused.returncode == 2
    assert message in refused.stderr and "checkpoint.allow_data_change=true" in refused.stderr
    assert len(metrics(finished_copy)) == STEPS  # nothing trained

    allowed = train(finished_copy, shards, f"train.max_steps={STEPS + 1}", change, "checkpoint.allow_data_change=true",
                    timeout=300)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "resuming on changed data" in allowed.stderr and message in allowed.stderr
    event = [row for row in metrics(finished_copy) if "event" in row]
    assert event == [{"step": STEPS, "event": "data_changed", "changes": [message]}]
    assert metrics(finished_copy)[-1]["step"] == STEPS + 1


def test_retention_with_keep_every(single_process_group, tmp_path):
    from pretrain.checkpoint import CheckpointManager, tag_for

    for step in range(1, 11):
        (tmp_path / tag_for(step)).mkdir()
    CheckpointManager(tmp_path, keep_last=2, keep_every=4)._prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(s) for s in (4, 8, 9, 10)]
