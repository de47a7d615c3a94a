#!/usr/bin/env python
"""Evaluate a model as the GPT-2 paper does, zero-shot, by log-likelihood: perplexity on text, and
tasks scored with lm-evaluation-harness's definitions (pretrain/inference/evaluation.py).

--input (perplexity): a .bin/.idx shard prefix or the --output-prefix of tools/preprocess_data.py
(its PREFIX.json lists the shards), a jsonl file (plain, .gz, .zst; the text under --text-key), or
a .txt file (the whole file is one document). Each document is scored on its own, after the
end-of-document token, every token predicted once; a document longer than the model's window is
scored by windows advancing --stride tokens.

--task: jsonl task files; the format is read from the first record's keys (or --task-format):
  lambada    {"text": ...}: the last word given the rest (OpenAI's lambada_test.jsonl); acc, perplexity
  hellaswag  HellaSwag's own records (ctx_a, ctx_b, activity_label, endings, label); acc, acc_norm
  choice     {"context": str, "choices": [str, ...], "label": int}; acc, acc_norm
A context longer than the window loses its beginning; the continuation is never cut.

Prints a table; with --json the last stdout line is one JSON object with every figure. Exit codes:
0 done, 2 unusable arguments, checkpoint, input or task file (the message names the file and line).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.cli import OneLineErrorParser, add_checkpoint_argument, load_model_or_explain, positive  # noqa: E402
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pretrain.inference.evaluation import (  # noqa: E402
    PARSERS,
    Document,
    EvaluationError,
    ModelScorer,
    encode_task,
    read_task,
    score_documents,
    score_task,
)

EXAMPLES = """examples:
  python tools/evaluate.py --checkpoint runs/gpt2-124m --input data/webtext_valid
  python tools/evaluate.py --checkpoint hf/gpt2 --input wikitext103_test.txt --stride 512 --device cuda
  python tools/evaluate.py --checkpoint runs/gpt2-124m/checkpoints/step_0010000 \\
      --task lambada_test.jsonl hellaswag_val.jsonl --batch-size 32 --json | tail -n 1
  python tools/evaluate.py --checkpoint gpt2-124m.pt --task my_choices.jsonl --task-format choice --max-examples 500
