"""Tokenize a corpus into Megatron .bin/.idx shards, in parallel and resumably.

The reading process cuts inputs into chunks of raw records (readers.py);
worker processes parse, validate and tokenize them; the reading process takes
the results back *in input order* and appends documents to the current shard,
starting a new one once it holds `shard_size_tokens` tokens. Output therefore
depends only on the inputs and settings, never on the worker count.

At most `IN_FLIGHT_PER_WORKER x workers` chunks are in flight, so memory stays flat however large
the corpus is. Each finished shard is journaled with the input position just
after its last document; a re-run resumes from there (shards.py).

Across MPI ranks (several nodes) no rank can know where a shard begins until the
files before it are tokenized, so the work goes in three steps: every rank
tokenizes its share of the input files into per-file token files, rank 0 plans
the shards from the documents' lengths, and shard k is written by rank k mod R
(`tokenize_across_ranks`). The shards, journal and summary are those of one
process, byte for byte, so a run killed with R ranks resumes with any number,
one included.
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
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from data_pipeline.atomic import write_text_atomically
from data_pipeline.readers import Chunk, Skipped, chunk_documents, is_datasets_dir, iter_chunks, resolve_inputs
from data_pipeline.curation.distributed import Coordinator
from data_pipeline.shards import (
    Journal,
    PlannedShard,
    ShardWriter,
    TokenFiles,
    assign_skips,
    indexed_dataset_module,
    plan_shards,
    write_planned_shard,
)
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


def refuse_bad_records(result: TokenizedChunk, strict: bool) -> None:
    if strict and result.skipped:
        raise StrictModeError(f"{result.skipped[0]} (--strict stops at the first bad record)")


def consume(result: TokenizedChunk, state: RunState, journal: Journal, open_shard, shard_size_tokens: int, strict: bool) -> None:
    """Append one chunk's documents to shards, closing each full shard with its skips."""
    refuse_bad_records(result, strict)
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


@dataclass
class Run:
    """What every rank knows of the run (rank 0 alone holds its journal)."""

    inputs: list[str]
    header: dict
    output_prefix: str
    start: Position  # the next record to tokenize: just after the last finished shard
    finished_shards: int
    done: bool
    has_token_files: bool  # PREFIX.work/ holds files tokenized by an earlier run across ranks


def preprocess(
    input_patterns: list[str],
    output_prefix: str,
    tokenizer_spec: str = "gpt2",
    workers: int = 1,
    text_key: str = "text",
    shard_size_tokens: int = DEFAULT_SHARD_SIZE_TOKENS,
    strict: bool = False,
    show_progress: bool = True,
    comm=None,
) -> dict:
    """Tokenize the inputs into PREFIX_NNNNN.bin/.idx shards; return the summary written to PREFIX.json.

    With an MPI communicator (tools/preprocess_data.py under mpiexec or srun) the
    ranks share the input files and write the shards one process would, byte for
    byte; every rank returns the summary. The output prefix must be on a file
    system all ranks see.
    """
    if workers < 1 or shard_size_tokens < 1:
        raise ValueError("--workers and --shard-size-tokens must be at least 1")
    co = Coordinator(comm)
    tokenizer = together(co, lambda: load_tokenizer(tokenizer_spec))
    opened = together(co, lambda: open_run(input_patterns, output_prefix, tokenizer, text_key, shard_size_tokens)
                      if co.rank == 0 else None)
    run, journal = opened if opened else (None, None)
    run = co.broadcast(run)
    if not run.done:
        if co.world > 1 or run.has_token_files:
            tokenize_across_ranks(co, run, journal, tokenizer, workers, strict, show_progress)
        else:
            tokenize_into_shards(run.inputs, output_prefix, tokenizer, journal, run.header, workers, strict,
                                 show_progress)
    return co.broadcast(together(co, lambda: write_summary(run, tokenizer, journal) if co.rank == 0 else None))


def open_run(input_patterns: list[str], output_prefix: str, tokenizer: Tokenizer, text_key: str,
             shard_size_tokens: int) -> tuple[Run, Journal]:
    """Check the inputs and the output prefix, and open the journal (rank 0)."""
    inputs = resolve_inputs(input_patterns)
    prepare_output(output_prefix)
    header = {
        "format": 1,
        "inputs": [{"path": os.path.abspath(path), "bytes": input_bytes(path)} for path in inputs],
        "tokenizer_sha256": tokenizer.identity()["sha256"],
        "text_key": text_key,
        "shard_size_tokens": shard_size_tokens,
    }
    journal = Journal.open(output_prefix, header)
    end = journal.shards[-1]["end"] if journal.shards else {"file_index": 0, "record": 0}
    run = Run(inputs, header, output_prefix, Position(end["file_index"], end["record"]), len(journal.shards),
              journal.done is not None, TokenFiles(output_prefix).matches(header))
    return run, journal


