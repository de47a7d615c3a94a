"""AdamW that skips an update, on every rank at once, when any gradient is non-finite.

One decision per optimizer step, whatever the precision and ZeRO stage:

- a hook on every parameter looks at each gradient as backward produces it (per
  micro-batch, on the device, no host synchronization) and keeps a local
  "non-finite seen" flag;
- the first time the inner optimizer's `step` is called in an optimizer step,
  one MAX all-reduce of that flag over all ranks decides; later calls in the same
  step (ZeRO calls the inner optimizer once per parameter group) reuse the decision;
- the trainer calls `finish_step()` after the step, which reports the decision and
  starts the next step afresh.

The hooks see full gradients before ZeRO partitions or reduces them, so every
stage sees the same thing. Where a DeepSpeed wrapper checks by itself
(BF16_Optimizer's non-finite gradient norm, the fp16 loss scaler) it skips on the
same condition before reaching this optimizer; the trainer counts both (its
`engine.skipped_steps`). The learning rate is set by the trainer from the step
number alone, so a skipped step advances the schedule either way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.parallel.distributed import collective_device


class NonFiniteGradientGuard:
    """Watches gradients during backward; decides once per optimizer step whether to skip it."""

    def __init__(self, parameters):
        self._seen: torch.Tensor | None = None  # bool scalar on the gradients' device
        self._decision: bool | None = None
        self.decisions = 0  # how many times the ranks agreed (one per optimizer step reaching the optimizer)
        for parameter in parameters:
            if parameter.requires_grad:
                parameter.register_hook(self._observe)

    def _observe(self, grad: torch.Tensor) -> None:
        if self._decision is not None:  # a step decided without finish_step (DeepSpeed's set-up step): a new one
            self._seen, self._decision = None, None
        # One fp32 sum: NaN and inf propagate into it, and no gradient-sized temporary is made.
        non_finite = ~torch.isfinite(grad.sum(dtype=torch.float32))
        self._seen = non_finite if self._seen is None else self._seen | non_finite.to(self._seen.device)

    def must_skip(self) -> bool:
        """The agreed decision for this optimizer step; the first call makes it (a collective)."""
        if self._decision is None:
            flag = torch.zeros(1, device=collective_device())
            if self._seen is not None:
                flag += self._seen.float().to(flag.device)
            if dist.is_initialized():
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self._decision = bool(flag.item())
            self.decisions += 1
        return self._decision

    def finish_step(self) -> bool:
        """Whether this optimizer step was skipped here; forget it for the next step."""
        skipped = bool(self._decision)
        self._seen, self._decision = None, None
        return skipped


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """torch's AdamW, except that a step the guard rejects changes neither weights nor moments."""

    def __init__(self, param_groups, **kwargs):
        super().__init__(param_groups, **kwargs)
        self.guard = NonFiniteGradientGuard(p for group in self.param_groups for p in group["params"])

    @torch.no_grad()
    def step(self, closure=None):
        if self.guard.must_skip():
            return None
        return super().step(closure)
