"""Dedup quality on planted near-duplicates of known Jaccard similarity, against datasketch's MinHashLSH."""

from __future__ import annotations

import random

import numpy as np
import pytest

from data_pipeline.curation.dedup import (
    MAX_32,
    MERSENNE_61,
    REASON_NAMES,
    MinHasher,
    MinHashSettings,
    candidate_pairs,
    bucket_records,
    cluster,
    deduplicate_in_memory,
    document_key,
    shingle_hashes,
    words,
)

SETTINGS = MinHashSettings()  # FineWeb: word 5-grams, 14 bands x 8 rows


class DisjointSet:
    """A plain union-find over document keys whose roots are the smallest keys: the reference for clusters."""

    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, key: int) -> int:
        while self.parent.get(key, key) != key:
            key = self.parent[key]
        return key

    def union(self, a: int, b: int) -> None:
        low, high = sorted((self.find(a), self.find(b)))
        if low != high:
            self.parent[high] = low

    def members(self):
        """(document, the root of its set) for every document that is not a root."""
        return [(key, self.find(key)) for key in list(self.parent) if self.find(key) != key]


def shingles(text: str, n: int = 5) -> set[str]:
    tokens = words(text)
    return {" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)} if len(tokens) > n else {" ".join(tokens)}


def jaccard(first: str, second: str) -> float:
    a, b = shingles(first), shingles(second)
    return len(a & b) / len(a | b)


@pytest.fixture(scope="module")
def planted(real_documents):
    """Real documents, each followed by a copy with a share of its words replaced (0 to 20%).

    Returns (texts, pairs): pairs are (original index, copy index, true Jaccard of their 5-gram sets).
    """
    rng = random.Random(0)
    originals = [d["text"] for d in real_documents if len(d["text"].split()) >= 80]
    vocabulary = sorted({w for text in originals for w in text.split()})
    texts, pairs = [], []
    for i, text in enumerate(originals):
        tokens = text.split()
        # A third each: light edits (Jaccard about 0.8-1), medium (0.5-0.8), heavy (below 0.5).
        share = (rng.uniform(0, 0.02), rng.uniform(0.02, 0.08), rng.uniform(0.08, 0.2))[i % 3]
        for position in rng.sample(range(len(tokens)), int(share * len(tokens))):
            tokens[position] = rng.choice(vocabulary)
        copy = " ".join(tokens)
        texts += [text, copy]
        pairs.append((len(texts) - 2, len(texts) - 1, jaccard(text, copy)))
    return texts, pairs


def quality(texts, pairs, removed: dict[int, int]) -> dict:
    """Recall over planted pairs with Jaccard >= 0.8, and every removal whose true Jaccard is below 0.5."""
    sets = DisjointSet()
    for doc, kept in removed.items():
        sets.union(doc, kept)
    high = [(a, b) for a, b, j in pairs if j >= 0.8]
    found = sum(sets.find(a) == sets.find(b) for a, b in high)
    false = sum(jaccard(texts[doc], texts[kept]) < 0.5 for doc, kept in removed.items())
    low = [(a, b) for a, b, j in pairs if j < 0.5]
    return {"recall_at_0.8": found / len(high), "high_pairs": len(high), "low_pairs": len(low),
            "removed": len(removed), "removed_below_0.5": false}


def datasketch_removals(texts) -> dict[int, int]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=SETTINGS.num_perm, params=(SETTINGS.bands, SETTINGS.rows))
    sketches = []
    for index, text in enumerate(texts):
        sketch = MinHash(num_perm=SETTINGS.num_perm, seed=1)
        sketch.update_batch([s.encode() for s in shingles(text)])
        lsh.insert(index, sketch)
        sketches.append(sketch)
    sets = DisjointSet()
    for index, sketch in enumerate(sketches):
        for other in lsh.query(sketch):
            sets.union(index, other)
    return dict(sets.members())


def test_planted_near_duplicates_recall_and_false_positives_against_datasketch(planted):
    texts, pairs = planted
    keys = np.arange(len(texts), dtype=np.int64)
    ours = {doc: kept for doc, (kept, _) in deduplicate_in_memory(keys, texts, SETTINGS).items()}
    reference = datasketch_removals(texts)
    ours_quality, reference_quality = quality(texts, pairs, ours), quality(texts, pairs, reference)
    print(f"\nours:       {ours_quality}\ndatasketch: {reference_quality}")
    assert ours_quality["high_pairs"] >= 80 and ours_quality["low_pairs"] >= 40
    assert ours_quality["recall_at_0.8"] >= 0.9
    assert ours_quality["recall_at_0.8"] >= reference_quality["recall_at_0.8"] - 0.05
    assert ours_quality["removed_below_0.5"] == 0
    assert ours_quality["removed_below_0.5"] <= reference_quality["removed_below_0.5"]
    # Every removed document points at the earliest member of its cluster.
    assert all(kept < doc for doc, kept in ours.items())


