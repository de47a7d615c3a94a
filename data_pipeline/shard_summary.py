"""What a set of token shards holds: documents, tokens, dtype, the tokenizer that made
them, the vocabulary they use, and how long their documents are.

Shards are read through megatron-core's IndexedDataset, the reader the trainer uses,
so a shard it cannot open fails here first. A PREFIX (the --output-prefix of
tools/preprocess_data.py) stands for the shards listed in PREFIX.json, and that file
is where the tokenizer's identity (name, sha256 of its files) is recorded; a shard
given on its own finds it through the PREFIX.json that lists it, if any.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipeline.shards import indexed_dataset_module
from data_pipeline.tokenizers import ENDOFTEXT, Tokenizer, load_tokenizer

PERCENTILES = (10, 50, 90, 99)
CHUNK_TOKENS = 1 << 26  # tokens counted at a time: bounded memory on shards of any size
LARGEST_COUNTED_ID = 1 << 24  # above this an id is corrupt: count distinct ids without a dense table


class ShardError(ValueError):
    """A prefix or shard that cannot be read, or a tokenizer that does not match it; names the file."""


@dataclass
class ShardSource:
    prefix: str
    """The shard's path without .bin/.idx."""
    tokenizer: dict | None
    """The identity recorded for it in a PREFIX.json (name, sha256, files), or None."""
    recorded_in: str | None
    """The PREFIX.json that records it."""


def _shard_files_exist(prefix: str) -> bool:
    """True for a complete shard, False for none; a .bin without its .idx (or the reverse) is refused."""
    bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
    if bin_path.is_file() and not idx_path.is_file():
        raise ShardError(f"{bin_path} has no {idx_path.name} beside it: the shard is incomplete (an interrupted "
                         "tools/preprocess_data.py writes the .idx last); run the same command again to finish it")
    if idx_path.is_file() and not bin_path.is_file():
        raise ShardError(f"{idx_path} has no {bin_path.name} beside it; the shard's tokens are missing")
    return bin_path.is_file()


def _recorded_by_parent(prefix: str) -> tuple[dict | None, str | None]:
    """The tokenizer identity in the PREFIX.json that lists shard PREFIX_NNNNN, if one does."""
    match = re.fullmatch(r"(.*)_\d{5}", prefix)
    summary_path = Path(match.group(1) + ".json") if match else None
    if summary_path is None or not summary_path.is_file():
        return None, None
    try:
        summary = json.loads(summary_path.read_text())
        listed = Path(prefix).name in {shard["name"] for shard in summary["shards"]}
        return (summary["tokenizer"], str(summary_path)) if listed else (None, None)
    except (ValueError, KeyError, TypeError):  # not a summary of tools/preprocess_data.py: no record
        return None, None


def find_shards(argument: str) -> list[ShardSource]:
    """A shard (PREFIX, PREFIX.bin or PREFIX.idx) or an output prefix with a PREFIX.json -> its shards."""
    prefix = argument[:-4] if argument.endswith((".bin", ".idx")) else argument
    if _shard_files_exist(prefix):
        return [ShardSource(prefix, *_recorded_by_parent(prefix))]
    summary_path = Path(prefix + ".json")
    if not summary_path.is_file():
        raise ShardError(f"{argument}: neither {prefix}.bin/.idx nor {prefix}.json exists; give a shard or the "
                         "--output-prefix that tools/preprocess_data.py was run with")
    try:
        summary = json.loads(summary_path.read_text())
        names, tokenizer = [shard["name"] for shard in summary["shards"]], summary["tokenizer"]
    except (ValueError, KeyError, TypeError) as error:
        raise ShardError(f"{summary_path} is not a summary written by tools/preprocess_data.py ({error!r})") from None
    sources = []
    for name in names:
        shard = str(summary_path.parent / name)
        if not _shard_files_exist(shard):
            raise ShardError(f"{summary_path} lists shard {name}, but {shard}.bin/.idx do not exist; were they moved?")
        sources.append(ShardSource(shard, tokenizer, str(summary_path)))
    return sources


def _spec_of_identity(identity: dict) -> str:
    """The load_tokenizer spec that rebuilds a recorded tokenizer: "gpt2", a model file or a BPE directory."""
    files = identity.get("files", {})
    if identity["name"] == "gpt2":
        return "gpt2"
    if "model" in files:
        return files["model"]
    return str(Path(files["vocab_bpe"]).parent)


