"""The one mapping between our GPT-2 weights and Hugging Face's GPT2LMHeadModel.

Our names are canonical layer names, `"{layer}.{param}"` as in gpt2.py's layer
sequence (`0.word.weight`, `2.attn.qkv.weight`, ...). `GPT2` and a pipeline stage
both name the tied embedding `tied_modules.embed.word.weight`; `canonical_name`
and `module_name` translate. Tensors are full size (tensor-parallel size 1).

Two layout differences, both handled here:
  * HF's Conv1D stores weights as (in, out); torch Linear as (out, in).
  * HF orders the fused QKV output as (q | k | v) each over all heads; we order it
    per head, (head, [q, k, v], head_dim), so a tensor-parallel split keeps heads whole.
The vocabulary is padded with zero rows to `padded_vocab_size` on the way in and
cut back to `vocab_size` on the way out.
"""

from __future__ import annotations

import torch

from pretrain.model.gpt2 import TIED_EMBEDDING
from pretrain.model.shape import GPTConfig


def _qkv_hf_to_ours(tensor: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    # HF weight (C, 3C) -> (3C, C) rows ordered (3, head, hd) -> (head, 3, hd); bias likewise.
    rows = tensor.t() if tensor.dim() == 2 else tensor
    rest = rows.shape[1:]
    per_head = rows.reshape(3, config.n_head, config.head_dim, *rest).transpose(0, 1)
    return per_head.reshape(3 * config.n_embd, *rest).contiguous()


def _qkv_ours_to_hf(tensor: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    rest = tensor.shape[1:]
    grouped = tensor.reshape(config.n_head, 3, config.head_dim, *rest).transpose(0, 1)
    rows = grouped.reshape(3 * config.n_embd, *rest)
    return (rows.t() if rows.dim() == 2 else rows).contiguous()


def _block_pairs(config: GPTConfig):
    """(our name, HF name, kind) for every block parameter; kind says how it converts."""
    for layer in range(config.n_layer):
        ours, hf = f"{layer + 2}", f"transformer.h.{layer}"
        for norm in ("ln_1", "ln_2"):
            for p in ("weight", "bias"):
                yield f"{ours}.{norm}.{p}", f"{hf}.{norm}.{p}", "copy"
        for p in ("weight", "bias"):
            yield f"{ours}.attn.qkv.{p}", f"{hf}.attn.c_attn.{p}", "qkv"
        for our_linear, hf_linear in (("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            yield f"{ours}.{our_linear}.weight", f"{hf}.{hf_linear}.weight", "transpose"
            yield f"{ours}.{our_linear}.bias", f"{hf}.{hf_linear}.bias", "copy"


def _pairs(config: GPTConfig):
    yield "0.word.weight", "transformer.wte.weight", "vocab"
    yield "1.position.weight", "transformer.wpe.weight", "copy"
    yield from _block_pairs(config)
    final = config.n_layer + 2
    yield f"{final}.ln_f.weight", "transformer.ln_f.weight", "copy"
    yield f"{final}.ln_f.bias", "transformer.ln_f.bias", "copy"


def canonical_names(config: GPTConfig) -> list[str]:
    """Every parameter of the model, by canonical name, in layer order."""
    return [ours for ours, _, _ in _pairs(config)]


def pad_vocabulary(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """The word embedding with zero rows appended up to `rows` (a layout's padded vocabulary)."""
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], tensor.shape[1])])


def _pad_vocab(tensor: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    return pad_vocabulary(tensor, config.padded_vocab_size)


# kind -> (HF -> ours, ours -> HF)
_CONVERSIONS = {
    "copy": (lambda t, c: t, lambda t, c: t),
    "transpose": (lambda t, c: t.t().contiguous(), lambda t, c: t.t().contiguous()),
    "qkv": (_qkv_hf_to_ours, _qkv_ours_to_hf),
    "vocab": (_pad_vocab, lambda t, c: t[: c.vocab_size]),
}


def hf_to_ours(hf_state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel state dict -> our canonical full-size state dict."""
    return {ours: _CONVERSIONS[kind][0](hf_state[hf], config).clone() for ours, hf, kind in _pairs(config)}


def ours_to_hf(our_state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our canonical full-size state dict -> HF GPT2LMHeadModel state dict (lm_head tied to wte)."""
    hf_state = {hf: _CONVERSIONS[kind][1](our_state[ours], config).clone() for ours, hf, kind in _pairs(config)}
    hf_state["lm_head.weight"] = hf_state["transformer.wte.weight"]
    return hf_state


_TIED = f"tied_modules.{TIED_EMBEDDING}."


def canonical_name(name: str) -> str:
    """A parameter name of `GPT2` or of a DeepSpeed pipeline stage -> our canonical name."""
    return "0." + name[len(_TIED):] if name.startswith(_TIED) else name


def module_name(canonical: str) -> str:
    """Our canonical name -> the parameter's name in `GPT2` and in pipeline stages."""
    return _TIED + canonical[2:] if canonical.startswith("0.") else canonical