def write_summary(run: Run, tokenizer: Tokenizer, journal: Journal) -> dict:
    summary = build_summary(run.header, tokenizer.identity(), tokenizer, journal)
    write_text_atomically(run.output_prefix + ".json", json.dumps(summary, indent=1) + "\n")
    TokenFiles(run.output_prefix).remove()  # left by a run across ranks killed as it finished
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


# ---- across ranks: each tokenizes whole input files, then the shards are cut in input order -----------


def together(co: Coordinator, work):
    """`work()` on this rank; if it fails on any rank, raise on every rank, so none waits in the next collective."""
    error = result = None
    try:
        result = work()
    except BaseException as failure:  # noqa: BLE001 - raised again by agree, on every rank
        error = failure
    co.agree(error)
    return result


def tokenize_across_ranks(co: Coordinator, run: Run, journal: Journal | None, tokenizer: Tokenizer, workers: int,
                          strict: bool, show_progress: bool) -> None:
    """Three steps, each resumable whatever the number of ranks before and after:

    1. every rank tokenizes its share of the input files, each whole, into token
       files (shards.TokenFiles); files finished by an earlier run are kept;
    2. rank 0 cuts the documents into the shards one process would make, from
       their lengths alone (shards.plan_shards), and tells every rank;
    3. shard k is written by rank k mod R; rank 0 journals the shards in order.
    The token files are deleted once the journal says the run is done.
    """
    files = TokenFiles(run.output_prefix)
    start = (run.start.file_index, run.start.record)
    if co.rank == 0 and run.finished_shards:
        log.info("resuming after %d finished shards, at %s record %d", run.finished_shards,
                 run.inputs[start[0]] if start[0] < len(run.inputs) else "the end", start[1])
    dealt = co.broadcast(together(co, lambda: deal_files(files, run, co.world) if co.rank == 0 else None))
    tokenize_files(co, run, files, dealt, tokenizer, workers, strict, show_progress)
    plan = co.broadcast(together(co, lambda: plan_shards(files, start, len(run.inputs), run.finished_shards,
                                                         run.header["shard_size_tokens"]) if co.rank == 0 else None))
    skips = together(co, lambda: assign_skips(plan, files, start, len(run.inputs)) if co.rank == 0 else None)
    write_shards(co, run, files, plan, journal, skips and skips[0], tokenizer.token_dtype, show_progress)
    together(co, lambda: (journal.finish({"skipped": skips[1]}), files.remove()) if co.rank == 0 else None)


def deal_files(files: TokenFiles, run: Run, world: int) -> list[list[tuple[int, int]]]:
    """(input file, first record) to tokenize, per rank: each file not already in the token files, largest
    first to the least loaded rank so that ranks finish together; each rank's share in input order."""
    sizes = [entry["bytes"] for entry in run.header["inputs"]]
    files.claim(run.header)  # first: a directory of another run is emptied, and none of its files is counted
    todo = []
    for index in range(run.start.file_index, len(run.inputs)):
        first = run.start.record if index == run.start.file_index else 0
        if files.finished(index, first) is None:
            todo.append((index, first))
    loads, dealt = [0] * world, [[] for _ in range(world)]
    for index, first in sorted(todo, key=lambda item: (-sizes[item[0]], item[0])):
        rank = loads.index(min(loads))
        dealt[rank].append((index, first))
        loads[rank] += sizes[index]
    return [sorted(share) for share in dealt]


class PeersStopped(Exception):
    """Another rank failed, so this one stopped its own files (the agreement that follows names the failure)."""


