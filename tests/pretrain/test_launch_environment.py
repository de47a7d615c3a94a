"""The launch environment: ranks from srun's variables, no silent 127.0.0.1 across nodes, GPU binding."""

from __future__ import annotations

import os

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


def test_nccl_warnings_on_and_one_cuda_queue_under_tensor_parallelism_unless_set(clean_environment):
    from pretrain.parallel.environment import set_communication_defaults

    for key in ("NCCL_DEBUG", "CUDA_DEVICE_MAX_CONNECTIONS"):  # recorded, so that what the function sets is undone
        clean_environment.setenv(key, "recorded")
        clean_environment.delenv(key)
    assert set_communication_defaults(1) == {"NCCL_DEBUG": "WARN"}
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
    clean_environment.setenv("NCCL_DEBUG", "INFO")  # the user's choice stays
    assert set_communication_defaults(2) == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    assert os.environ["NCCL_DEBUG"] == "INFO" and os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


def test_a_gpu_torch_cannot_use_is_reported_with_the_driver_and_cuda_versions(clean_environment, tmp_path):
    """PRETRAIN_DEVICE=cuda where torch sees no GPU (this machine: a CPU-only torch, no driver): the error names
    both versions whose mismatch is the usual cause, and the fix."""
    import torch

    from pretrain.parallel.environment import cuda_versions

    clean_environment.setenv("PRETRAIN_DEVICE", "cuda")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: there is nothing to report")
    with pytest.raises(LaunchError) as refused:
        wants_gpu()
    assert f"torch {torch.__version__}" in str(refused.value)
    assert "install a torch built for a CUDA this driver supports" in str(refused.value)
    driver = tmp_path / "version"
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
                      "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    assert cuda_versions(str(driver)).endswith("; NVIDIA driver 550.54.15")
    open_driver = tmp_path / "open"
    open_driver.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build\n")
    assert cuda_versions(str(open_driver)).endswith("; NVIDIA driver 570.86.15")
    assert cuda_versions(str(tmp_path / "absent")).endswith(f"no NVIDIA driver loaded ({tmp_path / 'absent'} is absent)")


def test_when_a_rank_fails_the_launcher_stops_the_others_even_one_that_ignores_sigterm(capfd):
    """pretrain.launch's wait: the failed rank's code comes back at once, and a rank that takes SIGTERM only as
    a request to save after its step (here: ignores it), as one waiting at start-up for the dead rank does, is
    killed after the grace period instead of keeping the launcher forever."""
    import subprocess
    import sys
    import time

    from pretrain.launch import wait_for

    waiting = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                "signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"], stdout=subprocess.PIPE)
    assert waiting.stdout.readline() == b"ready\n"
    failing = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    began = time.monotonic()
    assert wait_for([waiting, failing], grace=1.0) == 3
    assert time.monotonic() - began < 10
    assert waiting.returncode == -9
    assert "rank 1 exited with code 3; stopping the other ranks" in capfd.readouterr().err


def test_the_launchers_rendezvous_is_bound_before_any_rank_starts():
    """The ranks connect to a store the launcher already holds (torchrun's agent store): no port is picked
    for rank 0 to bind later, which another process could take in between."""
    import socket

    from pretrain.parallel.distributed import host_rendezvous

    store, rendezvous = host_rendezvous(2)
    assert rendezvous["TORCHELASTIC_USE_AGENT_STORE"] == "True"
    with socket.socket() as probe:
        probe.connect((rendezvous["MASTER_ADDR"], int(rendezvous["MASTER_PORT"])))  # someone listens already
    store.set("key", "value")
    assert store.get("key") == b"value"


def test_a_stop_signal_before_any_rank_starts_ends_the_launcher_starting_none(tmp_path, shards):
    """SIGTERM while the launcher still imports and checks (seconds, before it starts a rank): it is recorded,
    not fatal and not lost, and the launcher then exits 0 saying nothing was started; no run directory."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO
    from tests.training import data_settings

    launcher = subprocess.Popen([sys.executable, "-m", "pretrain.launch", "--nproc", "2", "--config",
                                 "configs/gpt2-tiny.yaml", "--set", *data_settings(shards),
                                 f"run.dir={tmp_path / 'run'}"], cwd=REPO,
                                env=dict(os.environ, PRETRAIN_DEVICE="cpu"), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until its SIGTERM handler is installed (the first thing it does)
        caught = open(f"/proc/{launcher.pid}/status").read().split("SigCgt:")[1].split()[0]
        if int(caught, 16) & (1 << (signal.SIGTERM - 1)):
            break
        time.sleep(0.005)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, stderr
    assert stderr.strip() == "pretrain.launch: SIGTERM before any rank started: nothing was started"
    assert not (tmp_path / "run").exists()
