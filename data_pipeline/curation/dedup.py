"""Exact and fuzzy deduplication: MinHash signatures, LSH buckets, clusters of connected pairs.

Every kept document gets a 64-bit key, `input file index << 32 | record number`,
so "the earliest document" is simply the smallest key, whatever the number of
workers or ranks. Per document we keep:
  - an exact key: 128 bits of xxh3 over the normalized text;
  - a MinHash signature: `bands x rows` 32-bit minima over its word n-grams
    (FineWeb: 5-grams, 14 bands x 8 rows = 112 hashes).
Buckets are (band, 64-bit hash of that band's rows); documents sharing a bucket
are candidate duplicates. Bucket records are routed to partitions by hash and
each partition is sorted on its own, so memory holds one partition at a time
(the executor spills them to disk, or exchanges them between MPI ranks by the
same partition rule). Candidate pairs are verified against the full signatures
(estimated Jaccard >= `verify_threshold`), which removes LSH's false positives
below the threshold, then joined into clusters (connected components); each cluster keeps
its smallest key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import xxhash

MERSENNE_61 = np.uint64((1 << 61) - 1)
MAX_32 = np.uint64((1 << 32) - 1)
EXACT_BAND = 0xFFFF  # the band number under which exact-text keys are bucketed
BUCKET_DTYPE = np.dtype([("band", "<u2"), ("hash", "<u8"), ("doc", "<i8")])
_NON_WORD = re.compile(r"[\W_]+")
_SHINGLE_BLOCK = 2048  # shingles hashed at a time: bounds memory for very long documents


@dataclass(frozen=True)
class MinHashSettings:
    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1
    verify_threshold: float = 0.7
    """Candidates must agree on this share of signature slots (an estimate of their Jaccard
    similarity); 0 keeps every LSH candidate, as FineWeb does."""

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows


def document_key(file_index: int, record: int) -> int:
    return (file_index << 32) | record


def key_parts(key: int) -> tuple[int, int]:
    return key >> 32, key & 0xFFFFFFFF


def words(text: str) -> list[str]:
    """Lowercased words without punctuation: the units shingles are made of."""
    return _NON_WORD.sub(" ", text.lower()).split()


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """32-bit hashes of the distinct word n-grams (a shorter text is one shingle)."""
    tokens = words(text)
    if len(tokens) <= ngram:
        grams = {" ".join(tokens)}
    else:
        grams = {" ".join(tokens[i:i + ngram]) for i in range(len(tokens) - ngram + 1)}
    return np.fromiter((xxhash.xxh32_intdigest(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))


def exact_key(text: str) -> tuple[int, int]:
    digest = xxhash.xxh3_128_intdigest(text.encode())
    return digest >> 64, digest & 0xFFFFFFFFFFFFFFFF


class MinHasher:
    """`num_perm` hash functions (a x + b) mod (2^61 - 1), truncated to 32 bits, minimized over shingles."""

    def __init__(self, settings: MinHashSettings):
        self.settings = settings
        rng = np.random.default_rng(settings.seed)
        self.a = rng.integers(1, int(MERSENNE_61), size=settings.num_perm, dtype=np.uint64)
        self.b = rng.integers(0, int(MERSENNE_61), size=settings.num_perm, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        hashes = shingle_hashes(text, self.settings.ngram)
        signature = np.full(self.settings.num_perm, MAX_32, dtype=np.uint64)
        for start in range(0, len(hashes), _SHINGLE_BLOCK):
            block = hashes[start:start + _SHINGLE_BLOCK, None]  # (S, 1)
            permuted = ((block * self.a + self.b) % MERSENNE_61) & MAX_32  # (S, num_perm); the product wraps mod 2^64
            np.minimum(signature, permuted.min(axis=0), out=signature)
        return signature.astype(np.uint32)

    def band_hashes(self, signature: np.ndarray) -> np.ndarray:
        rows = self.settings.rows
        return np.array([xxhash.xxh3_64_intdigest(signature[b * rows:(b + 1) * rows].tobytes())
                         for b in range(self.settings.bands)], dtype=np.uint64)


def bucket_records(keys: np.ndarray, band_hashes: np.ndarray, exact_high: np.ndarray | None) -> np.ndarray:
    """Bucket records for documents `keys` (n,), their band hashes (n, bands) and exact keys' high halves (n,)."""
    n, bands = band_hashes.shape
    records = np.empty(n * bands + (n if exact_high is not None else 0), dtype=BUCKET_DTYPE)
    records["band"][:n * bands] = np.tile(np.arange(bands, dtype=np.uint16), n)
    records["hash"][:n * bands] = band_hashes.reshape(-1)
    records["doc"][:n * bands] = np.repeat(keys, bands)
    if exact_high is not None:
        records["band"][n * bands:] = EXACT_BAND
        records["hash"][n * bands:] = exact_high
        records["doc"][n * bands:] = keys
    return records


