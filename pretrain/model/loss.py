"""The output head and the language-model loss in one step, a chunk of tokens at a time.

The plain way, `vocab_parallel_cross_entropy(lm_head(x).float(), labels)`, holds the
logits of the whole micro-batch three times over: in the model's dtype, as an fp32
copy, and as the fp32 softmax kept for backward. For GPT-2's 50,304-token vocabulary
and a 4 x 1024 micro-batch that is 0.4 + 0.8 + 0.8 GB, the largest tensors of a
124M-parameter step.

Here the tokens are taken `chunk_tokens` at a time: the chunk's logits are computed,
turned into its loss and, at once, into its gradients with respect to the hidden
states and the tied embedding, then dropped. Backward only scales those gradients by
the incoming one. The fp32 arithmetic (max, exp, sum, log, softmax) is megatron-core's
VocabParallelCrossEntropy, chunk by chunk, including its all-reduces over the
tensor-parallel ranks, which hold one slice of the vocabulary each. The matmuls are
the ones autograd would run (logits in the model's dtype), so the loss is the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# fp32 logits per chunk, in elements: 2^26 = 256 MiB; a few chunks per micro-batch.
CHUNK_ELEMENTS = 2**26


def _tensor_parallel() -> tuple:
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


class _HeadCrossEntropy(torch.autograd.Function):
    """mean over tokens of cross_entropy(hidden @ weight.T, labels), vocabulary split over TP ranks."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, padding_start: int, chunk_tokens: int, wants_grad: bool):
        from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as ops
        from megatron.core.tensor_parallel.utils import VocabUtility

        group, rank, world = _tensor_parallel()
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(weight.shape[0], rank, world)
        tokens = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if wants_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_grad else None
        for start in range(0, tokens, chunk_tokens):
            chunk, target = hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens]
            logits = chunk @ weight.t()  # (n, V / tp) in the model's dtype, as F.linear gives
            logits[:, padding_start:] = float("-inf")  # vocabulary padding takes no part
            logits, logits_max = ops.calculate_logits_max(logits)  # fp32 from here on
            _all_reduce(logits_max, dist.ReduceOp.MAX, group, world)
            target_mask, target_1d, predicted, sum_exp, exp_logits = ops.calculate_predicted_logits(
                logits, target, logits_max, vocab_start, vocab_end)
            _all_reduce(predicted, dist.ReduceOp.SUM, group, world)
            _all_reduce(sum_exp, dist.ReduceOp.SUM, group, world)
            softmax, loss = ops.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
            total += loss.sum()
            if wants_grad:  # d(sum of losses)/d(logits) = softmax - one_hot; the 1 / tokens comes in backward
                grad_2d, rows, not_elsewhere, grad_logits = ops.prepare_gradient_calculation_operands(softmax,
                                                                                                   target_mask)
                grad_2d[rows, target_1d] -= not_elsewhere
                # Unscaled, so that fp16 does not flush these small values to zero before the loss scale
                # (which only backward knows) multiplies them; each entry is at most 1 in size.
                grad_logits = grad_logits.to(hidden.dtype)
                grad_hidden[start:start + chunk_tokens] = grad_logits @ weight  # (n, C)
                grad_weight.add_(grad_logits.t() @ chunk)  # (V / tp, C), summed in fp32
                del grad_2d, grad_logits
            del logits, exp_logits, softmax  # before the next chunk's logits exist: one chunk at a time
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype, ctx.tokens = weight.dtype, tokens
        return total / tokens

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.float() / ctx.tokens  # the mean, and any loss scale or 1 / accumulation steps
        return ((grad_hidden.float() * scale).to(grad_hidden.dtype), (grad_weight * scale).to(ctx.weight_dtype),
                None, None, None, None)


def _all_reduce(tensor: torch.Tensor, op, group, world: int) -> None:
    if world > 1:
        dist.all_reduce(tensor, op=op, group=group)


def head_loss(x: torch.Tensor, embedding, labels: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean next-token cross entropy of the tied output head on hidden states x (B, T, C).

    `embedding` is the model's WordEmbedding (its weight is this rank's vocabulary slice,
    (V / tp, C)); gradients reach both x and that weight.
    """
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    weight = embedding.word.weight
    hidden = copy_to_tensor_model_parallel_region(x).reshape(-1, x.shape[-1])  # (B T, C); backward: TP all-reduce
    chunk_tokens = chunk_tokens or max(1, CHUNK_ELEMENTS // weight.shape[0])
    # Decided here: inside Function.forward grad mode is always off, and needs_input_grad is
    # true under no_grad too; evaluation must not pay for gradients.
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _HeadCrossEntropy.apply(hidden, weight, labels.reshape(-1), embedding.padding_start, chunk_tokens,
                                   wants_grad)


IGNORE = -1
"""A label that head_scores leaves out: the positions of a request's context and of padding."""


