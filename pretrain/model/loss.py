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

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

# fp32 logits per chunk, in elements: 2^26 = 256 MiB; a few chunks per micro-batch.
CHUNK_ELEMENTS = 2**26


def _tensor_parallel() -> tuple:
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


class _HeadLoss(torch.autograd.Function):
    """Summed over tokens: (1 - alpha) x cross_entropy(hidden @ weight.T, labels), plus, with a teacher
    (its last hidden states (B T, C_teacher) and `distillation`), alpha x T^2 x
    KL(softmax(teacher_logits / T) || softmax(student_logits / T)); the vocabulary split over TP ranks.
    Returns (objective, cross-entropy sum, KL sum), the last two for logging only."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, padding_start: int, chunk_tokens: int, wants_grad: bool,
                teacher_hidden: torch.Tensor | None, distillation: Distillation | None):
        from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as ops
        from megatron.core.tensor_parallel.utils import VocabUtility

        group, rank, world = _tensor_parallel()
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(weight.shape[0], rank, world)
        alpha = distillation.alpha if distillation is not None else 0.0
        tokens = hidden.shape[0]
        # Per token, summed once at the end: the sum does not depend on how the tokens are chunked.
        token_losses = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        divergence = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if wants_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_grad else None
        for start in range(0, tokens, chunk_tokens):
            chunk, target = hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens]
            logits = chunk @ weight.t()  # (n, V / tp) in the model's dtype, as F.linear gives
            logits[:, padding_start:] = float("-inf")  # vocabulary padding takes no part
            logits, logits_max = ops.calculate_logits_max(logits)  # fp32 from here on
            _all_reduce(logits_max, dist.ReduceOp.MAX, group, world)
            soft = None
            if distillation is not None:  # before megatron's arithmetic below turns the logits into exponentials
                span = slice(start, start + chunk_tokens)
                soft = _soft_targets(logits, logits_max, teacher_hidden[span], distillation.embedding.word.weight,
                                     distillation.temperature, padding_start, group, world)
                divergence += soft[0]
            target_mask, target_1d, predicted, sum_exp, exp_logits = ops.calculate_predicted_logits(
                logits, target, logits_max, vocab_start, vocab_end)
            _all_reduce(predicted, dist.ReduceOp.SUM, group, world)
            _all_reduce(sum_exp, dist.ReduceOp.SUM, group, world)
            softmax, loss = ops.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
            token_losses[start:start + chunk_tokens] = loss
            if wants_grad:  # d(sum of losses)/d(logits) = softmax - one_hot; the 1 / tokens comes in backward
                grad_2d, rows, not_elsewhere, grad_logits = ops.prepare_gradient_calculation_operands(softmax,
                                                                                                   target_mask)
                grad_2d[rows, target_1d] -= not_elsewhere
                if soft is not None:  # d(T^2 KL)/d(student logits) = T (p_student - p_teacher), real columns only
                    grad_logits.mul_(1 - alpha)
                    grad_logits[:, :padding_start].add_(soft[1], alpha=alpha * distillation.temperature)
                # Unscaled, so that fp16 does not flush these small values to zero before the loss scale
                # (which only backward knows) multiplies them; each entry is at most 1 (1 - alpha + alpha T
                # with a teacher) in size.
                grad_logits = grad_logits.to(hidden.dtype)
                grad_hidden[start:start + chunk_tokens] = grad_logits @ weight  # (n, C)
                grad_weight.add_(grad_logits.t() @ chunk)  # (V / tp, C), summed in fp32
                del grad_2d, grad_logits
            del logits, exp_logits, softmax, soft  # before the next chunk's logits exist: one chunk at a time
        cross_entropy = token_losses.sum()
        if distillation is not None:  # each rank summed its own slice of the vocabulary
            _all_reduce(divergence, dist.ReduceOp.SUM, group, world)
            divergence *= distillation.temperature**2
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype, ctx.tokens = weight.dtype, tokens
        ctx.mark_non_differentiable(cross_entropy, divergence)
        return (1 - alpha) * cross_entropy + alpha * divergence, cross_entropy, divergence

    @staticmethod
    def backward(ctx, grad_output, _cross_entropy, _divergence):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.float()  # the mean's 1 / tokens is in it, and any loss scale or 1 / accumulation
        return ((grad_hidden.float() * scale).to(grad_hidden.dtype), (grad_weight * scale).to(ctx.weight_dtype),
                None, None, None, None, None, None)


def _soft_targets(logits, logits_max, teacher_hidden, teacher_weight, T: float, padding_start: int, group, world):
    """For one chunk: (sum over its tokens and this rank's real columns of KL(teacher || student) at
    temperature T, p_student - p_teacher on those columns (n, padding_start)), both fp32.

    `logits` are the student's fp32 logits and `logits_max` their maximum over all ranks; max(z / T)
    is max(z) / T, so the same shift keeps exp() from overflowing. `teacher_hidden` is the chunk's
    (n, C_teacher), `teacher_weight` this rank's (V / tp, C_teacher). In place where it can be: each
    (n, V / tp) tensor is as large as the chunk."""
    log_student = logits[:, :padding_start].sub(logits_max[:, None]).div_(T)
    # the teacher's logits of the real vocabulary only, in its dtype, then fp32
    log_teacher = (teacher_hidden @ teacher_weight[:padding_start].t()).float()
    teacher_max = log_teacher.amax(dim=-1) if padding_start else log_teacher.new_full(log_teacher.shape[:1], -1e30)
    _all_reduce(teacher_max, dist.ReduceOp.MAX, group, world)
    log_teacher.sub_(teacher_max[:, None]).div_(T)
    p_student, p_teacher = log_student.exp(), log_teacher.exp()  # unnormalized so far
    sums = torch.stack([p_student.sum(dim=-1), p_teacher.sum(dim=-1)])  # (2, n)
    _all_reduce(sums, dist.ReduceOp.SUM, group, world)  # the whole vocabulary's normalizers
    log_student.sub_(sums[0].log()[:, None])
    log_teacher.sub_(sums[1].log()[:, None])
    p_student.div_(sums[0][:, None])
    p_teacher.div_(sums[1][:, None])
    divergence = log_teacher.sub_(log_student).mul_(p_teacher).sum()  # sum of p_t (log p_t - log p_s)
    return divergence, p_student.sub_(p_teacher)


def _all_reduce(tensor: torch.Tensor, op, group, world: int) -> None:
    if world > 1:
        dist.all_reduce(tensor, op=op, group=group)


def head_loss(x: torch.Tensor, embedding, labels: torch.Tensor, chunk_tokens: int | None = None,
              distillation: Distillation | None = None, teacher_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross entropy of the tied output head on hidden states x (B, T, C); while
    distilling (`distillation` and the teacher's last hidden states (B, T, C_teacher) both given), the
    distillation objective instead: (1 - alpha) x that + alpha x T^2 x KL(teacher || student)
    [+ hidden_cosine x (1 - cosine(x, teacher_hidden))], each term recorded in `distillation`.

    `embedding` is the model's WordEmbedding (its weight is this rank's vocabulary slice,
    (V / tp, C)); gradients reach both x and that weight.
    """
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    weight = embedding.word.weight
    hidden = copy_to_tensor_model_parallel_region(x).reshape(-1, x.shape[-1])  # (B T, C); backward: TP all-reduce
    distilling = distillation is not None and teacher_hidden is not None
    teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) if distilling else None  # (B T, C_teacher)
    # The same chunks with a teacher or without (its four or five more chunk-sized tensors, about 1.3 GB at
    # most, are the price): the gradients' sums then run in the same order, and alpha=0 is exactly the plain head.
    chunk_tokens = chunk_tokens or max(1, CHUNK_ELEMENTS // weight.shape[0])
    # Decided here: inside Function.forward grad mode is always off, and needs_input_grad is
    # true under no_grad too; evaluation must not pay for gradients.
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    objective, cross_entropy, divergence = _HeadLoss.apply(hidden, weight, labels.reshape(-1),
                                                           embedding.padding_start, chunk_tokens, wants_grad, teacher,
                                                           distillation if distilling else None)
    tokens = hidden.shape[0]
    loss = objective / tokens
    if distilling:
        cosine = None
        if distillation.hidden_cosine:  # x is whole on every TP rank: so is this term and its gradient
            cosine = (1 - F.cosine_similarity(x.float(), teacher_hidden.float(), dim=-1)).mean()
            loss = loss + distillation.hidden_cosine * cosine
        distillation.record(cross_entropy / tokens, divergence / tokens, cosine)
    return loss


@dataclass
class Distillation:
    """distill.* as the head needs them, with the frozen teacher's tied embedding (on the rank that
    holds the output head), and the sums of the objective's terms since `take` last ran."""

    embedding: torch.nn.Module
    """The teacher's WordEmbedding: its weight is this rank's slice of the teacher's vocabulary."""
    temperature: float
    alpha: float
    hidden_cosine: float
    sums: torch.Tensor | None = None
    """[cross entropy, KL at temperature T, 1 - cosine, micro-batches], fp32, summed over micro-batches."""

    def record(self, cross_entropy: torch.Tensor, divergence: torch.Tensor, cosine: torch.Tensor | None) -> None:
        terms = [cross_entropy, divergence / self.temperature**2, cosine if cosine is not None else 0.0 * divergence]
        row = torch.cat([torch.stack([term.detach().float() for term in terms]), cross_entropy.new_ones(1)])
        self.sums = row if self.sums is None else self.sums + row

    def take(self, device) -> torch.Tensor:
        """The sums (zeros where nothing was recorded: another pipeline stage), cleared."""
        sums, self.sums = self.sums, None
        return sums.to(device) if sums is not None else torch.zeros(4, device=device)


IGNORE = -1
"""A label that head_scores leaves out: the positions of a request's context and of padding."""


@torch.no_grad()
def head_scores(x: torch.Tensor, embedding, labels: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
    """Per sequence of hidden states x (B, T, C), over the positions whose label is not IGNORE:
    (B, 2) fp64 of [sum of log p(label), positions where the label is not the argmax].

    The log-likelihood scoring of zero-shot tasks (pretrain/inference/evaluation.py's ModelScorer) with the
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
