"""GPT-2, readable top to bottom, built from megatron-core's tensor-parallel primitives.

The model is a flat sequence of layers, so that DeepSpeed's PipelineModule can
cut it into stages (pretrain/parallel/pipeline.py) and a single process can run
it whole (`GPT2`):

    0        WordEmbedding       token ids (B, T) -> (B, T, C); tied with the output head
    1        PositionEmbedding   + learned absolute positions, dropout
    2..L+1   Block               pre-LayerNorm attention and MLP, residual connections
    L+2      FinalNorm           LayerNorm
    (head)   lm_head(WordEmbedding, x): logits over this rank's slice of the vocabulary

Tensor parallelism lives inside the layers (megatron-core's VocabParallelEmbedding,
ColumnParallelLinear, RowParallelLinear); with a tensor-parallel size of 1 they
are ordinary layers. Each rank holds `n_head / tp` heads, and a `1 / tp` slice of
the MLP and of the (padded) vocabulary.

Initialization does not depend on the layout: every weight is drawn in full
from a generator seeded by (seed, parameter name), then split (megatron-core's
CPU initialization), so any TP x PP x DP layout starts from the same model.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.model.loss import head_loss


@dataclass
class GPTConfig:
    n_layer: int = 12
    """Transformer blocks."""
    n_embd: int = 768
    """Hidden size C."""
    n_head: int = 12
    """Attention heads; must divide by the tensor-parallel size."""
    n_positions: int = 1024
    """Context length (learned positions)."""
    vocab_size: int = 50257
    """Real vocabulary; the embedding is padded to `padded_vocab_size` rows."""
    padded_vocab_size: int = 50304
    """Rows of the embedding: vocab_size rounded up to a multiple of 128 x TP."""
    dropout: float = 0.0
    """Embedding, attention and residual dropout; 0 for pretraining."""
    layer_norm_epsilon: float = 1e-5
    init_std: float = 0.02
    """N(0, init_std) for every weight; residual projections use init_std / sqrt(2 n_layer)."""

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class Initializer:
    """Per-parameter init methods whose draws depend only on (seed, name).

    megatron-core's CPU initialization calls `method(full_weight)` before it
    splits the weight across tensor-parallel ranks, so seeding by name makes the
    full model identical for every layout and every pipeline partition.
    """

    def __init__(self, seed: int, std: float):
        self.seed, self.std = seed, std

    def generator(self, name: str) -> torch.Generator:
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))

    def normal(self, name: str, std: float | None = None):
        std = self.std if std is None else std

        def method(weight: torch.Tensor) -> None:
            with torch.no_grad():
                weight.normal_(0.0, std, generator=self.generator(name))

        return method


# ---- layers ------------------------------------------------------------------------


class WordEmbedding(nn.Module):
    """Token embedding, vocabulary split across tensor-parallel ranks. Layer 0."""

    def __init__(self, config: GPTConfig, parallel: ModelParallelConfig, init: Initializer, index: int = 0):
        super().__init__()
        self.word = VocabParallelEmbedding(
            config.padded_vocab_size, config.n_embd, init_method=init.normal(f"{index}.word.weight"), config=parallel
        )
        # Columns of this rank's logit slice that are vocabulary padding, not tokens.
        self.padding_start = max(0, config.vocab_size - self.word.vocab_start_index)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.word(token_ids)  # (B, T) -> (B, T, C), all-reduced over TP


class PositionEmbedding(nn.Module):
    """Adds learned absolute positions. Layer 1."""

    def __init__(self, config: GPTConfig, parallel: ModelParallelConfig, init: Initializer, index: int = 1):
        super().__init__()
        self.position = nn.Embedding(config.n_positions, config.n_embd, dtype=parallel.params_dtype)
        init.normal(f"{index}.position.weight")(self.position.weight)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        return self.dropout(x + self.position(positions))  # (B, T, C)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, parallel: ModelParallelConfig, init: Initializer, prefix: str):
        super().__init__()
        tp = parallel.tensor_model_parallel_size
        self.local_heads, self.head_dim, self.dropout = config.n_head // tp, config.head_dim, config.dropout
        # Output rows are laid out per head as (n_head, [q, k, v], head_dim), Megatron's
        # layout: a contiguous split over TP ranks then hands each rank whole heads.
        self.qkv = ColumnParallelLinear(
            config.n_embd, 3 * config.n_embd, config=parallel, init_method=init.normal(f"{prefix}.qkv.weight"),
            bias=True, gather_output=False,
        )
        self.proj = RowParallelLinear(
            config.n_embd, config.n_embd, config=parallel, bias=True, input_is_parallel=True, skip_bias_add=False,
            init_method=init.normal(f"{prefix}.proj.weight", config.init_std / math.sqrt(2 * config.n_layer)),
        )
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv, _ = self.qkv(x)  # (B, T, 3 C / tp)
        q, k, v = qkv.view(B, T, self.local_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)  # 3 x (B, h, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.local_heads * self.head_dim)  # (B, T, C / tp)
        out, _ = self.proj(y)  # (B, T, C), all-reduced over TP
        return self.resid_dropout(out)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, parallel: ModelParallelConfig, init: Initializer, prefix: str):
        super().__init__()
        self.fc = ColumnParallelLinear(
            config.n_embd, 4 * config.n_embd, config=parallel, init_method=init.normal(f"{prefix}.fc.weight"),
            bias=True, gather_output=False,
        )
        self.proj = RowParallelLinear(
            4 * config.n_embd, config.n_embd, config=parallel, bias=True, input_is_parallel=True, skip_bias_add=False,
            init_method=init.normal(f"{prefix}.proj.weight", config.init_std / math.sqrt(2 * config.n_layer)),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.fc(x)  # (B, T, 4 C / tp)
        out, _ = self.proj(F.gelu(h, approximate="tanh"))  # (B, T, C)
        return self.dropout(out)


class Block(nn.Module):
    """Pre-LayerNorm transformer block. Layers 2 .. n_layer + 1."""

    def __init__(self, config: GPTConfig, parallel: ModelParallelConfig, init: Initializer, index: int):
        super().__init__()
        dtype = parallel.params_dtype
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, dtype=dtype)
        self.attn = CausalSelfAttention(config, parallel, init, f"{index}.attn")
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, dtype=dtype)
        self.mlp = MLP(config, parallel, init, f"{index}.mlp")
        self.checkpoint_activations = False  # set from outside (pretrain/parallel/build.py)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_activations and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class FinalNorm(nn.Module):
    """The last LayerNorm, before the tied output head. Layer n_layer + 2."""

    def __init__(self, config: GPTConfig, parallel: ModelParallelConfig, init: Initializer, index: int):
        super().__init__()
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, dtype=parallel.params_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x)


def lm_head(embedding: WordEmbedding, x: torch.Tensor) -> torch.Tensor:
    """Logits over this rank's vocabulary slice with the tied embedding: (B, T, C) -> (B, T, V / tp).

    Embedding rows past the real vocabulary exist only as padding; their logits
    are -inf, so they take no part in the softmax, the loss, its gradient, or
    sampling. Filled in place: the matmul's backward does not need its output,
    and only the few padding columns are touched.
    """
    x = copy_to_tensor_model_parallel_region(x)  # identity forward, all-reduce of the gradient
    logits = F.linear(x, embedding.word.weight)
    if embedding.padding_start < logits.shape[-1]:
        logits[..., embedding.padding_start:] = float("-inf")
    return logits


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over vocabulary-parallel logits (B, T, V / tp), in fp32.
    The reference for `head_loss`, which training uses: it never holds all the logits."""
    return vocab_parallel_cross_entropy(logits.float(), labels).mean()


