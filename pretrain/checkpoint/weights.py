"""Full-size model weights in and out of sharded checkpoints.

A checkpoint holds each rank's slice of the model (tensor-parallel ranks) for its
pipeline stage, and, under ZeRO, each data-parallel rank's partition of the fp32
master weights. `consolidate` turns a checkpoint of any layout and ZeRO stage into
one full-size fp32 tensor per parameter, under our canonical names
(`0.word.weight`, `2.attn.qkv.weight`, ...; pretrain/model/hf_mapping.py), with
the vocabulary unpadded. `load_into` goes the other way: full-size weights into a
model built for any layout (this rank's slices of its own stage).

Which weights a checkpoint gives:
  * ZeRO 1-3 after step 0: the fp32 master weights, the ones training updates, merged across
    data-, tensor- and pipeline-parallel ranks by DeepSpeed's own universal-checkpoint
    converter (`ds_to_universal`, the merge the trainer uses to resume on another layout).
  * ZeRO-0: the module weights, merged over tensor-parallel ranks by the rules the
    converter is given. In fp32 they are the master weights; in bf16 they are the
    model's bf16 copy (DeepSpeed's converter cannot read a ZeRO-0 bf16 optimizer).
  * At step 0 in fp32 (ZeRO 0-2): the module weights, which the master weights still
    equal. A step-0 checkpoint in bf16 or under ZeRO-3 is refused: its fp32 weights
    are only in optimizer partitions DeepSpeed's converter cannot read before a step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline.tokenizers import padded_vocab_size
from pretrain.checkpoint.sharded import LATEST, MANIFEST, CheckpointError, verify_files
from pretrain.model.shape import GPTConfig
from pretrain.model.hf_mapping import canonical_name, canonical_names, module_name, pad_vocabulary
from pretrain.checkpoint.reshard import UNIVERSAL, run_ds_to_universal, tensor_parallel_split

@dataclass
class Consolidated:
    """One checkpoint's weights, full size, in fp32."""

    directory: Path
    """The step_NNNNNNN directory they came from."""
    manifest: dict
    config: GPTConfig
    """Its model shape (vocabulary padded for one tensor-parallel rank)."""
    state: dict
    """Canonical name -> full fp32 tensor; the word embedding has vocab_size rows."""
    source: str
    """Which weights these are: the fp32 master weights or the module weights."""

    @property
    def tokenizer(self) -> str:
        """The data.tokenizer the run was trained with."""
        return self.manifest.get("config", {}).get("data", {}).get("tokenizer", "gpt2")


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A step_NNNNNNN directory, from itself, a checkpoint directory (its `latest`) or a run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / MANIFEST).is_file():
        return path
    for directory in (path, path / "checkpoints"):
        pointer = directory / LATEST
        if pointer.is_file():
            step = directory / pointer.read_text().strip()
            if not (step / MANIFEST).is_file():
                raise CheckpointError(f"{pointer} names {step.name}, but {step / MANIFEST} is missing; point it at "
                                      "another step_* directory or give one directly")
            return step
    raise CheckpointError(f"{path} is not a checkpoint: no {MANIFEST} in it, and no {LATEST} in it or in "
                          f"{path / 'checkpoints'}; give a run directory, its checkpoints/ or one step_* directory")


def model_config_of(manifest: dict, tensor_parallel_size: int = 1) -> GPTConfig:
    model = manifest["model"]
    return GPTConfig(n_layer=model["n_layer"], n_embd=model["n_embd"], n_head=model["n_head"],
                     n_positions=model["n_positions"], vocab_size=model["vocab_size"],
                     padded_vocab_size=padded_vocab_size(model["vocab_size"], tensor_parallel_size))


def consolidate(path: str | os.PathLike, work_dir: str | os.PathLike | None = None) -> Consolidated:
    """Read the checkpoint at `path` (see find_checkpoint) as full-size fp32 weights.

    The master weights are merged through a universal form: the one the checkpoint
    already holds if it was resharded before, else a temporary one in `work_dir`
    (default: the system's temporary directory), removed afterwards. It needs
    about three times the model's fp32 size on disk (weights and Adam moments).
    """
    directory = find_checkpoint(path)
    manifest = json.loads((directory / MANIFEST).read_text())
    verify_files(directory, manifest)
    config = model_config_of(manifest)
    layout, step = manifest["layout"], manifest["step"]
    if step == 0 and (layout["zero_stage"] == 3 or manifest.get("precision", "fp32") != "fp32"):
        raise CheckpointError(
            f"checkpoint {directory} was saved at step 0 in {manifest.get('precision')} under ZeRO-"
            f"{layout['zero_stage']}: its fp32 weights are only in optimizer partitions that DeepSpeed's converter "
            "cannot read before a first step. Start from the weights it was made from (model.init_from), or save "
            "step-0 checkpoints in fp32 with ZeRO 0-2 (tools/convert_checkpoint.py --from hf does)")
    # At step 0 (fp32, ZeRO 0-2: checked above) the master weights are still the module's, and
    # DeepSpeed's converter cannot read an optimizer that has not stepped.
    if layout["zero_stage"] >= 1 and step > 0:
        state, source = _master_weights(directory, config, work_dir), "fp32 master weights"
    else:
        state, source = _module_weights(directory, layout, config), "module weights"
    missing = [name for name in canonical_names(config) if name not in state]
    if missing:
        raise CheckpointError(f"checkpoint {directory} lacks weights for {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}; it is damaged or of another model")
    return Consolidated(directory, manifest, config, {n: state[n] for n in canonical_names(config)}, source)


