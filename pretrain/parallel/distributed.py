"""Process groups: torch.distributed, megatron-core's parallel_state and DeepSpeed's
topology, set up once and checked to describe the same groups."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.parallel.environment import LaunchError, wants_gpu
from pretrain.parallel.layout import ParallelLayout


def _megatron():
    # megatron-core warns at import that Transformer Engine and Apex are absent; we use neither.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
        from megatron.core.model_parallel_config import ModelParallelConfig
    return parallel_state, ModelParallelConfig


def choose_gpu(local_rank: int, visible_count: int, visible: str | None) -> int:
    """The CUDA device index this rank uses, whether srun shows a task every GPU of its node
    (then LOCAL_RANK picks one) or only its own (--gpus-per-task=1, --gpu-bind=single:1 or
    map_gpu: index 0). Several visible GPUs but fewer than LOCAL_RANK + 1 is ambiguous and refused."""
    if visible_count == 1:
        return 0
    if 0 <= local_rank < visible_count:
        return local_rank
    raise LaunchError(f"LOCAL_RANK={local_rank} but this task sees {visible_count} GPUs (CUDA_VISIBLE_DEVICES="
                      f"{visible or 'unset'}): give each task one GPU (srun --gpus-per-task=1) or all of its node's "
                      "GPUs with one task per GPU (--ntasks-per-node equal to --gpus-per-node)")


def bind_device() -> str:
    """Pick and select this rank's device; returns its description for the first log line.

    DeepSpeed (engine and PipelineModule) moves the model to cuda:LOCAL_RANK, so LOCAL_RANK
    is rewritten to the chosen index when a task sees fewer GPUs than its node has; the
    launcher's value stays in SLURM_LOCALID."""
    import os

    if not wants_gpu():
        return "CPU (gloo)"
    local_rank, visible = int(os.environ.get("LOCAL_RANK", "0")), os.environ.get("CUDA_VISIBLE_DEVICES")
    index = choose_gpu(local_rank, torch.cuda.device_count(), visible)
    torch.cuda.set_device(index)
    os.environ["LOCAL_RANK"] = str(index)
    return (f"GPU {index} ({torch.cuda.get_device_name(index)}; CUDA_VISIBLE_DEVICES={visible or 'unset'}, "
            f"local rank {local_rank})")


def host_rendezvous(world_size: int, timeout_minutes: float = 10.0):
    """A rendezvous store hosted by this process for `world_size` ranks it starts on this machine, as
    torchrun's agent does: (the store, which must outlive the ranks; the variables each rank needs).

    The store binds a free port itself, and every rank connects to it as a client. The other way, picking a
    free port and letting rank 0 bind it seconds later, loses now and then on a busy machine: between the
    pick and the bind another process (a gloo connection, another run) can take the port, and then rank 0
    fails and the others wait for it."""
    from datetime import timedelta

    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(minutes=timeout_minutes))
    return store, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                   "TORCHELASTIC_USE_AGENT_STORE": "True"}  # torch.distributed's env:// then only connects


REPORTED_KEY = "pretrain/error_reported"


def first_to_report() -> bool:
    """Whether this rank is the first of the job to report an error that stops it: the ranks claim the report
    in the rendezvous store, so that an error every rank meets (a refused checkpoint, a divergence) is
    printed once, by the rank that saw it first, not once per rank. True without a process group, and
    where the store does not answer within seconds (its host may be gone): an error is never lost."""
    from datetime import timedelta

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=5))
        first = store.add(REPORTED_KEY, 1) == 1
        if dist.get_rank() == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            # Rank 0 hosts the store (srun, torchrun without an agent store): leaving at once would take it
            # away from ranks about to claim, and they would print too. Up to 3 s for them to do so.
            deadline = time.monotonic() + 3
            while store.add(REPORTED_KEY, 0) < dist.get_world_size() and time.monotonic() < deadline:
                time.sleep(0.05)
        return first
    except Exception:  # noqa: BLE001  (the store's host ended first: say it rather than nothing)
        return True


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: the GPU under NCCL, else the CPU."""
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def control_group():
    """A process group over every rank on gloo, for small decisions read on the host (the stop check): under
    NCCL a flag all-reduced on the GPU is read only after every kernel queued before it, which would make
    each step wait for the GPU; over gloo it never touches the GPU. Collective: every rank calls it together
    (once; `None`, the world group, where the world group is gloo already)."""
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def init_distributed(backend: str | None = None, timeout_minutes: float = 10.0) -> None:
    """torch.distributed from the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
    registered with DeepSpeed's communication layer too. An existing process group is reused.

    A collective that waits longer than `timeout_minutes` fails instead of hanging: with
    NCCL's asynchronous error handling the process then exits, and srun's
    --kill-on-bad-exit ends the job."""
    import os
    from datetime import timedelta

    import deepspeed

    backend = backend or ("nccl" if wants_gpu() else "gloo")
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if backend == "gloo":
        # On CPUs DeepSpeed's communication layer compiles a shared-memory all-reduce when it starts: 28 s
        # on two cores, the first time and again for every new install path (torch keys its build cache by
        # the include paths). Only DeepSpeed's inference kernels call it; every collective of ours goes
        # through torch.distributed. Marked unavailable, it is neither built nor set up.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(minutes=timeout_minutes))


def initialize_model_parallel(layout: ParallelLayout, timeout_minutes: float = 10.0):
    """megatron-core's groups (tensor, pipeline, data) and DeepSpeed's matching topology.

    Both order ranks tensor-fastest, then data, then pipeline; the check below
    fails loudly if a library upgrade ever changes that. Under NCCL megatron-core's
    extra gloo groups (for CPU-side optimizer communication we do not use) are not made.
    """
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    parallel_state, _ = _megatron()
    tp, pp, dp = layout.tensor_parallel_size, layout.pipeline_parallel_size, layout.data_parallel_size
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=dist.get_backend() != "nccl",
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


def on_rank_zero(work, done, failure_marker: Path, rank: int, what: str, poll_seconds: float = 1.0,
                 stale: tuple[Path, ...] = ()) -> None:
    """Rank 0 runs `work()` while the other ranks wait on the file system, not in a collective.

    Such work (converting or consolidating a 1.5B checkpoint) can outlast a collective's
    timeout, so the other ranks poll until `done()` or rank 0's failure marker appears, and
    meet rank 0 in a barrier only then. A failure on rank 0 is written down first, so that
    every rank stops with the same error. `stale`: files an earlier, interrupted start may have
    left, which would make `done()` true too early; rank 0 removes them first. The directory
    must be one every rank sees, as checkpoints need anyway.
    """
    from data_pipeline.atomic import write_text_atomically
    from pretrain.checkpoint.sharded import CheckpointError

    if rank == 0:
        for path in (failure_marker, *stale):
            path.unlink(missing_ok=True)
    dist.barrier()  # no rank reads a stale failure marker or result
    if rank == 0:
        try:
            work()
        except BaseException as error:
            write_text_atomically(failure_marker, str(error))
            dist.barrier()
            raise
    else:
        while not done() and not failure_marker.is_file():
            time.sleep(poll_seconds)
    dist.barrier()
    if failure_marker.is_file():
        raise CheckpointError(f"rank 0 could not {what}: {failure_marker.read_text()}")
