#!/usr/bin/env python
"""The layout planner's memory model against real runs of the trainer, on CPU.

    python tools/bench_plan.py                        # every case, a markdown table on stdout
    python tools/bench_plan.py --cases dp2-zero3 tp2 --json

Each case trains for a few steps (python -m pretrain, or pretrain.launch for several ranks) on
real text (gensim's news and Wikipedia, tokenized here) and reports rank 0's peak resident
memory; the prediction is the memory model's peak for that rank plus the measured process
baseline (pretrain/planner/measure.py says how). The same cases run in
tests/pretrain/planner/test_planner.py, which requires each within 20%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no accelerator needed; DeepSpeed would say so on stdout


def main(argv=None) -> int:
    from pretrain.planner.measure import CASES, compare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=[case.name for case in CASES], help="default: all")
    parser.add_argument("--json", action="store_true", help="one JSON line per case instead of a table")
    args = parser.parse_args(argv)
    chosen = [case for case in CASES if not args.cases or case.name in args.cases]
    with tempfile.TemporaryDirectory(prefix="bench_plan_") as work:
        shards = make_shards(Path(work))
        if not args.json:
            print("| case | ranks | settings | baseline GiB | model GiB | predicted GiB | measured GiB | error |")
            print("|---|---|---|---|---|---|---|---|")
        baselines: dict = {}  # measured once per rank count and precision, as in the test
        for case in chosen:
            began = time.monotonic()
            result = compare(case, shards, Path(work), baselines)
            if args.json:
                print(json.dumps(result), flush=True)
                continue
            settings = " ".join(s.split(".", 1)[1] for s in case.settings)
            print(f"| {case.name} | {case.nproc} | {settings} | {result['baseline_gib']:.3f} | "
                  f"{result['model_gib']:.3f} | {result['predicted_gib']:.3f} | {result['measured_gib']:.3f} | "
                  f"{result['error']:+.1%} |", flush=True)
            print(f"{case.name}: {time.monotonic() - began:.0f} s", file=sys.stderr)
    return 0


def make_shards(directory: Path) -> str:
    from data_pipeline.preprocess import preprocess
    from data_pipeline.sample_text import real_documents, write_jsonl

    corpus = write_jsonl(directory / "real.jsonl", real_documents())
    prefix = str(directory / "real")
    preprocess([str(corpus)], prefix, "gpt2", workers=2, shard_size_tokens=300_000, show_progress=False)
    return prefix


if __name__ == "__main__":
    sys.exit(main())
