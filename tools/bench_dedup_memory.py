#!/usr/bin/env python
"""Peak memory per duplicate in curation's dedup bookkeeping.

Curates N one-line documents twice with exact dedup, in one process (workers=1, so
every phase runs here): once all distinct, once with all but `--distinct` of them
copies. The difference in peak RSS, divided by the number of duplicates, is what each
duplicate costs. `--code DIR` runs another checkout of the project (e.g. an older
commit in a git worktree), so before and after are measured by the same script:

    python tools/bench_dedup_memory.py --documents 1000000
    git worktree add /tmp/before 7618503 && python tools/bench_dedup_memory.py --code /tmp/before
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_one(code: str, documents: int, distinct: int, root: Path) -> dict:
    """Curate in a fresh process; returns its peak RSS and the duplicates found."""
    source = root / f"in-{distinct}.jsonl"
    with open(source, "w") as f:
        for i in range(documents):
            f.write(json.dumps({"id": f"d{i}", "text": f"document number {i % distinct:09d}"}) + "\n")
    script = (f"import sys, json; sys.path.insert(0, {code!r})\n"
              "from data_pipeline.peak_memory import peak_rss_bytes\n"
              "from data_pipeline.curation.pipeline import CurationConfig, curate\n"
              f"stats = curate([{str(source)!r}], {str(root / f'out-{distinct}')!r}, "
              "CurationConfig.from_dict({'stages': ['exact_dedup']}), workers=1, show_progress=False)\n"
              "print(json.dumps({'kept': stats['kept'], 'removed': stats['removed'], "
              "'peak_rss_kib': peak_rss_bytes() // 1024}))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--distinct", type=int, default=1000, help="distinct texts in the run with duplicates")
    parser.add_argument("--code", default=str(REPO), help="the checkout to measure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        unique = run_one(args.code, args.documents, args.documents, Path(tmp))
        copies = run_one(args.code, args.documents, args.distinct, Path(tmp))
    duplicates = copies["removed"]
    per_duplicate = (copies["peak_rss_kib"] - unique["peak_rss_kib"]) * 1024 / max(duplicates, 1)
    print(json.dumps({"code": args.code, "documents": args.documents, "duplicates": duplicates,
                      "peak_rss_mib_distinct": round(unique["peak_rss_kib"] / 1024, 1),
                      "peak_rss_mib_duplicates": round(copies["peak_rss_kib"] / 1024, 1),
                      "bytes_per_duplicate": round(per_duplicate, 1)}))


if __name__ == "__main__":
    main()
