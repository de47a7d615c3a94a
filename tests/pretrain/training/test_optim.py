"""Non-finite gradients: every rank skips the update together, then training goes on.
(Under DeepSpeed engines, every precision and ZeRO stage: tests/pretrain/test_numerics.py.)"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pretrain.training.optim import SkipNonFiniteAdamW
from tests.pretrain.ranks import start_ranks


def _rank(rank: int, out: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=2)
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = SkipNonFiniteAdamW([weight], lr=0.1)
    history = []
    for step, poisoned in enumerate([True, False]):
        x = torch.full((4,), 0.5)
        if poisoned and rank == 1:  # only one rank sees the NaN
            x[2] = float("nan")
        (weight * x).sum().backward()
        optimizer.step()
        history.append((optimizer.guard.finish_step(), weight.detach().clone()))
        optimizer.zero_grad()
    torch.save(history, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_all_ranks_skip_when_any_rank_has_a_non_finite_gradient(tmp_path):
    start_ranks(_rank, (str(tmp_path),), 2)
    for rank in (0, 1):
        (skipped_1, after_1), (skipped_2, after_2) = torch.load(tmp_path / f"rank{rank}.pt")
        assert skipped_1 and torch.equal(after_1, torch.ones(4))  # untouched, although rank 0's gradient was fine
        assert not skipped_2 and torch.all(after_2 < 1.0)  # the next, finite step updates
    assert torch.equal(torch.load(tmp_path / "rank0.pt")[1][1], torch.load(tmp_path / "rank1.pt")[1][1])


def test_adam_state_is_untouched_by_a_skipped_step():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = SkipNonFiniteAdamW([weight], lr=0.1)
    (weight * torch.tensor([1.0, float("inf"), 1.0])).sum().backward()
    optimizer.step()
    assert optimizer.guard.finish_step() and not optimizer.state[weight]  # no moments, no step count


def test_one_decision_per_step_and_a_new_backward_starts_a_new_one():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = SkipNonFiniteAdamW([weight], lr=0.1)
    weight.sum().backward()
    optimizer.step()
    optimizer.step()  # ZeRO calls the inner optimizer once per parameter group: the same decision
    assert optimizer.guard.decisions == 1
    # Without finish_step (DeepSpeed's own set-up step), the next backward still starts afresh.
    optimizer.zero_grad()
    (weight * float("nan")).sum().backward()
    before = weight.detach().clone()
    optimizer.step()
    assert optimizer.guard.decisions == 2 and torch.equal(weight, before)