def partition_of(records: np.ndarray, partitions: int) -> np.ndarray:
    return (records["hash"] % np.uint64(partitions)).astype(np.int64)


def candidate_pairs(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of documents sharing a bucket, as (exact pairs, fuzzy pairs), each (m, 2): (earlier, later).

    Within a bucket every document is paired with the bucket's earliest one; the
    clusters join the rest, so a bucket of k documents gives k - 1 pairs, not k^2.
    """
    ordered = records[np.lexsort((records["doc"], records["hash"], records["band"]))]
    same_bucket = np.zeros(len(ordered), dtype=bool)
    same_bucket[1:] = (ordered["band"][1:] == ordered["band"][:-1]) & (ordered["hash"][1:] == ordered["hash"][:-1])
    positions = np.arange(len(ordered))
    first_of_bucket = np.maximum.accumulate(np.where(same_bucket, 0, positions))
    pairs = np.stack([ordered["doc"][first_of_bucket[same_bucket]], ordered["doc"][same_bucket]], axis=1)
    exact = ordered["band"][same_bucket] == EXACT_BAND
    fuzzy = np.unique(pairs[~exact], axis=0) if (~exact).any() else np.empty((0, 2), dtype=np.int64)
    return pairs[exact], fuzzy


def estimated_jaccard(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Share of equal signature slots, row by row: an unbiased estimate of the shingle sets' Jaccard similarity."""
    return (first == second).mean(axis=-1)


def verified_pairs(partitions, signatures_of, exact_low_of, settings: MinHashSettings) -> tuple[np.ndarray, np.ndarray]:
    """(exact pairs, fuzzy pairs) found in some bucket partitions, each checked.

    `partitions` yields bucket-record arrays, each holding every record of its
    hashes; `signatures_of(keys)` and `exact_low_of(keys)` look documents up.
    Exact pairs must agree on all 128 bits; fuzzy pairs on `verify_threshold` of
    their signature slots. Partitions are independent, so this runs on whichever
    process owns them.
    """
    exact_found, fuzzy_found = [np.empty((0, 2), np.int64)], [np.empty((0, 2), np.int64)]
    for records in partitions:
        exact, fuzzy = candidate_pairs(records)
        if len(exact):
            exact_found.append(exact[exact_low_of(exact[:, 0]) == exact_low_of(exact[:, 1])])
        if len(fuzzy) and settings.verify_threshold > 0:
            fuzzy = fuzzy[estimated_jaccard(signatures_of(fuzzy[:, 0]), signatures_of(fuzzy[:, 1]))
                          >= settings.verify_threshold]
        fuzzy_found.append(fuzzy)
    return np.concatenate(exact_found), np.concatenate(fuzzy_found)


REASON_CODES = {"exact": 0, "minhash": 1}
REASON_NAMES = {code: name for name, code in REASON_CODES.items()}
DUPLICATES_DTYPE = np.dtype([("doc", "<i8"), ("kept", "<i8"), ("reason", "u1")])


def components(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(every document in `pairs`, sorted; the smallest document of its connected component).

    The union-find of the clusters, done by scipy's connected components on the
    pair graph: arrays of 8-byte keys instead of a Python dict entry per document,
    which is what bounds how many duplicates one process can cluster.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes, ends = np.unique(pairs, return_inverse=True)
    ends = ends.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(ends), dtype=np.int8), (ends[:, 0], ends[:, 1])), shape=(len(nodes),) * 2)
    count, labels = connected_components(graph, directed=False)
    smallest = np.full(count, len(nodes), dtype=np.int64)
    np.minimum.at(smallest, labels, np.arange(len(nodes)))  # nodes are sorted: the first index is the smallest key
    return nodes, nodes[smallest[labels]]


