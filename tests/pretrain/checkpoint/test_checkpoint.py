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

from pretrain.checkpoint.sharded import tag_for
from tests import cli
from tests.conftest import REPO, SHORT
from tests.training import SAME, metrics, train, train_command, train_env

# Long enough for a run stopped three times (a save killed after step 2, SIGTERM two steps after that
# resume, the time budget one step after the next) to stop mid-run every time, even where the kill lands
# a save or two late on a busy machine.
STEPS = 10
# This module's runs: STEPS steps of 64-token windows, saving only at the end (a test's settings come after).
DEFAULTS = (*SHORT, f"train.max_steps={STEPS}", "checkpoint.interval=100")


def run(run_dir: Path, shards: str, *settings: str, nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    return train(run_dir, shards, *DEFAULTS, *settings, nproc=nproc, timeout=timeout)


def start(run_dir: Path, shards: str, *settings: str, nproc: int = 1) -> cli.Command:
    """`run` without waiting, for a test that signals or kills it; forked like `train`'s runs (tests/cli.py)."""
    return cli.start(train_command(run_dir, shards, *DEFAULTS, *settings, nproc=nproc), cwd=REPO, env=train_env())


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in metrics(run_dir) if "loss" in row]


def latest_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards):
    run_dir = tmp_path_factory.mktemp("straight")
    result = run(run_dir, shards, "checkpoint.interval=2")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def wait_for_step(process, run_dir: Path, step: int) -> None:
    """Until `step` is logged. Never earlier: on a slow, busy machine start-up alone can take minutes, and a
    signal during start-up stops the run before training (its own test, below)."""
    deadline = time.monotonic() + 900
    path = run_dir / "metrics.jsonl"

    def logged() -> bool:
        lines = path.read_text().split("\n")[:-1] if path.is_file() else []  # whole lines: one may be half-written
        return any(json.loads(line)["step"] >= step for line in lines)

    while process.poll() is None and not logged():
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the run did not log step {step} in 900 s: {process.communicate()[1][-3000:]}")
        time.sleep(0.05)


