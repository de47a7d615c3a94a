#!/usr/bin/env python
"""Train a SentencePiece BPE tokenizer (byte fallback, an end-of-document token).

    python tools/train_tokenizer.py --input 'corpus/*.jsonl.zst' --vocab-size 32000 --output tok/

Reads the same inputs as tools/preprocess_data.py (jsonl, .gz, .zst, parquet,
datasets directories) plus plain .txt files. Writes DIR/tokenizer.model,
DIR/tokenizer.vocab and DIR/tokenizer.json (what it was trained on); use it
with `preprocess_data.py --tokenizer DIR/tokenizer.model`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from data_pipeline.readers import InputError, Skipped, iter_texts, resolve_inputs  # noqa: E402
from data_pipeline.tokenizers import train_sentencepiece  # noqa: E402


def read_texts(paths: list[str], text_key: str, skipped: list[Skipped]):
    corpus = [p for p in paths if not p.endswith(".txt")]
    yield from iter_texts(resolve_inputs(corpus), text_key, skipped) if corpus else ()
    for path in (p for p in paths if p.endswith(".txt")):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from f


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output", required=True, help="directory for tokenizer.model")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--max-sentences", type=int, default=10_000_000,
                        help="cap on the lines sampled for training (reservoir sampling over all input)")
    args = parser.parse_args(argv)
    try:
        text_files = [p for p in args.input if p.endswith(".txt")]
        missing = [p for p in text_files if not Path(p).is_file()]
        if missing:
            raise InputError(f"input not found: {missing[0]}")
        resolve_inputs([p for p in args.input if not p.endswith(".txt")])  # fail fast, before training
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.vocab_size < 260:
        print("error: --vocab-size must be at least 260 (256 byte pieces + specials)", file=sys.stderr)
        return 2
    skipped: list[Skipped] = []
    began = time.monotonic()
    texts = tqdm(read_texts(args.input, args.text_key, skipped), desc="reading documents", unit="doc")
    try:
        tokenizer = train_sentencepiece(texts, args.output, args.vocab_size, args.max_sentences)
    except RuntimeError as error:
        print(f"error: SentencePiece training failed: {error}", file=sys.stderr)
        return 2
    info = {
        "inputs": args.input,
        "documents": texts.n,
        "skipped_records": [vars(skip) for skip in skipped],
        "max_sentences": args.max_sentences,
        "tokenizer": tokenizer.identity(),
        "seconds": round(time.monotonic() - began, 1),
    }
    (Path(args.output) / "tokenizer.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"trained a {tokenizer.vocab_size}-piece tokenizer on {texts.n} documents "
          f"({len(skipped)} records skipped); end-of-document id {tokenizer.eod_id}: {args.output}/tokenizer.model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