def cluster(exact: np.ndarray, fuzzy: np.ndarray) -> np.ndarray:
    """Every removed document as (doc, the kept document it duplicates, reason code), sorted by doc.

    Exact duplicates are resolved first; fuzzy pairs then join the documents that
    remain. Every removed document points at a document that is kept: the earliest
    (smallest key) of its cluster.
    """
    exact_nodes, exact_roots = components(exact)
    copies = exact_nodes != exact_roots
    gone, copies_kept = exact_nodes[copies], exact_roots[copies]
    fuzzy = fuzzy[~(np.isin(fuzzy[:, 0], gone) | np.isin(fuzzy[:, 1], gone))]
    fuzzy_nodes, fuzzy_roots = components(fuzzy)
    near = fuzzy_nodes != fuzzy_roots
    near_gone, near_kept = fuzzy_nodes[near], fuzzy_roots[near]  # sorted by document
    # An exact copy of a document that a near duplicate then removed points at what was kept;
    # to that document it is a near duplicate, not an exact one.
    at = np.searchsorted(near_gone, copies_kept)
    moved = at < len(near_gone)
    moved[moved] = near_gone[at[moved]] == copies_kept[moved]
    copies_kept[moved] = near_kept[at[moved]]
    duplicates = np.empty(len(gone) + len(near_gone), dtype=DUPLICATES_DTYPE)
    duplicates["doc"] = np.concatenate([gone, near_gone])
    duplicates["kept"] = np.concatenate([copies_kept, near_kept])
    duplicates["reason"] = np.concatenate([np.where(moved, REASON_CODES["minhash"], REASON_CODES["exact"]),
                                           np.full(len(near_gone), REASON_CODES["minhash"])])
    return duplicates[np.argsort(duplicates["doc"])]  # documents are distinct: one key decides the order


def deduplicate_in_memory(keys: np.ndarray, texts: list[str], settings: MinHashSettings,
                          partitions: int = 4) -> dict[int, tuple[int, str]]:
    """The whole dedup for documents that fit in memory (tests, small corpora); the executor spills instead."""
    hasher = MinHasher(settings)
    signatures = np.stack([hasher.signature(t) for t in texts]) if texts else np.empty((0, settings.num_perm), np.uint32)
    bands = np.stack([hasher.band_hashes(s) for s in signatures]) if texts else np.empty((0, settings.bands), np.uint64)
    exact = np.array([exact_key(t) for t in texts], dtype=np.uint64).reshape(-1, 2)
    row_of = {int(k): i for i, k in enumerate(keys)}

    def rows(lookup: np.ndarray):
        return np.fromiter((row_of[int(k)] for k in lookup), dtype=np.int64, count=len(lookup))

    records = bucket_records(np.asarray(keys, dtype=np.int64), bands, exact[:, 0])
    owner = partition_of(records, partitions)
    pairs = verified_pairs((records[owner == p] for p in range(partitions)), lambda k: signatures[rows(k)],
                           lambda k: exact[rows(k), 1], settings)
    return {doc: (kept, REASON_NAMES[code]) for doc, kept, code in cluster(*pairs).tolist()}
