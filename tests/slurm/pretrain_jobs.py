"""The training jobs of tests/slurm/test_pretrain_sbatch.py: slurm/pretrain.sbatch submitted on the test cluster,
each scenario in its own thread (submit, wait for a state, act, record what it saw).

They start once per session (`pretrain_scenarios` in tests/slurm/conftest.py): with tests/slurm/test_data_sbatch.py
when both modules run, since its jobs spend most of their time waiting on Slurm (requeues, job starts) and these
keep the cores busy meanwhile. Each test then checks its scenario's record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import REPO, SHORT
from tests.slurm import jobs
from tests.slurm.jobs import job
from tests.training import TINY, data_settings, metrics, reference_settings, train

SBATCH = REPO / "slurm" / "pretrain.sbatch"
STEPS = 12  # the DP=2 runs; the schedule depends on it, so every DP=2 run uses it
# 64-token sequences: the same code paths as the preset's 256, a quarter of the compute per step.


# ---- helpers ------------------------------------------------------------------------------

SUBMITTED: list[str] = []  # every job of this module, cancelled at its end (a failed scenario leaves none running)
CANCELLED = threading.Event()  # set at the session's end: a scenario still running submits nothing and stops waiting


def wait_for(condition, what: str, timeout: float = 300, interval: float = 0.5):
    return jobs.wait_for(condition, what, timeout, interval, cancelled=CANCELLED)


def wait_until_done(job_id: str, timeout: float = 400) -> dict:
    return jobs.wait_until_done(job_id, timeout, cancelled=CANCELLED)


def submit(workdir: Path, shards: str, *settings: str, nodes: int = 2, tasks_per_node: int = 1,
           options: tuple[str, ...] = ()) -> str:
    """sbatch slurm/pretrain.sbatch from `workdir` (its logs/ and run/ go there); returns the job id."""
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    command = ["sbatch", "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
               "--gpus-per-node=0", "--cpus-per-task=1", "--time=10", "--signal=B:USR1@30", *options,
               str(SBATCH), TINY, "--set", *data_settings(shards), f"run.dir={workdir / 'run'}",
               "eval.interval=0", "logging.interval=1", *SHORT, *settings]
    if CANCELLED.is_set():
        raise RuntimeError("the session is ending: not submitting another job")
    env = dict(os.environ, PRETRAIN_DEVICE="cpu", PRETRAIN_PYTHON=sys.executable)
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    SUBMITTED.append(result.stdout.strip().split(";")[0])
    return SUBMITTED[-1]


def wait_until_requeued(job_id: str, restarts: int) -> None:
    """Requeued, and started again (after the test cluster's cred_expire of 10 s, not Slurm's 120)."""
    wait_for(lambda: int(job(job_id).get("Restarts", 0)) >= restarts, f"job {job_id} to be requeued", 120)


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"  # a step's row has its loss; a save's row does not
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.is_file() else 0


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


def ended_after(job_id: str, since: float) -> float:
    """Seconds from the wall-clock time `since` to the job's end, by Slurm's own EndTime."""
    return datetime.fromisoformat(job(job_id)["EndTime"]).timestamp() - since


# ---- the scenarios, each run in its own thread -----------------------------------------------

def interrupted_by_requeue(workdir: Path, shards: str) -> dict:
    job_id = submit(workdir, shards, f"train.max_steps={STEPS}", "checkpoint.interval=100")
    wait_for(lambda: steps_logged(workdir / "run") >= 3, "step 3", 300, interval=0.1)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    requeued = time.monotonic()
    wait_for(lambda: (workdir / "run" / "exit.json").is_file(), "the ranks' save and exit", 60, interval=0.1)
    saved_after = time.monotonic() - requeued
    wait_until_requeued(job_id, 1)
    return {"job": job_id, "state": wait_until_done(job_id), "saved_after": saved_after}


def interrupted_by_time_limit(workdir: Path, shards: str) -> dict:
    job_id = submit(workdir, shards, f"train.max_steps={STEPS}", "checkpoint.interval=100")
    wait_for(lambda: steps_logged(workdir / "run") >= 3, "step 3", 300, interval=0.1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    wait_until_requeued(job_id, 1)
    return {"job": job_id, "state": wait_until_done(job_id)}


def interrupted_by_a_killed_rank(workdir: Path, shards: str) -> dict:
    settings = (f"train.max_steps={STEPS}", "checkpoint.interval=2")
    job_id = submit(workdir, shards, *settings)
    wait_for(lambda: steps_logged(workdir / "run") >= 3, "step 3", 300, interval=0.1)
    pid = wait_for(lambda: rank_pid(job_id, 1), "rank 1's pid", 10)
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    state = wait_until_done(job_id, timeout=120)
    latest = (workdir / "run" / "checkpoints" / "latest").read_text().strip()
    again = submit(workdir, shards, *settings)
    return {"job": job_id, "state": state, "ended_after": ended_after(job_id, killed), "latest": latest,
            "again": again, "again_state": wait_until_done(again)}


def stopped_by_the_kill_switch(workdir: Path, shards: str) -> dict:
    settings = (f"train.max_steps={STEPS}", "checkpoint.interval=100")
    job_id = submit(workdir, shards, *settings)
    wait_for(lambda: steps_logged(workdir / "run") >= 2, "step 2", 300, interval=0.1)
    (workdir / "run" / "STOP").touch()
    state = wait_until_done(job_id)
    exit_record = json.loads((workdir / "run" / "exit.json").read_text())
    latest = (workdir / "run" / "checkpoints" / "latest").read_text().strip()
    still = submit(workdir, shards, *settings)  # the switch is still there: nothing starts
    still_state = wait_until_done(still)
    (workdir / "run" / "STOP").unlink()
    resumed = submit(workdir, shards, *settings)
    return {"job": job_id, "state": state, "exit": exit_record, "latest": latest, "still": still, "still_state": still_state,
            "resumed": resumed, "resumed_state": wait_until_done(resumed)}


LAYOUT_3D = ("parallel.tensor_parallel_size=2", "parallel.pipeline_parallel_size=2")


def three_d_on_two_nodes(workdir: Path, shards: str, task_files: list[str]) -> dict:
    """The trainer's reference run (validation and tasks included) on TP=2 x PP=2 x DP=2 over two nodes."""
    job_id = submit(workdir, shards, *reference_settings(task_files), *LAYOUT_3D, tasks_per_node=4)
    return {"job": job_id, "state": wait_until_done(job_id)}


