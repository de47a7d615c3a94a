"""The Slurm cluster fixture: tests/slurm/cluster.sh brings up munge, slurmctld and two slurmd
daemons (node1, node2) on 127.0.0.1; stopped at the end if this session started it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CLUSTER = Path(__file__).resolve().parent / "cluster.sh"


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (its daemons run as SlurmUser=root)"
    absent = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(tool) is None]
    if absent:
        return (f"Slurm is not installed ({', '.join(absent)} missing): "
                "apt-get install slurmctld slurmd slurm-client munge (.ci/run does)")
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running two-node cluster, set in this process's environment too."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    running = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, text=True).returncode == 0
    started = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    conf = started.stdout.strip().rsplit("=", 1)[1]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", conf)
        yield conf
    if not running:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def pretrain_scenarios(slurm_cluster, tmp_path_factory, shards, training_task_files):
    """The training jobs of test_pretrain_sbatch.py, started when the first Slurm module asks: name ->
    (work directory, Future of the scenario's record). test_data_sbatch.py starts them before its own jobs
    when both modules run, as theirs mostly wait on Slurm while these keep the cores busy
    (tests/slurm/pretrain_jobs.py). At the session's end, scenarios still running stop where they are."""
    from tests.slurm.pretrain_jobs import start

    started, stop = start(tmp_path_factory, shards, training_task_files)
    yield started
    stop()
