"""Tokenize a corpus into Megatron .bin/.idx shards, in parallel and resumably.

The reading process cuts inputs into chunks of raw records (readers.py);
worker processes parse, validate and tokenize them; the reading process takes
the results back *in input order* and appends documents to the current shard,
starting a new one once it holds `shard_size_tokens` tokens. Output therefore
depends only on the inputs and settings, never on the worker count.

At most `IN_FLIGHT_PER_WORKER x workers` chunks are in flight, so memory stays flat however large
the corpus is. Each finished shard is journaled with the input position just
after its last document; a re-run resumes from there (shards.py).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from data_pipeline.atomic import write_text_atomically
from data_pipeline.readers import Chunk, Skipped, chunk_documents, is_datasets_dir, iter_chunks, resolve_inputs
from data_pipeline.shards import Journal, ShardWriter, indexed_dataset_module
from data_pipeline.tokenizers import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE_TOKENS = 500_000_000  # ~1 GB per shard at uint16
# Chunks queued per worker: with fewer than ~4 a worker sometimes waits while the
# writer is busy; each is ~1 MB of text, so memory stays small and flat.
IN_FLIGHT_PER_WORKER = 4


class OutputError(Exception):
    """The output prefix cannot be written."""


class StrictModeError(Exception):
    """A bad record was found and --strict asked to fail on it."""


# ---- worker side ---------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None
_worker_text_key = "text"


def _init_worker(tokenizer: Tokenizer, text_key: str) -> None:
    global _worker_tokenizer, _worker_text_key
    _worker_tokenizer = tokenizer
    _worker_text_key = text_key


@dataclass
class TokenizedChunk:
    file_index: int
    tokens: np.ndarray  # every kept document's ids + end-of-document, concatenated
    lengths: np.ndarray  # tokens per kept document
    records: np.ndarray  # record number (0-based, within the file) of each kept document
    skipped: list[Skipped] = field(default_factory=list)
    text_bytes: int = 0
    disk_bytes: int = 0


def tokenize_chunk(chunk: Chunk) -> TokenizedChunk:
    tokenizer = _worker_tokenizer
    texts, records, skipped = chunk_documents(chunk, _worker_text_key)
    tokens, lengths = tokenizer.encode_documents(texts)
    return TokenizedChunk(
        file_index=chunk.file_index,
        tokens=tokens,
        lengths=lengths,
        records=np.array(records, dtype=np.int64),
        skipped=skipped,
        text_bytes=sum(len(text.encode("utf-8")) for text in texts),
        disk_bytes=chunk.disk_bytes,
    )


# ---- reading-process side --------------------------------------------------------


@dataclass
class Position:
    """Where in the input a shard ended: the next record to read."""

    file_index: int = 0
    record: int = 0


def input_chunks(inputs: list[str], text_key: str, start: Position) -> Iterator[Chunk]:
    for file_index in range(start.file_index, len(inputs)):
        first = start.record if file_index == start.file_index else 0
        yield from iter_chunks(inputs[file_index], file_index, text_key, first)


def tokenized_in_order(chunks: Iterator[Chunk], tokenizer: Tokenizer, text_key: str, workers: int) -> Iterator[TokenizedChunk]:
    """Tokenize chunks in worker processes and yield results in input order.

    Spawned (not forked) workers import only the tokenizer, not the torch and
    megatron-core the parent may hold; as with any spawn pool, a script calling
    this needs an `if __name__ == "__main__":` guard. The tokenizer travels
    pickled (~35 ms) instead of being rebuilt from its files in every worker
    (~300 ms). A worker killed by the OS raises BrokenProcessPool here rather
    than hanging the run.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(tokenizer, text_key)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(tokenize_chunk, chunk))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def input_bytes(path: str) -> int:
    if is_datasets_dir(Path(path)):
        return sum(p.stat().st_size for p in Path(path).glob("*.arrow"))
    return os.path.getsize(path)


def prepare_output(output_prefix: str) -> None:
    directory = Path(output_prefix).parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".{Path(output_prefix).name}.write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OutputError(f"cannot write output prefix {output_prefix}: {error.strerror or error}") from error


@dataclass
class RunState:
    """What the writer accumulates: the open shard and the skips since the last one."""

    shard: ShardWriter | None = None
    pending_skips: list[Skipped] = field(default_factory=list)
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0


def consume(result: TokenizedChunk, state: RunState, journal: Journal, open_shard, shard_size_tokens: int, strict: bool) -> None:
    """Append one chunk's documents to shards, closing each full shard with its skips."""
    if strict and result.skipped:
        raise StrictModeError(f"{result.skipped[0]} (--strict stops at the first bad record)")
    skips = sorted(result.skipped, key=lambda skip: skip.line)
    next_skip, offsets = 0, np.concatenate([[0], np.cumsum(result.lengths)])
    for doc, record in enumerate(result.records):
        # Records are 0-based, skip lines 1-based: skips before this document belong to the open shard.
        while next_skip < len(skips) and skips[next_skip].line <= record:
            state.pending_skips.append(skips[next_skip])
            next_skip += 1
        if state.shard is None:
            state.shard = open_shard()
        state.shard.add_document(result.tokens[offsets[doc]:offsets[doc + 1]])
        if state.shard.tokens >= shard_size_tokens:
            close_shard(state, journal, Position(result.file_index, int(record) + 1))
    state.pending_skips.extend(skips[next_skip:])
    state.documents += len(result.lengths)
    state.tokens += int(result.lengths.sum())
    state.text_bytes += result.text_bytes


