"""The parallel layout: one object, validated once at start-up.

world size = tensor x pipeline x data parallel; micro batch x gradient
accumulation x data parallel = global batch. Every check names the setting to
change (the `parallel.*` keys of the training config) and, where it can, the
values that would work.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.model.shape import GPTConfig


class LayoutError(ValueError):
    """An impossible parallel layout; the message names the setting to change."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    zero_stage: int = 1
    micro_batch_size: int = 1
    global_batch_size: int = 1

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_parallel_size * self.pipeline_parallel_size)

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def describe(self) -> str:
        return (f"TP={self.tensor_parallel_size} PP={self.pipeline_parallel_size} DP={self.data_parallel_size} "
                f"ZeRO-{self.zero_stage}, micro batch {self.micro_batch_size} x {self.gradient_accumulation_steps} "
                f"accumulation x {self.data_parallel_size} DP = global batch {self.global_batch_size}")

    def validate(self, model: GPTConfig) -> "ParallelLayout":
        """Raise LayoutError for the first impossible setting; return self when all hold."""
        tp, pp, world = self.tensor_parallel_size, self.pipeline_parallel_size, self.world_size
        for name, value in (("parallel.tensor_parallel_size", tp), ("parallel.pipeline_parallel_size", pp),
                            ("parallel.micro_batch_size", self.micro_batch_size),
                            ("parallel.global_batch_size", self.global_batch_size)):
            if value < 1:
                raise LayoutError(f"{name}={value} must be at least 1")
        if world % (tp * pp):
            raise LayoutError(
                f"world size {world} is not a multiple of parallel.tensor_parallel_size x "
                f"parallel.pipeline_parallel_size = {tp} x {pp} = {tp * pp}; change one of them or the number of processes"
            )
        if model.n_head % tp:
            valid = ", ".join(str(d) for d in _divisors(model.n_head))
            raise LayoutError(
                f"parallel.tensor_parallel_size={tp} does not divide the model's {model.n_head} attention heads; "
                f"choose one of {valid}"
            )
        if model.padded_vocab_size % (128 * tp):
            raise LayoutError(
                f"model.padded_vocab_size={model.padded_vocab_size} is not a multiple of 128 x "
                f"parallel.tensor_parallel_size = {128 * tp}; leave it unset and it is derived from the vocabulary"
            )
        if model.n_layer < pp:
            raise LayoutError(
                f"parallel.pipeline_parallel_size={pp} exceeds the model's {model.n_layer} layers; use at most {model.n_layer}"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise LayoutError(f"parallel.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if pp > 1 and self.zero_stage > 1:
            raise LayoutError(
                f"parallel.zero_stage={self.zero_stage} cannot be combined with pipeline parallelism "
                f"(parallel.pipeline_parallel_size={pp}): DeepSpeed supports only ZeRO-0/1 with pipelines. "
                "Set parallel.zero_stage=1, or parallel.pipeline_parallel_size=1 for ZeRO-2/3"
            )
        per_step = self.micro_batch_size * self.data_parallel_size
        if self.global_batch_size % per_step:
            raise LayoutError(
                f"parallel.global_batch_size={self.global_batch_size} is not a multiple of parallel.micro_batch_size x "
                f"data parallel size = {self.micro_batch_size} x {self.data_parallel_size} = {per_step}; "
                f"use a multiple of {per_step}"
            )
        return self
