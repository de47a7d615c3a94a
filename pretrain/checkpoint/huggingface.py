"""Hugging Face GPT-2 directories: read one as our weights, write ours as one.

The tensor mapping (Conv1D transposition, the fused QKV order, the vocabulary
padding) is pretrain/model/hf_mapping.py's; this module handles the directory:
config.json, safetensors weights and, for GPT-2's BPE, the tokenizer files.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from data_pipeline.tokenizers import GPT2BPETokenizer, Tokenizer
from pretrain.model.shape import GPTConfig
from pretrain.model.hf_mapping import hf_to_ours, ours_to_hf

GPT2_VOCABULARY = 50257
_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh approximation our MLP uses
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class HFFormatError(ValueError):
    """A directory that is not a GPT-2 model we can read; names the file or the setting."""


def is_hf_directory(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file() and not (Path(path) / "manifest.json").is_file()


def hf_model_config(hf_config, path: Path) -> GPTConfig:
    """GPTConfig for an HF GPT2Config, refusing what our model does not compute the same way."""
    if hf_config.model_type != "gpt2":
        raise HFFormatError(f"{path}/config.json has model_type {hf_config.model_type!r}; only GPT-2 is supported")
    refusals = {
        "activation_function": hf_config.activation_function not in _ACTIVATIONS,
        "n_inner": hf_config.n_inner not in (None, 4 * hf_config.n_embd),
        "scale_attn_weights": not hf_config.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": hf_config.scale_attn_by_inverse_layer_idx,
        "add_cross_attention": hf_config.add_cross_attention,
        "tie_word_embeddings": not getattr(hf_config, "tie_word_embeddings", True),
    }
    wrong = [key for key, refused in refusals.items() if refused]
    if wrong:
        raise HFFormatError(f"{path}/config.json: {', '.join(f'{k}={getattr(hf_config, k, None)!r}' for k in wrong)} "
                            "is not GPT-2 as this trainer builds it (tanh GELU, 4 x n_embd MLP, scaled attention, "
                            "tied output head)")
    return GPTConfig(n_layer=hf_config.n_layer, n_embd=hf_config.n_embd, n_head=hf_config.n_head,
                     n_positions=hf_config.n_positions, vocab_size=hf_config.vocab_size,
                     padded_vocab_size=hf_config.vocab_size, layer_norm_epsilon=hf_config.layer_norm_epsilon)


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as transformers_logging

    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def read_hf_config(path: str | os.PathLike) -> GPTConfig:
    """Our config for a Hugging Face GPT-2 directory's config.json, or HFFormatError naming what is wrong."""
    from transformers import GPT2Config

    path = Path(path)
    if not path.exists():
        raise HFFormatError(f"{path} does not exist")
    if not (path / "config.json").is_file():
        raise HFFormatError(f"{path} is not a Hugging Face model directory: it has no config.json")
    try:
        hf_config = GPT2Config.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise HFFormatError(f"{path}/config.json cannot be read: {' '.join(str(error).split())}") from None
    return hf_model_config(hf_config, path)


def read_hf_directory(path: str | os.PathLike) -> tuple[GPTConfig, dict]:
    """(our config, canonical fp32 weights with vocab_size rows) of a GPT2LMHeadModel directory."""
    from safetensors import SafetensorError
    from transformers import GPT2LMHeadModel

    path = Path(path)
    config = read_hf_config(path)
    try:
        with _quiet_transformers():  # its load report and progress bar: what matters is checked below
            model, info = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # the last: a file cut short
        raise HFFormatError(f"the weights in {path} cannot be loaded: {error}") from None
    # from_pretrained fills a missing tensor with random values and only reports it: refuse instead.
    missing = [name for name in info.get("missing_keys", []) if name != "lm_head.weight"]
    wrong = missing + [str(item) for item in info.get("mismatched_keys", [])]
    if wrong:
        raise HFFormatError(f"the weights in {path} lack or mis-shape {len(wrong)} tensor(s) of its config.json: "
                            f"{', '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}")
    return config, hf_to_ours(model.state_dict(), config)


def hf_tokenizer_spec(path: str | os.PathLike, vocab_size: int) -> str:
    """What data.tokenizer a Hugging Face directory's model was trained with: its own BPE files, or
    GPT-2's when it has none and GPT-2's vocabulary size."""
    path = Path(path)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return str(path)
    if vocab_size == GPT2_VOCABULARY:
        return "gpt2"
    raise HFFormatError(f"{path} has no vocab.json + merges.txt and {vocab_size} tokens (not GPT-2's "
                        f"{GPT2_VOCABULARY}): give the tokenizer it was trained with")


def write_hf_directory(config: GPTConfig, state: dict, output: str | os.PathLike, tokenizer: Tokenizer,
                       dtype: str = "fp32") -> Path:
    """Save canonical weights as a GPT2LMHeadModel directory (config.json, model.safetensors), with
    vocab.json and merges.txt when the tokenizer is GPT-2's byte-level BPE."""
    from transformers import GPT2Config, GPT2LMHeadModel

    output = Path(output)
    end_of_text = tokenizer.eod_id
    hf_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, n_inner=None, activation_function="gelu_new",
        layer_norm_epsilon=config.layer_norm_epsilon, resid_pdrop=config.dropout, embd_pdrop=config.dropout,
        attn_pdrop=config.dropout, bos_token_id=end_of_text, eos_token_id=end_of_text, tie_word_embeddings=True,
    )
    hf_state = {name: tensor.to(DTYPES[dtype]) for name, tensor in ours_to_hf(state, config).items()}
    with torch.device("meta"):
        model = GPT2LMHeadModel(hf_config)
    model.load_state_dict(hf_state, assign=True, strict=True)
    model.tie_weights()
    model.config.dtype = DTYPES[dtype]
    model.save_pretrained(output, safe_serialization=True)
    if isinstance(tokenizer, GPT2BPETokenizer):
        write_tokenizer_files(tokenizer, output)
    return output


def write_tokenizer_files(tokenizer: GPT2BPETokenizer, output: Path) -> None:
    """GPT-2's vocab.json and merges.txt (the encoder.json / vocab.bpe pair under HF's names), and the
    tokenizer.json and tokenizer_config.json that transformers' AutoTokenizer reads first."""
    from transformers import GPT2TokenizerFast

    shutil.copyfile(tokenizer.files["encoder_json"], output / "vocab.json")
    shutil.copyfile(tokenizer.files["vocab_bpe"], output / "merges.txt")
    # Read back from those files: transformers 5 builds an empty tokenizer from vocab_file= / merges_file=.
    hf_tokenizer = GPT2TokenizerFast.from_pretrained(output)
    hf_tokenizer.model_max_length = 10**6  # the model's n_positions is in config.json
    hf_tokenizer.save_pretrained(output)
