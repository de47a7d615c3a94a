#!/usr/bin/env python
"""Generation speed with and without the KV cache, on random models of the preset shapes.

    python tools/bench_generate.py                                   # gpt2-124m and gpt2-tiny, fp32, CPU
    python tools/bench_generate.py --presets gpt2-124m gpt2-355m --device cuda --new-tokens 512

Each preset is built with random weights (the speed does not depend on them), in
one process, fp32, and continues one prompt of --prompt-tokens random tokens by
--new-tokens greedy tokens, end-of-document ignored, so that both runs do the
same steps. With the cache each new token is one position through the model;
without it the whole sequence is recomputed for every token. tokens/s counts new
tokens over the time from the prompt's forward pass to the last token, the best
of --repeats runs after a short warm-up; both runs must give the same tokens.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from pretrain.inference.generation import SamplingOptions, generate  # noqa: E402
from pretrain.inference.loading import LoadedModel, single_process_group  # noqa: E402
from pretrain.model.presets import model_config, parameter_count  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["gpt2-124m", "gpt2-tiny"],
                        help="model shapes: configs/<name>.yaml (default: gpt2-124m gpt2-tiny)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=1, help="batch size")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each; the best is kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def random_model(preset: str, device: str) -> LoadedModel:
    from data_pipeline.tokenizers import load_tokenizer
    from pretrain.model.gpt2 import GPT2
    from pretrain.parallel.distributed import model_parallel_config
    from pretrain.parallel.layout import ParallelLayout

    single_process_group()
    config = model_config(preset)
    model = GPT2(config, model_parallel_config(ParallelLayout(world_size=1))).to(device).eval()
    return LoadedModel(model, config, load_tokenizer("gpt2"), f"random {preset}", torch.device(device))


def tokens_per_second(loaded: LoadedModel, prompt_ids: list[int], args, use_cache: bool) -> tuple[float, list]:
    """Best tokens/s of `repeats` runs, and the tokens of the last one."""
    options = SamplingOptions(max_new_tokens=args.new_tokens, greedy=True, num_samples=args.num_samples,
                              stop_at_eod=False, use_cache=use_cache)
    generate(loaded, prompt_ids, SamplingOptions(max_new_tokens=4, greedy=True, use_cache=use_cache))  # warm-up
    best, samples = 0.0, None
    for _ in range(args.repeats):
        run = generate(loaded, prompt_ids, options)
        best, samples = max(best, run.tokens_per_second), run.samples
    return best, samples


def huggingface_tokens_per_second(loaded: LoadedModel, prompt_ids: list[int], args) -> tuple[float, list]:
    """transformers' GPT2LMHeadModel on the same weights, generate() with its own KV cache: what a
    user would run instead. Best tokens/s of `repeats` runs, and the new tokens."""
    import time

    from transformers import GPT2Config, GPT2LMHeadModel

    from pretrain.model.hf_mapping import canonical_name, ours_to_hf

    config = loaded.config
    state = {canonical_name(name): tensor for name, tensor in loaded.model.state_dict().items()
             if not name.endswith("_extra_state")}
    hf = GPT2LMHeadModel(GPT2Config(n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head,
                                    n_positions=config.n_positions, vocab_size=config.vocab_size,
                                    activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    hf.load_state_dict(ours_to_hf(state, config), strict=False)
    hf = hf.to(loaded.device).eval()
    ids = torch.tensor([prompt_ids] * args.num_samples, device=loaded.device)
    options = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=4, **options)  # warm-up
        best, new = 0.0, None
        for _ in range(args.repeats):
            began = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **options)
            best = max(best, args.new_tokens / (time.perf_counter() - began))
            new = out[0, len(prompt_ids):].tolist()
    return best, new


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}; prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new, batch {args.num_samples}, fp32, greedy\n", file=sys.stderr)
    rows = ["| model | parameters | new tokens | ours, KV cache (tokens/s) | ours, no cache (tokens/s) | speed-up "
            "| transformers generate (tokens/s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for preset in args.presets:
        loaded = random_model(preset, args.device)
        prompt_ids = torch.randint(0, loaded.config.vocab_size, (args.prompt_tokens,),
                                   generator=torch.Generator().manual_seed(0)).tolist()
        cached, cached_samples = tokens_per_second(loaded, prompt_ids, args, use_cache=True)
        uncached, uncached_samples = tokens_per_second(loaded, prompt_ids, args, use_cache=False)
        if cached_samples != uncached_samples:
            print(f"error: {preset}: generation with and without the cache gave different tokens", file=sys.stderr)
            return 1
        reference, reference_tokens = huggingface_tokens_per_second(loaded, prompt_ids, args)
        if reference_tokens != cached_samples[0].token_ids:
            print(f"warning: {preset}: transformers' greedy tokens differ from ours", file=sys.stderr)
        new_tokens = len(cached_samples[0].token_ids)
        rows.append(f"| {preset} | {parameter_count(loaded.config) / 1e6:.1f} M | {new_tokens} | {cached:,.1f} | "
                    f"{uncached:,.1f} | {cached / uncached:.1f}x | {reference:,.1f} |")
        print(rows[-1], file=sys.stderr, flush=True)
        del loaded
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
