"""Models to plan for: this project's GPT-2 presets (configs/gpt2-*.yaml), and GPT-3's sizes as
planning targets at paper scale (Brown et al. 2020, table 2.1: layers, width, heads, 2048-token
context, and the batch each was trained with). GPT-3's alternating sparse attention is not
modelled; its dense layers are GPT-2's, so the same trainer would run them."""

from __future__ import annotations

from data_pipeline.tokenizers import padded_vocab_size
from pretrain.model.shape import GPTConfig
from pretrain.model.presets import CONFIGS, model_config, preset_path

# name: (layers, width, heads, batch in 2048-token sequences: the paper's 0.5M, 1M, 2M and 3.2M
# tokens). GPT-3 XL's 24 heads of 128 do not make its width of 2048; here it has 16 heads of 128
# (the same width and parameters).
GPT3 = {
    "gpt3-125m": (12, 768, 12, 256),
    "gpt3-350m": (24, 1024, 16, 256),
    "gpt3-760m": (24, 1536, 16, 256),
    "gpt3-1.3b": (24, 2048, 16, 512),
    "gpt3-2.7b": (32, 2560, 32, 512),
    "gpt3-6.7b": (32, 4096, 32, 1024),
    "gpt3-13b": (40, 5120, 40, 1024),
    "gpt3-175b": (96, 12288, 96, 1536),
}
GPT3_CONTEXT = 2048


def known_targets() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("gpt2-*.yaml")) + list(GPT3)


def target_model(name: str, tensor_parallel_size: int, sequence: int | None = None) -> GPTConfig:
    """The model of a preset, padded for `tensor_parallel_size`, trained at `sequence` tokens."""
    if name in GPT3:
        layers, width, heads, _ = GPT3[name]
        positions = sequence or GPT3_CONTEXT
        return GPTConfig(n_layer=layers, n_embd=width, n_head=heads, n_positions=positions, vocab_size=50257,
                         padded_vocab_size=padded_vocab_size(50257, tensor_parallel_size))
    overrides = {"n_positions": sequence} if sequence else {}
    return model_config(name, tensor_parallel_size, **overrides)


# GPT-2's batch (Radford et al. 2019, section 2.3): 512 sequences.
GPT2_BATCH_SEQUENCES = 512


def default_batch_tokens(name: str) -> int:
    """The batch the preset trains with, in tokens: its own parallel.global_batch_size where its
    YAML sets one, else GPT-2's 512 sequences (GPT-3's batches for the gpt3-* targets)."""
    if name in GPT3:
        return GPT3[name][3] * GPT3_CONTEXT
    import yaml

    from pretrain.config import load_config

    path = preset_path(name)
    written = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    config = load_config(path)
    sequences = (written.get("parallel") or {}).get("global_batch_size", GPT2_BATCH_SEQUENCES)
    return int(sequences) * config.model.n_positions


def model_settings(name: str, model: GPTConfig) -> list[str]:
    """--set keys that give a config the planned model: all of them for a GPT-3 target (no YAML
    of its own), the context when it differs from the preset's."""
    if name in GPT3:
        return [f"model.n_layer={model.n_layer}", f"model.n_embd={model.n_embd}", f"model.n_head={model.n_head}",
                f"model.n_positions={model.n_positions}"]
    own = model_config(name).n_positions
    return [f"model.n_positions={model.n_positions}"] if model.n_positions != own else []
