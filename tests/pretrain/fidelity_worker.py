"""One rank of a multi-process run, for tests that compare a layout with the single-process reference.

Spawned by tests (torch.multiprocessing), one process per rank on gloo. Each rank
saves its local view (its losses, gradients and parameters with their
tensor-parallel split) to OUT/rank{r}.pt; the test assembles full tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.model.shape import GPTConfig
from pretrain.model.hf_mapping import canonical_name

TINY = GPTConfig(n_layer=4, n_embd=64, n_head=4, n_positions=32, vocab_size=1000, padded_vocab_size=1024)
SEQUENCE = 16


@dataclass(frozen=True)
class Scenario:
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    steps: int = 10
    micro_batch_size: int = 2
    global_batch_size: int = 8
    zero_stage: int = 0
    activation_checkpointing: int = 0
    seed: int = 1234

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size


def global_batch(step: int, size: int) -> torch.Tensor:
    """Token ids (size, SEQUENCE + 1) for a step, the same for every layout. Two batches
    alternate, so ten steps visibly lower the loss (random tokens are otherwise unlearnable)."""
    return torch.randint(0, TINY.vocab_size, (size, SEQUENCE + 1), generator=torch.Generator().manual_seed(1000 + step % 2))


def rank_micro_batches(step: int, scenario: Scenario, data_rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    samples = global_batch(step, scenario.global_batch_size)
    per_rank = scenario.global_batch_size // scenario.data_parallel_size
    mine = samples[data_rank * per_rank:(data_rank + 1) * per_rank]
    return [(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()) for chunk in mine.split(scenario.micro_batch_size)]


def local_view(named_tensors) -> dict[str, tuple[torch.Tensor, int | None]]:
    """canonical name -> (tensor, tensor-parallel split dimension or None when replicated)."""
    view = {}
    for name, param, tensor in named_tensors:
        split = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        view[canonical_name(name)] = (tensor.detach().clone(), split)
    return view


def run_rank(rank: int, scenario: Scenario, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(scenario.world_size), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.manual_seed(0)
    from megatron.core import parallel_state

    from pretrain.parallel.build import apply_activation_checkpointing, build_model
    from pretrain.parallel.distributed import init_distributed, initialize_model_parallel, model_parallel_config
    from pretrain.parallel.deepspeed_config import deepspeed_config
    from pretrain.parallel.engine import initialize_engine, train_step
    from pretrain.parallel.layout import ParallelLayout

    init_distributed("gloo")
    layout = ParallelLayout(scenario.world_size, scenario.tensor_parallel_size, scenario.pipeline_parallel_size,
                            scenario.zero_stage, scenario.micro_batch_size, scenario.global_batch_size).validate(TINY)
    topology = initialize_model_parallel(layout)
    model = build_model(TINY, layout, topology, model_parallel_config(layout), scenario.seed)
    apply_activation_checkpointing(model, scenario.activation_checkpointing)
    initial = local_view((n, p, p) for n, p in model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    first_gradients = {}

    def record_first_gradients(opt, args, kwargs):
        if not first_gradients:
            first_gradients.update(local_view((n, p, p.grad) for n, p in model.named_parameters()))

    optimizer.register_step_pre_hook(record_first_gradients)
    engine = initialize_engine(model, layout, topology, optimizer, deepspeed_config(layout))
    data_rank = parallel_state.get_data_parallel_rank()
    losses = [train_step(engine, rank_micro_batches(step, scenario, data_rank)).item()
              for step in range(scenario.steps)]
    coords = (parallel_state.get_pipeline_model_parallel_rank(), data_rank,
              parallel_state.get_tensor_model_parallel_rank())
    torch.save({"coords": coords, "losses": losses, "initial": initial, "gradients": first_gradients,
                "final": local_view((n, p, p) for n, p in model.named_parameters())},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
