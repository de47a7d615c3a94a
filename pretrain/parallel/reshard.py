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
saved with every checkpoint. The conversion is written under a temporary name
and renamed when complete, inside the checkpoint's own directory, so it is
reused by later resumes and removed with the checkpoint.
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

from pretrain.checkpoint import CheckpointError
from pretrain.model.gpt2 import TIED_EMBEDDING, GPTConfig

log = logging.getLogger("pretrain")

UNIVERSAL = "universal"
_PARTIAL = ".universal-partial"

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


def checkpoint_client_state(config: GPTConfig) -> dict:
    """What every checkpoint carries so that it can be resharded later."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    return {UNIVERSAL_CHECKPOINT_INFO: universal_checkpoint_info(config)}


def tensor_parallel_split(name: str) -> str:
    """How the converter will treat `name`: "replicated", "rows" (dim 1), "vocabulary" or "columns" (dim 0)."""
    if any(re.match(pattern, name) for pattern in _REPLICATED):
        return "replicated"
    if any(re.match(pattern, name) for pattern in _ROW_PARALLEL):
        return "rows"
    return "vocabulary" if re.match(_WORD_EMBEDDING, name) else "columns"


def universal_dir(checkpoint: Path) -> Path:
    return Path(checkpoint) / UNIVERSAL


def convert_to_universal(checkpoint: Path, workers: int | None = None) -> Path:
    """Convert one checkpoint directory (rank 0 only); returns its universal form, reusing an earlier one.

    Runs DeepSpeed's converter in a child process: it uses worker processes of its
    own, which must not be forked from a process holding collective communicators.
    """
    checkpoint = Path(checkpoint)
    target = universal_dir(checkpoint)
    if (target / "zero" / "optimizer_state.pt").is_file():
        return target
    partial = checkpoint / _PARTIAL
    shutil.rmtree(partial, ignore_errors=True)
    workers = workers or max(1, min(8, (os.cpu_count() or 2) // 2))
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint),
               "--output_folder", str(partial / UNIVERSAL), "--num_extract_workers", str(workers),
               "--num_merge_workers", str(max(1, workers // 2))]
    log.info("resharding %s: converting it to DeepSpeed's universal form with %d workers", checkpoint, workers)
    began = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if result.returncode != 0:
        raise CheckpointError(f"converting {checkpoint} for a new layout failed (DeepSpeed's ds_to_universal, "
                              f"exit {result.returncode}):\n{result.stderr[-3000:]}")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial / UNIVERSAL, target)  # complete, so never half-read by a later resume
    shutil.rmtree(partial, ignore_errors=True)
    log.info("converted in %.1f s: %s", time.monotonic() - began, target)
    return target