def press_ctrl_c(pid: int) -> None:
    """SIGINT to the process and every process below it, as a terminal sends it to its foreground job
    (a process that has ended meanwhile is skipped)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return
    for child in children:
        press_ctrl_c(int(child))
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        pass


def interrupt_after_step(process, run_dir: Path, step: int) -> str:
    """SIGTERM once `step` is logged; the run's stderr, after checking that it exited 0."""
    wait_for_step(process, run_dir, step)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def kill_mid_save(process, checkpoints: Path) -> Path:
    """SIGKILL the run the moment a save after step 2 is under way; returns the unfinished directory."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        partial = [p for p in checkpoints.glob(".tmp-step_*") if int(p.name.split("_")[1]) > 2]
        if partial:
            process.kill()
            process.wait()
            return partial[0]
        time.sleep(0.0005)
    stdout, stderr = process.output_so_far()
    raise AssertionError(f"no save after step 2 was seen in {checkpoints}; run exit code {process.poll()}\n"
                         f"{stdout[-2000:]}\n{stderr[-3000:]}")


@pytest.fixture(scope="module")
def stopped_three_ways(tmp_path_factory, shards) -> dict:
    """One run stopped each way a cluster stops a run, resumed after each, then finished: SIGKILL in the
    middle of a save, SIGTERM two steps into the rerun, train.exit_after_minutes one step into the next.
    What each stop left is recorded for its own test; all three compare the finished curve with the
    straight run (a resume that lost any state moves every later loss). Four starts instead of six."""
    run_dir = tmp_path_factory.mktemp("stopped")
    checkpoints = run_dir / "checkpoints"
    partial = kill_mid_save(start(run_dir, shards, "checkpoint.interval=1"), checkpoints)
    killed = {"partial": partial, "partial_left": partial.exists(),
              "partial_manifest": (partial / "manifest.json").exists(), "latest": latest_step(run_dir),
              "latest_manifest": (checkpoints / tag_for(latest_step(run_dir)) / "manifest.json").is_file()}

    sigterm_stderr = interrupt_after_step(start(run_dir, shards), run_dir, killed["latest"] + 2)
    sigterm = {"stderr": sigterm_stderr, "latest": latest_step(run_dir), "partial_left": partial.exists()}

    budget = run(run_dir, shards, "train.exit_after_minutes=0.001")
    assert budget.returncode == 0, budget.stderr[-3000:]
    exit_after = {"stderr": budget.stderr, "latest": latest_step(run_dir),
                  "record": json.loads((run_dir / "exit.json").read_text())}

    finished = run(run_dir, shards)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return {"run_dir": run_dir, "killed": killed, "sigterm": sigterm, "exit_after": exit_after, "finished": finished}


@pytest.mark.slow
def test_a_kill_mid_save_leaves_the_previous_checkpoint_and_the_rerun_continues_exactly(stopped_three_ways,
                                                                                          straight):
    killed, rerun = stopped_three_ways["killed"], stopped_three_ways["sigterm"]["stderr"]
    assert killed["partial_left"], "the kill should land while the save is still under way"
    assert not killed["partial_manifest"]
    assert killed["latest"] == int(killed["partial"].name.split("_")[1]) - 1
    assert killed["latest_manifest"]

    assert "an unfinished save" in rerun and not stopped_three_ways["sigterm"]["partial_left"]
    assert f"resumed from {tag_for(killed['latest'])}" in rerun
    run_dir = stopped_three_ways["run_dir"]
    assert [row["step"] for row in metrics(run_dir)] == list(range(1, STEPS + 1))
    assert losses(run_dir) == pytest.approx(losses(straight), rel=SAME)  # same layout, fp32


@pytest.mark.slow
def test_sigterm_saves_and_the_rerun_continues_the_same_curve(stopped_three_ways, straight):
    resumed_at, sigterm = stopped_three_ways["killed"]["latest"], stopped_three_ways["sigterm"]
    assert "saving a checkpoint after this step" in sigterm["stderr"]
    stopped_at = sigterm["latest"]
    assert resumed_at + 2 <= stopped_at < STEPS, "the signal should land mid-run"
    rerun = stopped_three_ways["exit_after"]["stderr"]
    assert f"resumed from step_{stopped_at:07d} at step {stopped_at}" in rerun
    run_dir = stopped_three_ways["run_dir"]
    assert [row["step"] for row in metrics(run_dir)] == list(range(1, STEPS + 1))
    assert losses(run_dir) == pytest.approx(losses(straight), rel=SAME)  # same layout, fp32


@pytest.mark.slow
def test_sigterm_on_two_pipeline_stages_saves_and_the_rerun_continues_the_same_curve(tmp_path, shards, straight):
    """The launcher forwards SIGTERM to both ranks, which save together."""
    pipeline = "parallel.pipeline_parallel_size=2"
    stderr = interrupt_after_step(start(tmp_path, shards, pipeline, nproc=2), tmp_path, 2)
    assert "saving a checkpoint after this step" in stderr
    stopped_at = latest_step(tmp_path)
    assert 2 <= stopped_at < STEPS, "the signal should land mid-run"
    resumed = run(tmp_path, shards, pipeline, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step_{stopped_at:07d} at step {stopped_at}" in resumed.stderr
    assert [row["step"] for row in metrics(tmp_path)] == list(range(1, STEPS + 1))
    assert losses(tmp_path) == pytest.approx(losses(straight), rel=1e-5)


@pytest.mark.slow
def test_ctrl_c_saves_like_sigterm_and_a_second_ctrl_c_stops_at_once(tmp_path, shards):
    """Under pretrain.launch, as a terminal delivers it (the launcher and its ranks): one Ctrl-C saves after
    the step and exits 0; two stop the ranks at once (exit 130), without a checkpoint, even ranks that would
    take long to finish their step. Neither prints a traceback."""
    pipeline = "parallel.pipeline_parallel_size=2"
    first = start(tmp_path, shards, pipeline, nproc=2)
    wait_for_step(first, tmp_path, 2)
    press_ctrl_c(first.pid)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert "received SIGINT: saving a checkpoint after this step, then exiting (Ctrl-C again" in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert json.loads((tmp_path / "exit.json").read_text())["reason"] == "signal:SIGINT"
    stopped_at = latest_step(tmp_path)
    assert 2 <= stopped_at < STEPS

    again = start(tmp_path, shards, pipeline, nproc=2)  # the same command again resumes from that checkpoint
    wait_for_step(again, tmp_path, stopped_at + 1)
    ranks = [int(pid) for pid in Path(f"/proc/{again.pid}/task/{again.pid}/children").read_text().split()]
    for rank in ranks:  # held mid-step: however long their step and save would take, they are not done
        os.kill(rank, signal.SIGSTOP)
    press_ctrl_c(again.pid)
    time.sleep(0.2)
    press_ctrl_c(again.pid)
    began = time.monotonic()
    _, stderr = again.communicate(timeout=60)
    assert again.returncode == 130, stderr[-3000:]
    assert time.monotonic() - began < 15
    assert "second Ctrl-C: stopping the ranks now, without a checkpoint" in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr and "exited with code" not in stderr
    assert latest_step(tmp_path) == stopped_at


@pytest.mark.slow
def test_exit_after_minutes_saves_records_why_and_the_rerun_continues_exactly(stopped_three_ways, straight):
    """A wall-time budget (for clusters whose signals are unreliable): save, exit 0, say why in exit.json."""
    first, stopped = stopped_three_ways["sigterm"]["latest"], stopped_three_ways["exit_after"]
    assert stopped["record"] == {"reason": "exit_after_minutes", "step": first + 1, "first_step": first,
                                 "max_steps": STEPS}
    assert stopped["latest"] == first + 1 < STEPS
    assert f"stopped at step {first + 1} (exit_after_minutes) with a checkpoint" in stopped["stderr"]

    run_dir = stopped_three_ways["run_dir"]
    assert f"resumed from step_{first + 1:07d}" in stopped_three_ways["finished"].stderr
    assert json.loads((run_dir / "exit.json").read_text())["reason"] == "finished"
    assert losses(run_dir) == pytest.approx(losses(straight), rel=SAME)  # same layout, fp32


@pytest.mark.slow
def test_a_signal_during_start_up_stops_the_run_cleanly_before_training(tmp_path, shards):
    """A preemption while the rank is still importing torch and building the model must not kill it (so a
    fresh interpreter, not a fork of one that imported them)."""
    process = subprocess.Popen(train_command(tmp_path, shards, *DEFAULTS), cwd=REPO, env=train_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # python -m pretrain is still importing its libraries
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "received SIGUSR1" in stderr
    assert json.loads((tmp_path / "exit.json").read_text())["reason"] == "signal:SIGUSR1"
    assert not (tmp_path / "checkpoints" / "latest").exists()  # nothing trained, nothing to save


def test_one_process_takes_ctrl_c_as_a_stop_request_and_a_second_as_exit_130():
    """pretrain/training/stop_signals.py in a process of its own: the first SIGINT is recorded (the run saves
    after its step), the second ends the process at once, each with one line and no traceback."""
    code = ("import sys, time; sys.path.insert(0, {repo!r}); from pretrain.training import stop_signals; "
            "stop_signals.install(); print('ready', flush=True)\n"
            "while stop_signals.received() is None: time.sleep(0.01)\n"
            "print('recorded', stop_signals.received(), flush=True); time.sleep(60)").format(repo=str(REPO))
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "ready\n"
    process.send_signal(signal.SIGINT)
    assert process.stdout.readline() == "recorded SIGINT\n"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "received SIGINT: saving a checkpoint after this step, then exiting (Ctrl-C again" in stderr
    assert "second Ctrl-C: exiting now, without a checkpoint" in stderr and "Traceback" not in stderr


def test_a_stop_signal_while_an_import_walks_loggings_registry_is_only_recorded():
    """The start-up race the test above once hit under load: `import torch` sets logger levels, and each
    Logger.setLevel walks logging's registry of loggers; a handler that looked up a logger then added one
    to it mid-walk ("dictionary changed size during iteration": exit 1, no clean stop). Here the signal
    arrives inside such a walk every time."""
    code = """if True:
        import logging, os, signal
        from pretrain.training import stop_signals
        stop_signals.install()
        logging.getLogger("some.library")
        for _ in logging.Logger.manager.loggerDict.values():  # as every setLevel does (torch's import calls it)
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs here, inside the loop
        print(stop_signals.received(), "pretrain" in logging.Logger.manager.loggerDict)
    """
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SIGUSR1", "False"]
    assert "WARNING received SIGUSR1: saving a checkpoint after this step" in result.stderr


@pytest.mark.slow
def test_a_kill_switch_present_at_start_trains_nothing_and_says_so(tmp_path, shards):
    (tmp_path / "STOP").touch()
    result = run(tmp_path, shards, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped at step 0 by the kill switch" in result.stderr
    assert json.loads((tmp_path / "exit.json").read_text())["reason"] == "stop_file"
    assert not (tmp_path / "metrics.jsonl").read_text() and not (tmp_path / "checkpoints" / "latest").exists()


def test_without_a_save_at_the_end_only_the_interval_saves(tmp_path, shards):
    """checkpoint.at_end=false (measurements that keep no weights): step 2 saved by the interval, step 3 not."""
    result = train(tmp_path, shards, *SHORT, "train.max_steps=3", "checkpoint.interval=2", "checkpoint.at_end=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["step"] for row in metrics(tmp_path)] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [tag_for(2)]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == tag_for(2)


@pytest.fixture
def finished_copy(tmp_path, straight):
    """A copy of the straight run, to damage."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    return run_dir