@torch.no_grad()
def head_scores(x: torch.Tensor, embedding, labels: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
    """Per sequence of hidden states x (B, T, C), over the positions whose label is not IGNORE:
    (B, 2) fp64 of [sum of log p(label), positions where the label is not the argmax].

    The log-likelihood scoring of zero-shot tasks (pretrain/evaluation.py's ModelScorer) with the
    vocabulary split over tensor-parallel ranks; every rank gets the whole figures. The logits are
    fp32 whatever the model's dtype (bf16 logits tie often), and the argmax is the first index of
    the maximum, as torch's and the harness's; a NaN logit is never the argmax."""
    from megatron.core.tensor_parallel.utils import VocabUtility

    group, rank, world = _tensor_parallel()
    weight = embedding.word.weight.float()  # (V / tp, C): this rank's slice of the vocabulary
    vocab_start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(weight.shape[0], rank, world)
    hidden, labels = x.reshape(-1, x.shape[-1]), labels.reshape(-1)
    chunk_tokens = chunk_tokens or max(1, CHUNK_ELEMENTS // weight.shape[0])
    logprob = torch.empty(hidden.shape[0], dtype=torch.float64, device=hidden.device)
    missed = torch.empty_like(logprob)
    for start in range(0, hidden.shape[0], chunk_tokens):
        target = labels[start:start + chunk_tokens].clamp(min=0)
        logits = hidden[start:start + chunk_tokens].float() @ weight.t()  # (n, V / tp)
        logits[:, embedding.padding_start:] = float("-inf")  # vocabulary padding takes no part
        local_max, local_argmax = logits.max(dim=-1)
        top = local_max.clone()
        _all_reduce(top, dist.ReduceOp.MAX, group, world)
        # the first index holding the maximum, over all ranks (a NaN maximum matches nothing: not greedy)
        first = torch.where(local_max == top, vocab_start + local_argmax, torch.iinfo(torch.long).max)
        _all_reduce(first, dist.ReduceOp.MIN, group, world)
        local = target - vocab_start
        mine = (local >= 0) & (local < weight.shape[0])
        target_logit = torch.where(mine, logits.gather(1, local.clamp(0, weight.shape[0] - 1)[:, None])[:, 0], 0.0)
        _all_reduce(target_logit, dist.ReduceOp.SUM, group, world)
        sum_exp = torch.exp(logits - top[:, None]).sum(dim=-1)
        _all_reduce(sum_exp, dist.ReduceOp.SUM, group, world)
        logprob[start:start + chunk_tokens] = (target_logit - top - torch.log(sum_exp)).double()
        missed[start:start + chunk_tokens] = (first != target).double()
        del logits
    kept = (labels != IGNORE).double()
    return torch.stack([(logprob * kept).view(x.shape[:2]).sum(1), (missed * kept).view(x.shape[:2]).sum(1)], dim=1)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    padding_start: int) -> torch.Tensor:
    """T^2 x mean over tokens of KL(teacher || student), both softened by the temperature T (Hinton et
    al. 2015; DistilGPT2's soft-target term), from vocabulary-parallel logits (n, V / tp).

    Each rank holds one slice of the vocabulary; the softmax normalizers and the KL's sum over the
    vocabulary are all-reduced over tensor-parallel ranks, so no rank gathers the full logits.
    Columns from `padding_start` on are vocabulary padding: they take no part (probability 0 for
    both). The arithmetic is fp32; the gradient reaches the student's logits only, as
    T x (softmax(student / T) - softmax(teacher / T)) / n, the T^2 scaling keeping its size
    independent of T.
    """
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    group, _, world = _tensor_parallel()
    valid = torch.arange(student_logits.shape[-1], device=student_logits.device) < padding_start

    def log_softmax(logits: torch.Tensor) -> torch.Tensor:
        scaled = (logits.float() / temperature).masked_fill(~valid, float("-inf"))
        top = scaled.detach().max(dim=-1).values  # a shift for stability only: no gradient through it
        _all_reduce(top, dist.ReduceOp.MAX, group, world)
        shifted = scaled - top[:, None]
        total = _SumOverRanks.apply(shifted.exp().sum(dim=-1), group, world)  # the whole vocabulary's
        return shifted - torch.log(total)[:, None]

    log_student = log_softmax(student_logits)
    with torch.no_grad():
        log_teacher = log_softmax(teacher_logits)
    terms = torch.where(valid, log_teacher.exp() * (log_teacher - log_student), 0.0)  # (n, V / tp)
    # The KL's sum over the vocabulary: all-reduced forward; backward leaves each rank its own slice's
    # share, since every rank differentiates the same replicated loss (megatron-core's reduce_from).
    kl = reduce_from_tensor_model_parallel_region(terms.sum(dim=-1))  # (n,)
    return temperature**2 * kl.mean()


class _SumOverRanks(torch.autograd.Function):
    """An all-reduce (sum) whose gradient is all-reduced too: the softmax normalizer, which every
    rank's slice of the loss depends on, so its gradient gathers contributions from every rank."""

    @staticmethod
    def forward(ctx, tensor, group, world: int):
        ctx.group, ctx.world = group, world
        tensor = tensor.clone()
        _all_reduce(tensor, dist.ReduceOp.SUM, group, world)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        _all_reduce(grad, dist.ReduceOp.SUM, ctx.group, ctx.world)
        return grad, None, None
