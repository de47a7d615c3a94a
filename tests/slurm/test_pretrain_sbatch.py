"""slurm/pretrain.sbatch on a real Slurm cluster (two emulated nodes on this machine), gloo on CPUs.

Every run here is compared with `python -m pretrain.launch` on the same layout: a multi-node start, a
requeue, a time limit, a killed rank and the kill switch must each leave the uninterrupted run's
metrics, every step exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.slurm.jobs import job, wait_for, wait_until_done
from tests.pretrain.test_trainer import TINY, metrics, train

SBATCH = REPO / "slurm" / "pretrain.sbatch"
STEPS = 12  # the DP=2 runs; the schedule depends on it, so every DP=2 run uses it
pytestmark = pytest.mark.slow


# ---- helpers ------------------------------------------------------------------------------

def submit(workdir: Path, shards: str, *settings: str, nodes: int = 2, tasks_per_node: int = 1,
           options: tuple[str, ...] = ()) -> str:
    """sbatch slurm/pretrain.sbatch from `workdir` (its logs/ and run/ go there); returns the job id."""
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    command = ["sbatch", "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
               "--gpus-per-node=0", "--cpus-per-task=1", "--time=10", "--signal=B:USR1@30", *options,
               str(SBATCH), TINY, "--set", f"data.prefixes=[{shards}]", f"run.dir={workdir / 'run'}",
               "eval.interval=0", "logging.interval=1", *settings]
    env = dict(os.environ, PRETRAIN_DEVICE="cpu", PRETRAIN_PYTHON=sys.executable)
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def wait_until_requeued(job_id: str, restarts: int) -> None:
    """Requeued, and started again (after the test cluster's cred_expire of 10 s, not Slurm's 120)."""
    wait_for(lambda: int(job(job_id).get("Restarts", 0)) >= restarts, f"job {job_id} to be requeued", 120)


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def log_of(workdir: Path, job_id: str) -> str:
    return (workdir / "logs" / f"gpt2-{job_id}.out").read_text()


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in metrics(run_dir)]


def assert_same_curve(run_dir: Path, reference: Path) -> None:
    """Every step once, in order, with the uninterrupted run's loss (fp32, same layout)."""
    ours, theirs = losses(run_dir), losses(reference)
    assert [step for step, _ in ours] == [step for step, _ in theirs] == list(range(1, len(theirs) + 1))
    assert [loss for _, loss in ours] == pytest.approx([loss for _, loss in theirs], rel=1e-6)


def rank_pid(job_id: str, rank: int) -> int | None:
    """The pid of a job's training rank (a python process srun started), found by its environment."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
            cmdline = (entry / "cmdline").read_text()
        except OSError:
            continue
        if (environ.get("SLURM_JOB_ID") == job_id and environ.get("SLURM_PROCID") == str(rank)
                and "pretrain" in cmdline and "--check" not in cmdline and "python" in cmdline):
            return int(entry.name)
    return None


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards):
    """The uninterrupted DP=2 run, started with python -m pretrain.launch."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = train(run_dir, shards, f"train.max_steps={STEPS}", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


# ---- tests --------------------------------------------------------------------------------

def test_tp2_pp2_dp2_on_two_nodes_trains_the_local_launch_curve(slurm_cluster, tmp_path, shards):
    layout = ["parallel.tensor_parallel_size=2", "parallel.pipeline_parallel_size=2", "train.max_steps=4"]
    job_id = submit(tmp_path, shards, *layout, tasks_per_node=4)
    local = train(tmp_path / "local", shards, *layout, nproc=8)
    assert local.returncode == 0, local.stderr[-3000:]
    state = wait_until_done(job_id)
    text = log_of(tmp_path, job_id)
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "0"), text[-3000:]
    assert_same_curve(tmp_path / "run", tmp_path / "local")
    assert "8 tasks on 2 node(s): node[1-2]" in text and "rendezvous node1:" in text
    assert "git commit " in text and "8 ranks on 2 node(s): node1, node2" in text
    for rank in range(8):
        assert f"rank {rank}: node{rank // 4 + 1}, CPU (gloo)" in text
    assert "resolved config" in text and "tensor_parallel_size: 2" in text
    assert "training finished" in text and "requeueing" not in text
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000004"


def test_scontrol_requeue_mid_run_saves_and_the_requeued_job_resumes(slurm_cluster, tmp_path, shards,
                                                                      reference):
    job_id = submit(tmp_path, shards, f"train.max_steps={STEPS}", "checkpoint.interval=100")
    wait_for(lambda: steps_logged(tmp_path / "run") >= 3, "step 3", 300)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    requeued = time.monotonic()
    wait_for(lambda: (tmp_path / "run" / "exit.json").is_file(), "the ranks' save and exit", 60, interval=0.1)
    saved_after = time.monotonic() - requeued
    wait_until_requeued(job_id, 1)
    state = wait_until_done(job_id)
    text = log_of(tmp_path, job_id)
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-3000:]
    assert "received SIGTERM: saving a checkpoint after this step" in text
    assert "attempt 2" in text and "resumed from step_" in text
    assert_same_curve(tmp_path / "run", reference)
    print(f"\nscontrol requeue -> ranks saved and exited in {saved_after:.1f} s (KillWait is 30 s)")


