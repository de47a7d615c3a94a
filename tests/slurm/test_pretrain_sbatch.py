"""slurm/pretrain.sbatch on a real Slurm cluster (two emulated nodes on this machine), gloo on CPUs.

A requeue, a time limit, a killed rank and the kill switch must each leave the metrics of the
uninterrupted `python -m pretrain.launch` run on the same layout, every step once (within 1e-6); a
multi-node TP2 x PP2 x DP2 start must train the one-process reference run's curve, validation loss and
task figures (within 1e-5, as tests/pretrain/test_trainer.py requires of every layout).

The jobs are independent, so they run side by side: one thread per scenario submits its job, waits
for the step it acts at (a state, not a time), acts, and records what it saw; each test then checks
its scenario's record. The test cluster's 16 CPU slots hold the four two-rank jobs and the 8-rank job
at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import REPO, SHORT
from tests.slurm.jobs import job, wait_for, wait_until_done
from tests.training import TINY, assert_same_as_reference, data_settings, metrics, reference_settings, train

SBATCH = REPO / "slurm" / "pretrain.sbatch"
STEPS = 12  # the DP=2 runs; the schedule depends on it, so every DP=2 run uses it
# 64-token sequences: the same code paths as the preset's 256, a quarter of the compute per step.
pytestmark = pytest.mark.slow


# ---- helpers ------------------------------------------------------------------------------

SUBMITTED: list[str] = []  # every job of this module, cancelled at its end (a failed scenario leaves none running)


def submit(workdir: Path, shards: str, *settings: str, nodes: int = 2, tasks_per_node: int = 1,
           options: tuple[str, ...] = ()) -> str:
    """sbatch slurm/pretrain.sbatch from `workdir` (its logs/ and run/ go there); returns the job id."""
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    command = ["sbatch", "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
               "--gpus-per-node=0", "--cpus-per-task=1", "--time=10", "--signal=B:USR1@30", *options,
               str(SBATCH), TINY, "--set", *data_settings(shards), f"run.dir={workdir / 'run'}",
               "eval.interval=0", "logging.interval=1", *SHORT, *settings]
    env = dict(os.environ, PRETRAIN_DEVICE="cpu", PRETRAIN_PYTHON=sys.executable)
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    SUBMITTED.append(result.stdout.strip().split(";")[0])
    return SUBMITTED[-1]


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


@pytest.fixture(scope="module")
def scenarios(slurm_cluster, tmp_path_factory, shards, training_task_files):
    """name -> (workdir, Future of the scenario's record), all started at once."""
    pool = ThreadPoolExecutor(max_workers=len(SCENARIOS))
    started = {}
    for scenario in SCENARIOS:
        workdir = tmp_path_factory.mktemp(scenario.__name__)
        more = (training_task_files,) if scenario is three_d_on_two_nodes else ()
        started[scenario.__name__] = (workdir, pool.submit(scenario, workdir, shards, *more))
    yield started
    subprocess.run(["scancel", *SUBMITTED], capture_output=True)  # threads still waiting see their jobs end
    pool.shutdown(wait=True)


def outcome(scenarios: dict, name: str) -> tuple[Path, dict, str]:
    """The scenario's work directory, record and the log of its first job."""
    workdir, future = scenarios[name]
    record = future.result()
    return workdir, record, log_of(workdir, record["job"])


def reference_dir(scenarios: dict) -> Path:
    workdir, future = scenarios["reference_run"]
    future.result()
    return workdir


# ---- tests --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def impossible_configs(slurm_cluster, tmp_path_factory, shards) -> dict:
    """The three impossible configs, submitted together before anything else occupies the cluster."""
    began = time.monotonic()
    jobs = {}
    for case_id, (settings, tasks_per_node, _) in IMPOSSIBLE.items():
        workdir = tmp_path_factory.mktemp(case_id)
        jobs[case_id] = (workdir, submit(workdir, shards, *settings, tasks_per_node=tasks_per_node))
    return {case_id: (workdir, job_id, wait_until_done(job_id, timeout=120), time.monotonic() - began)
            for case_id, (workdir, job_id) in jobs.items()}


IMPOSSIBLE = {
    "heads-not-divisible": (["parallel.tensor_parallel_size=3"], 3,
                            "parallel.tensor_parallel_size=3 does not divide the model's 4 attention heads"),
    "missing-prefix": (["data.prefixes=[/nonexistent/web]"], 1, "data.prefixes: neither /nonexistent/web.bin/.idx"),
    "world-not-divisible": (["parallel.pipeline_parallel_size=4"], 3, "world size 6 is not a multiple of "
                            "parallel.tensor_parallel_size x parallel.pipeline_parallel_size = 1 x 4"),
}


@pytest.mark.parametrize("case_id", list(IMPOSSIBLE))
def test_impossible_config_fails_in_seconds_before_any_rank_starts(impossible_configs, case_id):
    workdir, job_id, state, elapsed = impossible_configs[case_id]
    message = IMPOSSIBLE[case_id][2]
    text = log_of(workdir, job_id)
    assert (state["JobState"], state["ExitCode"]) == ("FAILED", "2:0"), text
    assert message in text and "nothing was started" in text
    assert "rendezvous" not in text and "rank 0 of" not in text
    assert elapsed < 60
    print(f"\n{message[:40]}...: job failed {elapsed:.1f} s after sbatch")


def test_tp2_pp2_dp2_on_two_nodes_trains_the_one_process_curve(scenarios, single_process_run):
    """The same losses, validation loss and task figures as the trainer's one-process reference run, as
    `python -m pretrain.launch` gives on this layout (tests/pretrain/test_trainer.py)."""
    workdir, record, text = outcome(scenarios, "three_d_on_two_nodes")
    state = record["state"]
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "0"), text[-3000:]
    assert_same_as_reference(workdir / "run", single_process_run[0])
    assert "8 tasks on 2 node(s): node[1-2]" in text and "rendezvous node1:" in text
    assert "git commit " in text and "8 ranks on 2 node(s): node1, node2" in text
    for rank in range(8):
        assert f"rank {rank}: node{rank // 4 + 1}, CPU (gloo)" in text
    assert "resolved config" in text and "tensor_parallel_size: 2" in text
    assert "training finished" in text and "requeueing" not in text
    assert (workdir / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000004"


def test_scontrol_requeue_mid_run_saves_and_the_requeued_job_resumes(scenarios):
    workdir, record, text = outcome(scenarios, "interrupted_by_requeue")
    state = record["state"]
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-3000:]
    assert "received SIGTERM: saving a checkpoint after this step" in text
    assert "attempt 2" in text and "resumed from step_" in text
    assert_same_curve(workdir / "run", reference_dir(scenarios))
    print(f"\nscontrol requeue -> ranks saved and exited in {record['saved_after']:.1f} s (KillWait is 30 s)")


