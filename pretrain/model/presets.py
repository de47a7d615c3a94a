"""Model presets: the `model:` section of configs/*.yaml, and what follows from them."""

from __future__ import annotations

from pathlib import Path

from pretrain.model.shape import GPTConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = CONFIGS / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in CONFIGS.glob("gpt2-*.yaml")))
    raise ValueError(f"model preset {name_or_path!r} is neither a YAML file nor one of: {known}")


def model_config(name_or_path: str, tensor_parallel_size: int = 1, **overrides) -> GPTConfig:
    """GPTConfig from a preset, with the vocabulary padded for `tensor_parallel_size`."""
    from pretrain.config import load_config

    settings = [f"model.{key}={value}" for key, value in overrides.items()]
    return load_config(preset_path(name_or_path), settings).model.gpt_config(tensor_parallel_size)


def flops_per_token(config: GPTConfig, sequence_length: int) -> int:
    """Training FLOPs per token: 6 N for the matmuls (forward + backward) plus 12 L C T for attention."""
    return 6 * parameter_count(config) + 12 * config.n_layer * config.n_embd * sequence_length


def parameter_count(config: GPTConfig, include_padding: bool = False) -> int:
    """Trainable parameters (tied head counted once), without the vocabulary padding by default."""
    C, L = config.n_embd, config.n_layer
    vocab = config.padded_vocab_size if include_padding else config.vocab_size
    per_block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    return vocab * C + config.n_positions * C + L * per_block + 2 * C