@pytest.mark.slow
def test_retention_keeps_the_last_k_and_every_mth(straight):
    kept = sorted(p.name for p in (straight / "checkpoints").glob("step_*"))
    assert kept == [tag_for(STEPS - 2), tag_for(STEPS)]  # interval 2, keep_last 2 (default), keep_every 0
    manifest = json.loads((straight / "checkpoints" / tag_for(STEPS) / "manifest.json").read_text())
    assert manifest["step"] == STEPS and manifest["consumed_samples"] == 8 * STEPS
    assert manifest["layout"] == {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "data_parallel_size": 1,
                                  "zero_stage": 1}
    assert manifest["data"]["tokenizer_sha256"] and len(manifest["config_sha256"]) == 64
    assert manifest["config"]["train"]["max_steps"] == STEPS and manifest["config"]["checkpoint"]["interval"] == 2
    assert any(name.endswith("optim_states.pt") for name in manifest["files"])


@pytest.mark.slow
@pytest.mark.parametrize("damage,message", [
    ("truncate", "has 100 bytes, the manifest says"),
    ("delete", "is missing mp_rank_00_model_states.pt"),
    ("overwrite", "mp_rank_00_model_states.pt cannot be read (RuntimeError: PytorchStreamReader failed"),
    ("shape", "holds a different model; (checkpoint, config): {'n_layer': (4, 2)}"),
    ("manifest", "manifest.json is not a manifest of this project (missing: files, layout, model)"),
])
def test_a_damaged_or_incompatible_checkpoint_is_an_error_naming_it(finished_copy, shards, damage, message):
    """Refused at start-up, naming the file or setting; the run directory stays as it was (its config.yaml,
    and the exit record that slurm/pretrain.sbatch reads)."""
    latest = finished_copy / "checkpoints" / tag_for(STEPS)
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
    elif damage == "manifest":
        (latest / "manifest.json").write_text('{"step": 4}')
    else:
        settings.append("model.n_layer=2")
    before = {name: (finished_copy / name).read_text() for name in ("config.yaml", "exit.json")}
    if damage != "overwrite":  # `--check` reads sizes and the manifest, not the tensors: all but this one
        check = cli.run([*train_command(finished_copy, shards, *DEFAULTS, *settings), "--check"], cwd=REPO,
                        env=train_env(), timeout=60)
        assert check.returncode == 2 and message in check.stderr and len(check.stderr.strip().splitlines()) == 1
    result = run(finished_copy, shards, *settings, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and result.stderr.count("Traceback") == 0
    if damage != "overwrite":  # refused before the start is recorded
        assert {name: (finished_copy / name).read_text() for name in before} == before


@pytest.mark.slow
def test_a_dropout_run_resumes_with_its_random_state_exactly(tmp_path, shards):
    common = ["model.dropout=0.1", "schedule.decay=constant", "checkpoint.interval=2"]  # lr: not tied to max_steps
    straight_run = run(tmp_path / "straight", shards, "train.max_steps=4", *common)
    assert straight_run.returncode == 0, straight_run.stderr[-3000:]
    for steps in (2, 4):
        part = run(tmp_path / "resumed", shards, f"train.max_steps={steps}", *common)
        assert part.returncode == 0, part.stderr[-3000:]
    assert "resumed from step_0000002" in part.stderr
    # the same dropout masks (other masks move the loss by far more than SAME)
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), rel=SAME)


