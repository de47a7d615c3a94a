#!/usr/bin/env python
"""Sample text from a trained model: continue a prompt, greedily or by sampling, with a KV cache.

Reads a run directory, its checkpoints/ directory or one step_NNNNNNN directory
(any parallel layout), a Hugging Face GPT-2 directory, or a consolidated .pt file
(tools/convert_checkpoint.py). Prints each sample (the prompt, then its
continuation) on stdout, and the speed on stderr. Exit codes: 0 done, 2 unusable
arguments, checkpoint or prompt.
"""

from __future__ import annotations

import argparse
import math
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.cli import OneLineErrorParser, add_checkpoint_argument, load_model_or_explain, non_negative, positive  # noqa: E402
os.environ.setdefault("DS_ACCELERATOR", "cpu")

EXAMPLES = """examples:
  python tools/generate.py --checkpoint runs/gpt2-124m --prompt "The meaning of life is" --greedy
  python tools/generate.py --checkpoint runs/gpt2-124m/checkpoints/step_0010000 --prompt-file prompt.txt \\
      --max-new-tokens 200 --temperature 0.8 --top-p 0.95 --num-samples 4 --seed 7
  python tools/generate.py --checkpoint hf/gpt2 --prompt "Hello" --top-k 40 --device cuda --json | tail -n 1
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_argument(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="the text to continue; empty starts a new document")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from this UTF-8 file")
    parser.add_argument("--max-new-tokens", type=positive, default=100, metavar="N",
                        help="tokens to generate per sample (default 100; capped at the model's context)")
    parser.add_argument("--greedy", action="store_true",
                        help="always take the most likely token (ignores --temperature, --top-k, --top-p)")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T",
                        help="> 0; below 1 sharper, above 1 flatter (default 1.0)")
    parser.add_argument("--top-k", type=non_negative, default=0, metavar="K",
                        help="sample among the K most likely tokens; 0 for all (default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="nucleus sampling, in (0, 1]: the fewest tokens whose probability reaches P (default 1)")
    parser.add_argument("--num-samples", type=positive, default=1, metavar="N",
                        help="continuations of the prompt, generated as one batch (default 1)")
    parser.add_argument("--seed", type=non_negative, default=1234, help="sampler seed; same seed, same samples")
    parser.add_argument("--no-stop", action="store_true", help="go on past the end-of-document token")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when there is a GPU, else cpu")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the whole sequence for every token (slower; for comparison)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (prompt, samples as text and token ids, tokens_per_second, ...) "
                             "instead of the samples")
    args = parser.parse_args(argv)
    if not args.greedy and not 0 < args.temperature < math.inf:
        parser.error(f"argument --temperature: {args.temperature} must be > 0 and finite (or use --greedy)")
    if not 0 < args.top_p <= 1:
        parser.error(f"argument --top-p: {args.top_p} must be in (0, 1]")
    return args


def sampling_options(args: argparse.Namespace):
    from pretrain.inference.generation import SamplingOptions

    return SamplingOptions(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, num_samples=args.num_samples, seed=args.seed,
                           stop_at_eod=not args.no_stop, use_cache=not args.no_cache)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--prompt-file {args.prompt_file}: {error}") from None


def load(args: argparse.Namespace):
    """The model, or ValueError naming what to fix (the checkpoint path, the device)."""
    return load_model_or_explain(args.checkpoint, args.device)


def report(args, prompt: str, loaded, generation) -> None:
    if args.json:
        record = {"checkpoint": args.checkpoint, "model": loaded.description, "prompt": prompt,
                  **generation.to_json(), "options": vars(sampling_options(args))}
        print(json.dumps(record))
    else:
        for number, sample in enumerate(generation.samples, start=1):
            if len(generation.samples) > 1:
                print(f"--- sample {number}/{len(generation.samples)} ({sample.finish_reason}) ---")
            print(prompt + sample.text)
    cache = "without cache" if args.no_cache else "with KV cache"
    print(f"{generation.new_tokens} tokens in {generation.seconds:.2f} s: {generation.tokens_per_second:.1f} "
          f"tokens/s ({len(generation.samples)} sample(s), {loaded.device}, {cache})", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # What can be checked without torch first, so that a mistyped command fails at once.
        if not Path(args.checkpoint).exists():
            raise ValueError(f"--checkpoint {args.checkpoint} does not exist")
        prompt = read_prompt(args)
        from pretrain.inference.generation import generate

        loaded = load(args)
        generation = generate(loaded, loaded.tokenizer.encode(prompt), sampling_options(args))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for note in generation.notes:
        print(f"note: {note}", file=sys.stderr)
    report(args, prompt, loaded, generation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
