"""DeepSpeed engines for our model: the generated DeepSpeed config and one training step
that works the same for a pipeline (PipelineEngine.train_batch) and a single stage."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.parallel.layout import ParallelLayout

PRECISIONS = ("fp32", "bf16", "fp16")


def deepspeed_config(layout: ParallelLayout, precision: str = "fp32", gradient_clipping: float = 0.0,
                     extra: dict | None = None) -> dict:
    """The DeepSpeed JSON for a layout; `extra` keys are passed through on top."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r} must be one of {', '.join(PRECISIONS)}")
    config = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.gradient_accumulation_steps,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": {"stage": layout.zero_stage},
        # ZeRO accepts only optimizer classes it lists; ours is torch's AdamW plus a
        # skip on non-finite gradients (pretrain/optim.py), the same update otherwise.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0},
        "steps_per_print": 10**9,  # our own logging reports progress
        "wall_clock_breakdown": False,
    }
    config.update(extra or {})
    return config


def initialize_engine(model: torch.nn.Module, layout: ParallelLayout, topology, optimizer, config: dict,
                      lr_scheduler=None):
    """deepspeed.initialize with the groups our layout implies.

    A PipelineModule carries its topology itself (DeepSpeed asserts mpu=None);
    a single-stage model gets DeepSpeed's grid over the same topology as its
    mpu, so gradients are averaged over data-parallel ranks only, never over
    tensor-parallel ones.
    """
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    mpu = None if isinstance(model, PipelineModule) else PipelineParallelGrid(topology=topology)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu,
                                           lr_scheduler=lr_scheduler, dist_init_required=False)
    return engine


def train_step(engine, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """One optimizer step over this data-parallel rank's micro-batches; returns the
    mean loss over the whole global batch (all micro-batches, all DP ranks)."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if isinstance(engine, PipelineEngine):
        return engine.train_batch(iter(micro_batches)).item()
    losses = []
    for token_ids, labels in micro_batches:
        loss = engine(token_ids.to(engine.device), labels.to(engine.device))
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().float())
    total = torch.stack(losses).mean()  # on the model's device, as NCCL needs
    dist.all_reduce(total, group=engine.mpu.get_data_parallel_group())
    return (total / engine.mpu.get_data_parallel_world_size()).item()


def evaluate_loss(engine, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss over one global batch without updating anything (all DP ranks agree)."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if isinstance(engine, PipelineEngine):
        return engine.eval_batch(iter(micro_batches)).item()  # averaged over micro-batches and DP
    engine.eval()
    with torch.no_grad():
        total = sum(engine(token_ids.to(engine.device), labels.to(engine.device)).float()
                    for token_ids, labels in micro_batches) / len(micro_batches)
    engine.train()
    dist.all_reduce(total, group=engine.mpu.get_data_parallel_group())
    return (total / engine.mpu.get_data_parallel_world_size()).item()