@pytest.mark.slow
def test_resuming_on_other_data_is_refused_naming_each_changed_key_unless_allowed(finished_copy, shards):
    """The seed, the split and the prefixes changed at once (one refused start and one allowed, not three
    of each): each change is named, in the refusal and in the recorded event."""
    changes = {"train.seed=99": "train.seed: 1234 -> 99",
               "data.split=80,20,0": "data.split: '90,10,0' -> '80,20,0'",
               f"data.prefixes=[{shards}_00000]": f"data.prefixes: ['{shards}'] -> ['{shards}_00000']"}
    refused = run(finished_copy, shards, f"train.max_steps={STEPS + 1}", *changes, timeout=300)
    assert refused.returncode == 2
    assert "checkpoint.allow_data_change=true" in refused.stderr
    for message in changes.values():
        assert message in refused.stderr
    assert len(metrics(finished_copy)) == STEPS  # nothing trained

    allowed = run(finished_copy, shards, f"train.max_steps={STEPS + 1}", *changes, "checkpoint.allow_data_change=true",
                  timeout=300)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "resuming on changed data" in allowed.stderr
    for message in changes.values():
        assert message in allowed.stderr
    [event] = [row for row in metrics(finished_copy) if "event" in row]
    assert event.keys() == {"step", "event", "changes"} and (event["step"], event["event"]) == (STEPS, "data_changed")
    assert sorted(event["changes"]) == sorted(changes.values())
    assert metrics(finished_copy)[-1]["step"] == STEPS + 1


