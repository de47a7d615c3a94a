"""Checkpoint files written in the background (checkpoint.async, on by default).

DeepSpeed writes a checkpoint file by file through its CheckpointEngine (`save(state_dict, path)`).
Ours, BackgroundWriter, copies each state dict to host memory while the step loop waits (that copy is
the only part a save blocks for) and hands it to one writer thread per rank, which writes the files in
order while training goes on. pretrain/checkpoint/sharded.py then queues, on every rank, a mark that its
files are complete (or why they are not), and on rank 0 the finalization: wait for every rank's mark on
the file system (no collective leaves the main thread), write the manifest, move the directory into
place, point `latest` at it, remove old checkpoints. A process killed mid-write leaves only a `.tmp-`
directory, which the next start removes: `latest` names the previous, complete checkpoint throughout.
"""

from __future__ import annotations

import copy
import os
import queue
import threading

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from pretrain.checkpoint.resume import CheckpointError


def to_host(value):
    """A copy of a state dict that training cannot change any more: tensors copied to host memory (compact:
    a view of a flat buffer becomes a tensor of its own), containers rebuilt, other values deep-copied."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        copied = type(value)() if type(value) is not dict else {}
        for key, item in value.items():
            copied[key] = to_host(item)
        return copied
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(to_host(item) for item in value)
    return copy.deepcopy(value)


def save_durably(state, path) -> None:
    """torch.save, then the file's data flushed to the disk: a checkpoint is declared complete (its rank's mark,
    then `latest`) only over files a power cut would not take back."""
    torch.save(state, path)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


class BackgroundWriter(CheckpointEngine):
    """DeepSpeed's checkpoint engine for this run: staged copies, written by one thread, in order."""

    def __init__(self):
        super().__init__()
        self.name = "BackgroundWriter"
        self.staged_bytes = 0  # of the save in progress
        self.error: BaseException | None = None  # the first failure of the save in progress
        self._jobs: queue.Queue = queue.Queue()
        self._failure: BaseException | None = None  # a failure not yet raised in the main thread
        self._thread = threading.Thread(target=self._work, name="checkpoint-writer", daemon=True)
        self._thread.start()

    # ---- DeepSpeed's interface ----------------------------------------------------------------

    def create(self, info) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        staged = to_host(state_dict)
        self.staged_bytes += tensor_bytes(staged)
        self.submit(lambda: save_durably(staged, path))

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info) -> bool:
        return True  # sharded.py decides when a checkpoint is complete

    def preserves_storage_sharing(self) -> bool:
        return False  # the staging copy is compact already: DeepSpeed need not clone on the device first

    # ---- the queue ----------------------------------------------------------------------------

    def begin(self) -> None:
        """A new save: its failure state starts clean."""
        self.staged_bytes, self.error = 0, None

    def submit(self, job, always: bool = False) -> None:
        """Run `job()` on the writer thread after the jobs before it; unless `always`, only while the save in
        progress has not failed (its later files would be incomplete anyway)."""
        self._jobs.put((job, always))

    def drain(self) -> None:
        """Wait until every job submitted so far has run; raise a writer failure not raised yet."""
        self._jobs.join()
        if self._failure is not None:
            failure, self._failure = self._failure, None
            if isinstance(failure, OSError):  # a full or vanished disk: one line, and no requeue (exit 2)
                raise CheckpointError(f"writing a checkpoint failed: {failure}; `latest` still names the previous "
                                      "checkpoint") from failure
            raise failure

    def _work(self) -> None:
        while True:
            job, always = self._jobs.get()
            try:
                if always or self.error is None:
                    job()
            except BaseException as error:  # noqa: BLE001 - kept, and raised in the main thread by drain()
                if self.error is None:
                    self.error = error
                if self._failure is None:
                    self._failure = error
            finally:
                self._jobs.task_done()

    def makedirs(self, path, exist_ok=False) -> None:
        os.makedirs(path, exist_ok=exist_ok)