def reference_run(workdir: Path, shards: str) -> dict:
    """The uninterrupted DP=2 run, started with python -m pretrain.launch."""
    result = train(workdir, shards, f"train.max_steps={STEPS}", *SHORT, "logging.interval=1", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return {}


SCENARIOS = [reference_run, interrupted_by_requeue, interrupted_by_time_limit, interrupted_by_a_killed_rank,
             stopped_by_the_kill_switch, three_d_on_two_nodes]


def start(tmp_path_factory, shards: str, task_files: list[str]):
    """name -> (workdir, Future of the scenario's record), all started at once; and the function that cancels
    what is still running and waits for the threads."""
    pool = ThreadPoolExecutor(max_workers=len(SCENARIOS))
    started = {}
    for scenario in SCENARIOS:
        workdir = tmp_path_factory.mktemp(scenario.__name__)
        more = (task_files,) if scenario is three_d_on_two_nodes else ()
        started[scenario.__name__] = (workdir, pool.submit(scenario, workdir, shards, *more))

    def stop() -> None:
        CANCELLED.set()
        subprocess.run(["scancel", *SUBMITTED], capture_output=True)
        pool.shutdown(wait=True)

    return started, stop


def outcome(scenarios: dict, name: str) -> tuple[Path, dict, str]:
    """The scenario's work directory, record and the log of its first job."""
    workdir, future = scenarios[name]
    record = future.result()
    return workdir, record, log_of(workdir, record["job"])


def reference_dir(scenarios: dict) -> Path:
    workdir, future = scenarios["reference_run"]
    future.result()
    return workdir


