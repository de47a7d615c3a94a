#!/usr/bin/env python
"""Look at what the model will see: token shards, or the exact samples of a training step.

Shards (a prefix stands for the shards in its PREFIX.json):
    python tools/inspect_data.py data/web/gpt2
    python tools/inspect_data.py data/web/gpt2_00003 data/books/gpt2 --show-documents 3
    python tools/inspect_data.py data/web/gpt2 --json | tail -n 1 | jq .total

  Per shard and in total: documents, tokens, dtype, the tokenizer recorded in
  PREFIX.json (name, sha256), the vocabulary used (distinct ids, the largest, whether it
  fits the tokenizer's vocabulary) and document lengths (min, p10, p50, p90, p99, max,
  mean; end-of-document included). The shards are checked against --tokenizer, else
  against the recorded tokenizer.

The samples the trainer feeds at a step, on one data-parallel rank:
    python tools/inspect_data.py --config configs/gpt2-tiny.yaml --step 0    # after tools/demo.py
    python tools/inspect_data.py --config configs/gpt2-124m.yaml --set data.prefixes=[data/web/gpt2] \\
        --step 1200 --world-size 16 --data-rank 3 --show-tokens
    python tools/inspect_data.py --config configs/gpt2-tiny.yaml --split valid --step 1 --json

  The datasets are built as the trainer builds them (same seed, split, blend and sizes
  for the whole run) and the sequences taken by its own micro_batches: for each, where it
  comes from (shard, document, token range), where documents end, and the decoded text.
  The data order is the same for any tensor or pipeline size; --world-size (default:
  tensor x pipeline size, one replica) sets the data-parallel size, and --data-rank is
  megatron-core's data-parallel rank. For --split valid, --step is the validation batch
  (every evaluation reads batches 0 .. eval.iterations - 1).

  megatron-core's sample indices are rebuilt in a temporary directory (they depend only
  on the seed, blend, split and sizes, so they are the run's), never written into the
  run's cache. --cache-dir keeps them for the next call; it may point at a run's own
  cache (RUN_DIR/data_cache or data.cache_dir) once that run has built its indices: they
  are then only read. Before that, both could write the same files at once.

--json: the last stdout line is one JSON object with every figure (and token ids).
Exit codes: 0 done, 2 unusable arguments (the message names the option or file).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.cli import OneLineErrorParser  # noqa: E402
warnings.filterwarnings("ignore", module="megatron")  # "Transformer Engine and Apex are not installed"

from data_pipeline.shard_summary import (  # noqa: E402
    ShardError,
    decode_marking_ends,
    figures,
    find_shards,
    first_documents,
    read_shard,
    resolve_tokenizer,
)


class UsageError(ValueError):
    """An option combination that cannot work; the message names the option."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="*", metavar="PREFIX_OR_SHARD",
                        help="shard prefixes (PREFIX.bin/.idx) or tools/preprocess_data.py output prefixes")
    parser.add_argument("--tokenizer", help="shards: the tokenizer to check against and decode with "
                                            "(default: the one recorded in PREFIX.json)")
    parser.add_argument("--show-documents", type=int, default=0, metavar="N",
                        help="shards: decode the first N documents")
    parser.add_argument("--config", help="show the samples the trainer feeds with this config (YAML)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, as for python -m pretrain")
    parser.add_argument("--step", type=int, help="with --config: the global step (0-based)")
    parser.add_argument("--data-rank", type=int, help="with --config: the data-parallel rank (default 0)")
    parser.add_argument("--world-size", type=int,
                        help="with --config: ranks of the run (default: tensor x pipeline size, one replica)")
    parser.add_argument("--split", choices=("train", "valid"), help="with --config: train (default) or valid")
    parser.add_argument("--show-tokens", action="store_true", help="with --config: print the token ids too")
    parser.add_argument("--cache-dir", help="with --config: keep megatron-core's sample indices here (see above)")
    parser.add_argument("--max-chars", type=int, default=1000,
                        help="decoded text shown per document or sequence (0: all; default 1000)")
    parser.add_argument("--json", action="store_true", help="end with one line of JSON holding every figure")
    return parser.parse_args(argv)


