"""Process groups: torch.distributed, megatron-core's parallel_state and DeepSpeed's
topology, set up once and checked to describe the same groups."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from pretrain.parallel.layout import ParallelLayout


def _megatron():
    # megatron-core warns at import that Transformer Engine and Apex are absent; we use neither.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
        from megatron.core.model_parallel_config import ModelParallelConfig
    return parallel_state, ModelParallelConfig


def environment_from_launcher() -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK from torchrun / our launcher, or else from srun's
    SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (never SLURM_NODEID: that is the node,
    not the rank). A single process needs nothing set."""
    import os

    slurm = {"RANK": "SLURM_PROCID", "WORLD_SIZE": "SLURM_NTASKS", "LOCAL_RANK": "SLURM_LOCALID"}
    for ours, theirs in slurm.items():
        if ours not in os.environ and theirs in os.environ:
            os.environ[ours] = os.environ[theirs]
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise RuntimeError("MASTER_PORT is not set: start multi-process runs with python -m pretrain.launch, "
                               "torchrun, or an sbatch script from slurm/")
        os.environ["MASTER_PORT"] = str(free_port())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: the GPU under NCCL, else the CPU."""
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def init_distributed(backend: str | None = None) -> None:
    """torch.distributed from the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
    registered with DeepSpeed's communication layer too. An existing process group is reused."""
    import deepspeed

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def initialize_model_parallel(layout: ParallelLayout):
    """megatron-core's groups (tensor, pipeline, data) and DeepSpeed's matching topology.

    Both order ranks tensor-fastest, then data, then pipeline; the check below
    fails loudly if a library upgrade ever changes that.
    """
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    parallel_state, _ = _megatron()
    tp, pp, dp = layout.tensor_parallel_size, layout.pipeline_parallel_size, layout.data_parallel_size
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    coordinates = topology.get_coord(dist.get_rank())
    ours = (coordinates.pipe, coordinates.data, coordinates.model)
    megatron = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_data_parallel_rank(),
                parallel_state.get_tensor_model_parallel_rank())
    if ours != megatron:
        raise RuntimeError(f"rank {dist.get_rank()}: DeepSpeed places it at (pipe, data, model) {ours}, "
                           f"megatron-core at {megatron}; the two libraries disagree on rank order")
    return topology


def model_parallel_config(layout: ParallelLayout, params_dtype: torch.dtype = torch.float32):
    """megatron-core's ModelParallelConfig for our layers: CPU initialization of the full
    weight, then a split, which keeps initialization independent of the layout."""
    _, ModelParallelConfig = _megatron()
    return ModelParallelConfig(
        tensor_model_parallel_size=layout.tensor_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_parallel_size,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
    )
