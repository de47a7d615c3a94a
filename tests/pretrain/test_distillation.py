"""The distillation loss's soft-target term: T^2 x KL(teacher || student) over the vocabulary-parallel
logits equals torch's KL on the full logits, in value and gradient, on one rank and split over two."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from pretrain.parallel.distributed import free_port

VOCAB, REAL = 512, 500  # the last 12 columns are vocabulary padding


def logits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits (tokens, VOCAB), the teacher sharper, as a trained one is."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(8, VOCAB, generator=generator, dtype=torch.float64).float()
    teacher = 3 * torch.randn(8, VOCAB, generator=generator, dtype=torch.float64).float()
    return student, teacher


def reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> tuple[float, torch.Tensor]:
    """torch's KL on the real vocabulary; the gradient on the padding columns is 0."""
    student = student.clone().requires_grad_(True)
    loss = temperature**2 * F.kl_div(F.log_softmax(student[:, :REAL] / temperature, dim=-1),
                                     F.log_softmax(teacher[:, :REAL] / temperature, dim=-1),
                                     log_target=True, reduction="batchmean")
    loss.backward()
    return loss.item(), student.grad


def ours(student: torch.Tensor, teacher: torch.Tensor, temperature: float, padding_start: int):
    from pretrain.model.loss import distillation_kl

    student = student.clone().requires_grad_(True)
    loss = distillation_kl(student, teacher, temperature, padding_start)
    loss.backward()
    return loss.item(), student.grad


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_equals_torch_on_the_full_vocabulary(single_process_group, temperature):
    student, teacher = logits(0)
    loss, grad = ours(student, teacher, temperature, REAL)
    expected_loss, expected_grad = reference(student, teacher, temperature)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert torch.all(grad[:, REAL:] == 0)  # padding takes no part
    assert ours(teacher, teacher, temperature, REAL)[0] == pytest.approx(0.0, abs=1e-6)  # KL(p || p) = 0


def _tensor_parallel_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    from pretrain.parallel.distributed import init_distributed, initialize_model_parallel
    from pretrain.parallel.layout import ParallelLayout

    init_distributed("gloo")
    initialize_model_parallel(ParallelLayout(2, tensor_parallel_size=2, global_batch_size=1))
    student, teacher = logits(0)
    half = VOCAB // 2  # rank 1's slice holds the padding: its padding starts at REAL - half
    mine = slice(rank * half, (rank + 1) * half)
    padding_start = REAL - rank * half if rank else half
    loss, grad = ours(student[:, mine], teacher[:, mine], 2.0, padding_start)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"loss": loss, "grad": grad.tolist()}))
    dist.barrier()
    dist.destroy_process_group()


def test_kl_split_over_two_tensor_parallel_ranks_equals_the_whole(tmp_path):
    mp.start_processes(_tensor_parallel_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    student, teacher = logits(0)
    expected_loss, expected_grad = reference(student, teacher, 2.0)
    for result in ranks:
        assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    grad = torch.cat([torch.tensor(result["grad"]) for result in ranks], dim=1)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
