#!/usr/bin/env python
"""`make demo`: the main job on real text that ships with a pip package.

Today that job is the data path: real English text (gensim's ABC news articles
and Wikipedia pages) -> GPT-2 BPE -> Megatron .bin/.idx shards, read back with
megatron-core's IndexedDataset. Training joins here as it lands.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.preprocess import preprocess  # noqa: E402
from data_pipeline.sample_text import news_articles, wikipedia_pages, write_jsonl  # noqa: E402
from data_pipeline.shards import indexed_dataset_module  # noqa: E402
from data_pipeline.tokenizers import load_tokenizer  # noqa: E402

OUT = Path(os.environ.get("DEMO_OUT") or Path(__file__).resolve().parents[1] / "demo_out")


def write_corpus() -> list[Path]:
    import zstandard

    news = write_jsonl(OUT / "corpus" / "news.jsonl", list(news_articles()))
    wiki_lines = "".join(json.dumps(page) + "\n" for page in wikipedia_pages()).encode()
    wiki = OUT / "corpus" / "wikipedia.jsonl.zst"
    wiki.write_bytes(zstandard.ZstdCompressor(level=10).compress(wiki_lines))
    return [news, wiki]


def show_shards(summary: dict, prefix: Path) -> None:
    IndexedDataset = indexed_dataset_module().IndexedDataset
    print(f"\n{'shard':<14}{'documents':>10}{'tokens':>10}")
    for shard in summary["shards"]:
        print(f"{shard['name']:<14}{shard['documents']:>10}{shard['tokens']:>10}")
    print(f"{'total':<14}{summary['documents']:>10}{summary['tokens']:>10}   ({summary['dtype']} ids, "
          f"tokenizer {summary['tokenizer']['name']} sha256 {summary['tokenizer']['sha256'][:12]})")
    last_shard = IndexedDataset(str(prefix.parent / summary["shards"][-1]["name"]))
    ids = last_shard[len(last_shard) - 1]
    tokenizer = load_tokenizer("gpt2")
    print(f"\nlast document of the last shard, read back with megatron-core's IndexedDataset "
          f"({len(ids)} tokens, ends with end-of-document id {ids[-1]}):")
    print("  " + repr(tokenizer.decode(ids[:60]))[:300] + " ...")


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    indexed_dataset_module()  # megatron-core's import takes seconds; keep it out of the timing below
    inputs = write_corpus()
    print(f"corpus: {', '.join(f'{p.name} ({p.stat().st_size / 1e6:.1f} MB)' for p in inputs)}")
    prefix = OUT / "tokens" / "demo"
    began = time.monotonic()
    summary = preprocess([str(p) for p in inputs], str(prefix), "gpt2", workers=max(1, len(os.sched_getaffinity(0))),
                         shard_size_tokens=300_000)
    print(f"tokenized in {time.monotonic() - began:.1f} s; {summary['skipped']['total']} records skipped")
    show_shards(summary, prefix)
    print(f"\nsummary: {prefix}.json")
    print(f"again from the command line:\n  .venv/bin/python tools/preprocess_data.py --input {OUT}/corpus/* "
          f"--output-prefix {OUT}/cli/demo --tokenizer gpt2 --shard-size-tokens 300000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
