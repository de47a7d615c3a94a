"""GPT-2, readable top to bottom, built from megatron-core's tensor-parallel primitives.

The model is a flat sequence of layers, so that DeepSpeed's PipelineModule can
cut it into stages (pretrain/parallel/pipeline.py) and a single process can run
it whole (`GPT2`):

    0        WordEmbedding       token ids (B, T) -> (B, T, C); tied with the output head
    1        PositionEmbedding   + learned absolute positions, dropout
    2..L+1   Block               pre-LayerNorm attention and MLP, residual connections
    L+2      FinalNorm           LayerNorm
    (head)   lm_head(WordEmbedding, x): logits over this rank's slice of the vocabulary

For generation, `GPT2.forward` takes a `KVCache`: the keys and values of the
tokens already seen, so that each new token costs one position of compute.

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

import torch
import torch.nn.functional as F

import data_pipeline.library_imports  # noqa: F401  (before megatron.core: see that module)
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

from pretrain.model.loss import head_loss, head_scores
from pretrain.model.shape import GPTConfig


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

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        # `start`: tokens before this chunk (in a KVCache); 0 in training, where the pipeline passes x alone.
        positions = torch.arange(start, start + x.shape[1], device=x.device)
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

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv, _ = self.qkv(x)  # (B, T, 3 C / tp)
        q, k, v = qkv.view(B, T, self.local_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)  # 3 x (B, h, T, hd)
        dropout = self.dropout if self.training else 0.0
        if cache is None or cache.start == 0:
            if cache is not None:
                cache.extend(k, v)  # the first chunk sees only itself: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            k, v = cache.extend(k, v)  # (B, h, start + T, hd): the cached tokens, then this chunk
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask(T, x.device), dropout_p=dropout)
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

    def _forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        if self.checkpoint_activations and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cache, use_reentrant=False)
        return self._forward(x, cache)


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
        self.distillation = None  # a teacher's settings while distilling (not a module: never saved or trained)

    @property
    def embedding(self) -> WordEmbedding:
        return self.tied_modules[TIED_EMBEDDING]

    def hidden_states(self, token_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The last hidden states (B, T, C), after the final LayerNorm: what the output head reads."""
        start = 0 if cache is None else cache.make_room(token_ids.shape[1])
        x = self.embedding(token_ids)  # (B, T, C)
        x = getattr(self, "1")(x, start)  # + positions start .. start + T - 1
        for block in range(self.config.n_layer):  # layers 2 .. n_layer + 1
            x = getattr(self, str(block + 2))(x, None if cache is None else cache.layer(block, start))
        if cache is not None:
            cache.length = start + token_ids.shape[1]
        return getattr(self, str(self.num_layers - 1))(x)  # FinalNorm

    def forward(self, token_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | None = None, scores: bool = False,
                teacher_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V / tp), or the loss with `labels`, or with `scores` too each sequence's
        log-likelihood of its labels (head_scores). With a `cache`, `token_ids` (B, T) are the
        tokens after the `cache.length` cached ones: their positions follow them, their attention also
        sees them, and the cache keeps their keys and values. With a teacher's last hidden states
        (`self.distillation` set: pretrain/training/distill.py), the loss is the distillation objective."""
        x = self.hidden_states(token_ids, cache)
        if labels is None:
            return lm_head(self.embedding, x)  # (B, T, V / tp)
        if scores:
            return head_scores(x, self.embedding, labels)  # (B, 2)
        # the head and the loss in chunks (pretrain/model/loss.py)
        return head_loss(x, self.embedding, labels, distillation=self.distillation, teacher_hidden=teacher_hidden)


# ---- generation -------------------------------------------------------------------------


class LayerCache:
    """One block's slice of a KVCache: `start` tokens are cached in `keys` and `values`
    (B, h, max_length, hd), where h is this rank's heads."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: int):
        self.keys, self.values, self.start = keys, values, start

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new chunk's keys and values (B, h, T, hd); return all of them so far, (B, h, start + T, hd)."""
        end = self.start + k.shape[2]
        self.keys[:, :, self.start:end] = k
        self.values[:, :, self.start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]

    def mask(self, T: int, device: torch.device) -> torch.Tensor | None:
        """Which keys each of T new queries may see: every cached one, and the new ones up to itself.

        (T, start + T), True where allowed. SDPA's is_causal would align the triangle to the first
        key, not the last, so a chunk after cached tokens needs this mask. One query sees everything.
        """
        if T == 1:
            return None
        return torch.ones(T, self.start + T, dtype=torch.bool, device=device).tril(diagonal=self.start)


class KVCache:
    """Keys and values of the tokens a GPT2 has seen, so that generating a token costs one position.

    Preallocated for `max_length` positions (n_positions at most): `keys` and `values` are each
    (n_layer, B, h, max_length, hd), where h is this rank's heads. `length` tokens are cached;
    `GPT2.forward(new_ids, cache=cache)` stores the new tokens' keys and values after them.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_length: int | None = None,
                 local_heads: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        self.max_length = config.n_positions if max_length is None else max_length
        if not 0 < self.max_length <= config.n_positions:
            raise ValueError(f"a KV cache of {self.max_length} positions: it must hold 1 to n_positions "
                             f"({config.n_positions}), the most the model's position embedding covers")
        shape = (config.n_layer, batch_size, local_heads or config.n_head, self.max_length, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    @classmethod
    def for_model(cls, model: GPT2, batch_size: int, max_length: int | None = None) -> KVCache:
        """A cache on the model's device, in its dtype, for its number of heads per rank."""
        weight = model.embedding.word.weight
        heads = getattr(model, "2").attn.local_heads
        return cls(model.config, batch_size, max_length, heads, weight.device, weight.dtype)

    def make_room(self, tokens: int) -> int:
        """Check that `tokens` more fit; return the position of the first of them."""
        if self.length + tokens > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} positions: {self.length} cached + {tokens} "
                             "new do not fit; make it longer (max_length, at most n_positions) or start a new one")
        return self.length

    def layer(self, block: int, start: int) -> LayerCache:
        return LayerCache(self.keys[block], self.values[block], start)
