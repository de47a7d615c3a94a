"""The distillation objective of the output head, (1 - alpha) x cross entropy + alpha x T^2 x
KL(teacher || student) [+ w x (1 - cosine) of the last hidden states], computed chunk by chunk over
vocabulary-parallel logits, equals torch's on the full logits, in value and gradient, on one rank and
split over two tensor-parallel ranks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.pretrain.ranks import start_ranks

VOCAB, REAL = 512, 500  # the last 12 rows of the embeddings are vocabulary padding
TOKENS, WIDTH, TEACHER_WIDTH = 10, 16, 24


def inputs(seed: int = 0) -> dict:
    """Hidden states, tied embeddings (padding rows zero, as the model's) and labels; the teacher sharper."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=generator, dtype=torch.float64).float()

    weight, teacher_weight = normal(VOCAB, WIDTH), normal(VOCAB, TEACHER_WIDTH)
    weight[REAL:], teacher_weight[REAL:] = 0, 0
    return {"hidden": normal(TOKENS, WIDTH), "weight": weight, "teacher_hidden": normal(TOKENS, TEACHER_WIDTH, scale=2),
            "teacher_weight": teacher_weight, "labels": torch.randint(0, REAL, (TOKENS,), generator=generator)}


def reference(data: dict, temperature: float, alpha: float, cosine_weight: float = 0.0) -> dict:
    """torch's cross entropy and KL on the full logits of the real vocabulary."""
    hidden, weight = data["hidden"].clone().requires_grad_(True), data["weight"].clone().requires_grad_(True)
    student = (hidden @ weight.t())[:, :REAL]
    teacher = (data["teacher_hidden"] @ data["teacher_weight"].t())[:, :REAL]
    cross_entropy = F.cross_entropy(student, data["labels"])
    divergence = F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                          log_target=True, reduction="batchmean")
    loss = (1 - alpha) * cross_entropy + alpha * temperature**2 * divergence
    if cosine_weight:
        cosine = (1 - F.cosine_similarity(hidden, data["teacher_hidden"][:, :WIDTH], dim=-1)).mean()
        loss = loss + cosine_weight * cosine
    loss.backward()
    return {"loss": loss.item(), "cross_entropy": cross_entropy.item(), "kl": divergence.item(),
            "grad_hidden": hidden.grad, "grad_weight": weight.grad}


def ours(data: dict, temperature: float, alpha: float, cosine_weight: float = 0.0, rows: slice = slice(None),
         padding_start: int = REAL, chunk_tokens: int | None = 3) -> dict:
    """head_loss on this rank's rows of the embeddings (rows: its vocabulary slice), in chunks of 3 tokens."""
    from pretrain.model.loss import Distillation, head_loss

    hidden = data["hidden"].clone().requires_grad_(True)
    weight = data["weight"][rows].clone().requires_grad_(True)
    embedding = SimpleNamespace(word=SimpleNamespace(weight=weight), padding_start=padding_start)
    teacher = SimpleNamespace(word=SimpleNamespace(weight=data["teacher_weight"][rows]))
    distillation = Distillation(teacher, temperature, alpha, cosine_weight)
    teacher_hidden = data["teacher_hidden"][:, :WIDTH] if cosine_weight else data["teacher_hidden"]
    if cosine_weight:  # the cosine term needs equal widths: the teacher's first WIDTH features, its head all
        distillation.embedding = SimpleNamespace(word=SimpleNamespace(weight=data["teacher_weight"][rows, :WIDTH]))
    loss = head_loss(hidden[None], embedding, data["labels"][None], chunk_tokens=chunk_tokens,
                     distillation=distillation, teacher_hidden=teacher_hidden[None])
    loss.backward()
    cross_entropy, divergence, cosine, micro_batches = distillation.take("cpu").tolist()
    return {"loss": loss.item(), "cross_entropy": cross_entropy, "kl": divergence, "cosine": cosine,
            "micro_batches": micro_batches, "grad_hidden": hidden.grad, "grad_weight": weight.grad}