def close_shard(state: RunState, journal: Journal, end: Position) -> None:
    record = state.shard.finish()
    record["end"] = {"file_index": end.file_index, "record": end.record}
    record["skipped"] = [vars(skip) for skip in state.pending_skips]
    journal.add_shard(record)
    state.shard, state.pending_skips = None, []


# ---- the whole run -------------------------------------------------------------------


def preprocess(
    input_patterns: list[str],
    output_prefix: str,
    tokenizer_spec: str = "gpt2",
    workers: int = 1,
    text_key: str = "text",
    shard_size_tokens: int = DEFAULT_SHARD_SIZE_TOKENS,
    strict: bool = False,
    show_progress: bool = True,
) -> dict:
    """Tokenize the inputs into PREFIX_NNNNN.bin/.idx shards; return the summary written to PREFIX.json."""
    if workers < 1 or shard_size_tokens < 1:
        raise ValueError("--workers and --shard-size-tokens must be at least 1")
    inputs = resolve_inputs(input_patterns)
    prepare_output(output_prefix)
    tokenizer = load_tokenizer(tokenizer_spec)
    identity = tokenizer.identity()
    header = {
        "format": 1,
        "inputs": [{"path": os.path.abspath(path), "bytes": input_bytes(path)} for path in inputs],
        "tokenizer_sha256": identity["sha256"],
        "text_key": text_key,
        "shard_size_tokens": shard_size_tokens,
    }
    journal = Journal.open(output_prefix, header)
    if journal.done is None:
        tokenize_into_shards(inputs, output_prefix, tokenizer, journal, header, workers, strict, show_progress)
    summary = build_summary(header, identity, tokenizer, journal)
    write_text_atomically(output_prefix + ".json", json.dumps(summary, indent=1) + "\n")
    return summary


def tokenize_into_shards(inputs, output_prefix, tokenizer, journal, header, workers, strict, show_progress) -> None:
    end = journal.shards[-1]["end"] if journal.shards else {"file_index": 0, "record": 0}
    start = Position(end["file_index"], end["record"])
    if journal.shards:
        log.info("resuming after %d finished shards, at %s record %d", len(journal.shards),
                 inputs[start.file_index] if start.file_index < len(inputs) else "the end", start.record)
    sizes = [entry["bytes"] for entry in header["inputs"]]
    state = RunState()

    def open_shard() -> ShardWriter:
        return ShardWriter(output_prefix, len(journal.shards), tokenizer.token_dtype)

    indexed_dataset_module()  # megatron-core's import takes seconds: pay it before the clock starts
    began = time.monotonic()
    bar = tqdm(total=sum(sizes), initial=sum(sizes[:start.file_index]), unit="B", unit_scale=True,
               desc="tokenizing", disable=not show_progress, mininterval=0.5 if sys.stderr.isatty() else 30)
    with bar:
        chunks = input_chunks(inputs, header["text_key"], start)
        for result in tokenized_in_order(chunks, tokenizer, header["text_key"], workers):
            consume(result, state, journal, open_shard, header["shard_size_tokens"], strict)
            elapsed = max(time.monotonic() - began, 1e-9)
            bar.update(result.disk_bytes)
            bar.set_postfix(docs_per_s=f"{state.documents / elapsed:.0f}",
                            text_MB_per_s=f"{state.text_bytes / elapsed / 1e6:.1f}", refresh=False)
    if state.shard is not None:
        close_shard(state, journal, Position(len(inputs), 0))
    journal.finish({"skipped": [vars(skip) for skip in state.pending_skips]})
    elapsed = max(time.monotonic() - began, 1e-9)
    log.info("tokenized %d documents, %d tokens in %.1f s (%.0f docs/s, %.0f tokens/s, %.1f MB/s of text) with %d workers",
             state.documents, state.tokens, elapsed, state.documents / elapsed, state.tokens / elapsed,
             state.text_bytes / elapsed / 1e6, workers)


def build_summary(header: dict, identity: dict, tokenizer: Tokenizer, journal: Journal) -> dict:
    skipped = [skip for shard in journal.shards for skip in shard["skipped"]] + journal.done["skipped"]
    return {
        "inputs": header["inputs"],
        "tokenizer": identity,
        "dtype": np.dtype(tokenizer.token_dtype).name,
        "text_key": header["text_key"],
        "shard_size_tokens": header["shard_size_tokens"],
        "documents": sum(shard["documents"] for shard in journal.shards),
        "tokens": sum(shard["tokens"] for shard in journal.shards),
        "shards": [{key: shard[key] for key in ("name", "documents", "tokens")} for shard in journal.shards],
        "skipped": {
            "total": len(skipped),
            "by_reason": dict(Counter(skip["reason"] for skip in skipped)),
            "records": skipped,
        },
    }