def _load(spec: str, option: str) -> Tokenizer:
    try:
        return load_tokenizer(spec)
    except (ValueError, OSError) as error:
        raise ShardError(f"{option}: {error}") from None


def resolve_tokenizer(sources: list[ShardSource], spec: str | None) -> tuple[Tokenizer, str]:
    """The tokenizer to check the shards against and decode them with, and where it came from.

    --tokenizer (`spec`) must be the one recorded for every shard that has a record; without
    it the recorded one is loaded; with no record at all, GPT-2 is assumed (and said so)."""
    recorded = {source.tokenizer["sha256"]: source for source in sources if source.tokenizer}
    if spec is not None:
        tokenizer = _load(spec, "--tokenizer")
        sha = tokenizer.identity()["sha256"]
        for source in recorded.values():
            if source.tokenizer["sha256"] != sha:
                raise ShardError(
                    f"{source.recorded_in} records tokenizer {source.tokenizer['name']} (sha256 "
                    f"{source.tokenizer['sha256'][:12]}), not --tokenizer {spec} (sha256 {sha[:12]}); "
                    "give the tokenizer the shards were made with, or leave out --tokenizer to use the recorded one")
        return tokenizer, f"--tokenizer {spec}"
    if len(recorded) > 1:
        names = ", ".join(f"{s.tokenizer['name']} in {s.recorded_in}" for s in recorded.values())
        raise ShardError(f"the shards were made with different tokenizers ({names}); inspect them separately")
    if not recorded:
        return load_tokenizer("gpt2"), "gpt2 (assumed: no PREFIX.json records the tokenizer; give --tokenizer)"
    source = next(iter(recorded.values()))
    where = f"the tokenizer recorded in {source.recorded_in} (give --tokenizer for a copy elsewhere)"
    tokenizer = _load(_spec_of_identity(source.tokenizer), where)
    if tokenizer.identity()["sha256"] != source.tokenizer["sha256"]:
        raise ShardError(f"the tokenizer files recorded in {source.recorded_in} have changed since the shards were "
                         "made; give the original with --tokenizer")
    return tokenizer, f"recorded in {source.recorded_in}"


@dataclass
class ShardStats:
    source: ShardSource
    dtype: str
    document_lengths: np.ndarray
    """(documents,) tokens per document, end-of-document included."""
    token_counts: dict | np.ndarray
    """Occurrences of each token id: a dense array indexed by id, or {id: count} for absurd ids."""

    @property
    def tokens(self) -> int:
        return int(self.document_lengths.sum())


def _open(prefix: str):
    try:
        return indexed_dataset_module().IndexedDataset(prefix)
    except Exception as error:  # megatron-core asserts on a bad magic or version
        raise ShardError(f"{prefix}.idx cannot be read as a Megatron index ({error!r}); remake the shard") from None


def document_lengths(dataset) -> np.ndarray:
    """Tokens per document: a document is one or more consecutive sequences of the index."""
    ends = np.concatenate([[0], np.cumsum(dataset.sequence_lengths, dtype=np.int64)])
    return ends[dataset.document_indices[1:]] - ends[dataset.document_indices[:-1]]


def _count_ids(tokens: np.ndarray) -> dict | np.ndarray:
    """Occurrences of each id, counted chunk by chunk."""
    counts = np.zeros(0, dtype=np.int64)
    for start in range(0, len(tokens), CHUNK_TOKENS):
        chunk = np.asarray(tokens[start:start + CHUNK_TOKENS]).astype(np.int64)
        if chunk.min() < 0 or chunk.max() >= LARGEST_COUNTED_ID:
            ids, occurrences = np.unique(np.asarray(tokens).astype(np.int64), return_counts=True)
            return dict(zip(ids.tolist(), occurrences.tolist()))
        chunk_counts = np.bincount(chunk)
        if len(chunk_counts) > len(counts):
            counts = np.pad(counts, (0, len(chunk_counts) - len(counts)))
        counts[:len(chunk_counts)] += chunk_counts
    return counts


def read_shard(source: ShardSource) -> ShardStats:
    dataset = _open(source.prefix)
    dtype = np.dtype(dataset.index.dtype)
    lengths = document_lengths(dataset)
    bin_path = Path(source.prefix + ".bin")
    expected = int(np.sum(dataset.sequence_lengths, dtype=np.int64)) * dtype.itemsize
    if bin_path.stat().st_size != expected:
        raise ShardError(f"{bin_path} holds {bin_path.stat().st_size} bytes, its index says {expected}; "
                         "the shard is damaged, remake it")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r") if expected else np.empty(0, dtype)
    return ShardStats(source, dtype.name, lengths, _count_ids(tokens))


