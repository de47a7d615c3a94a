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

Ranks that tokenize input files apart (several nodes under MPI) first write
each file's tokens to `PREFIX.work/` (`TokenFiles`), then cut the shards one
process would have made from them (`plan_shards`, `write_planned_shard`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.atomic import fsync_path, write_text_atomically


def indexed_dataset_module():
    import data_pipeline.library_imports  # noqa: F401  (megatron-core, quietly and without compiling)
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
                    f"--output-prefix, or delete {path}, the shards beside it and {output_prefix}.work/ to start over"
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


# ---- tokenized input files: how ranks that tokenize apart write the same shards ------------

DOCS_DTYPE = np.dtype([("length", "<i8"), ("record", "<i8")])  # per kept document of an input file


class TokenFiles:
    """Input files tokenized one by one under PREFIX.work/, for shards to be cut from afterwards.

    Ranks of a multi-node run tokenize whole input files apart, so none can know
    where the shards of one process reading the inputs in order would begin. Each
    rank writes, per input file, `NNNNN.tokens` (the ids of every kept document,
    end-of-document included, one after the other) and `NNNNN.docs` (each
    document's length and record number) under `.tmp` names, renames them, and
    writes `NNNNN.json` (counts and skipped records) last: a file without its
    `.json` is tokenized again. Then `plan_shards` cuts the documents into the
    shards one process would make. `header.json` names the run (as the journal
    does); a directory left by another run is discarded.
    """

    def __init__(self, output_prefix: str):
        self.root = Path(output_prefix + ".work")

    def path(self, index: int, kind: str) -> Path:
        return self.root / f"{index:05d}.{kind}"

    def matches(self, header: dict) -> bool:
        path = self.root / "header.json"
        return path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(header))

    def claim(self, header: dict) -> None:
        if not self.matches(header):
            self.remove()
            self.root.mkdir(parents=True)
            write_text_atomically(self.root / "header.json", json.dumps(header))

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def finished(self, index: int, first_record: int = 0) -> dict | None:
        """The summary of input file `index` if its token files are complete and start at or before `first_record`."""
        marker = self.path(index, "json")
        try:
            summary = json.loads(marker.read_text())
            intact = (self.path(index, "tokens").stat().st_size == summary["token_bytes"]
                      and self.path(index, "docs").stat().st_size == summary["documents"] * DOCS_DTYPE.itemsize)
        except (OSError, ValueError, KeyError, TypeError):  # missing or damaged: tokenized again
            return None
        return summary if intact and summary["first_record"] <= first_record else None

    def writer(self, index: int, first_record: int, dtype: type[np.integer]) -> "TokenFileWriter":
        return TokenFileWriter(self, index, first_record, dtype)

    def documents(self, index: int) -> np.ndarray:
        return _mapped(self.path(index, "docs"), DOCS_DTYPE)

    def tokens(self, index: int, dtype: type[np.integer]) -> np.ndarray:
        return _mapped(self.path(index, "tokens"), np.dtype(dtype))


def _mapped(path: Path, dtype: np.dtype) -> np.ndarray:
    """A read-only memory map (numpy cannot map an empty file): a shard reads only its own part of a file."""
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.empty(0, dtype)


class TokenFileWriter:
    """One input file's documents as they are tokenized; `finish()` makes them appear complete."""

    def __init__(self, files: TokenFiles, index: int, first_record: int, dtype: type[np.integer]):
        self.files, self.index, self.dtype = files, index, dtype
        self._tokens = open(files.path(index, "tokens.tmp"), "wb")
        self._docs = open(files.path(index, "docs.tmp"), "wb")
        self.summary = {"index": index, "first_record": first_record, "documents": 0, "tokens": 0, "token_bytes": 0,
                        "text_bytes": 0, "skipped": []}

    def add(self, tokens: np.ndarray, lengths: np.ndarray, records: np.ndarray, skipped: list[dict],
            text_bytes: int) -> None:
        data = np.asarray(tokens, dtype=self.dtype).tobytes()
        self._tokens.write(data)
        docs = np.empty(len(lengths), dtype=DOCS_DTYPE)
        docs["length"], docs["record"] = lengths, records
        self._docs.write(docs.tobytes())
        summary = self.summary
        summary["documents"] += len(lengths)
        summary["tokens"] += int(np.sum(lengths))
        summary["token_bytes"] += len(data)
        summary["text_bytes"] += text_bytes
        summary["skipped"] += skipped

    def finish(self) -> dict:
        for f, kind in ((self._tokens, "tokens"), (self._docs, "docs")):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self.files.path(self.index, kind + ".tmp"), self.files.path(self.index, kind))
        write_text_atomically(self.files.path(self.index, "json"), json.dumps(self.summary))
        return self.summary


