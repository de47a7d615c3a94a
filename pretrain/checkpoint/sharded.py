"""Sharded checkpoints, written atomically, with a manifest; resume from `latest`.

Every rank writes its own model and optimizer shards through DeepSpeed's
`save_checkpoint`, into `DIR/.tmp-step_0000020/`: copied to host memory while the
step loop waits, written by a background thread while training goes on
(pretrain/checkpoint/writer.py; checkpoint.async=false waits for the writing too).
Each rank then marks its files complete; when all have, rank 0 lists every file
with its size in `manifest.json` (with the layout, step, consumed samples, config
hash, model shape and data identity), renames the directory to
`DIR/step_0000020/`, and only then points `DIR/latest` at it, and removes old
checkpoints. A crash at any moment leaves the previous checkpoint as `latest`; a
`.tmp-` directory is never loaded and is removed at the next start.

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
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.atomic import fsync_path, write_text_atomically
from pretrain.checkpoint.writer import BackgroundWriter, save_durably
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
DONE_MARK, FAILED_MARK = ".done_rank", ".failed_rank"  # each rank's word on its files, in a save's .tmp- directory


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
    """Saves and loads a run's checkpoints; saves write in the background (pretrain/checkpoint/writer.py)
    unless `asynchronous` is false, when a save returns once the checkpoint is complete."""

    def __init__(self, directory: Path, keep_last: int, keep_every: int, asynchronous: bool = True,
                 timeout_minutes: float = 10.0):
        self.directory = Path(directory)
        self.keep_last, self.keep_every = keep_last, keep_every
        self.asynchronous, self.timeout_minutes = asynchronous, timeout_minutes
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.writer = BackgroundWriter()  # the engine's checkpoint engine (use_writer)
        self._completed: list[dict] = []  # rows of finished saves, for metrics.jsonl (rank 0)
        self._lock = threading.Lock()

    def use_writer(self, engine) -> None:
        """Make `engine` write its checkpoint files through our background writer."""
        engine.checkpoint_engine = self.writer

    def clean_partial_saves(self) -> None:
        """Remove `.tmp-` directories a crash mid-save left behind (rank 0)."""
        if self.rank == 0 and self.directory.is_dir():
            for partial in self.directory.glob(TMP_PREFIX + "*"):
                log.warning("removing %s, an unfinished save", partial)
                shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()

    # ---- save ----------------------------------------------------------------------

    def save(self, engine, step: int, manifest: dict, client_state: dict) -> Path:
        """Save step `step`. Returns once this rank's state is copied to host memory (asynchronous) or the
        checkpoint is complete; it becomes `latest` when every rank's files are on disk."""
        began = time.perf_counter()
        self.wait()  # one save at a time: the previous one's files, and on rank 0 its finalization
        tag, partial_tag = tag_for(step), TMP_PREFIX + tag_for(step)
        partial = self.directory / partial_tag
        finish_weights(engine)  # the updated weights may still be arriving (pretrain/parallel/overlap.py)
        self.writer.begin()
        engine.save_checkpoint(str(self.directory), tag=partial_tag, save_latest=False,
                               client_state={**client_state, "step": step, "iteration": step})
        rng = random_state()
        self.writer.submit(lambda: save_durably(rng, partial / f"rng_rank{self.rank:05d}.pt"))
        # Synchronous, the loop waits for the whole save: its blocking time is the write time (set at the end).
        blocking = time.perf_counter() - began if self.asynchronous else None
        timing = {"began": began, "blocking": blocking, "bytes": self.writer.staged_bytes}
        self.writer.submit(lambda: self._mark(partial, timing), always=True)
        if self.rank == 0:
            self.writer.submit(lambda: self._finalize(partial, tag, step, manifest, timing), always=True)
        if not self.asynchronous:
            self.wait()
            dist.barrier()  # every rank's files are in place before any goes on
        return self.directory / tag

    def wait(self) -> None:
        """Until the saves started so far are written (on rank 0: complete, or failed); raises a failure."""
        self.writer.drain()

    def completed(self) -> list[dict]:
        """The metrics rows of the saves finished since the last call (rank 0)."""
        with self._lock:
            rows, self._completed = self._completed, []
        return rows

    def _mark(self, partial: Path, timing: dict) -> None:
        """On the writer thread, after this rank's files: say so, or why they are not all there."""
        error = self.writer.error
        name = f"{FAILED_MARK if error else DONE_MARK}{self.rank:05d}"
        body = {"error": f"{type(error).__name__}: {error}"} if error else {
            "seconds": time.perf_counter() - timing["began"], "bytes": timing["bytes"]}
        partial.mkdir(parents=True, exist_ok=True)
        write_text_atomically(partial / name, json.dumps(body))

    def _finalize(self, partial: Path, tag: str, step: int, manifest: dict, timing: dict) -> None:
        """On rank 0's writer thread: once every rank's files are marked complete, the manifest, the rename,
        `latest`, then the old checkpoints removed (after the new one is complete, off the step's path)."""
        deadline = time.monotonic() + 60 * self.timeout_minutes
        def marks(prefix: str) -> list[Path]:  # written atomically: a NAME.tmp is a mark still being written
            return sorted(p for p in partial.glob(prefix + "*") if not p.name.endswith(".tmp"))

        while True:
            failed = marks(FAILED_MARK)
            if failed:
                raise CheckpointError(f"the save of step {step} failed on rank {failed[0].name[-5:].lstrip('0') or 0}: "
                                      f"{json.loads(failed[0].read_text())['error']}; {self.directory / LATEST} "
                                      "still names the previous checkpoint")
            done = marks(DONE_MARK)
            if len(done) == self.world_size:
                break
            if time.monotonic() > deadline:
                raise CheckpointError(f"the save of step {step}: {self.world_size - len(done)} rank(s) did not finish "
                                      f"writing within {self.timeout_minutes:g} minutes (train.distributed_timeout_"
                                      f"minutes); {self.directory / LATEST} still names the previous checkpoint")
            time.sleep(0.05)
        for mark in done:
            mark.unlink()
        final = self.directory / tag
        files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
        write_text_atomically(partial / MANIFEST, json.dumps({**manifest, "step": step, "files": files}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        fsync_path(self.directory)
        write_text_atomically(self.directory / LATEST, tag + "\n")
        written = time.perf_counter() - timing["began"]
        timing["blocking"] = written if timing["blocking"] is None else timing["blocking"]
        size = sum(files.values())
        log.info("saved checkpoint %s: %.2f GB, the step loop blocked %.2f s, written in %.2f s", final, size / 1e9,
                 timing["blocking"], written)
        with self._lock:
            self._completed.append({"step": step, "event": "checkpoint", "bytes": size,
                                    "blocking_seconds": timing["blocking"], "write_seconds": written})
        self._prune()

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
