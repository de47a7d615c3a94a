#!/usr/bin/env python
"""Choose a parallel layout before spending cluster hours: which TP x PP x DP x ZeRO x micro-batch x
activation-checkpointing layouts fit the GPUs, and which is fastest.

Every layout of a preset on a cluster:
    python tools/plan.py --preset gpt2-1.5b --nodes 8 --gpus-per-node 8 --gpu h100
    python tools/plan.py --preset gpt3-175b --nodes 128 --gpus-per-node 8 --global-batch-tokens 3145728
    python tools/plan.py --preset gpt2-124m --nodes 1 --gpus-per-node 8 --gpu a100-40gb --json

  Lists the layouts that fit, fastest first (per-GPU memory in GiB split into parameters,
  gradients, optimizer states, activations and buffers; estimated step time, tokens/s and
  MFU), recommends one with the reason, and counts the combinations refused, with why
  (heads that do not divide by TP, ZeRO-2/3 with a pipeline, a global batch that does not
  divide, memory over the device).

One run config, as slurm/pretrain.sbatch would start it:
    python tools/plan.py --config configs/gpt2-1.5b.yaml --nodes 8 --gpus-per-node 8
    python tools/plan.py --config configs/gpt2-124m.yaml --set parallel.micro_batch_size=64 --nodes 1

  Prints its predicted memory per pipeline stage and its step time; exit 1 if it would not
  fit, 2 if the trainer would refuse it.

The memory model follows this trainer's allocations (pretrain/planner/memory.py); its CPU
variant is checked against real runs (tests/pretrain/planner/test_planner.py; docs/benchmarks.md), the
GPU variant printed here not yet. The time
model is an estimate: the trainer's FLOPs at an assumed --efficiency of the GPU's peak, plus
communication by stated formulas (pretrain/planner/timing.py); it has not been measured on a GPU.
--json: one JSON object on stdout with every figure. Exit codes: 0 done, 1 nothing fits, 2 bad arguments.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Planning needs no accelerator; DeepSpeed would otherwise probe for one and say so on stdout.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tools.cli import OneLineErrorParser, positive  # noqa: E402


def parse_args(argv=None):
    from pretrain.planner.hardware import ACCELERATORS
    from pretrain.planner.timing import COMPUTE_EFFICIENCY

    parser = OneLineErrorParser(prog="tools/plan.py", description=__doc__,
                                formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", help="gpt2-tiny .. gpt2-1.5b (configs/), or gpt3-125m .. gpt3-175b")
    what.add_argument("--config", help="check one run config (YAML) instead of searching")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="with --config: dotted overrides, as for python -m pretrain")
    parser.add_argument("--nodes", type=positive, default=1)
    parser.add_argument("--gpus-per-node", type=positive, default=8)
    parser.add_argument("--gpu", default="h100", choices=sorted(ACCELERATORS), help="default h100")
    parser.add_argument("--gpu-memory-gib", type=float, help="override the GPU's memory")
    parser.add_argument("--interconnect-gbps", type=float, default=400.0,
                        help="network bandwidth per GPU between nodes, Gbit/s (default 400: one NDR port per GPU)")
    parser.add_argument("--global-batch-tokens", type=positive, help="default: the preset's own batch")
    parser.add_argument("--sequence", type=positive, help="training sequence length (default: the preset's context)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--gradient-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="train.gradient_dtype: fp32 (default) needs ZeRO >= 1 under bf16; bf16 allows ZeRO-0")
    parser.add_argument("--efficiency", type=float, default=COMPUTE_EFFICIENCY,
                        help=f"fraction of the GPU's peak (dense bf16; fp32 for --precision fp32) the matmuls "
                             f"reach (default {COMPUTE_EFFICIENCY})")
    parser.add_argument("--top", type=positive, default=10, help="layouts to list (default 10)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.set and not args.config:
        parser.error("--set goes with --config")
    if args.config:
        search_only = [flag for flag, given in (("--precision", args.precision != "bf16"),
                                                 ("--gradient-dtype", args.gradient_dtype != "fp32"),
                                                 ("--sequence", args.sequence), ("--top", args.top != 10),
                                                 ("--global-batch-tokens", args.global_batch_tokens)) if given]
        if search_only:
            parser.error(f"{', '.join(search_only)} go(es) with --preset; with --config, set the run's own keys "
                         "with --set (train.precision, train.gradient_dtype, model.n_positions, "
                         "parallel.global_batch_size)")
    if not 0 < args.efficiency <= 1:
        parser.error(f"--efficiency {args.efficiency} must be in (0, 1]")
    from pretrain.planner.search import CONTEXT_GIB, FRAGMENTATION

    smallest = CONTEXT_GIB / (1 - FRAGMENTATION)
    if args.gpu_memory_gib is not None and not (math.isfinite(args.gpu_memory_gib) and args.gpu_memory_gib > smallest):
        parser.error(f"--gpu-memory-gib {args.gpu_memory_gib} must be a number above {smallest:.2f} "
                     f"(the planner keeps {CONTEXT_GIB:g} GiB for the CUDA context and {FRAGMENTATION:.0%} headroom)")
    if not (math.isfinite(args.interconnect_gbps) and args.interconnect_gbps > 0):
        parser.error(f"--interconnect-gbps {args.interconnect_gbps} must be a positive number")
    if not math.isfinite(args.efficiency):
        parser.error(f"--efficiency {args.efficiency} must be in (0, 1]")
    return args


def cluster_from(args):
    import dataclasses

    from pretrain.planner.hardware import Cluster, accelerator

    gpu = accelerator(args.gpu)
    if args.gpu_memory_gib:
        gpu = dataclasses.replace(gpu, memory_gib=args.gpu_memory_gib)
    return Cluster(args.nodes, args.gpus_per_node, gpu, args.interconnect_gbps)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pretrain.config import ConfigError
    from pretrain.planner import report

    cluster = cluster_from(args)
    try:
        if args.config:
            return report.check_config(args, cluster)
        return report.search(args, cluster)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
