"""The scoring behind eval.tasks, against pretrain/inference/evaluation.py's ModelScorer on the same logits.
(The trainer end to end, in several layouts and against tools/evaluate.py: tests/pretrain/training/test_trainer.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pretrain.inference.evaluation import ModelScorer
from pretrain.model.loss import IGNORE, head_scores
from pretrain.training.tasks import fill_row

VOCAB, PADDED, WIDTH, WINDOW = 50, 64, 16, 12


def head(weight: torch.Tensor):
    """What head_scores reads of a WordEmbedding: the weight and where the vocabulary padding starts."""
    return SimpleNamespace(word=SimpleNamespace(weight=weight), padding_start=VOCAB)


def reference_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.t()
    logits[..., VOCAB:] = float("-inf")
    return logits


def test_head_scores_equal_model_scorer_including_ties_and_padding(single_process_group):
    """Requests packed as the trainer packs them (fill_row) score as ModelScorer scores them: the sum of
    log-probabilities, and greedy only where every target is the first index of the maximum. The
    stand-in model's hidden state is a table lookup of the current token; rows 3 and 7 of the
    vocabulary are equal and token 40's hidden state points along them: after 40, tokens 3 and 7 tie
    for the maximum, and 3 is the argmax, 7 is not."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(PADDED, WIDTH, generator=generator)
    weight[7] = weight[3]
    table = torch.randn(PADDED, WIDTH, generator=generator)
    table[40] = weight[3] * 4
    requests = [([11, 12, 40], [3]), ([1, 2, 3, 40], [7]), ([9] * 6, [3, 8, 21]), ([4], [30, 2]), ([40], [3, 40, 3])]
    expected = ModelScorer(lambda ids: reference_logits(table[ids], weight), WINDOW, batch_size=2)(requests)
    assert [greedy for _, greedy in expected][:2] == [True, False]  # the tie, each way

    ids = torch.zeros(len(requests), WINDOW, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    for row, request in enumerate(requests):
        fill_row(ids[row], labels[row], request)
    scores = head_scores(table[ids], head(weight), labels, chunk_tokens=5)  # chunks that cut through rows
    assert scores.dtype == torch.float64 and scores.shape == (len(requests), 2)
    assert scores[:, 0].tolist() == pytest.approx([logprob for logprob, _ in expected], rel=1e-5)
    assert [missed == 0 for missed in scores[:, 1].tolist()] == [greedy for _, greedy in expected]


def test_a_non_finite_model_is_never_greedy(single_process_group):
    weight = torch.randn(PADDED, WIDTH)
    hidden = torch.full((1, WINDOW, WIDTH), float("nan"))
    labels = torch.full((1, WINDOW), IGNORE)
    labels[0, 2] = 5
    scores = head_scores(hidden, head(weight), labels)
    assert torch.isnan(scores[0, 0]) and scores[0, 1] == 1


def test_fill_row_scores_the_continuation_at_the_positions_that_predict_it():
    ids, labels = torch.zeros(8, dtype=torch.long), torch.full((8,), IGNORE)
    fill_row(ids, labels, ([5, 6, 7], [8, 9]))
    assert ids.tolist() == [5, 6, 7, 8, 0, 0, 0, 0]  # context + continuation[:-1], then padding
    assert labels.tolist() == [IGNORE, IGNORE, 8, 9, IGNORE, IGNORE, IGNORE, IGNORE]