def test_time_limit_signal_saves_requeues_and_resumes(slurm_cluster, tmp_path, shards, reference):
    """The time-limit warning mid-run: the run saves and the job requeues itself.

    Slurm delivers --signal=B:USR1@N by signalling the batch step, as `scancel --batch --signal=USR1`
    does; the test sends it that way at a known step, because slurmctld checks time limits only about
    every 30 s, which would put a real one-minute limit's warning anywhere from start-up to the end of
    this 30-second run."""
    job_id = submit(tmp_path, shards, f"train.max_steps={STEPS}", "checkpoint.interval=100")
    wait_for(lambda: steps_logged(tmp_path / "run") >= 3, "step 3", 300)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    wait_until_requeued(job_id, 1)
    state = wait_until_done(job_id)
    text = log_of(tmp_path, job_id)
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-3000:]
    assert "USR1: the time limit is near" in text and "received SIGUSR1" in text
    assert f"requeueing job {job_id}" in text and "resumed from step_" in text
    saved_at = int(text.split("resumed from step_")[1][:7])
    assert 3 <= saved_at < STEPS
    assert_same_curve(tmp_path / "run", reference)


def test_a_rank_killed_mid_step_ends_the_job_naming_it_and_resubmitting_resumes(slurm_cluster, tmp_path,
                                                                                  shards, reference):
    settings = (f"train.max_steps={STEPS}", "checkpoint.interval=2")
    job_id = submit(tmp_path, shards, *settings)
    wait_for(lambda: steps_logged(tmp_path / "run") >= 3, "step 3", 300, interval=0.1)
    pid = wait_for(lambda: rank_pid(job_id, 1), "rank 1's pid", 10)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    state = wait_until_done(job_id, timeout=120)
    ended_after = time.monotonic() - killed
    text = log_of(tmp_path, job_id)
    assert state["JobState"] == "FAILED" and state["ExitCode"] != "0:0", text[-3000:]
    assert ended_after < 60, f"the job took {ended_after:.0f} s to end after a rank died"
    assert "srun: error: node2: task 1: Killed" in text  # srun names the node and the task (= rank)
    assert "rank 1 on node2 was reported failed first (Killed)" in text
    assert "training failed with exit code" in text and "Not requeueing" in text
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()

    again = submit(tmp_path, shards, *settings)
    state = wait_until_done(again)
    text = log_of(tmp_path, again)
    assert state["JobState"] == "COMPLETED", text[-3000:]
    assert f"resumed from {latest}" in text
    assert_same_curve(tmp_path / "run", reference)
    print(f"\njob ended {ended_after:.1f} s after rank 1 was SIGKILLed; resumed from {latest}")


def test_kill_switch_saves_and_stops_without_requeue_until_removed(slurm_cluster, tmp_path, shards,
                                                                     reference):
    settings = (f"train.max_steps={STEPS}", "checkpoint.interval=100")
    job_id = submit(tmp_path, shards, *settings)
    wait_for(lambda: steps_logged(tmp_path / "run") >= 2, "step 2", 300)
    (tmp_path / "run" / "STOP").touch()
    state = wait_until_done(job_id)
    text = log_of(tmp_path, job_id)
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "0"), text[-3000:]
    assert "stopped by the kill switch" in text and "requeueing job" not in text
    exit_record = json.loads((tmp_path / "run" / "exit.json").read_text())
    assert exit_record["reason"] == "stop_file" and 2 <= exit_record["step"] < STEPS
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"step_{exit_record['step']:07d}"

    still = submit(tmp_path, shards, *settings)  # the switch is still there: nothing starts
    assert wait_until_done(still)["JobState"] == "COMPLETED"
    assert "kill switch" in log_of(tmp_path, still) and "rendezvous" not in log_of(tmp_path, still)

    (tmp_path / "run" / "STOP").unlink()
    resumed = submit(tmp_path, shards, *settings)
    assert wait_until_done(resumed)["JobState"] == "COMPLETED", log_of(tmp_path, resumed)[-3000:]
    assert_same_curve(tmp_path / "run", reference)


@pytest.mark.parametrize("settings,tasks_per_node,message", [
    (["parallel.tensor_parallel_size=3"], 3, "parallel.tensor_parallel_size=3 does not divide the model's 4 "
                                             "attention heads"),
    (["data.prefixes=[/nonexistent/web]"], 1, "data.prefixes: neither /nonexistent/web.bin/.idx"),
    (["parallel.pipeline_parallel_size=4"], 3, "world size 6 is not a multiple of parallel.tensor_parallel_size x parallel.pipeline_parallel_size = 1 x 4"),
], ids=["heads-not-divisible", "missing-prefix", "world-not-divisible"])
def test_impossible_config_fails_in_seconds_before_any_rank_starts(slurm_cluster, tmp_path, shards,
                                                                  settings, tasks_per_node, message):
    began = time.monotonic()
    job_id = submit(tmp_path, shards, *settings, tasks_per_node=tasks_per_node)  # later settings win
    state = wait_until_done(job_id, timeout=120)
    text = log_of(tmp_path, job_id)
    assert (state["JobState"], state["ExitCode"]) == ("FAILED", "2:0"), text
    assert message in text and "nothing was started" in text
    assert "rendezvous" not in text and "rank 0 of" not in text
    elapsed = time.monotonic() - began
    assert elapsed < 60
    print(f"\n{message[:40]}...: job failed {elapsed:.1f} s after sbatch")