def length_figures(lengths: np.ndarray) -> dict:
    """min, p10, p50, p90, p99, max, mean of document lengths (numpy's linear percentiles)."""
    if len(lengths) == 0:
        return {}
    figures = {"min": int(lengths.min())}
    figures.update({f"p{q}": float(np.percentile(lengths, q)) for q in PERCENTILES})
    figures.update({"max": int(lengths.max()), "mean": float(lengths.mean())})
    return figures


def _as_dict(counts: dict | np.ndarray) -> dict:
    if isinstance(counts, dict):
        return counts
    ids = np.flatnonzero(counts)
    return dict(zip(ids.tolist(), counts[ids].tolist()))


def merge_counts(all_counts: list) -> dict | np.ndarray:
    if all(isinstance(counts, np.ndarray) for counts in all_counts):
        merged = np.zeros(max((len(c) for c in all_counts), default=0), dtype=np.int64)
        for counts in all_counts:
            merged[:len(counts)] += counts
        return merged
    merged: dict = {}
    for counts in all_counts:
        for token, occurrences in _as_dict(counts).items():
            merged[token] = merged.get(token, 0) + occurrences
    return merged


def vocabulary_figures(counts: dict | np.ndarray, vocab_size: int) -> dict:
    """Distinct ids used, the largest, and whether every id is below the tokenizer's vocabulary size."""
    used = sorted(_as_dict(counts)) if isinstance(counts, dict) else np.flatnonzero(counts).tolist()
    largest = used[-1] if used else None
    return {"distinct_ids": len(used), "largest_id": largest, "vocab_size": vocab_size,
            "fits": largest is None or (used[0] >= 0 and largest < vocab_size)}


def figures(stats: list[ShardStats], tokenizer: Tokenizer) -> dict:
    """Per shard and in total, as the tool prints them and --json writes them."""
    def one(shard: ShardStats) -> dict:
        recorded = shard.source.tokenizer
        return {"shard": shard.source.prefix, "documents": len(shard.document_lengths), "tokens": shard.tokens,
                "dtype": shard.dtype,
                "tokenizer": {"name": recorded["name"], "sha256": recorded["sha256"]} if recorded else None,
                "vocabulary": vocabulary_figures(shard.token_counts, tokenizer.vocab_size),
                "document_length": length_figures(shard.document_lengths)}

    lengths = np.concatenate([s.document_lengths for s in stats]) if stats else np.zeros(0, np.int64)
    identity = tokenizer.identity()
    total = {"shards": len(stats), "documents": len(lengths), "tokens": int(lengths.sum()),
             "dtypes": sorted({s.dtype for s in stats}),
             "vocabulary": vocabulary_figures(merge_counts([s.token_counts for s in stats]), tokenizer.vocab_size),
             "document_length": length_figures(lengths)}
    return {"tokenizer": {"name": identity["name"], "sha256": identity["sha256"], "vocab_size": tokenizer.vocab_size},
            "shards": [one(s) for s in stats], "total": total}


def first_documents(sources: list[ShardSource], count: int) -> Iterator[tuple[str, int, np.ndarray]]:
    """(shard, document number, token ids) of the first `count` documents, shard after shard."""
    for source in sources:
        dataset = _open(source.prefix)
        bounds = dataset.document_indices
        for document in range(len(bounds) - 1):
            if count <= 0:
                return
            count -= 1
            pieces = [dataset[sequence] for sequence in range(bounds[document], bounds[document + 1])]
            yield source.prefix, document, np.concatenate(pieces) if pieces else np.zeros(0, np.int64)


def decode_marking_ends(tokenizer: Tokenizer, ids) -> str:
    """Decoded text with every end-of-document id shown as <|endoftext|>, whatever the tokenizer
    (SentencePiece decodes its end-of-sentence id to nothing)."""
    segments, current = [], []
    for token in (int(t) for t in ids):
        if token == tokenizer.eod_id:
            segments.append(tokenizer.decode(current) + ENDOFTEXT)
            current = []
        else:
            current.append(token)
    return "".join(segments) + tokenizer.decode(current)
