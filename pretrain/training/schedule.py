"""Learning-rate schedule: linear warm-up, then cosine or linear decay to a floor,
counted in optimizer steps or in tokens."""

from __future__ import annotations

import math

from pretrain.config import Config


def lr_multiplier(step: int, config: Config) -> float:
    """Multiplier on optim.lr for optimizer step `step` (0-based)."""
    schedule = config.schedule
    tokens_per_step = config.parallel.global_batch_size * config.model.n_positions
    position = step * tokens_per_step if schedule.unit == "tokens" else step
    total = config.train.max_steps * (tokens_per_step if schedule.unit == "tokens" else 1)
    end = schedule.decay_end or total
    if schedule.warmup and position < schedule.warmup:
        return (position + 1) / schedule.warmup
    if schedule.decay == "constant":
        return 1.0
    progress = min(1.0, (position - schedule.warmup) / max(1, end - schedule.warmup))
    floor = schedule.min_lr_ratio
    if schedule.decay == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