@dataclass
class PlannedShard:
    """A shard to cut from token files: its pieces, and where in the input it ends."""

    index: int
    pieces: list[tuple[int, int, int, int]]
    """(input file, first document, end document, first token) ranges of that file's token files, in order."""
    end: tuple[int, int]
    """(input file, record) just after its last document, as the journal records it; (number of inputs, 0)
    for the last shard, which ends with the input."""


def plan_shards(files: TokenFiles, start: tuple[int, int], input_count: int, first_shard: int,
                shard_size_tokens: int) -> list[PlannedShard]:
    """The shards one process makes from input position `start` on: documents in input order, a shard
    closed after the document that brings it to `shard_size_tokens` (as preprocess.consume does).

    One binary search per shard over each file's running token count, so planning
    costs a pass over the document lengths, not a loop over documents.
    """
    plan, pieces, carried = [], [], 0
    for index in range(start[0], input_count):
        docs = files.documents(index)
        begin = int(np.searchsorted(docs["record"], start[1])) if index == start[0] else 0
        ends = np.cumsum(docs["length"])  # tokens up to and including each document
        while begin < len(docs):
            before = int(ends[begin - 1]) if begin else 0
            last = int(np.searchsorted(ends, before + shard_size_tokens - carried))  # the document that fills it
            if last >= len(docs):
                pieces.append((index, begin, len(docs), before))
                carried += int(ends[-1]) - before
                break
            pieces.append((index, begin, last + 1, before))
            plan.append(PlannedShard(first_shard + len(plan), pieces, (index, int(docs["record"][last]) + 1)))
            pieces, carried, begin = [], 0, last + 1
    if pieces:
        plan.append(PlannedShard(first_shard + len(plan), pieces, (input_count, 0)))
    return plan


def assign_skips(plan: list[PlannedShard], files: TokenFiles, start: tuple[int, int],
                 input_count: int) -> tuple[list[list[dict]], list[dict]]:
    """Each planned shard's skipped records, and those after the last shard ends, as one process files
    them: a skipped record belongs to the first shard that ends after it."""
    per_shard: list[list[dict]] = [[] for _ in plan]
    after: list[dict] = []
    shard = 0
    for index in range(start[0], input_count):
        for skip in files.finished(index, start[1] if index == start[0] else 0)["skipped"]:
            position = (index, skip["line"] - 1)  # lines count from 1, records from 0
            if position < start:
                continue
            while shard < len(plan) and plan[shard].end <= position:
                shard += 1
            (per_shard[shard] if shard < len(plan) else after).append(skip)
    return per_shard, after


def write_planned_shard(planned: PlannedShard, files: TokenFiles, output_prefix: str,
                        dtype: type[np.integer]) -> dict:
    """Write one planned shard from the token files, document by document as one process would: the same bytes."""
    shard = ShardWriter(output_prefix, planned.index, dtype)
    for index, begin, end, first_token in planned.pieces:
        tokens = files.tokens(index, dtype)
        offsets = np.concatenate([[first_token], first_token + np.cumsum(files.documents(index)["length"][begin:end])])
        for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
            shard.add_document(tokens[start:stop])
    record = shard.finish()
    record["end"] = {"file_index": planned.end[0], "record": planned.end[1]}
    return record