def test_exact_duplicates_keep_the_earliest_and_are_told_apart_from_near_duplicates(planted):
    texts, _ = planted
    base = texts[0]
    corpus = [base, texts[2], base, base + " One more sentence at the very end of it.", base]
    keys = np.array([document_key(3, 7), document_key(0, 5), document_key(1, 0), document_key(2, 0),
                     document_key(0, 9)], dtype=np.int64)
    removed = deduplicate_in_memory(keys, corpus, SETTINGS)
    earliest = document_key(0, 9)  # file 0, record 9: before files 1 and 3 whatever the list order
    assert removed == {int(keys[0]): (earliest, "exact"), int(keys[2]): (earliest, "exact"),
                       int(keys[3]): (earliest, "minhash")}


def test_a_bucket_of_k_documents_gives_k_minus_1_pairs_to_its_earliest():
    hasher = MinHasher(SETTINGS)
    signature = hasher.signature("one two three four five six seven")
    bands = np.stack([hasher.band_hashes(signature)] * 4)
    keys = np.array([40, 10, 30, 20], dtype=np.int64)
    exact, fuzzy = candidate_pairs(bucket_records(keys, bands, None))
    assert len(exact) == 0
    assert fuzzy.tolist() == [[10, 20], [10, 30], [10, 40]]


def test_signatures_hashed_in_blocks_equal_the_minimum_over_all_shingles_at_once():
    hasher = MinHasher(SETTINGS)
    long_text = " ".join(f"w{i}" for i in range(10_000))  # more shingles than one hashing block
    hashes = shingle_hashes(long_text, SETTINGS.ngram)[:, None]
    direct = (((hashes * hasher.a + hasher.b) % MERSENNE_61) & MAX_32).min(axis=0).astype(np.uint32)
    assert len(hashes) > 2048 and np.array_equal(hasher.signature(long_text), direct)
    assert hasher.signature("a b c d e f").shape == (112,)
    assert np.array_equal(MinHasher(SETTINGS).signature(long_text), hasher.signature(long_text))  # seeded


def reference_cluster(exact: np.ndarray, fuzzy: np.ndarray) -> dict[int, tuple[int, str]]:
    """The clustering rule written plainly with a union-find."""
    exact_sets, fuzzy_sets = DisjointSet(), DisjointSet()
    for a, b in exact.tolist():
        exact_sets.union(a, b)
    removed = {doc: (kept, "exact") for doc, kept in exact_sets.members()}
    for a, b in fuzzy.tolist():
        if a not in removed and b not in removed:
            fuzzy_sets.union(a, b)
    removed.update({doc: (kept, "minhash") for doc, kept in fuzzy_sets.members()})
    for doc, (kept, reason) in removed.items():
        if reason == "exact" and kept in removed:
            removed[doc] = (fuzzy_sets.find(kept), "minhash")
    return removed


@pytest.mark.parametrize("seed", range(6))
def test_clusters_equal_a_plain_union_find_on_random_pair_graphs(seed):
    """Chains, stars and overlapping exact and fuzzy pairs, as the dedup can produce them."""
    rng = np.random.default_rng(seed)
    keys = np.sort(rng.choice(1 << 40, size=300, replace=False)).astype(np.int64)
    def pairs(count):
        ends = np.sort(keys[rng.integers(0, len(keys), size=(count, 2))], axis=1)
        return ends[ends[:, 0] != ends[:, 1]]
    exact, fuzzy = pairs(int(rng.integers(0, 120))), pairs(int(rng.integers(0, 250)))
    ours = {doc: (kept, REASON_NAMES[code]) for doc, kept, code in cluster(exact, fuzzy).tolist()}
    assert ours == reference_cluster(exact, fuzzy)
    assert all(kept not in ours and kept < doc for doc, (kept, _) in ours.items())
    empty = np.empty((0, 2), np.int64)
    assert len(cluster(empty, empty)) == 0 and len(cluster(exact, empty)) == len(reference_cluster(exact, empty))
