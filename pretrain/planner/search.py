"""Every layout of a model on a cluster: the ones that cannot run, each with its reason, and the
ones that can, with their memory and time, ranked fastest first among those that fit."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass

from pretrain.model.shape import GPTConfig
from pretrain.parallel.deepspeed_config import gradient_dtype_refusal
from pretrain.parallel.layout import LayoutError, ParallelLayout
from pretrain.planner.hardware import Cluster
from pretrain.planner.memory import GIB, MemoryEstimate, RunShape, peak_memory
from pretrain.planner.timing import COMPUTE_EFFICIENCY, StepTime, step_time

# What a GPU holds outside PyTorch's allocations: the CUDA context and NCCL's buffers (about
# 1 GiB), and the caching allocator's fragmentation (a few percent of what it holds). Assumed.
CONTEXT_GIB = 1.0
FRAGMENTATION = 0.05
NEAR_TIE = 0.02


@dataclass(frozen=True)
class Candidate:
    run: RunShape
    memory: MemoryEstimate
    time: StepTime
    fits: bool

    @property
    def layout(self) -> ParallelLayout:
        return self.run.layout

    def settings(self, extra: list[str] = ()) -> list[str]:
        """The trainer's --set overrides for this layout, then `extra` (the model and precision planned)."""
        layout = self.layout
        return [f"parallel.tensor_parallel_size={layout.tensor_parallel_size}",
                f"parallel.pipeline_parallel_size={layout.pipeline_parallel_size}",
                f"parallel.zero_stage={layout.zero_stage}", f"parallel.micro_batch_size={layout.micro_batch_size}",
                f"parallel.global_batch_size={layout.global_batch_size}",
                f"model.activation_checkpointing={self.run.activation_checkpointing}",
                f"train.gradient_dtype={self.run.gradient_dtype}", *extra]

    def to_dict(self, extra: list[str] = ()) -> dict:
        layout = self.layout
        return {
            "tensor_parallel_size": layout.tensor_parallel_size, "pipeline_parallel_size": layout.pipeline_parallel_size,
            "data_parallel_size": layout.data_parallel_size, "zero_stage": layout.zero_stage,
            "micro_batch_size": layout.micro_batch_size,
            "gradient_accumulation_steps": layout.gradient_accumulation_steps,
            "activation_checkpointing": self.run.activation_checkpointing, "gradient_dtype": self.run.gradient_dtype,
            "fits": self.fits, "memory_gib": self.memory.gib(), "peak_stage": self.memory.stage,
            "peak_moment": self.memory.moment, "optimizer_path": self.run.optimizer,
            "step_seconds": self.time.seconds, "step_seconds_by_part": self.time.parts(),
            "data_parallel_hidden_seconds": self.time.data_parallel_hidden,
            "tokens_per_second": self.time.tokens_per_second, "mfu": self.time.mfu, "settings": self.settings(extra),
        }


def usable_gib(cluster: Cluster) -> float:
    return cluster.gpu.memory_gib * (1 - FRAGMENTATION) - CONTEXT_GIB


def evaluate(run: RunShape, cluster: Cluster, efficiency: float = COMPUTE_EFFICIENCY) -> Candidate:
    memory = peak_memory(run)
    return Candidate(run, memory, step_time(run, cluster, efficiency), memory.total / GIB <= usable_gib(cluster))


