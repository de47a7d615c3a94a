#!/usr/bin/env python
"""Throughput of the four quality stages (Gopher repetition and quality, C4 with fineweb.yaml's settings,
FineWeb) on gensim's real documents, in CPU seconds of this process, best of `--repeats`.

    python tools/bench_filters.py                                   # this tree's filters.py
    git show 7618503:data_pipeline/curation/filters.py > /tmp/old_filters.py
    python tools/bench_filters.py /tmp/old_filters.py               # another version, same documents
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.curation.document import Document  # noqa: E402
from data_pipeline.sample_text import real_documents  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("filters", nargs="?", default=str(Path(__file__).resolve().parents[1] / "data_pipeline" /
                                                          "curation" / "filters.py"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("filters_under_test", args.filters)
    filters = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(filters)
    normalize = filters.Normalize()
    texts = [normalize(Document(d["text"], d["id"], d["source"])).text for d in real_documents()]
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    stages = {
        "gopher_repetition": filters.GopherRepetitionFilter,
        "gopher_quality": filters.GopherQualityFilter,
        "c4 (fineweb.yaml)": lambda: filters.C4Filter(min_words_per_line=3, min_sentences=5,
                                                      require_terminal_punctuation=False),
        "fineweb": filters.FineWebFilter,
    }
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, make in stages.items():
            stage = make()
            began = time.process_time()
            for text in texts:
                stage(Document(text, "x", "x"))
            best[name] = min(best.get(name, float("inf")), time.process_time() - began)
    print(f"{args.filters}: {len(texts)} documents, {megabytes:.2f} MB, best of {args.repeats} (CPU seconds)")
    for name, seconds in [*best.items(), ("all four", sum(best.values()))]:
        print(f"  {name:20s} {seconds:6.3f} s  {len(texts) / seconds:8.0f} docs/s  {megabytes / seconds:6.2f} MB/s")


if __name__ == "__main__":
    main()
