"""Token shards in the Megatron indexed-dataset layout, written atomically, and
the journal that lets an interrupted tokenization resume.

A shard `PREFIX_00003` is `PREFIX_00003.bin` (token ids, one document after the
other) and `PREFIX_00003.idx` (magic, version, dtype, per-document lengths and
byte offsets), written by megatron-core's `IndexedDatasetBuilder` and read by
its `IndexedDataset`. Both files are written under `.tmp` names, flushed to
disk, and renamed `.bin` first and `.idx` last: a shard without its `.idx`
cannot be opened, so a crash never leaves one that looks complete.

The journal (`PREFIX.progress.jsonl`) holds a header naming the run's inputs
and settings, then one line per finished shard with where in the input it
ended. It is the only record of completion: a shard on disk that the journal
does not list is rewritten.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.atomic import fsync_path, write_text_atomically


def indexed_dataset_module():
    # megatron-core warns at import that Transformer Engine and Apex are absent;
    # the indexed dataset needs neither, so the warnings are only noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def shard_prefix(prefix: str, index: int) -> str:
    return f"{prefix}_{index:05d}"


class ShardWriter:
    """One shard being written; `finish()` makes it appear atomically."""

    def __init__(self, prefix: str, index: int, dtype: type[np.integer]):
        self.index = index
        self.prefix = shard_prefix(prefix, index)
        self._bin_tmp, self._idx_tmp = self.prefix + ".bin.tmp", self.prefix + ".idx.tmp"
        self._builder = indexed_dataset_module().IndexedDatasetBuilder(self._bin_tmp, dtype=dtype)
        self.documents = 0
        self.tokens = 0

    def add_document(self, token_ids: np.ndarray) -> None:
        self._builder.add_document(token_ids, [len(token_ids)])
        self.documents += 1
        self.tokens += len(token_ids)

    def finish(self) -> dict:
        self._builder.finalize(self._idx_tmp)
        for tmp in (self._bin_tmp, self._idx_tmp):
            fsync_path(tmp)
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(self._idx_tmp, self.prefix + ".idx")
        fsync_path(os.path.dirname(os.path.abspath(self.prefix)))
        return {
            "index": self.index,
            "name": os.path.basename(self.prefix),
            "documents": self.documents,
            "tokens": self.tokens,
            "bin_bytes": os.path.getsize(self.prefix + ".bin"),
        }


class JournalMismatch(Exception):
    """The output prefix holds a run with other inputs or settings."""


@dataclass
class Journal:
    """Append-only record of finished shards; survives being killed mid-write."""

    path: Path
    header: dict
    shards: list[dict] = field(default_factory=list)
    done: dict | None = None

    @classmethod
    def open(cls, output_prefix: str, header: dict) -> "Journal":
        """Load the journal of `output_prefix` if it belongs to this run, else start one."""
        path = Path(output_prefix + ".progress.jsonl")
        journal = cls(path, header)
        if path.exists():
            lines = _read_complete_lines(path)
            if lines and lines[0].get("header") != header:
                raise JournalMismatch(
                    f"{path} belongs to a run with other inputs or settings; use another "
                    f"--output-prefix, or delete {path} and the shards beside it to start over"
                )
            records = [line for line in lines[1:] if "shard" in line]
            journal.shards = _intact_prefix(output_prefix, records)
            done = [line["done"] for line in lines[1:] if "done" in line]
            if done and len(journal.shards) == len(records):
                journal.done = done[0]
        journal._rewrite()
        return journal

    def add_shard(self, record: dict) -> None:
        self.shards.append(record)
        self._append({"shard": record})

    def finish(self, record: dict) -> None:
        self.done = record
        self._append({"done": record})

    def _append(self, line: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _rewrite(self) -> None:
        """Rewrite atomically: drops torn last lines and shards no longer intact."""
        lines = [{"header": self.header}] + [{"shard": record} for record in self.shards]
        if self.done is not None:
            lines.append({"done": self.done})
        write_text_atomically(self.path, "".join(json.dumps(line) + "\n" for line in lines))


def _read_complete_lines(path: Path) -> list[dict]:
    """Parse journal lines, stopping at the first torn one (a kill mid-append)."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for text in f:
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                break
    return lines


def _intact_prefix(output_prefix: str, records: list[dict]) -> list[dict]:
    """Journal shards up to the first one whose files are missing or the wrong size.

    Paths come from the current prefix, not the journal, so a finished output
    directory can be moved and still resume.
    """
    intact = []
    for record in records:
        shard = record["shard"]
        prefix = shard_prefix(output_prefix, shard["index"])
        bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
        if not (idx_path.is_file() and bin_path.is_file() and bin_path.stat().st_size == shard["bin_bytes"]):
            break
        intact.append(shard)
    return intact
