#!/usr/bin/env python
"""Curation throughput: tools/curate.py's pipeline against datatrove's, same input, same rules, one run.

    python tools/bench_curate.py --documents 4000 --workers 1

Both run the Gopher repetition and quality rules, C4 (without removing lines that
lack terminal punctuation, as FineWeb does), FineWeb's rules, and MinHash dedup
with word 5-grams in 14 bands x 8 rows, on the same jsonl files, each with
`--workers` processes; the figure is input documents per second per worker,
end to end (reading, filtering, dedup, writing). The input is real text (gensim's
news and Wikipedia test data) repeated with a few words changed per copy, so
the dedup has near duplicates to find. Needs `pip install -e .[bench]`
(datatrove and spaCy, whose blank English tokenizer datatrove's rules use).

    python tools/bench_curate.py --cluster-pairs 4000000

measures instead what bounds the dedup's memory: clustering that many verified
pairs (clusters of 4 documents, a tenth of the pairs also exact) on one process,
in seconds and peak memory allocated while clustering (tracemalloc).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.curation.pipeline import CurationConfig, curate  # noqa: E402
from data_pipeline.readers import read_jsonl  # noqa: E402
from data_pipeline.sample_text import real_documents  # noqa: E402

OUR_CONFIG = {"stages": [
    "gopher_repetition", "gopher_quality",
    {"c4": {"min_words_per_line": 3, "min_sentences": 5, "require_terminal_punctuation": False}},
    # verify_threshold 0: every LSH candidate pair is a duplicate, as in datatrove (and FineWeb).
    "fineweb", {"minhash_dedup": {"ngram": 5, "bands": 14, "rows": 8, "verify_threshold": 0}},
]}


def make_corpus(directory: Path, documents: int, files: int, seed: int = 0) -> list[Path]:
    """`documents` records over `files` jsonl files: the real documents, then copies with 2% of words changed."""
    rng = random.Random(seed)
    originals = [d["text"] for d in real_documents()]
    vocabulary = sorted({w for text in originals for w in text.split()})
    paths = [directory / f"part{k:03d}.jsonl" for k in range(files)]
    handles = [p.open("w", encoding="utf-8") for p in paths]
    for i in range(documents):
        words = originals[i % len(originals)].split()
        if i >= len(originals):
            for position in rng.sample(range(len(words)), max(1, len(words) // 50)):
                words[position] = rng.choice(vocabulary)
        handles[i % files].write(json.dumps({"id": f"d{i}", "text": " ".join(words)}) + "\n")
    for handle in handles:
        handle.close()
    return paths


def run_ours(inputs: list[Path], output: Path, workers: int) -> tuple[float, int]:
    began = time.perf_counter()
    stats = curate([str(p) for p in inputs], output, CurationConfig.from_dict(OUR_CONFIG), workers=workers,
                   show_progress=False)
    return time.perf_counter() - began, stats["kept"]


def _xxhash64_of_text(data) -> int:
    import xxhash

    return xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)


def datatrove_signature_step():
    """datatrove 0.10.1's MinHash signature step, hashing shingles the way it means to.

    It hands str to xxhash, which since xxhash 3 takes bytes only ("Strings must be
    encoded before hashing"); the step is otherwise unchanged, and encoding is what
    older xxhash did internally.
    """
    from datatrove.pipeline.dedup import MinhashDedupSignature

    class Signature(MinhashDedupSignature):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._hash_func = _xxhash64_of_text

    return Signature


def run_datatrove(inputs: list[Path], work: Path, workers: int) -> tuple[float, int]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    minhash = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    tasks, source = len(inputs), str(inputs[0].parent)

    def executor(pipeline, name, task_count=tasks):
        return LocalPipelineExecutor(pipeline=pipeline, tasks=task_count, workers=workers,
                                     logging_dir=str(work / "logs" / name), start_method="spawn")

    stages = [
        executor([JsonlReader(source, glob_pattern="*.jsonl"), GopherRepetitionFilter(), GopherQualityFilter(),
                  C4QualityFilter(filter_no_terminal_punct=False), FineWebQualityFilter(),
                  JsonlWriter(str(work / "filtered"))], "filter"),
        executor([JsonlReader(str(work / "filtered")),
                  datatrove_signature_step()(output_folder=str(work / "signatures"), config=minhash)], "signatures"),
        executor([MinhashDedupBuckets(input_folder=str(work / "signatures"), output_folder=str(work / "buckets"),
                                      config=minhash)], "buckets", minhash.num_buckets),
        executor([MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove_ids"),
                                      config=minhash)], "cluster", 1),
        executor([JsonlReader(str(work / "filtered")), MinhashDedupFilter(input_folder=str(work / "remove_ids")),
                  JsonlWriter(str(work / "output"))], "output"),
    ]
    began = time.perf_counter()
    for stage in stages:
        stage.run()
    seconds = time.perf_counter() - began
    kept = sum(1 for path in (work / "output").glob("*.jsonl.gz") for _ in read_jsonl(path))
    return seconds, kept


def bench_cluster(count: int) -> None:
    import tracemalloc

    import numpy as np

    from data_pipeline.curation.dedup import cluster

    rng = np.random.default_rng(0)
    docs = rng.choice(1 << 40, size=count, replace=False).astype(np.int64)
    fuzzy = np.sort(np.stack([docs, docs[(np.arange(count) // 4) * 4]], axis=1), axis=1)
    fuzzy = fuzzy[fuzzy[:, 0] != fuzzy[:, 1]]
    exact = fuzzy[: count // 10]
    began = time.perf_counter()
    removed = len(cluster(exact, fuzzy))
    seconds = time.perf_counter() - began
    tracemalloc.start()  # a second run for memory: tracing slows it; numpy's and scipy's arrays are traced too
    cluster(exact, fuzzy)
    grown = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    pairs = len(exact) + len(fuzzy)
    print(f"clustered {pairs:,} pairs ({removed:,} documents removed) in {seconds:.1f} s; peak memory "
          f"+{grown / 1e6:,.0f} MB, {grown / pairs:.0f} bytes per pair")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=4_000)
    parser.add_argument("--files", type=int, default=4, help="input files (tasks)")
    parser.add_argument("--workers", type=int, default=1, help="processes for each pipeline")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--cluster-pairs", type=int, default=0, help="measure clustering this many pairs instead")
    args = parser.parse_args(argv)
    if args.cluster_pairs:
        bench_cluster(args.cluster_pairs)
        return 0
    root = Path(tempfile.mkdtemp(prefix="bench_curate_"))
    try:
        (root / "input").mkdir()
        inputs = make_corpus(root / "input", args.documents, args.files)
        megabytes = sum(p.stat().st_size for p in inputs) / 1e6
        print(f"input: {args.documents:,} documents, {megabytes:.1f} MB in {args.files} files; "
              f"{args.workers} worker(s) each")
        ours_seconds, ours_kept = run_ours(inputs, root / "ours", args.workers)
        theirs_seconds, theirs_kept = run_datatrove(inputs, root / "datatrove", args.workers)
        print(f"{'pipeline':<12}{'seconds':>10}{'docs/s/worker':>16}{'kept':>10}")
        for name, seconds, kept in (("ours", ours_seconds, ours_kept), ("datatrove", theirs_seconds, theirs_kept)):
            print(f"{name:<12}{seconds:>10.1f}{args.documents / seconds / args.workers:>16,.0f}{kept:>10,}")
        print(f"ours / datatrove, per worker: {theirs_seconds / ours_seconds:.2f}x")
        assert sum(1 for p in (root / "ours" / "documents").glob("*.jsonl.zst") for _ in read_jsonl(p)) == ours_kept
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
