#!/usr/bin/env python
"""Exposed data-parallel communication, overlap off and on, measured and as the planner predicts it.

    sudo .venv/bin/python tools/bench_overlap.py                 # 200 Mbit/s, the table for docs
    sudo .venv/bin/python tools/bench_overlap.py --megabits 100 --json

Two ranks (DP=2, bf16 ZeRO-1: DeepSpeed's BF16_Optimizer, as the shipped recipe) run in two network
namespaces joined by a veth pair that `tc` limits to --megabits per direction (tools/netns.py; the
addresses exist only inside the namespaces), so that communication costs as much as compute on this
machine's CPUs. Each rank trains the same small GPT twice: with DeepSpeed's blocking reduction and gather
(parallel.overlap_communication=false), then with ours (pretrain/parallel/overlap.py).

Measured, per step (median of the steps after the first): the seconds the step stands still for
communication (off: inside DeepSpeed's reduction and its weight all-gather; on: waiting for the buckets
after backward and for the weight slices in the next forward), and the forward and backward of one
micro-batch. Predicted: pretrain/planner/timing.py data_parallel_exposed for the same model, link
bandwidth and measured forward and backward. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

PORT = 29561


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabits", type=float, default=200.0, help="link rate per direction, Mbit/s")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256, help="n_embd")
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per step and rank")
    parser.add_argument("--bucket", type=int, default=400_000, help="parallel.bucket_size, elements")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # set for the ranks it starts
    parser.add_argument("--address", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def model_and_layout(args):
    from pretrain.model.shape import GPTConfig
    from pretrain.parallel.layout import ParallelLayout

    model = GPTConfig(n_layer=args.layers, n_embd=args.width, n_head=4, n_positions=args.sequence,
                      vocab_size=1024, padded_vocab_size=1024)
    layout = ParallelLayout(2, 1, 1, 1, args.micro_batch, 2 * args.micro_batch * args.accumulation)
    return model, layout.validate(model)


def rank_main(args) -> None:
    """One rank: both trainings, its measurements as one JSON line on stdout."""
    import torch

    os.environ.update(RANK=str(args.rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR=args.address,
                      MASTER_PORT=str(PORT))
    torch.set_num_threads(1)  # one core per rank: the two ranks share this machine's two
    from pretrain.parallel.build import build_model
    from pretrain.parallel.deepspeed_config import deepspeed_config
    from pretrain.parallel.distributed import init_distributed, initialize_model_parallel, model_parallel_config
    from pretrain.parallel.engine import initialize_engine
    from pretrain.parallel.overlap import install

    init_distributed("gloo")
    model_config, layout = model_and_layout(args)
    topology = initialize_model_parallel(layout)
    tokens = torch.randint(0, 1024, (args.accumulation, args.micro_batch, args.sequence + 1),
                           generator=torch.Generator().manual_seed(args.rank))
    results = {}
    for overlap in (False, True):
        model = build_model(model_config, layout, topology, model_parallel_config(layout), 1234)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engine = initialize_engine(model, layout, topology, optimizer, deepspeed_config(layout, "bf16", 1.0))
        waiting = install(engine, args.bucket).waited if overlap else blocking_timers(engine)
        results["on" if overlap else "off"] = [timed_step(engine, tokens, waiting) for _ in range(args.steps)]
        results["parameters"] = sum(p.numel() for p in model.parameters())
    print(json.dumps(results), flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def blocking_timers(engine) -> dict:
    """Seconds spent in DeepSpeed's own blocking reduction and weight gather."""
    waited = {"gradients": 0.0, "weights": 0.0}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                waited[name] += time.perf_counter() - began
        return wrapper

    engine.buffered_allreduce_fallback = timed("gradients", engine.buffered_allreduce_fallback)
    engine.optimizer.update_lp_params = timed("weights", engine.optimizer.update_lp_params)
    return waited


