"""A trained model in one process, for the tools that use it (generation, evaluation).

`load_weights` reads full-size weights from any of the three forms a model leaves
this system in: a checkpoint of ours (any layout, pretrain/checkpoint/weights.py), a Hugging
Face GPT-2 directory, or a consolidated file (`tools/convert_checkpoint.py --to
fp32`). `load_model` builds our GPT2 on them, in one process (tensor-parallel size
1), in evaluation mode.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.tokenizers import Tokenizer, load_tokenizer
from pretrain.checkpoint.sharded import MANIFEST, CheckpointError
from pretrain.model.gpt2 import GPT2, GPTConfig

CONSOLIDATED_FORMAT = "gpt2-slurm consolidated weights, v1"


@dataclass
class Weights:
    config: GPTConfig
    """Model shape; padded_vocab_size is for one tensor-parallel rank."""
    state: dict
    """Canonical name -> full fp32 tensor (word embedding: vocab_size rows)."""
    tokenizer: str
    """data.tokenizer spec: "gpt2", a directory or a tokenizer.model."""
    description: str
    """Where they came from, for logs and reports."""


def load_weights(path: str | os.PathLike, work_dir: str | None = None) -> Weights:
    """Full-size weights from a checkpoint of ours, a Hugging Face directory or a consolidated file."""
    from data_pipeline.tokenizers import padded_vocab_size
    from pretrain.checkpoint.huggingface import hf_tokenizer_spec, is_hf_directory, read_hf_directory
    from pretrain.checkpoint.weights import consolidate

    path = Path(path)
    if path.is_file():
        return _read_consolidated(path)
    if path.is_dir() and is_hf_directory(path):
        config, state = read_hf_directory(path)
        config.padded_vocab_size = padded_vocab_size(config.vocab_size)
        return Weights(config, state, hf_tokenizer_spec(path, config.vocab_size), f"Hugging Face model {path}")
    consolidated = consolidate(path, work_dir)
    step = consolidated.manifest["step"]
    return Weights(consolidated.config, consolidated.state, consolidated.tokenizer,
                   f"checkpoint {consolidated.directory} (step {step}, {consolidated.source})")


def describe_weights(path: str | os.PathLike) -> tuple[GPTConfig, str]:
    """The model shape and data.tokenizer of what load_weights would read, without reading the weights
    (a checkpoint's manifest, a Hugging Face config.json, a consolidated file's header)."""
    from data_pipeline.tokenizers import padded_vocab_size
    from pretrain.checkpoint.huggingface import hf_tokenizer_spec, is_hf_directory, read_hf_config
    from pretrain.checkpoint.weights import find_checkpoint

    path = Path(path)
    if path.is_file():
        weights = _read_consolidated(path, mmap=True)  # the tensors stay on disk until touched
        config, tokenizer = weights.config, weights.tokenizer
    elif path.is_dir() and is_hf_directory(path):
        config = read_hf_config(path)
        config.padded_vocab_size = padded_vocab_size(config.vocab_size)
        tokenizer = hf_tokenizer_spec(path, config.vocab_size)
    else:
        config, tokenizer = _describe_checkpoint(find_checkpoint(path) / MANIFEST)
    if not isinstance(tokenizer, str):
        raise CheckpointError(f"{path} records its tokenizer as {tokenizer!r}, not a name or path; it is damaged")
    return config, tokenizer


def _describe_checkpoint(record: Path) -> tuple[GPTConfig, str]:
    from pretrain.checkpoint.weights import model_config_of

    try:
        manifest = json.loads(record.read_text())
        return model_config_of(manifest), manifest.get("config", {}).get("data", {}).get("tokenizer", "gpt2")
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{record} is damaged ({type(error).__name__}: {error}); use another step_* "
                              "directory") from None


def save_consolidated(weights: Weights, output: str | os.PathLike) -> None:
    from pretrain.model.presets import parameter_count

    output = Path(output)
    record = {"format": CONSOLIDATED_FORMAT, "model": _shape(weights.config), "tokenizer": weights.tokenizer,
              "source": weights.description, "parameters": parameter_count(weights.config),
              "state_dict": weights.state}
    partial = output.with_name(output.name + ".tmp")
    try:
        torch.save(record, partial)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)


def _shape(config: GPTConfig) -> dict:
    return {key: getattr(config, key) for key in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size",
                                                  "layer_norm_epsilon")}


WHAT_TO_GIVE = ("give a checkpoint directory of ours, a Hugging Face GPT-2 directory, or a file written by "
                "tools/convert_checkpoint.py --to fp32")


def _read_consolidated(path: Path, mmap: bool = False) -> Weights:
    from data_pipeline.tokenizers import padded_vocab_size

    try:
        record = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises several kinds for a file that is not its format
        # Not torch's message: for a pickle of other objects it advises weights_only=False, which would run
        # the file's code and still not make it a model.
        raise CheckpointError(f"{path} is not a model file of this project ({type(error).__name__} from torch.load); "
                              f"{WHAT_TO_GIVE}") from None
    if not isinstance(record, dict) or record.get("format") != CONSOLIDATED_FORMAT:
        raise CheckpointError(f"{path} is not a consolidated weights file of this project; {WHAT_TO_GIVE}")
    try:
        shape = record["model"]
        config = GPTConfig(**shape, padded_vocab_size=padded_vocab_size(shape["vocab_size"]))
        return Weights(config, record["state_dict"], record["tokenizer"],
                       f"consolidated file {path} ({record['source']})")
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is a damaged consolidated weights file ({type(error).__name__}: {error}); "
                              "write it again with tools/convert_checkpoint.py --to fp32") from None


# ---- one process ------------------------------------------------------------------------------


def single_process_group() -> None:
    """A one-rank gloo group and megatron-core's parallel state for it (tensor-parallel size 1);
    our layers are megatron-core's, which read their group sizes from there."""
    from pretrain.parallel.distributed import initialize_model_parallel
    from pretrain.parallel.layout import ParallelLayout

    if not dist.is_initialized():  # port 0: bound when the store starts, so no other process can take it first
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        initialize_model_parallel(ParallelLayout(world_size=1))


