"""A small GPT-2 in Hugging Face's format, with random weights, for the tools that read models."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

# GPT-2's vocabulary (the bundled BPE), so that the model reads real text; the rest is tiny.
TINY_HF = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory):
    """A directory that transformers' GPT2LMHeadModel.from_pretrained reads: random weights (seeded;
    biases and LayerNorms too, so that a wrong mapping shows), GPT-2's tokenizer files beside them."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from data_pipeline.tokenizers import load_tokenizer
    from pretrain.checkpoint.huggingface import write_tokenizer_files

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY_HF))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                parameter.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    directory = tmp_path_factory.mktemp("tiny-hf")
    model.save_pretrained(directory)
    write_tokenizer_files(load_tokenizer("gpt2"), directory)
    return directory
