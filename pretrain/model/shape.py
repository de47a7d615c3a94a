"""The model's shape: what a config, a layout check, the planner and a checkpoint's record need to know
about a GPT-2 without building it. No torch here, so `python -m pretrain --check` starts in a fraction of a
second (pretrain/training/run_check.py)."""

from __future__ import annotations

from dataclasses import dataclass


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
