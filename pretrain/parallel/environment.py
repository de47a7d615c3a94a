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
    import warnings

    import torch  # only here: a CPU run's --check needs no torch

    said = []
    with warnings.catch_warnings(record=device == "cuda") as caught:  # torch says why CUDA failed in a warning
        if device == "cuda":  # (only where a GPU is required: elsewhere torch's own warning is printed as ever)
            warnings.simplefilter("always")
        available = torch.cuda.is_available()
        said = caught or []
    if device == "cuda" and not available:
        torch_says = "; ".join(str(warning.message).strip() for warning in said if "CUDA" in str(warning.message))
        raise LaunchError("PRETRAIN_DEVICE=cuda but torch sees no GPU (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}; {cuda_versions()}"
                          + (f"; torch says: {torch_says}" if torch_says else "") + "): install a torch built for "
                          "a CUDA this driver supports (make setup TORCH_SPEC=...), or use PRETRAIN_DEVICE=cpu")
    return available


def set_communication_defaults(tensor_parallel_size: int) -> dict[str, str]:
    """Set, where the user has not, what NCCL and CUDA read when they start (before any CUDA call): returns
    the settings made.

    - NCCL_DEBUG=WARN: NCCL says why a collective failed or hangs (a bad interface, a timeout) instead of
      failing silently; INFO is the next level, for debugging a cluster's network.
    - CUDA_DEVICE_MAX_CONNECTIONS=1 with tensor parallelism: one hardware queue, so kernels start in the
      order they are issued and a tensor-parallel all-reduce issued before the next matrix multiply is not
      held behind it (megatron-core's tensor-parallel layers assume this)."""
    import os

    wanted = {"NCCL_DEBUG": "WARN"}
    if tensor_parallel_size > 1:
        wanted["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    made = {key: value for key, value in wanted.items() if key not in os.environ}
    os.environ.update(made)
    return made


DRIVER_VERSION_FILE = "/proc/driver/nvidia/version"


def cuda_versions(driver_file: str = DRIVER_VERSION_FILE) -> str:
    """'torch 2.x built for CUDA 12.8; NVIDIA driver 550.54.15': the two versions whose mismatch most often
    keeps torch from a GPU (a CUDA 12.x build needs a 525+ driver), or what is missing instead."""
    import re

    import torch

    built = (f"torch {torch.__version__} built for CUDA {torch.version.cuda}" if torch.version.cuda
             else f"torch {torch.__version__}, a CPU-only build")
    try:
        with open(driver_file, encoding="utf-8", errors="replace") as text:
            first = text.readline()
    except OSError:
        return f"{built}; no NVIDIA driver loaded ({driver_file} is absent)"
    version = re.search(r"Kernel Module(?: for \S+)?\s+([0-9][0-9.]*)", first)
    return f"{built}; NVIDIA driver {version.group(1) if version else first.strip()}"