"""

TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_argument(parser)
    parser.add_argument("--input", nargs="+", default=[], metavar="FILE_OR_PREFIX",
                        help="text to measure perplexity on: shard prefixes, .jsonl(.gz/.zst) or .txt files")
    parser.add_argument("--task", nargs="+", default=[], metavar="TASK.jsonl", help="zero-shot task files")
    parser.add_argument("--task-format", choices=("auto", *PARSERS), default="auto",
                        help="format of every --task file (default: from the first record's keys)")
    parser.add_argument("--text-key", default="text", help="the field holding the text in --input jsonl files")
    parser.add_argument("--stride", type=positive, metavar="N",
                        help="tokens a window advances in long documents (default: the model's window, no overlap)")
    parser.add_argument("--max-examples", type=positive, metavar="N",
                        help="score only the first N documents of each input and examples of each task")
    parser.add_argument("--batch-size", type=positive, default=8, metavar="N", help="sequences per forward (default 8)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when there is a GPU, else cpu")
    parser.add_argument("--skip-tokenizer-check", action="store_true",
                        help="score shards whose recorded tokenizer files differ from the model's (the same "
                             "vocabulary saved in other files, e.g. a Hugging Face vocab.json)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="also print one JSON object with every figure, last")
    args = parser.parse_args(argv)
    if not args.input and not args.task:
        parser.error("give --input (perplexity) or --task (zero-shot tasks), or both")
    for option, paths in (("--input", args.input), ("--task", args.task)):
        if len(set(paths)) != len(paths):
            parser.error(f"{option}: a path is given twice")
    return args


# ---- inputs: files and shards -> documents ---------------------------------------------------


def input_kind(path: str) -> str:
    """jsonl, text or shards; a path that is none of them is refused naming it."""
    from data_pipeline.readers import JSONL_SUFFIXES

    if path.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES):
        if not os.path.isfile(path):
            raise EvaluationError(f"--input {path} does not exist")
        return "text" if path.endswith(TEXT_SUFFIXES) else "jsonl"  # .txt.zst before .zst, which means jsonl
    prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
    if not (os.path.isfile(prefix + ".bin") or os.path.isfile(prefix + ".idx") or os.path.isfile(prefix + ".json")):
        raise EvaluationError(f"--input {path}: not a .jsonl or .txt file, and neither {prefix}.bin/.idx nor "
                              f"{prefix}.json exists (give a shard prefix, or the --output-prefix of "
                              "tools/preprocess_data.py)")
    return "shards"


def jsonl_documents(path: str, text_key: str, tokenizer) -> Iterator[Document]:
    from data_pipeline.readers import InputError, chunk_documents, iter_chunks

    try:
        for chunk in iter_chunks(path, 0, text_key):
            texts, _, skipped = chunk_documents(chunk, text_key)
            bad = [skip for skip in skipped if skip.reason != "empty_document"]  # nothing to score in those
            if bad:
                raise EvaluationError(f"{bad[0]}")
            for text in texts:
                yield Document(tokenizer.encode(text), len(text.encode("utf-8")))
    except InputError as error:
        raise EvaluationError(str(error)) from None


def text_document(path: str, tokenizer) -> Iterator[Document]:
    """A .txt file is one document, as WikiText's or the Penn Treebank's test files are scored whole."""
    import gzip

    import zstandard

    try:
        data = Path(path).read_bytes()
        if path.endswith(".gz"):
            data = gzip.decompress(data)
        elif path.endswith(".zst"):
            data = zstandard.ZstdDecompressor().stream_reader(data).read()
        text = data.decode("utf-8")
    except (OSError, EOFError, zstandard.ZstdError, UnicodeDecodeError) as error:
        raise EvaluationError(f"--input {path} cannot be read as UTF-8 text: {error}") from None
    yield Document(tokenizer.encode(text), len(data))


def shard_sources(path: str, tokenizer, skip_check: bool) -> list:
    """The shards of a prefix, refused when a PREFIX.json records a tokenizer with other files."""
    from data_pipeline.shard_summary import find_shards

    sources = find_shards(path)
    ours = sorted(tokenizer.identity()["file_sha256"].values())
    for source in sources:
        recorded = source.tokenizer
        if recorded and not skip_check and sorted(recorded.get("file_sha256", {}).values()) != ours:
            raise EvaluationError(
                f"--input {path}: {source.recorded_in} records tokenizer {recorded['name']}, whose files differ from "
                f"the model's ({tokenizer.name}); evaluate with shards made by the model's tokenizer, or pass "
                "--skip-tokenizer-check if it is the same vocabulary in other files")
    return sources


def shard_documents(sources: list, tokenizer) -> Iterator[Document]:
    """Each document of each shard, without the end-of-document token preprocessing appended; its
    bytes are those of its decoded text."""
    from data_pipeline.shards import indexed_dataset_module

    for source in sources:
        dataset = indexed_dataset_module().IndexedDataset(source.prefix)
        bounds = dataset.document_indices  # a document is sequences bounds[i] .. bounds[i + 1] - 1
        for first, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            tokens = [int(t) for sequence in dataset[first:end] for t in sequence]
            if tokens and tokens[-1] == tokenizer.eod_id:
                tokens.pop()
            if tokens and max(tokens) >= tokenizer.vocab_size:
                raise EvaluationError(f"{source.prefix}.bin holds token id {max(tokens)}, beyond the model's "
                                      f"{tokenizer.vocab_size}-token vocabulary: made with another tokenizer")
            yield Document(tokens, len(tokenizer.decode(tokens).encode("utf-8")))


def shard_document_count(sources: list) -> int:
    from data_pipeline.shards import indexed_dataset_module

    return sum(len(indexed_dataset_module().IndexedDataset(s.prefix).document_indices) - 1 for s in sources)


def documents_of(path: str, args, tokenizer) -> tuple[Iterator[Document], int | None]:
    """(the documents of one --input, their number when known cheaply)."""
    kind = input_kind(path)
    if kind == "jsonl":
        return jsonl_documents(path, args.text_key, tokenizer), None
    if kind == "text":
        return text_document(path, tokenizer), 1
    sources = shard_sources(path, tokenizer, args.skip_tokenizer_check)
    return shard_documents(sources, tokenizer), shard_document_count(sources)


def counted(documents: Iterator[Document], limit: int | None, bar) -> Iterator[Document]:
    """The first `limit` documents (all with None), each counted on the progress bar as it is read."""
    for number, document in enumerate(documents):
        if limit is not None and number >= limit:
            return
        bar.update(1)
        yield document


# ---- running -------------------------------------------------------------------------------


def load(args: argparse.Namespace):
    """The model, or EvaluationError naming what to fix (the checkpoint path, the device)."""
    try:
        return load_model_or_explain(args.checkpoint, args.device, args.quiet)
    except ValueError as error:
        raise EvaluationError(str(error)) from None


def progress_bar(args, description: str, total: int | None, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit, disable=args.quiet, file=sys.stderr,
                mininterval=0.5 if sys.stderr.isatty() else 30)


def perplexity_of(path: str, loaded, args) -> dict:
    documents, count = documents_of(path, args, loaded.tokenizer)
    if count is not None and args.max_examples is not None:
        count = min(count, args.max_examples)
    window = loaded.config.n_positions
    with progress_bar(args, f"perplexity {Path(path).name}", count, "docs") as bar:
        loglikelihood = ModelScorer(loaded.logits, window, args.batch_size, loaded.device)
        sums = score_documents(counted(documents, args.max_examples, bar), loglikelihood, window,
                               loaded.tokenizer.eod_id, stride=args.stride or window,
                               requests_per_call=8 * args.batch_size)
    return sums.metrics()


def task_of(task, loaded, args) -> dict:
    encoded = encode_task(task, loaded.tokenizer)
    requests = sum(len(example.continuations) for example in encoded.examples)
    window = loaded.config.n_positions
    with progress_bar(args, f"{task.format} {Path(task.path).name}", requests, "requests") as bar:
        loglikelihood = ModelScorer(loaded.logits, window, args.batch_size, loaded.device, progress=bar.update)
        sums = score_task(encoded, loglikelihood, window)
    return {"format": task.format, **sums.metrics()}


def evaluate(args: argparse.Namespace) -> dict:
    """Every figure, as the JSON report holds them. Task files and inputs are checked before the
    model loads, so that a bad path fails in a second rather than after the load."""
    tasks = [read_task(path, args.task_format, args.max_examples) for path in args.task]
    for path in args.input:
        input_kind(path)
    loaded = load(args)
    window = loaded.config.n_positions
    if args.stride is not None and args.stride > window:
        raise EvaluationError(f"--stride {args.stride} exceeds the model's {window}-token window")
    report = {"checkpoint": args.checkpoint, "model": loaded.description, "window": window,
              "stride": args.stride or window, "device": str(loaded.device), "perplexity": {}, "tasks": {}}
    for path in args.input:
        report["perplexity"][path] = perplexity_of(path, loaded, args)
    for task in tasks:
        report["tasks"][task.path] = task_of(task, loaded, args)
    return report


# ---- reporting -----------------------------------------------------------------------------


def figure(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.4g}"


def print_table(report: dict) -> None:
    print(f"model: {report['model']} (window {report['window']} tokens, {report['device']})")
    if report["perplexity"]:
        print(f"\nperplexity (stride {report['stride']})")
        width = max(len(path) for path in report["perplexity"])
        print(f"  {'input':<{width}} {'documents':>10} {'tokens':>12} {'loss':>8} {'perplexity':>12} {'bits/byte':>10}")
        for path, m in report["perplexity"].items():
            print(f"  {path:<{width}} {m['documents']:>10} {m['tokens']:>12} {figure(m['loss']):>8} "
                  f"{figure(m['perplexity'], 2):>12} {figure(m['bits_per_byte']):>10}")
    if report["tasks"]:
        width = max(len(path) for path in report["tasks"])
        print(f"\n  {'task':<{width}} {'format':<10} {'examples':>9} {'acc':>16} {'acc_norm':>16} {'perplexity':>12}")
        for path, m in report["tasks"].items():
            acc = f"{figure(m['acc'])} ± {figure(m['acc_stderr'])}"
            norm = f"{figure(m['acc_norm'])} ± {figure(m['acc_norm_stderr'])}" if "acc_norm" in m else "-"
            print(f"  {path:<{width}} {m['format']:<10} {m['examples']:>9} {acc:>16} {norm:>16} "
                  f"{figure(m.get('perplexity'), 2):>12}")


def finite(value):
    """JSON has no infinity: a perplexity beyond float range is null."""
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def main(argv=None) -> int:
    args = parse_args(argv)
    from data_pipeline.shard_summary import ShardError

    try:
        report = evaluate(args)
    except (EvaluationError, ShardError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print_table(report)
    if args.json:
        print(json.dumps(finite(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
