"""The launch environment: ranks from srun's variables, no silent 127.0.0.1 across nodes, GPU binding."""

from __future__ import annotations

import pytest

from pretrain.parallel.distributed import choose_gpu
from pretrain.parallel.environment import LaunchError, environment_from_launcher, wants_gpu

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                    "SLURM_LOCALID", "SLURM_NNODES", "SLURM_STEP_NUM_NODES", "PRETRAIN_DEVICE")


@pytest.fixture
def clean_environment(monkeypatch):
    """None of the launch variables set; whatever the test (or the code under test) sets is undone after it,
    so no later test's subprocess inherits a rank."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.setenv(name, "recorded")  # records the original state, so teardown restores it
        monkeypatch.delenv(name)
    return monkeypatch


def test_srun_variables_give_rank_world_size_and_local_rank(clean_environment):
    import os

    for name, value in {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
                        "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}.items():
        clean_environment.setenv(name, value)
    environment_from_launcher()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    assert os.environ["MASTER_ADDR"] == "node1"


@pytest.mark.parametrize("nodes_variable", ["SLURM_NNODES", "SLURM_STEP_NUM_NODES"])
def test_several_nodes_without_master_addr_stop_naming_it(clean_environment, nodes_variable):
    clean_environment.setenv("SLURM_PROCID", "0")
    clean_environment.setenv("SLURM_NTASKS", "8")
    clean_environment.setenv("MASTER_PORT", "29500")
    clean_environment.setenv(nodes_variable, "2")
    with pytest.raises(LaunchError, match="MASTER_ADDR is not set and this srun step spans 2 nodes"):
        environment_from_launcher()


def test_one_node_falls_back_to_this_machine(clean_environment):
    import os

    clean_environment.setenv("SLURM_NNODES", "1")
    environment_from_launcher()
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["WORLD_SIZE"] == "1"
    # The store binds a free port itself when it starts: a port chosen here could be taken by then
    assert os.environ["MASTER_PORT"] == "0"


@pytest.mark.parametrize("local_rank,visible,expected", [
    (3, "0,1,2,3,4,5,6,7", 3),  # every GPU of the node visible: LOCAL_RANK picks
    (3, "5", 0),  # --gpus-per-task=1 / --gpu-bind: the task sees only its own
    (0, "0,1,2,3", 0),
])
def test_gpu_choice_follows_what_the_task_can_see(local_rank, visible, expected):
    assert choose_gpu(local_rank, len(visible.split(",")), visible) == expected


def test_more_tasks_than_visible_gpus_is_refused_with_the_fix():
    with pytest.raises(LaunchError, match=r"LOCAL_RANK=5 but this task sees 2 GPUs \(CUDA_VISIBLE_DEVICES=0,1\)"):
        choose_gpu(5, 2, "0,1")


def test_pretrain_device_selects_cpu_and_rejects_unknown_values(clean_environment):
    clean_environment.setenv("PRETRAIN_DEVICE", "cpu")
    assert wants_gpu() is False
    clean_environment.setenv("PRETRAIN_DEVICE", "tpu")
    with pytest.raises(LaunchError, match="PRETRAIN_DEVICE='tpu' must be cpu or cuda"):
        wants_gpu()
