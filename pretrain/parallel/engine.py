"""DeepSpeed engines for our model (their config: pretrain/parallel/deepspeed_config.py) and one training
step that works the same for a pipeline (PipelineEngine.train_batch) and a single stage."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.parallel.layout import ParallelLayout
from pretrain.parallel.overlap import arm


def initialize_engine(model: torch.nn.Module, layout: ParallelLayout, topology, optimizer, config: dict):
    """deepspeed.initialize with the groups our layout implies.

    A PipelineModule carries its topology itself (DeepSpeed asserts mpu=None);
    a single-stage model gets DeepSpeed's grid over the same topology as its
    mpu, so gradients are averaged over data-parallel ranks only, never over
    tensor-parallel ones.
    """
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    from data_pipeline.library_imports import import_deepspeed_optimizers

    import_deepspeed_optimizers()
    mpu = None if isinstance(model, PipelineModule) else PipelineParallelGrid(topology=topology)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu,
                                           dist_init_required=False)
    return engine


def loss_scale(optimizer) -> float | None:
    """The fp16 loss scale of whichever wrapper DeepSpeed chose; None where there is none.

    FP16_Optimizer, FP16_UnfusedOptimizer and the ZeRO 1-3 optimizers all expose it as
    `loss_scale` (only some also as `cur_scale`); BF16_Optimizer and a bare optimizer have none.
    """
    scale = getattr(optimizer, "loss_scale", None)
    return float(scale) if isinstance(scale, (int, float, torch.Tensor)) else None


def train_step(engine, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], teacher=None) -> torch.Tensor:
    """One optimizer step over this data-parallel rank's micro-batches; returns the
    mean loss over the whole global batch (all micro-batches, all DP ranks), a scalar on the
    device, not read (a read waits for the device). With a `teacher`
    (pretrain/training/distill.py FrozenTeacher), the loss is the distillation objective."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if isinstance(engine, PipelineEngine):
        if teacher is not None:  # the teacher's whole forward first; the last stage gets its states as labels
            hidden = teacher.pipeline_hidden_states(micro_batches)
            micro_batches = [(token_ids, labels if states is None else (labels, states))
                             for (token_ids, labels), states in zip(micro_batches, hidden)]
        return engine.train_batch(iter(micro_batches))
    losses = []
    for index, (token_ids, labels) in enumerate(micro_batches):  # non-blocking from pinned memory; no host sync
        token_ids = token_ids.to(engine.device, non_blocking=True)
        extra = {} if teacher is None else {"teacher_hidden": teacher.hidden_states(token_ids)}
        loss = engine(token_ids, labels.to(engine.device, non_blocking=True), **extra)
        if index == len(micro_batches) - 1:
            arm(engine)  # the gradients are complete as this backward produces them: reduce them meanwhile
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().float())
    total = torch.stack(losses).mean()  # on the model's device, as NCCL needs
    dist.all_reduce(total, group=engine.mpu.get_data_parallel_group())
    return total / engine.mpu.get_data_parallel_world_size()


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


def score_batches(engine, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """head_scores of every sequence of these micro-batches (labels IGNORE where nothing is scored):
    (micro-batches x micro_batch_size, 2) on every rank of this model replica. Nothing is updated.

    Every data-parallel rank must call this equally often with as many micro-batches (ZeRO-3
    gathers parameters over them in each forward; the pipeline engine starts with a barrier)."""
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from megatron.core import parallel_state

    if not isinstance(engine, PipelineEngine):
        engine.eval()
        with torch.no_grad():
            scores = torch.cat([engine(token_ids.to(engine.device), labels.to(engine.device), scores=True)
                                for token_ids, labels in micro_batches])
        engine.train()
        return scores
    from pretrain.parallel.pipeline import pipeline_scores

    # The last stage's outputs become the scores, one tensor per micro-batch. The engine would also add
    # each to its running training loss (a scalar, kept aside), and with DeepSpeed's own monitor on it
    # would broadcast them as one scalar loss (turned off meanwhile).
    monitor, loss_fn = engine.monitor.enabled, engine.module.loss_fn
    engine.module.loss_fn, training_loss, engine.total_loss, engine.monitor.enabled = \
        pipeline_scores, engine.total_loss, None, False
    try:
        outputs = engine.eval_batch(iter(micro_batches), reduce_output=None, bcast_loss=False,
                                    num_micro_batches=len(micro_batches))
    finally:
        engine.module.loss_fn, engine.total_loss, engine.monitor.enabled = loss_fn, training_loss, monitor
    rows = len(micro_batches) * micro_batches[0][0].shape[0]
    scores = torch.cat(outputs) if engine.is_last_stage() else torch.empty(rows, 2, dtype=torch.float64,
                                                                          device=engine.device)
    dist.broadcast(scores, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return scores
