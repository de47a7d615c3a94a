"""Resume on another layout: DeepSpeed's universal checkpoint, made automatic.

A checkpoint is written in DeepSpeed's sharded layout: each rank's ZeRO
partition of the flat fp32 weights and Adam moments, cut by tensor and pipeline
rank. To resume with a different TP, PP, DP or ZeRO stage, rank 0 converts it
once with DeepSpeed's converter (deepspeed.checkpoint.ds_to_universal) into one
full tensor per parameter name (`universal/zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`),
and every rank of the new layout then loads its own slices from there
(`checkpoint.load_universal` in the DeepSpeed config).

The converter merges tensor-parallel slices by parameter name, so it must be told
how each of our parameters is split; `universal_checkpoint_info` says so, and is
saved with every checkpoint. The conversion is written to a sibling `.tmp-`
directory and renamed into the checkpoint's own directory when complete, so it
is reused by later resumes and removed with the checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from pretrain.checkpoint.sharded import CheckpointError, first_unreadable
from pretrain.model.gpt2 import TIED_EMBEDDING
from pretrain.model.shape import GPTConfig
from pretrain.parallel.distributed import on_rank_zero

log = logging.getLogger("pretrain")

UNIVERSAL = "universal"

_WORD_EMBEDDING = rf"tied_modules\.{TIED_EMBEDDING}\.word\.weight$"
# How megatron-core splits each parameter over tensor-parallel ranks (pretrain/model/gpt2.py):
# VocabParallelEmbedding by vocabulary rows, ColumnParallelLinear (qkv, fc) by output rows,
# the converter's default; RowParallelLinear (the two proj) by input columns, with its bias
# whole on every rank, like LayerNorms and the position table.
_REPLICATED = [r"\d+\.position\.weight$", r"\d+\.ln_[12f]\.(weight|bias)$", r"\d+\.(attn|mlp)\.proj\.bias$"]
_ROW_PARALLEL = [r"\d+\.(attn|mlp)\.proj\.weight$"]


def universal_checkpoint_info(config: GPTConfig) -> dict:
    """What DeepSpeed's converter needs to merge our tensor-parallel slices; saved with each checkpoint."""
    from deepspeed.checkpoint import constants as c

    return {
        # Replicated parameters are identical on every TP rank; the mean is the same value
        # and, unlike an exact-copy check, survives a last-bit difference.
        c.PARAMETER_TO_AVERAGE_PATTERNS: _REPLICATED,
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: _ROW_PARALLEL,
        # Vocabulary padding depends on TP (a multiple of 128 x TP): the converter strips it and
        # the loader pads again for the new TP. The padded rows never reach the loss.
        c.VOCABULARY_PARAMETER_PATTERNS: [_WORD_EMBEDDING],
        c.ORIGINAL_VOCAB_SIZE: config.vocab_size,
        c.PADDED_VOCAB_SIZE: config.padded_vocab_size,
        # The output head shares the embedding: the first stage's copy is the one kept.
        c.PIPELINE_REPLICATED_PARAMETER_PATTERNS: [_WORD_EMBEDDING],
    }


def tensor_parallel_split(name: str) -> str:
    """How a parameter (GPT2's or a pipeline stage's name) is cut over tensor-parallel ranks, by the rules
    given to DeepSpeed's converter, in its order: "replicated", "rows" (input columns, merged along
    dim 1), "vocabulary" (rows, then unpadded) or "columns" (output rows, merged along dim 0)."""
    def matches(patterns):
        return any(re.match(pattern, name) for pattern in patterns)

    if matches(_REPLICATED):
        return "replicated"
    if matches(_ROW_PARALLEL):
        return "rows"
    return "vocabulary" if matches([_WORD_EMBEDDING]) else "columns"