def test_time_limit_signal_saves_requeues_and_resumes(scenarios):
    """The time-limit warning mid-run: the run saves and the job requeues itself.

    Slurm delivers --signal=B:USR1@N by signalling the batch step, as `scancel --batch --signal=USR1`
    does; the scenario sends it that way at a known step, because slurmctld checks time limits only
    about every 30 s, which would put a real one-minute limit's warning anywhere in this short run."""
    workdir, record, text = outcome(scenarios, "interrupted_by_time_limit")
    state = record["state"]
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-3000:]
    assert "USR1: the time limit is near" in text and "received SIGUSR1" in text
    assert f"requeueing job {record['job']}" in text and "resumed from step_" in text
    saved_at = int(text.split("resumed from step_")[1][:7])
    assert 3 <= saved_at < STEPS
    assert_same_curve(workdir / "run", reference_dir(scenarios))


def test_a_rank_killed_mid_step_ends_the_job_naming_it_and_resubmitting_resumes(scenarios):
    workdir, record, text = outcome(scenarios, "interrupted_by_a_killed_rank")
    state = record["state"]
    assert state["JobState"] == "FAILED" and state["ExitCode"] != "0:0", text[-3000:]
    # Slurm's EndTime has whole seconds; a clock or time-zone mismatch would show as a negative figure
    assert -2 < record["ended_after"] < 60, f"the job ended {record['ended_after']:.0f} s after a rank died"
    assert "srun: error: node2: task 1: Killed" in text  # srun names the node and the task (= rank)
    assert "rank 1 on node2 was reported failed first (Killed)" in text
    assert "training failed with exit code" in text and "Not requeueing" in text

    text = log_of(workdir, record["again"])
    assert record["again_state"]["JobState"] == "COMPLETED", text[-3000:]
    assert f"resumed from {record['latest']}" in text
    assert_same_curve(workdir / "run", reference_dir(scenarios))
    print(f"\njob ended {record['ended_after']:.0f} s after rank 1 was SIGKILLed; resumed from {record['latest']}")


def test_kill_switch_saves_and_stops_without_requeue_until_removed(scenarios):
    workdir, record, text = outcome(scenarios, "stopped_by_the_kill_switch")
    state, exit_record = record["state"], record["exit"]
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "0"), text[-3000:]
    assert "stopped by the kill switch" in text and "requeueing job" not in text
    assert exit_record["reason"] == "stop_file" and 2 <= exit_record["step"] < STEPS
    assert record["latest"] == f"step_{exit_record['step']:07d}"

    assert record["still_state"]["JobState"] == "COMPLETED"  # the switch was still there: nothing started
    still = log_of(workdir, record["still"])
    assert "kill switch" in still and "rendezvous" not in still

    assert record["resumed_state"]["JobState"] == "COMPLETED", log_of(workdir, record["resumed"])[-3000:]
    assert_same_curve(workdir / "run", reference_dir(scenarios))