def timed_step(engine, tokens, waiting: dict) -> dict:
    """One optimizer step (the trainer's loop: pretrain/parallel/engine.py train_step), timed by part."""
    from pretrain.parallel.overlap import arm

    before = dict(waiting)
    began = time.perf_counter()
    forward = backward = 0.0
    for index, batch in enumerate(tokens):
        weights_before = waiting["weights"]
        start = time.perf_counter()
        loss = engine(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())
        middle = time.perf_counter()
        if index == len(tokens) - 1:
            arm(engine)
        engine.backward(loss)
        end = time.perf_counter()
        if index == 0:  # the first micro-batch: no reduction in its backward; its forward less any wait
            forward = middle - start - (waiting["weights"] - weights_before)
            backward = end - middle
        engine.step()
    return {"step": time.perf_counter() - began, "forward": forward, "backward": backward,
            "gradients": waiting["gradients"] - before["gradients"], "weights": waiting["weights"] - before["weights"]}


def predict(args, measured: dict, overlap: bool) -> dict:
    """The planner's exposed data-parallel seconds for this run, from the measured forward and backward."""
    from pretrain.planner.memory import RunShape
    from pretrain.planner.timing import data_parallel_exposed

    model, layout = model_and_layout(args)
    run = RunShape(model, layout, "bf16", "fp32", overlap=overlap, overlap_bucket_size=args.bucket)
    exposed, hidden = data_parallel_exposed(run, measured["parameters"], 2, args.megabits / 8 / 1000,
                                            measured["on"]["forward"], measured["on"]["backward"])
    return {"exposed": exposed, "hidden": hidden}


def measure(args) -> dict:
    """Both ranks in their namespaces; rank 0's measurements with the planner's predictions beside them."""
    from tools import netns

    why_not = netns.available()
    if why_not:
        raise SystemExit(f"error: {why_not}")
    with netns.slow_link(args.megabits, tag=61) as link:
        ranks = []
        for side in (1, 0):
            command = [sys.executable, str(Path(__file__).resolve()), "--rank", str(side), "--address",
                       link.addresses[0], *forwarded(args)]
            ranks.append(subprocess.Popen(link.command(side, command), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        try:
            outputs = [rank.communicate(timeout=600) for rank in ranks]
        finally:
            for rank in ranks:  # none may outlive its namespace
                if rank.poll() is None:
                    rank.kill()
                    rank.wait()
    failed = [err[-3000:] for rank, (_, err) in zip(ranks, outputs) if rank.returncode != 0]
    if failed:
        raise RuntimeError("a rank failed:\n" + "\n".join(failed))
    per_rank = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    measured = {"parameters": per_rank[0]["parameters"]}
    for name in ("off", "on"):
        # Per step, the rank that stood still least: the other also waited for its peer to reach the collective.
        steps = [min((rank[name][step] for rank in per_rank), key=lambda row: row["gradients"] + row["weights"])
                 for step in range(1, args.steps)]  # the first step connects and warms up
        measured[name] = {key: statistics.median(row[key] for row in steps) for key in steps[0]}
        measured[name]["exposed"] = statistics.median(row["gradients"] + row["weights"] for row in steps)
    for overlap, name in ((False, "off"), (True, "on")):
        measured[name]["predicted"] = predict(args, measured, overlap)["exposed"]
    return {"megabits": args.megabits, "bucket": args.bucket, **measured}


def forwarded(args) -> list[str]:
    """The settings a rank needs, as options."""
    return ["--megabits", str(args.megabits), "--layers", str(args.layers), "--width", str(args.width),
            "--sequence", str(args.sequence), "--micro-batch", str(args.micro_batch),
            "--accumulation", str(args.accumulation), "--bucket", str(args.bucket), "--steps", str(args.steps)]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rank is not None:
        rank_main(args)
        return 0
    result = measure(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"DP=2 over {args.megabits:g} Mbit/s, {result['parameters'] / 1e6:.2f}M parameters, "
          f"{args.accumulation} micro-batches of {args.micro_batch} x {args.sequence} per rank, "
          f"buckets of {args.bucket:,} elements")
    print(f"forward {result['on']['forward']:.3f} s, backward {result['on']['backward']:.3f} s per micro-batch")
    print("overlap   step s   exposed s (gradients + weights)   predicted s   ratio")
    for name in ("off", "on"):
        row = result[name]
        print(f"{name:>7} {row['step']:>8.3f} {row['exposed']:>11.3f} ({row['gradients']:.3f} + {row['weights']:.3f})"
              f"{row['predicted']:>18.3f} {row['exposed'] / row['predicted']:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
