#!/usr/bin/env python
"""What building the model costs a rank at start-up, on CPU: seconds and peak host memory.

    python tools/bench_startup.py --preset gpt2-1.5b                 # the trainer's build (lean)
    python tools/bench_startup.py --preset gpt2-1.5b --build whole   # the whole model at once, as before
    python tools/bench_startup.py --preset gpt2-124m --json

One process builds the model for one rank of a TP=1 PP=1 layout, which holds the whole model, from
(seed, parameter name) with megatron-core's CPU initialization of each full weight, then split for
tensor parallelism. `lean` (the trainer's, pretrain/parallel/build.py) constructs it on the meta device
and then layer by layer on the destination (here the CPU; on a GPU rank its GPU); `whole` constructs it
all on the CPU at once (the trainer before issue 23, after which DeepSpeed moved it to the GPU). It
reports the seconds, the process's peak resident memory before and after (VmHWM), and the peak above
the weights the build leaves: what a GPU rank's host holds besides them (with `whole` the weights
themselves were on the host too). A few initial values are printed so that the two builds can be
compared value for value. The figures go in docs/benchmarks.md.
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
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def peak_rss_gib() -> float:
    from data_pipeline.peak_memory import peak_rss_bytes

    return peak_rss_bytes() / 2**30


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-1.5b", help="a model preset (pretrain/model/presets.py)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--build", choices=("lean", "whole"), default="lean",
                        help="lean: meta device, then layer by layer (the trainer's); whole: all at once on the CPU")
    parser.add_argument("--to", choices=("cpu", "meta"), default="cpu",
                        help="where a lean build puts the weights: cpu, or meta, which drops each layer's weights "
                             "once built: the host memory a rank whose weights go to its GPU needs")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    from pretrain.model.gpt2 import GPT2
    from pretrain.model.presets import model_config as preset, parameter_count
    from pretrain.parallel.build import build_model
    from pretrain.parallel.distributed import initialize_model_parallel, model_parallel_config
    from pretrain.parallel.layout import ParallelLayout

    config = preset(args.preset)
    layout = ParallelLayout(world_size=1)
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as scratch:
        dist.init_process_group("gloo", init_method=f"file://{scratch}/store", rank=0, world_size=1)
        topology = initialize_model_parallel(layout)
        before = peak_rss_gib()
        began = time.perf_counter()
        if args.build == "lean":
            model = build_model(config, layout, topology, model_parallel_config(layout), args.seed, device=args.to)
        else:
            model = GPT2(config, model_parallel_config(layout), args.seed)
        seconds = time.perf_counter() - began
        after = peak_rss_gib()
        first = next(p for name, p in model.named_parameters() if name.endswith("qkv.weight"))
        first = torch.full((3,), float("nan")) if first.is_meta else first
        weights = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta) / 2**30
        result = {"preset": args.preset, "build": args.build, "to": args.to if args.build == "lean" else "cpu", "parameters": parameter_count(config),
                  "build_seconds": round(seconds, 2), "peak_above_weights_gib": round(after - weights, 3),
                  "peak_rss_gib_before": round(before, 3), "peak_rss_gib_after": round(after, 3),
                  "weights_gib": round(weights, 3),
                  "threads": torch.get_num_threads(),
                  "first_qkv_values": [round(v, 6) for v in first.detach().flatten()[:3].tolist()]}
        dist.destroy_process_group()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.preset} ({result['parameters'] / 1e6:,.0f}M parameters, {result['weights_gib']:.2f} GiB fp32), "
              f"{args.build} build: {seconds:.1f} s on {result['threads']} thread(s); peak RSS {before:.2f} GiB before, "
              f"{after:.2f} GiB after, {result['peak_above_weights_gib']:.2f} GiB above the weights")
        print(f"first qkv values (seed {args.seed}): {result['first_qkv_values']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