def refusal(run: RunShape) -> str | None:
    """Why the trainer would refuse this layout (its own checks), or None."""
    try:
        run.layout.validate(run.model)
    except LayoutError as error:
        return str(error)
    return gradient_dtype_refusal(run.precision, run.gradient_dtype, run.layout.zero_stage)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_runs(model_for_tp, cluster: Cluster, global_batch_size: int, precision: str = "bf16",
                   gradient_dtype: str = "fp32"):
    """Every combination tried: TP over the divisors of the world and of the heads (those that do
    not fit both are tried once, to be refused), PP over the world's divisors up to the layer
    count, ZeRO 0-3, micro-batches in powers of two, with and without activation checkpointing.
    `model_for_tp(tp)` gives the model padded for TP."""
    world = cluster.world_size
    probe: GPTConfig = model_for_tp(1)
    for tp in sorted(set(_divisors(world)) | set(_divisors(probe.n_head))):
        model = model_for_tp(tp) if world % tp == 0 else probe
        if world % tp or model.n_head % tp:
            yield RunShape(model, ParallelLayout(world, tp, 1, 1, 1, global_batch_size), precision, gradient_dtype)
            continue
        for pp in _divisors(world // tp):
            if pp > model.n_layer:
                continue
            dp = world // (tp * pp)
            for zero in (0, 1, 2, 3) if dp > 1 else (0, 1):  # without data parallelism ZeRO-2/3 split nothing
                micro = 1
                while micro * dp <= global_batch_size:
                    for checkpointing in (0, 1):
                        layout = ParallelLayout(world, tp, pp, zero, micro, global_batch_size)
                        yield RunShape(model, layout, precision, gradient_dtype, checkpointing)
                    micro *= 2


@dataclass
class Plan:
    cluster: Cluster
    ranked: list[Candidate]
    """Layouts that run, those that fit first, fastest first."""
    refused: Counter
    """Kind of reason -> how many combinations it ruled out."""
    examples: dict
    """Kind of reason -> the first message of that kind."""

    @property
    def recommended(self) -> Candidate | None:
        """The simplest of the layouts that fit within NEAR_TIE of the fastest: the time model has no
        per-layer gather latency nor pipeline-engine overhead, so smaller gaps decide nothing."""
        fitting = [c for c in self.ranked if c.fits]
        if not fitting:
            return None
        close = [c for c in fitting if c.time.tokens_per_second >= (1 - NEAR_TIE) * fitting[0].time.tokens_per_second]
        return min(close, key=lambda c: (c.layout.zero_stage, c.layout.pipeline_parallel_size,
                                         c.layout.tensor_parallel_size, c.run.activation_checkpointing,
                                         -c.time.tokens_per_second))


def plan_layouts(model_for_tp, cluster: Cluster, global_batch_size: int, precision: str = "bf16",
                 efficiency: float = COMPUTE_EFFICIENCY, gradient_dtype: str = "fp32") -> Plan:
    ranked, refused, examples = [], Counter(), {}
    for run in candidate_runs(model_for_tp, cluster, global_batch_size, precision, gradient_dtype):
        reason = refusal(run)
        if reason:
            kind = _reason_kind(reason)
            refused[kind] += 1
            examples.setdefault(kind, reason)
            continue
        ranked.append(evaluate(run, cluster, efficiency))
    ranked.sort(key=lambda c: (not c.fits, -c.time.tokens_per_second, c.memory.total))
    return Plan(cluster, ranked, refused, examples)


def _reason_kind(reason: str) -> str:
    """Refusals that differ only in their numbers are one kind."""
    return re.sub(r"\d+", "N", reason.split(";")[0])


def why_recommended(plan: Plan) -> str:
    best = plan.recommended
    if best is None:
        return "no layout fits: use more GPUs, larger ones, or a smaller model"
    fitting = [c for c in plan.ranked if c.fits]
    layout = best.layout
    if best is fitting[0]:
        speed = f"the fastest of {len(fitting)} layouts that fit"
    else:
        speed = (f"within {NEAR_TIE:.0%} of the fastest of {len(fitting)} layouts that fit ({describe(fitting[0])}), "
                 "and simpler (lower ZeRO stage, fewer stages)")
    reasons = [f"{speed} ({best.time.tokens_per_second:,.0f} tokens/s, "
               f"{best.memory.total / GIB:.1f} of {usable_gib(plan.cluster):.1f} usable GiB per GPU)"]
    if layout.tensor_parallel_size == 1 and layout.pipeline_parallel_size == 1:
        reasons.append("the model fits without tensor or pipeline parallelism, which would add an all-reduce "
                       "per layer or a pipeline bubble")
    runner_up = next((c for c in fitting if c is not best
                      and dataclasses.astuple(c.layout) != dataclasses.astuple(layout)), None)
    if runner_up is not None and best is fitting[0]:
        gap = best.time.tokens_per_second / runner_up.time.tokens_per_second - 1
        reasons.append(f"{gap:.1%} ahead of the next ({describe(runner_up)})" if gap >= 0.001 else
                       f"as fast as the next ({describe(runner_up)}) and no larger in memory")
    return "; ".join(reasons)


def describe(candidate: Candidate) -> str:
    layout = candidate.layout
    checkpointing = ", activation checkpointing" if candidate.run.activation_checkpointing else ""
    return (f"TP {layout.tensor_parallel_size} x PP {layout.pipeline_parallel_size} x DP {layout.data_parallel_size}, "
            f"ZeRO-{layout.zero_stage}, micro batch {layout.micro_batch_size} x {layout.gradient_accumulation_steps}"
            f"{checkpointing}")
