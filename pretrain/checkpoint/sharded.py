"""Sharded checkpoints, written atomically, with a manifest; resume from `latest`.

Every rank writes its own model and optimizer shards through DeepSpeed's
`save_checkpoint`, into `DIR/.tmp-step_0000020/`. When all ranks are done, rank 0
lists every file with its size in `manifest.json` (with the layout, step,
consumed samples, config hash, model shape and data identity), renames the
directory to `DIR/step_0000020/`, and only then points `DIR/latest` at it. A
crash at any moment leaves the previous checkpoint as `latest`; a `.tmp-` directory
is never loaded and is removed at the next start.

On load, every file the manifest lists must exist with its recorded size, and
the model shape must match the config; otherwise the error names the file or the
mismatch. A run never silently starts fresh over a checkpoint it cannot read.
A checkpoint saved on another layout is loaded through its universal form
(pretrain/checkpoint/reshard.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.atomic import fsync_path, write_text_atomically
from pretrain.parallel.overlap import finish_weights
# Defined without torch (--check reads checkpoints too); imported from here by the tools and the trainer.
from pretrain.checkpoint.resume import (  # noqa: F401
    LATEST,
    MANIFEST,
    CheckpointError,
    verify_files,
)

log = logging.getLogger("pretrain")

TMP_PREFIX = ".tmp-"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def config_hash(config_dict: dict) -> str:
    """Hash of the settings that shape training (not where files go)."""
    shaping = {k: v for k, v in config_dict.items() if k not in ("run", "checkpoint", "logging")}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()


def random_state() -> dict:
    """This rank's torch random state (dropout): the CPU generator's and, when training on a GPU, its
    device's (is_initialized: a CPU run on a GPU node must not start CUDA to save it)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}


def restore_random_state(state) -> None:
    if isinstance(state, torch.Tensor):  # checkpoints before the CUDA state was saved
        state = {"cpu": state, "cuda": None}
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


def first_unreadable(checkpoint: Path) -> str | None:
    """Which file of a checkpoint torch cannot open, and why (a file damaged in place keeps its size,
    which the manifest checks); None if all open. Memory-mapped: nothing is read in full."""
    for path in sorted(Path(checkpoint).glob("*.pt")):
        try:
            torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as error:  # pickle, zip and torch each raise their own kinds
            return f"{path} cannot be read ({type(error).__name__}: {error})"
    return None


class CheckpointManager:
    def __init__(self, directory: Path, keep_last: int, keep_every: int):
        self.directory = Path(directory)
        self.keep_last, self.keep_every = keep_last, keep_every
        self.rank = dist.get_rank()

    def clean_partial_saves(self) -> None:
        """Remove `.tmp-` directories a crash mid-save left behind (rank 0)."""
        if self.rank == 0 and self.directory.is_dir():
            for partial in self.directory.glob(TMP_PREFIX + "*"):
                log.warning("removing %s, an unfinished save", partial)
                shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()

    # ---- save ----------------------------------------------------------------------

    def save(self, engine, step: int, manifest: dict, client_state: dict) -> Path:
        tag, partial_tag = tag_for(step), TMP_PREFIX + tag_for(step)
        partial = self.directory / partial_tag
        finish_weights(engine)  # the updated weights may still be arriving (pretrain/parallel/overlap.py)
        engine.save_checkpoint(str(self.directory), tag=partial_tag, save_latest=False,
                               client_state={**client_state, "step": step, "iteration": step})
        torch.save(random_state(), partial / f"rng_rank{self.rank:05d}.pt")
        dist.barrier()  # every rank's shards are on disk
        final = self.directory / tag
        if self.rank == 0:
            files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
            write_text_atomically(partial / MANIFEST, json.dumps({**manifest, "step": step, "files": files}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            fsync_path(self.directory)
            write_text_atomically(self.directory / LATEST, tag + "\n")
            self._prune()
            log.info("saved checkpoint %s", final)
        dist.barrier()
        return final

    def _prune(self) -> None:
        steps = sorted(int(p.name.split("_")[1]) for p in self.directory.glob("step_*") if p.is_dir())
        keep = set(steps[-self.keep_last:]) if self.keep_last > 0 else set(steps[-1:])
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        for step in steps:
            if step not in keep:
                shutil.rmtree(self.directory / tag_for(step), ignore_errors=True)

    # ---- load ----------------------------------------------------------------------

    def load(self, engine, tag: str, universal: Path | None = None) -> None:
        """Load `tag` as saved, or from its universal form (pretrain/checkpoint/reshard.py) on another layout."""
        directory = self.directory / tag
        where = (universal.parent, universal.name) if universal else (self.directory, tag)
        finish_weights(engine)  # no broadcast of the old weights may land on the loaded ones
        try:
            load_path, _ = engine.load_checkpoint(str(where[0]), tag=where[1], load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        except Exception:  # noqa: BLE001 - a file damaged in place (its size intact) fails inside torch.load
            damaged = first_unreadable(where[0] / where[1])
            if damaged:
                raise CheckpointError(f"{damaged}: the checkpoint is damaged; to resume from an older one, point "
                                      f"{self.directory / LATEST} at another step_* directory") from None
            raise
        if load_path is None:
            hint = f" (its universal form {universal}; delete that directory to convert again)" if universal else ""
            raise CheckpointError(f"DeepSpeed could not load {directory}{hint}")
        # Random state belongs to a rank of the saved layout; on another layout there is no
        # matching rank (it only matters for dropout, which pretraining leaves at 0).
        rng = directory / f"rng_rank{self.rank:05d}.pt"
        if rng.is_file() and universal is None:
            restore_random_state(torch.load(rng))