class Peers:
    """Point-to-point messages beside the collectives while every rank tokenizes its own files.

    A failing rank warns the others at once, so that they stop within a chunk
    rather than finish files that may take an hour; every rank sends rank 0 its
    running totals for the one progress bar. `finish` receives every message
    still in flight, so none is left pending. Alone (no communicator) there is
    nobody to tell.
    """

    FAILURE, PROGRESS = 7101, 7102  # message tags
    SEND_INTERVAL_S = 1.0

    def __init__(self, co: Coordinator):
        self.co, self.comm = co, co.comm
        self.totals = np.zeros((co.world, 4), dtype=np.int64)  # per rank: disk bytes, documents, tokens, text bytes
        self._requests: list = []
        self._sent = self._received = 0
        self._warned, self._last_send = False, 0.0

    def warn_others(self) -> None:
        self._warned = True
        if self.comm is not None:
            self._requests += [self.comm.isend(None, dest=rank, tag=self.FAILURE)
                               for rank in range(self.co.world) if rank != self.co.rank]

    def failed_elsewhere(self) -> bool:
        from mpi4py import MPI

        return self.comm is not None and self.comm.iprobe(source=MPI.ANY_SOURCE, tag=self.FAILURE)

    def report(self, totals: np.ndarray, final: bool = False) -> None:
        """This rank's running totals; rank 0 takes in everyone's, the others send theirs now and then."""
        self.totals[self.co.rank] = totals
        if self.comm is None:
            return
        if self.co.rank == 0:
            self._receive_progress()
        elif final or time.monotonic() - self._last_send >= self.SEND_INTERVAL_S:
            self._requests.append(self.comm.isend(totals.copy(), dest=0, tag=self.PROGRESS))
            self._sent += 1
            self._last_send = time.monotonic()

    def _receive_progress(self, until: int | None = None) -> None:
        """Progress messages that have arrived, or (with `until`) every one until that many in all."""
        from mpi4py import MPI

        status = MPI.Status()
        while (self._received < until if until is not None
               else self.comm.iprobe(source=MPI.ANY_SOURCE, tag=self.PROGRESS, status=status)):
            totals = self.comm.recv(source=MPI.ANY_SOURCE, tag=self.PROGRESS, status=status)
            self.totals[status.Get_source()] = totals  # a rank's messages arrive in the order it sent them
            self._received += 1

    def wait_for_everyone(self, show) -> None:
        """Until every rank has finished or stopped; rank 0 meanwhile passes the totals to `show`."""
        if self.comm is None:
            return
        request = self.comm.Ibarrier()
        while not request.Test():
            if self.co.rank == 0:
                self._receive_progress()
                show(self.totals.sum(axis=0))
            time.sleep(0.05)

    def finish(self) -> None:
        if self.comm is None:
            return
        from mpi4py import MPI

        flags = self.comm.allgather((self._warned, self._sent))
        for source, (warned, _) in enumerate(flags):
            if warned and source != self.co.rank:
                self.comm.recv(source=source, tag=self.FAILURE)
        if self.co.rank == 0:
            self._receive_progress(until=sum(sent for _, sent in flags))
        MPI.Request.waitall(self._requests)


class TokenizingProgress:
    """Rank 0's bar over every rank's input bytes, with documents/s, tokens/s and MB/s of text."""

    def __init__(self, total_bytes: int, ranks: int, enabled: bool):
        self.began = time.monotonic()
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenizing on {ranks} rank(s)",
                        disable=not enabled or not total_bytes, mininterval=0.5 if sys.stderr.isatty() else 30)

    def show(self, totals: np.ndarray) -> None:
        disk_bytes, documents, tokens, text_bytes = totals.tolist()
        elapsed = max(time.monotonic() - self.began, 1e-9)
        self.bar.update(disk_bytes - self.bar.n)
        self.bar.set_postfix(docs_per_s=f"{documents / elapsed:.0f}", tokens_per_s=f"{tokens / elapsed:.0f}",
                             text_MB_per_s=f"{text_bytes / elapsed / 1e6:.1f}", refresh=False)