def checkpoint_client_state(config: GPTConfig) -> dict:
    """What every checkpoint carries so that it can be resharded later."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    return {UNIVERSAL_CHECKPOINT_INFO: universal_checkpoint_info(config)}


def repair_after_universal_load(optimizer, expected: list[dict]) -> None:
    """Undo two things DeepSpeed's ZeRO-3 universal loader gets wrong (ZeRO-1/2 need neither).

    It copies the first saved group's settings into every group, which would put
    weight decay on biases and LayerNorms: the settings come from this run's
    config, so they are re-applied by index. And it gives every group the same
    Adam step tensor, which torch's AdamW increments in place, once per group:
    the second group's bias correction would then run ahead. Each state gets its
    own copy.
    """
    for group, settings in zip(optimizer.param_groups, expected, strict=True):
        group.update(settings)
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def group_settings(optimizer) -> list[dict]:
    """Each group's settings except the learning rate (the trainer sets it from the step before each step)."""
    return [{k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
            for group in optimizer.param_groups]


def universal_dir(checkpoint: Path) -> Path:
    return Path(checkpoint) / UNIVERSAL


def _converted(checkpoint: Path) -> bool:
    # The converter writes the optimizer's common state last.
    return (universal_dir(checkpoint) / "zero" / "optimizer_state.pt").is_file()


def _partial_dir(checkpoint: Path) -> Path:
    # A sibling `.tmp-` directory: never inside the checkpoint the converter reads, and
    # removed with other unfinished saves at the next start.
    return checkpoint.parent / f".tmp-universal-{checkpoint.name}"


def _failure_marker(checkpoint: Path) -> Path:
    return checkpoint.parent / f".tmp-universal-failed-{checkpoint.name}"


def run_ds_to_universal(checkpoint: Path, output: Path, workers: int) -> None:
    """DeepSpeed's converter on one checkpoint directory, in a child process: it uses worker processes
    of its own, which must not be forked from a process holding collective communicators."""
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint),
               "--output_folder", str(output), "--num_extract_workers", str(workers),
               "--num_merge_workers", str(max(1, workers // 2))]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if result.returncode != 0:
        damaged = first_unreadable(checkpoint)
        if damaged:
            raise CheckpointError(f"{damaged}; the checkpoint is damaged: use another step_* directory")
        hint = ""
        if "universal_checkpoint_info" in result.stderr:
            hint = ("it was saved before checkpoints carried resharding information; resume it once on its own "
                    "layout, let it save, then change the layout. ")
        raise CheckpointError(f"merging the partitions of {checkpoint} failed: {hint}DeepSpeed's ds_to_universal "
                              f"exited {result.returncode}:\n{result.stderr[-3000:]}")


def convert_to_universal(checkpoint: Path, workers: int | None = None) -> Path:
    """Convert one checkpoint directory (rank 0 only); returns its universal form, reusing an earlier one."""
    checkpoint = Path(checkpoint)
    target = universal_dir(checkpoint)
    if _converted(checkpoint):
        return target
    partial = _partial_dir(checkpoint)
    shutil.rmtree(partial, ignore_errors=True)
    workers = workers or max(1, min(8, (os.cpu_count() or 2) // 2))
    log.info("resharding %s: converting it to DeepSpeed's universal form with %d workers", checkpoint, workers)
    began = time.monotonic()
    run_ds_to_universal(checkpoint, partial / UNIVERSAL, workers)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial / UNIVERSAL, target)  # complete, so never half-read by a later resume
    shutil.rmtree(partial, ignore_errors=True)
    log.info("converted in %.1f s: %s", time.monotonic() - began, target)
    return target


def convert_on_rank_zero(checkpoint: Path, rank: int, poll_seconds: float = 1.0) -> Path:
    """Rank 0 converts the checkpoint to its universal form while the others wait (pretrain.parallel.distributed
    .on_rank_zero: on the file system, not in a collective that could time out)."""
    checkpoint = Path(checkpoint)
    on_rank_zero(lambda: convert_to_universal(checkpoint), lambda: _converted(checkpoint), _failure_marker(checkpoint),
                 rank, f"convert {checkpoint} for the new layout", poll_seconds)
    return universal_dir(checkpoint)
