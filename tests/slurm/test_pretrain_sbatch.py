"""slurm/pretrain.sbatch on a real Slurm cluster (two emulated nodes on this machine), gloo on CPUs.

A requeue, a time limit, a killed rank and the kill switch must each leave the metrics of the
uninterrupted `python -m pretrain.launch` run on the same layout, every step once (within 1e-6); a
multi-node TP2 x PP2 x DP2 start must train the one-process reference run's curve, validation loss and
task figures (within 1e-5, as tests/pretrain/training/test_trainer.py requires of every layout).

The jobs are independent, so they run side by side (tests/slurm/pretrain_jobs.py): one thread per scenario
submits its job, waits for the step it acts at (a state, not a time), acts, and records what it saw; each
test then checks its scenario's record. They start with the session's first Slurm module, beside the data
jobs of tests/slurm/test_data_sbatch.py, which mostly wait on Slurm; the test cluster's 32 CPU slots hold
them all at once.
"""

from __future__ import annotations

import time

import pytest

from tests.slurm.jobs import wait_until_done
from tests.slurm.pretrain_jobs import STEPS, assert_same_curve, log_of, outcome, reference_dir, submit
from tests.training import assert_same_as_reference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scenarios(pretrain_scenarios):
    """The session's training jobs (tests/slurm/pretrain_jobs.py), started by the first Slurm module."""
    return pretrain_scenarios


# ---- tests --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def impossible_configs(slurm_cluster, tmp_path_factory, shards) -> dict:
    """The three impossible configs, submitted together. Each job runs only `python -m pretrain --check` (0.2 s,
    no torch), so it ends within seconds even while the training jobs keep both cores busy."""
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
    `python -m pretrain.launch` gives on this layout (tests/pretrain/training/test_trainer.py)."""
    workdir, record, text = outcome(scenarios, "three_d_on_two_nodes")
    state = record["state"]
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "0"), text[-3000:]
    assert_same_as_reference(workdir / "run", single_process_run[0])
    assert "8 tasks on 2 node(s): node[1-2]" in text and "rendezvous node1:" in text
    assert "git commit " in text and "8 ranks on 2 node(s): node1, node2; CPU (gloo)" in text
    # The console is short; every rank's place and the resolved config are in rank 0's log file.
    assert "resolved config" not in text and f"logs: {workdir / 'run' / 'logs'}" in text
    details = (workdir / "run" / "logs" / "rank_00000.log").read_text()
    for rank in range(8):
        assert f"rank {rank}: node{rank // 4 + 1}, CPU (gloo)" in details
    assert "resolved config" in details and "tensor_parallel_size: 2" in details
    assert sorted(p.name for p in (workdir / "run" / "logs").iterdir()) == [f"rank_{r:05d}.log" for r in range(8)]
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