def tokenize_files(co: Coordinator, run: Run, files: TokenFiles, dealt: list[list[tuple[int, int]]],
                   tokenizer: Tokenizer, workers: int, strict: bool, show_progress: bool) -> None:
    """Step 1 on every rank at once: this rank's input files into token files. An error on any rank stops
    every rank within a chunk, and is raised on all of them."""
    indexed_dataset_module()  # megatron-core's import takes seconds: pay it before the clock starts
    sizes = [entry["bytes"] for entry in run.header["inputs"]]
    peers = Peers(co)
    progress = TokenizingProgress(sum(sizes[index] for share in dealt for index, _ in share), co.world,
                                  show_progress and co.rank == 0)
    began, error = time.monotonic(), None
    try:
        tokenize_own_files(dealt[co.rank], run, files, tokenizer, workers, strict, peers, progress)
    except PeersStopped:
        pass
    except BaseException as failure:  # noqa: BLE001 - raised again by agree below
        error = failure
        peers.warn_others()
    peers.wait_for_everyone(progress.show)
    peers.finish()
    progress.show(peers.totals.sum(axis=0))
    progress.bar.close()
    co.agree(error)
    if co.rank == 0:
        _, documents, tokens, text_bytes = peers.totals.sum(axis=0).tolist()
        elapsed = max(time.monotonic() - began, 1e-9)
        log.info("tokenized %d files: %d documents, %d tokens in %.1f s (%.0f docs/s, %.0f tokens/s, %.1f MB/s of "
                 "text) on %d rank(s) x %d workers", sum(map(len, dealt)), documents, tokens, elapsed,
                 documents / elapsed, tokens / elapsed, text_bytes / elapsed / 1e6, co.world, workers)


def file_chunks(path: str, file_index: int, text_key: str, first_record: int) -> Iterator[Chunk]:
    """The chunks of one input file, at least one (empty for a file with no records left), so that every
    input file gets its token files."""
    empty = True
    for chunk in iter_chunks(path, file_index, text_key, first_record):
        empty = False
        yield chunk
    if empty:
        yield Chunk(file_index, path, first_record, "values")


def tokenize_own_files(own: list[tuple[int, int]], run: Run, files: TokenFiles, tokenizer: Tokenizer, workers: int,
                       strict: bool, peers: Peers, progress: TokenizingProgress) -> None:
    """This rank's (input file, first record) pairs into token files, with its local worker processes."""
    text_key, first_records = run.header["text_key"], dict(own)
    chunks = (chunk for index, first in own for chunk in file_chunks(run.inputs[index], index, text_key, first))
    totals = np.zeros(4, dtype=np.int64)
    writer = None
    if own:
        with closing(tokenized_in_order(chunks, tokenizer, text_key, workers)) as results:
            for result in results:
                refuse_bad_records(result, strict)
                if writer is None or writer.index != result.file_index:
                    if writer is not None:
                        writer.finish()
                    writer = files.writer(result.file_index, first_records[result.file_index], tokenizer.token_dtype)
                skipped = [vars(skip) for skip in sorted(result.skipped, key=lambda skip: skip.line)]
                writer.add(result.tokens, result.lengths, result.records, skipped, result.text_bytes)
                totals += (result.disk_bytes, len(result.lengths), int(result.lengths.sum()), result.text_bytes)
                peers.report(totals)
                progress.show(peers.totals.sum(axis=0))
                if peers.failed_elsewhere():
                    raise PeersStopped()
        writer.finish()
    peers.report(totals, final=True)


def write_shards(co: Coordinator, run: Run, files: TokenFiles, plan: list[PlannedShard], journal: Journal | None,
                 skips: list[list[dict]] | None, dtype: type[np.integer], show_progress: bool) -> None:
    """Step 3: shard k is written by rank k mod R, in rounds of one shard per rank. After each round rank 0
    journals the round's shards in index order, so the journal always lists a prefix of the shards, as
    after one process, and a re-run with any number of ranks resumes after it."""
    began = time.monotonic()
    bar = tqdm(total=len(plan), unit="shard", desc=f"writing shards on {co.world} rank(s)",
               disable=not (show_progress and co.rank == 0 and plan), mininterval=0.5 if sys.stderr.isatty() else 30)
    with bar:
        for first in range(0, len(plan), co.world):
            mine = first + co.rank
            record = together(co, lambda: write_planned_shard(plan[mine], files, run.output_prefix, dtype)
                              if mine < len(plan) else None)
            records = co.gather(record)
            together(co, lambda: journal_round(journal, records, skips, first) if co.rank == 0 else None)
            bar.update(min(co.world, len(plan) - first))
    if co.rank == 0 and plan:
        log.info("wrote %d shards, %d tokens, in %.1f s on %d rank(s)", len(plan),
                 sum(shard["tokens"] for shard in journal.shards[-len(plan):]), time.monotonic() - began, co.world)


def journal_round(journal: Journal, records: list[dict | None], skips: list[list[dict]], first: int) -> None:
    """The shards of one round (plan positions first, first + 1, ...; None past the end), in order."""
    for offset, record in enumerate(record for record in records if record is not None):
        record["skipped"] = skips[first + offset]
        journal.add_shard(record)


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