def assert_matches(result: dict, expected: dict, columns: slice = slice(None)) -> None:
    for key in ("loss", "cross_entropy", "kl"):
        assert result[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    torch.testing.assert_close(result["grad_hidden"], expected["grad_hidden"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["grad_weight"][:REAL], expected["grad_weight"][columns][:REAL], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.5), (4.0, 0.9), (2.0, 1.0)])
def test_objective_equals_torch_on_the_full_vocabulary(single_process_group, temperature, alpha):
    data = inputs()
    result = ours(data, temperature, alpha)
    assert_matches(result, reference(data, temperature, alpha))
    assert torch.all(result["grad_weight"][REAL:] == 0)  # padding takes no part
    assert result["micro_batches"] == 1


def test_hidden_cosine_term_adds_its_weighted_value_and_gradient(single_process_group):
    data = inputs(1)
    narrow = {**data, "teacher_hidden": data["teacher_hidden"][:, :WIDTH], "teacher_weight": data["teacher_weight"][:, :WIDTH]}
    result = ours(data, 2.0, 0.5, cosine_weight=0.7)
    expected = reference(narrow, 2.0, 0.5, cosine_weight=0.7)
    assert_matches(result, expected)
    cosine = (1 - F.cosine_similarity(data["hidden"], data["teacher_hidden"][:, :WIDTH], dim=-1)).mean().item()
    assert result["cosine"] == pytest.approx(cosine, rel=1e-6)


def test_alpha_zero_is_bit_for_bit_the_plain_head(single_process_group, monkeypatch):
    """Each with its own default chunks (3 tokens here): the same sums in the same order."""
    from pretrain.model import loss

    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 3 * VOCAB)
    data = inputs(2)
    hidden, weight = data["hidden"].clone().requires_grad_(True), data["weight"].clone().requires_grad_(True)
    embedding = SimpleNamespace(word=SimpleNamespace(weight=weight), padding_start=REAL)
    plain = loss.head_loss(hidden[None], embedding, data["labels"][None])
    plain.backward()
    distilled = ours(data, 2.0, 0.0, chunk_tokens=None)
    assert distilled["loss"] == plain.item() and distilled["cross_entropy"] == pytest.approx(plain.item(), rel=1e-6)
    assert torch.equal(distilled["grad_hidden"], hidden.grad) and torch.equal(distilled["grad_weight"], weight.grad)


def test_a_teacher_equal_to_the_student_has_no_divergence(single_process_group):
    data = inputs(3)
    same = {**data, "teacher_hidden": data["hidden"], "teacher_weight": data["weight"]}
    assert ours(same, 2.0, 1.0)["kl"] == pytest.approx(0.0, abs=1e-6)


def _tensor_parallel_worker(rank: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    from pretrain.parallel.distributed import init_distributed, initialize_model_parallel
    from pretrain.parallel.layout import ParallelLayout

    init_distributed("gloo")
    initialize_model_parallel(ParallelLayout(2, tensor_parallel_size=2, global_batch_size=1))
    half = VOCAB // 2  # rank 1's slice holds the padding: its padding starts at REAL - half
    result = ours(inputs(), 2.0, 0.6, rows=slice(rank * half, (rank + 1) * half),
                  padding_start=REAL - rank * half if rank else half)
    result = {key: value.tolist() if isinstance(value, torch.Tensor) else value for key, value in result.items()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def test_objective_split_over_two_tensor_parallel_ranks_equals_the_whole(tmp_path):
    start_ranks(_tensor_parallel_worker, (str(tmp_path),), 2)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    expected = reference(inputs(), 2.0, 0.6)
    half = VOCAB // 2
    for rank, result in enumerate(ranks):
        result = {key: torch.tensor(value) if isinstance(value, list) else value for key, value in result.items()}
        assert_matches(result, expected, columns=slice(rank * half, (rank + 1) * half))