def check_options(args: argparse.Namespace) -> None:
    if args.config is None:
        if not args.shards:
            raise UsageError("give shard prefixes to summarize, or --config CONFIG.yaml --step S for a step's samples")
        config_only = (("--step", args.step), ("--data-rank", args.data_rank), ("--world-size", args.world_size),
                       ("--split", args.split), ("--set", args.set or None), ("--cache-dir", args.cache_dir),
                       ("--show-tokens", args.show_tokens or None))
        given = [name for name, value in config_only if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: for --config only; leave out or add --config CONFIG.yaml")
    else:
        if args.shards:
            raise UsageError(f"give either shards ({' '.join(args.shards)}) or --config, not both")
        if args.step is None:
            raise UsageError("--config needs --step S: the global step whose samples to show")
        if args.tokenizer or args.show_documents:
            raise UsageError("--tokenizer and --show-documents are for shards; with --config the tokenizer is "
                             "data.tokenizer")
    if args.max_chars < 0 or args.show_documents < 0:
        raise UsageError("--max-chars and --show-documents must be at least 0")


def clip(text: str, max_chars: int) -> str:
    if max_chars and len(text) > max_chars:
        return text[:max_chars] + f" [... {len(text) - max_chars} more characters]"
    return text


def indented(text: str) -> str:
    return "\n".join("    | " + line for line in text.splitlines() or [""])


def length_line(lengths: dict) -> str:
    if not lengths:
        return "no documents"
    return ("document length: min {min}  p10 {p10:.0f}  p50 {p50:.0f}  p90 {p90:.0f}  p99 {p99:.0f}  max {max}  "
            "mean {mean:.1f}".format(**lengths))


def vocabulary_line(vocabulary: dict, tokenizer_name: str) -> str:
    fits = "fits" if vocabulary["fits"] else "DOES NOT FIT"
    return (f"vocabulary: {vocabulary['distinct_ids']:,} distinct ids, largest {vocabulary['largest_id']} "
            f"({fits} {tokenizer_name}'s {vocabulary['vocab_size']:,})")


def print_summary(summary: dict, tokenizer_origin: str) -> None:
    tokenizer = summary["tokenizer"]
    print(f"checked against tokenizer {tokenizer['name']} (sha256 {tokenizer['sha256'][:12]}; {tokenizer_origin})")
    for shard in summary["shards"]:
        recorded = shard["tokenizer"]
        made_with = f"{recorded['name']} (sha256 {recorded['sha256'][:12]})" if recorded else "not recorded"
        print(f"{shard['shard']}: {shard['documents']:,} documents, {shard['tokens']:,} tokens, {shard['dtype']}, "
              f"tokenizer {made_with}")
        print("  " + vocabulary_line(shard["vocabulary"], tokenizer["name"]))
        print("  " + length_line(shard["document_length"]))
    total = summary["total"]
    print(f"total, {total['shards']} shard(s): {total['documents']:,} documents, {total['tokens']:,} tokens, "
          f"{'/'.join(total['dtypes'])}")
    print("  " + vocabulary_line(total["vocabulary"], tokenizer["name"]))
    print("  " + length_line(total["document_length"]))


def summarize_shards(args: argparse.Namespace) -> dict:
    sources = [source for argument in args.shards for source in find_shards(argument)]
    tokenizer, origin = resolve_tokenizer(sources, args.tokenizer)
    summary = figures([read_shard(source) for source in sources], tokenizer)
    print_summary(summary, origin)
    for shard, document, ids in first_documents(sources, args.show_documents):
        print(f"\n{shard} document {document}: {len(ids)} tokens")
        print(indented(clip(decode(tokenizer, ids), args.max_chars)))
    return summary


def decode(tokenizer, ids) -> str:
    try:
        return decode_marking_ends(tokenizer, ids)
    except Exception as error:  # an id outside the vocabulary (see "DOES NOT FIT" above)
        return f"(cannot decode with {tokenizer.name}: {error!r})"


def piece_line(piece, sequence_length: int) -> str:
    last = min(piece.position + piece.length, sequence_length) - 1
    label = " and the last label" if piece.position + piece.length > sequence_length else ""
    ends = " (document end)" if piece.offset + piece.length == piece.document_length else ""
    return (f"    positions {piece.position}-{last}{label}: {Path(piece.shard).name} document {piece.document}, "
            f"tokens {piece.offset}-{piece.offset + piece.length - 1} of {piece.document_length}{ends}")


def print_step(view, args: argparse.Namespace) -> None:
    layout = view.layout
    print(f"{view.split} step {view.step}, data rank {view.data_rank} of {layout.data_parallel_size} "
          f"({layout.describe()}): {len(view.micro_batches)} micro-batch(es)")
    for number, batch in enumerate(view.micro_batches):
        for row, sequence in enumerate(batch):
            ends = ("end-of-document at positions " + ", ".join(map(str, sequence.eod_positions))
                    if sequence.eod_positions else "no end-of-document")
            print(f"\nmicro-batch {number}, sequence {row}: sample {sequence.sample} of the {view.split} split, "
                  f"{len(sequence.tokens)} tokens, {ends}")
            for piece in sequence.pieces:
                print(piece_line(piece, len(sequence.tokens)))
            print(indented(clip(decode(view.tokenizer, sequence.tokens), args.max_chars)))
            if args.show_tokens:
                print(f"    ids: {sequence.tokens}")


def step_record(view, config_path: str) -> dict:
    layout = view.layout
    return {
        "config": config_path, "split": view.split, "step": view.step, "data_rank": view.data_rank,
        "data_parallel_size": layout.data_parallel_size, "global_batch_size": layout.global_batch_size,
        "micro_batch_size": layout.micro_batch_size,
        "micro_batches": [[{"sample": s.sample, "tokens": s.tokens, "labels": s.labels,
                            "eod_positions": s.eod_positions, "sources": [vars(piece) for piece in s.pieces]}
                           for s in batch] for batch in view.micro_batches],
    }


def inspect_step(args: argparse.Namespace) -> dict:
    import yaml

    from pretrain.config import ConfigError, load_config
    from pretrain.training.blend import DataError
    from pretrain.training.data_inspect import InspectError, samples_at_step
    from pretrain.parallel.layout import LayoutError

    if not Path(args.config).is_file():
        raise UsageError(f"--config {args.config}: no such file")
    try:
        config = load_config(args.config, args.set)
        view = samples_at_step(config, args.step, args.data_rank or 0, args.world_size, args.split or "train",
                           args.cache_dir)
    except (ConfigError, DataError, InspectError, LayoutError, yaml.YAMLError) as error:
        raise UsageError(str(error).replace("\n", " ")) from None
    print_step(view, args)
    return step_record(view, args.config)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.ERROR)  # its index-building chatter
    try:
        check_options(args)
        record = inspect_step(args) if args.config else summarize_shards(args)
    except (UsageError, ShardError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    if args.json:
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
