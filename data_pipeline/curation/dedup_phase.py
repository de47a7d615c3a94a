"""Phase 2, global: bucket records of every survivor, spilled into partitions by hash so memory holds
one partition at a time -> verified pairs -> clusters -> work/duplicates.npy (removed key, kept key,
reason), sorted by key, so each input file's duplicates are one contiguous slice."""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from data_pipeline.curation.config import CurationConfig
from data_pipeline.curation.dedup import BUCKET_DTYPE, MinHashSettings, cluster, partition_of, verified_pairs
from data_pipeline.curation.distributed import Coordinator
from data_pipeline.curation.keys import KeyStore
from data_pipeline.curation.layout import Layout

log = logging.getLogger("curate")


def spill_partitions(store: KeyStore, indices: list[int], config: CurationConfig, directory: Path,
                     co: Coordinator) -> list[Path]:
    """Bucket records of every document, routed by hash into partitions small enough for `memory_mb`.

    Partition p belongs to rank p % world: each rank sends the records of its own
    input files, one file per round, to the ranks owning their partitions (an
    all-to-all by bucket hash), and writes what it receives to its partition files.
    Returns this rank's partitions.
    """
    bands = config.minhash.bands if config.minhash else 0
    total = sum(store.count(i) for i in indices) * (bands + config.exact_dedup)
    count = max(co.world, math.ceil(total * BUCKET_DTYPE.itemsize / (config.memory_mb * 2**20)))
    directory.mkdir(parents=True, exist_ok=True)
    files = {p: open(directory / f"partition-{p:05d}.bin", "wb") for p in range(co.rank, count, co.world)}
    mine = [i for i in indices if co.owns(i)]
    for round_ in range(co.all_max(len(mine))):
        records, error = np.empty(0, BUCKET_DTYPE), None
        try:
            if round_ < len(mine):
                records = store.bucket_records(mine[round_], bands, config.exact_dedup)
        except Exception as failure:  # noqa: BLE001 - raised on every rank by agree, before the exchange
            error = failure
        co.agree(error)  # a rank that failed must not leave the others waiting in the all-to-all
        owner = partition_of(records, count)
        for received in co.all_to_all([records[owner % co.world == rank] for rank in range(co.world)]):
            partition = partition_of(received, count)
            for p, f in files.items():
                f.write(received[partition == p].tobytes())
    for f in files.values():
        f.close()
    return [Path(f.name) for f in files.values()]


def deduplicate(layout: Layout, indices: list[int], config: CurationConfig, co: Coordinator) -> np.ndarray:
    """Every duplicate (removed key, kept key, reason code), sorted by key; cached in work/.

    Each rank verifies the candidate pairs of its own partitions; rank 0 joins
    them into clusters (pairs are few next to documents) and writes the result.
    """
    target = layout.duplicates
    if target.is_file():
        return np.load(target, mmap_mode="r")
    began = time.perf_counter()
    store = KeyStore(layout, config.minhash.num_perm if config.minhash else 0)
    partitions = spill_partitions(store, indices, config, layout.work / "buckets", co)
    pairs = verified_pairs((np.fromfile(p, dtype=BUCKET_DTYPE) for p in partitions), store.signatures_of,
                           store.exact_low_of, config.minhash or MinHashSettings(verify_threshold=0))
    gathered = co.gather(pairs)
    error = None
    if co.rank == 0:
        try:
            save_clusters(gathered, target)
            shutil.rmtree(layout.work / "buckets", ignore_errors=True)
            log.info("dedup: %d duplicates among %d documents in %d partition(s) on %d rank(s), %.1f s",
                     len(np.load(target, mmap_mode="r")), sum(store.count(i) for i in indices),
                     len(partitions) * co.world, co.world, time.perf_counter() - began)
        except Exception as failure:  # noqa: BLE001 - raised on every rank by agree
            error = failure
    co.agree(error)  # also the barrier: every rank finds the result written
    return np.load(target, mmap_mode="r")


def save_clusters(gathered: list[tuple[np.ndarray, np.ndarray]], target: Path) -> None:
    """Join every rank's verified pairs into clusters and write the duplicates, atomically."""
    duplicates = cluster(np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered]))
    partial = target.with_name("duplicates.partial.npy")
    np.save(partial, duplicates)
    os.replace(partial, target)


def duplicates_of_file(duplicates: np.ndarray, index: int) -> np.ndarray:
    """Input file `index`'s rows of the dedup result: a slice, since rows are sorted by key and the file
    index is the key's high half."""
    low, high = np.searchsorted(duplicates["doc"], [index << 32, (index + 1) << 32])
    return np.array(duplicates[low:high])