def test_retention_with_keep_every(single_process_group, tmp_path):
    from pretrain.checkpoint.sharded import CheckpointManager

    for step in range(1, 11):
        (tmp_path / tag_for(step)).mkdir()
    CheckpointManager(tmp_path, keep_last=2, keep_every=4)._prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(s) for s in (4, 8, 9, 10)]


@pytest.mark.slow
def test_a_stop_during_evaluation_leaves_it_between_batches_and_saves(tmp_path, shards):
    """A preemption must not wait for a long evaluation: SIGTERM while 5,000 validation batches run (minutes
    here) is agreed between two ranks after the batch under way; the run saves the step it trained and exits 0
    within seconds, writing no validation row for the evaluation it left."""
    process = start(tmp_path, shards, "eval.interval=2", "eval.iterations=5000", nproc=2)
    wait_for_step(process, tmp_path, 2)  # step 2's row is written just before its evaluation starts
    time.sleep(1.0)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    elapsed = time.monotonic() - signalled
    assert process.returncode == 0, stderr[-3000:]
    assert "evaluation at step 2 left after" in stderr and "of 5000 batches: signal:SIGTERM" in stderr
    assert latest_step(tmp_path) == 2
    assert json.loads((tmp_path / "exit.json").read_text())["reason"] == "signal:SIGTERM"
    assert not any("valid_loss" in row for row in metrics(tmp_path))
    assert elapsed < 30, elapsed
