"""The launch environment a rank reads before any library starts: RANK, WORLD_SIZE and the rendezvous
address from torchrun, our launcher or srun, and whether to use GPUs. torch is imported only to ask for a
GPU, so a CPU run's `python -m pretrain --check` imports none of it."""

from __future__ import annotations


class LaunchError(RuntimeError):
    """A launch environment that cannot form a correct process group; names the variable."""


def environment_from_launcher() -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK from torchrun / our launcher, or else from srun's
    SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (never SLURM_NODEID: that is the node,
    not the rank). A single process needs nothing set.

    MASTER_ADDR falls back to 127.0.0.1 only when every rank is on this machine: under
    srun across several nodes each rank would otherwise rendezvous with itself and hang.
    """
    import os

    slurm = {"RANK": "SLURM_PROCID", "WORLD_SIZE": "SLURM_NTASKS", "LOCAL_RANK": "SLURM_LOCALID"}
    for ours, theirs in slurm.items():
        if ours not in os.environ and theirs in os.environ:
            os.environ[ours] = os.environ[theirs]
    nodes = int(os.environ.get("SLURM_STEP_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    if "MASTER_ADDR" not in os.environ and nodes > 1:
        raise LaunchError(f"MASTER_ADDR is not set and this srun step spans {nodes} nodes: set MASTER_ADDR to the "
                          "first host of the job (slurm/pretrain.sbatch does: scontrol show hostnames "
                          "$SLURM_JOB_NODELIST | head -n 1) and MASTER_PORT to a port free on it")
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise LaunchError("MASTER_PORT is not set: start multi-process runs with python -m pretrain.launch, "
                              "torchrun, or an sbatch script from slurm/")
        # Port 0: the store binds whatever port is free at that moment, and a single process needs no
        # other to find it. A port picked early and bound seconds later, after the imports,
        # was sometimes taken by then on a busy machine (EADDRINUSE).
        os.environ["MASTER_PORT"] = "0"


def wants_gpu() -> bool:
    """Train on GPUs (NCCL) unless PRETRAIN_DEVICE=cpu or torch sees none."""
    import os

    device = os.environ.get("PRETRAIN_DEVICE", "").lower()
    if device not in ("", "cpu", "cuda"):
        raise LaunchError(f"PRETRAIN_DEVICE={device!r} must be cpu or cuda (or unset: cuda when a GPU is visible)")
    if device == "cpu":
        return False
    import torch  # only here: a CPU run's --check needs no torch

    if device == "cuda" and not torch.cuda.is_available():
        raise LaunchError("PRETRAIN_DEVICE=cuda but torch sees no GPU (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); unset it or use PRETRAIN_DEVICE=cpu")
    return torch.cuda.is_available()
