#!/usr/bin/env python
"""What a checkpoint save costs the step loop, written in the background and not, against the disk's own speed.

    python tools/bench_checkpoint.py --preset gpt2-124m --data demo_out/tokens/demo
    python tools/bench_checkpoint.py --preset gpt2-355m --data demo_out/tokens/demo --json

Trains the preset on one CPU rank (bf16, ZeRO-1), saving every --interval steps, once with
`checkpoint.async=true` and once with `false`, and reads each save's row from metrics.jsonl (bytes,
blocking_seconds, write_seconds). Beside them, `dd` writes as many bytes to the same file system with
direct I/O (no page cache): the disk's own rate. The throughput of a save is its bytes over its write
time. The first save of each run is left out (allocations, the first writes of each file). Figures go in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def disk_rate(directory: Path, megabytes: int) -> float:
    """Bytes per second `dd` writes to `directory` with O_DIRECT (and a final fsync), the disk's own rate."""
    target = directory / "dd.probe"
    try:
        done = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={max(1, megabytes // 16)}",
                               "oflag=direct", "conv=fsync"], capture_output=True, text=True, check=True)
    finally:
        target.unlink(missing_ok=True)
    copied = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", done.stderr)
    return int(copied.group(1)) / float(copied.group(2))


def saves(args, run_dir: Path, asynchronous: bool) -> list[dict]:
    """The checkpoint rows of a run saving after every step."""
    command = [sys.executable, "-m", "pretrain", "--config", str(REPO / "configs" / f"{args.preset}.yaml"), "--set",
               f"data.prefixes=[{args.data}]", f"run.dir={run_dir}", f"train.max_steps={args.interval * args.saves}",
               f"checkpoint.interval={args.interval}", f"checkpoint.keep_last={args.saves}", f"checkpoint.async={str(asynchronous).lower()}",
               "eval.interval=0", "logging.interval=1", "logging.tensorboard=false", "train.precision=bf16",
               f"parallel.micro_batch_size={args.micro_batch}", f"parallel.global_batch_size={args.micro_batch}",
               f"model.n_positions={args.sequence}", "checkpoint.check_space=false", "data.split=100,0,0"]
    done = subprocess.run(command, cwd=REPO, env=dict(os.environ, PRETRAIN_DEVICE="cpu"), capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"error: the {args.preset} run failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row.get("event") == "checkpoint"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-124m", help="configs/PRESET.yaml")
    parser.add_argument("--data", required=True, help="a token shard prefix in the preset's tokenizer (GPT-2's)")
    parser.add_argument("--interval", type=int, default=10,
                        help="steps between saves: more than a save takes to write, or the next save waits for it")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--sequence", type=int, default=128, help="model.n_positions: short, the step is not measured")
    parser.add_argument("--dir", help="where the runs go (default: a temporary directory here)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    base = Path(args.dir or tempfile.mkdtemp(prefix="bench_checkpoint_", dir=REPO))
    result = {"preset": args.preset}
    try:
        for mode in ("sync", "async"):
            rows = saves(args, base / mode, mode == "async")[1:]
            result[mode] = {"saves": len(rows), "bytes": rows[-1]["bytes"],
                            "blocking_seconds": statistics.median(r["blocking_seconds"] for r in rows),
                            "write_seconds": statistics.median(r["write_seconds"] for r in rows)}
            shutil.rmtree(base / mode, ignore_errors=True)
        size = result["sync"]["bytes"]
        result["disk_bytes_per_second"] = disk_rate(base, max(256, size // 2**20))
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    for mode in ("sync", "async"):
        row = result[mode]
        row["throughput_bytes_per_second"] = row["bytes"] / row["write_seconds"]
        row["of_disk"] = row["throughput_bytes_per_second"] / result["disk_bytes_per_second"]
    result["blocking_async_of_sync"] = result["async"]["blocking_seconds"] / result["sync"]["blocking_seconds"]
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.preset}: {size / 1e9:.2f} GB a checkpoint; dd with direct I/O: "
          f"{result['disk_bytes_per_second'] / 1e6:,.0f} MB/s")
    for mode in ("sync", "async"):
        row = result[mode]
        print(f"  {mode:>5}: blocks the loop {row['blocking_seconds']:.2f} s, written in {row['write_seconds']:.2f} s, "
              f"{row['throughput_bytes_per_second'] / 1e6:,.0f} MB/s ({row['of_disk']:.0%} of the disk's) "
              f"[median of {row['saves']} saves]")
    print(f"  async blocks {result['blocking_async_of_sync']:.0%} of what sync does")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