@dataclass
class LoadedModel:
    model: GPT2
    config: GPTConfig
    tokenizer: Tokenizer
    description: str
    device: torch.device

    @torch.no_grad()
    def logits(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, vocab_size) fp32 logits over the real vocabulary."""
        return self.model(token_ids.to(self.device)).float()[..., : self.config.vocab_size]


def build_model(weights: Weights, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> GPT2:
    """Our GPT2 with these weights, in one process, in evaluation mode."""
    from pretrain.parallel.build import without_empty_extra_state
    from pretrain.parallel.distributed import model_parallel_config
    from pretrain.parallel.layout import ParallelLayout
    from pretrain.checkpoint.weights import load_into

    single_process_group()
    model = without_empty_extra_state(GPT2(weights.config, model_parallel_config(ParallelLayout(world_size=1))))
    load_into(model, weights.state, weights.config)
    return model.to(device=device, dtype=dtype).eval()


def load_model(path: str | os.PathLike, device: str | None = None, dtype: torch.dtype = torch.float32,
               work_dir: str | None = None) -> LoadedModel:
    """Our GPT2 on the weights at `path` (see load_weights), with its tokenizer. The device defaults to
    the first GPU when there is one."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights = load_weights(path, work_dir)
    tokenizer = load_tokenizer(weights.tokenizer)
    if tokenizer.vocab_size != weights.config.vocab_size:
        raise CheckpointError(f"{path} has a {weights.config.vocab_size}-token vocabulary but its tokenizer "
                              f"{weights.tokenizer!r} has {tokenizer.vocab_size} tokens")
    return LoadedModel(build_model(weights, device, dtype), weights.config, tokenizer, weights.description, device)