def _master_weights(directory: Path, config: GPTConfig, work_dir) -> dict:
    existing = directory / UNIVERSAL
    if (existing / "zero" / "optimizer_state.pt").is_file():  # converted when a run resumed on another layout
        return _read_universal(existing, config)
    scratch = Path(tempfile.mkdtemp(prefix="consolidate-", dir=work_dir))
    try:
        run_ds_to_universal(directory, scratch / UNIVERSAL, workers=1)
        return _read_universal(scratch / UNIVERSAL, config)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _read_universal(universal: Path, config: GPTConfig) -> dict:
    state = {}
    for parameter in sorted((universal / "zero").iterdir()):
        if parameter.is_dir() and (parameter / "fp32.pt").is_file():
            tensor = _load(parameter / "fp32.pt")["param"]
            state[canonical_name(parameter.name)] = _unpadded(canonical_name(parameter.name), tensor, config)
    return state


def _module_weights(directory: Path, layout: dict, config: GPTConfig) -> dict:
    """Each tensor-parallel rank's module weights, merged: {canonical name: full tensor}."""
    slices: dict[str, list] = {}
    for tp in range(layout["tensor_parallel_size"]):
        for name, tensor in _module_state(directory, layout, tp).items():
            if tensor is not None and not name.endswith("_extra_state"):
                slices.setdefault(canonical_name(name), []).append(tensor.detach().float())
    return {name: _unpadded(name, _merge(name, parts), config) for name, parts in slices.items()}


def _module_state(directory: Path, layout: dict, tp: int) -> dict:
    """Tensor-parallel rank `tp`'s module state under GPT2's names, from one file or one per pipeline layer."""
    if layout["pipeline_parallel_size"] == 1:
        return _load(directory / f"mp_rank_{tp:02d}_model_states.pt")["module"]
    state = {}
    for path in sorted(directory.glob(f"layer_*-model_{tp:02d}-model_states.pt")):
        layer = int(re.match(r"layer_(\d+)-", path.name).group(1))
        for name, tensor in _load(path).items():
            state[f"{layer}.{name}"] = tensor
    return state


def _load(path: Path):
    """torch.load of a checkpoint file, or CheckpointError naming it (a damaged file keeps its size)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # pickle, zip and torch each raise their own kinds
        raise CheckpointError(f"{path} cannot be read ({type(error).__name__}: {error}); the checkpoint is "
                              "damaged: use another step_* directory") from None


def _merge(name: str, parts: list) -> torch.Tensor:
    kind = tensor_parallel_split(module_name(name))
    if kind == "replicated" or len(parts) == 1:
        return parts[0]
    return torch.cat(parts, dim=1 if kind == "rows" else 0)


def _unpadded(name: str, tensor: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    return tensor[: config.vocab_size].contiguous() if name == "0.word.weight" else tensor


# ---- full-size weights into a model of any layout -------------------------------------------


def load_into(model: torch.nn.Module, state: dict, config: GPTConfig, strict: bool = True) -> int:
    """Copy full-size canonical weights into `model` (GPT2 or one pipeline stage, any tensor-parallel
    size): each parameter takes its own rank's slice, cut the way megatron-core cut it. Returns how
    many parameters were set."""
    from megatron.core import parallel_state

    rank, size = (parallel_state.get_tensor_model_parallel_rank(),
                  parallel_state.get_tensor_model_parallel_world_size())
    count = 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            full = state[canonical_name(name)] if strict else state.get(canonical_name(name))
            if full is None:
                continue
            if canonical_name(name) == "0.word.weight":  # pad to this layout's vocabulary rows
                full = pad_vocabulary(full, config.padded_vocab_size)
            if getattr(parameter, "tensor_model_parallel", False):
                full = full.chunk(size, dim=parameter.partition_dim)[rank]
            if full.shape != parameter.shape:
                raise CheckpointError(f"weights for {canonical_name(name)} have shape {tuple(full.shape)} on "
                                      f"tensor-parallel rank {rank}, the model expects {tuple(parameter.shape)}")
            parameter.copy_(full)
            count += 1
    return count
