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
    def forward(ctx, hidden, weight, labels, padding_start: int, chunk_tokens: int):
        from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as ops
        from megatron.core.tensor_parallel.utils import VocabUtility

        group, rank, world = _tensor_parallel()
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(weight.shape[0], rank, world)
        tokens = hidden.shape[0]
        wants_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
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
            if wants_grad:  # d(mean loss)/d(logits) = (softmax - one_hot) / tokens
                operands = ops.prepare_gradient_calculation_operands(softmax, target_mask)
                per_token = torch.full_like(loss, 1.0 / tokens)
                grad_logits = ops.calculate_gradients(*operands[:2], target_1d, *operands[2:], per_token)
                grad_logits = grad_logits.to(hidden.dtype)
                grad_hidden[start:start + chunk_tokens] = grad_logits @ weight  # (n, C)
                grad_weight += (grad_logits.t() @ chunk).float()  # (V / tp, C), summed in fp32
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / tokens

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_output.to(grad_hidden.dtype), (grad_weight * grad_output).to(ctx.weight_dtype),
                None, None, None)


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
    return _HeadCrossEntropy.apply(hidden, weight, labels.reshape(-1), embedding.padding_start, chunk_tokens)