def layer_classes(config: GPTConfig) -> list[type[nn.Module]]:
    """The layer sequence, in order; the pipeline and `GPT2` both build from it."""
    return [WordEmbedding, PositionEmbedding] + [Block] * config.n_layer + [FinalNorm]


# The key of the word embedding shared by the first layer and the output head; DeepSpeed's
# PipelineModule keeps tied layers under `tied_modules.<key>`, and GPT2 does the same.
TIED_EMBEDDING = "embed"


class GPT2(nn.Module):
    """The whole model in one process (pipeline size 1); tensor parallelism still applies.

    Parameters carry the same names as in a DeepSpeed pipeline stage
    (`tied_modules.embed.word.weight`, `1.position.weight`, `2.attn.qkv.weight`, ...),
    so a checkpoint's names do not depend on the pipeline size.
    """

    def __init__(self, config: GPTConfig, parallel: ModelParallelConfig, seed: int = 1234):
        super().__init__()
        self.config = config
        init = Initializer(seed, config.init_std)
        classes = layer_classes(config)
        self.tied_modules = nn.ModuleDict({TIED_EMBEDDING: WordEmbedding(config, parallel, init, 0)})
        for index, cls in enumerate(classes[1:], start=1):
            self.add_module(str(index), cls(config, parallel, init, index))
        self.num_layers = len(classes)

    @property
    def embedding(self) -> WordEmbedding:
        return self.tied_modules[TIED_EMBEDDING]

    def forward(self, token_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embedding(token_ids)  # (B, T, C)
        for index in range(1, self.num_layers):
            x = getattr(self, str(index))(x)
        if labels is None:
            return lm_head(self.embedding, x)  # (B, T, V / tp)
        return head_loss(x, self.embedding, labels)  # the head and the loss in chunks (pretrain/model/loss.py)
