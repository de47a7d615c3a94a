"""AdamW that skips an update, on every rank at once, when any gradient is non-finite.

DeepSpeed's fp16 loss scaler already skips overflowing steps; in bf16 and fp32
nothing does, and one NaN gradient would poison the weights for good. DeepSpeed
calls this optimizer's `step` on every rank once per training step (with ZeRO, on
each rank's partition), so a MAX all-reduce of a local "non-finite" flag makes all
ranks skip together and keeps replicas identical.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.parallel.distributed import collective_device


class SkipNonFiniteAdamW(torch.optim.AdamW):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped_last_step = False

    def _any_non_finite(self) -> bool:
        sums = [p.grad.float().sum() for group in self.param_groups for p in group["params"] if p.grad is not None]
        flag = torch.zeros(1, device=collective_device())
        if sums:  # a sum over all gradients is non-finite if any element is (NaN and inf propagate)
            flag += (~torch.isfinite(torch.stack(sums).sum())).float().to(flag.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @torch.no_grad()
    def step(self, closure=None):
        self.skipped_last_step = self._any_non_finite()
        if self.skipped_last_step:
            return None
        return super().step(closure)
