"""Predicted against measured: run the trainer for a few steps on CPU and compare the peak memory
it reports with the memory model's.

On CPU the trainer's `memory_gib` is rank 0's peak resident set size. Besides the tensors the
model counts, that holds the interpreter, torch, DeepSpeed and megatron-core, gloo, the data
indices: the process baseline. It is measured, not guessed: the same command and layout with
the model shrunk to almost nothing (one block per stage, 16 x TP wide, 8-token sequences), less
the little the memory model predicts for that shrunk model. It depends on the number of ranks
and the precision (measured: 0.446 to 0.451 GiB over six fp32 layouts of two ranks), so it is
measured once for each of those and shared.

glibc keeps freed heap memory in the process (its mmap threshold rises after large frees), so
the resident set would record the allocator's history rather than the live tensors. The runs
set MALLOC_MMAP_THRESHOLD_ so that large blocks are returned when freed, as a GPU's
max_memory_allocated counts live tensors only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pretrain.config import load_config
from pretrain.planner.hardware import Cluster, accelerator
from pretrain.planner.memory import GIB, estimate_stage
from pretrain.planner.report import run_from_config

REPO = Path(__file__).resolve().parents[2]
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
STEPS = 2  # Adam's moments exist from the first step's end: the second step runs with them


@dataclass
class Case:
    name: str
    config: str
    settings: list
    nproc: int = 1


def shrunk(case: Case) -> list[str]:
    """The case's settings with the model made negligible, the layout unchanged."""
    config = load_config(case.config, case.settings)
    tp, pp = config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size
    return [*case.settings, f"model.n_layer={pp}", f"model.n_embd={16 * tp}", f"model.n_head={tp}",
            "model.n_positions=8", "model.activation_checkpointing=0"]


def predicted_bytes(config_path: str, settings: list[str], world_size: int) -> int:
    """Rank 0's peak (pipeline stage 0), as resident on a CPU."""
    config = load_config(config_path, settings)
    run = run_from_config(config, Cluster(1, world_size, accelerator("h100")))
    return estimate_stage(run, 0, resident=True).total


def measured_gib(case: Case, settings: list[str], shards: str, run_dir: Path, timeout: int = 900,
                 environment: dict | None = None) -> float:
    """Rank 0's peak memory_gib over STEPS steps of `python -m pretrain` on `shards`, started with `environment`
    (default: this process's)."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a checkpoint left there would be resumed, not trained from
    launcher = ["-m", "pretrain.launch", "--nproc", str(case.nproc)] if case.nproc > 1 else ["-m", "pretrain"]
    command = [sys.executable, *launcher, "--config", case.config, "--set", f"data.prefixes=[{shards}]",
               f"run.dir={run_dir}", "data.split=90,10,0", "eval.interval=0", f"train.max_steps={STEPS}",
               f"checkpoint.interval={STEPS + 1000}", "checkpoint.at_end=false", "logging.tensorboard=false", *settings]
    env = dict(os.environ if environment is None else environment, **MALLOC_ENV, DS_ACCELERATOR="cpu",
               PRETRAIN_DEVICE="cpu", PYTHONUNBUFFERED="1")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{case.name}: the run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return max(json.loads(line)["memory_gib"] for line in lines if "memory_gib" in line)


def baseline_gib(case: Case, shards: str, work: Path, cache: dict, environment: dict | None = None) -> float:
    """The process baseline for the case's rank count and precision, measured on first use."""
    precision = load_config(case.config, case.settings).train.precision
    key = (case.nproc, precision)
    if key not in cache:
        settings = shrunk(case)
        cache[key] = (measured_gib(case, settings, shards, work / f"baseline-{case.nproc}-{precision}",
                                   environment=environment)
                      - predicted_bytes(case.config, settings, case.nproc) / GIB)
    return cache[key]


def compare(case: Case, shards: str, work: Path, baselines: dict | None = None,
            environment: dict | None = None) -> dict:
    """Measure the case (and the baseline, unless `baselines` holds it); predicted = baseline + the model's peak."""
    baseline = baseline_gib(case, shards, work, {} if baselines is None else baselines, environment)
    model = predicted_bytes(case.config, case.settings, case.nproc) / GIB
    measured = measured_gib(case, case.settings, shards, work / case.name, environment=environment)
    predicted = baseline + model
    return {"case": case.name, "nproc": case.nproc, "settings": case.settings, "baseline_gib": baseline,
            "model_gib": model, "predicted_gib": predicted, "measured_gib": measured,
            "error": predicted / measured - 1}


MINI = str(REPO / "configs" / "gpt2-mini.yaml")
FP32 = ["train.precision=fp32", "parallel.micro_batch_size=2"]
BF16 = ["train.precision=bf16", "model.n_positions=128", "parallel.micro_batch_size=2"]  # bf16 is slow on CPU
CASES = [
    Case("dp1-zero0", MINI, [*FP32, "parallel.zero_stage=0", "parallel.global_batch_size=4"]),
    Case("dp2-zero1", MINI, [*FP32, "parallel.zero_stage=1", "parallel.global_batch_size=8"], 2),
    Case("dp2-zero2", MINI, [*FP32, "parallel.zero_stage=2", "parallel.global_batch_size=8"], 2),
    Case("dp2-zero3", MINI, [*FP32, "parallel.zero_stage=3", "parallel.global_batch_size=8"], 2),
    Case("tp2", MINI, [*FP32, "parallel.tensor_parallel_size=2", "parallel.global_batch_size=4"], 2),
    Case("pp2", MINI, [*FP32, "parallel.pipeline_parallel_size=2", "parallel.global_batch_size=8"], 2),
    Case("micro4", MINI, ["train.precision=fp32", "parallel.micro_batch_size=4", "parallel.global_batch_size=8"]),
    Case("micro4-checkpointing", MINI, ["train.precision=fp32", "parallel.micro_batch_size=4",
                                        "parallel.global_batch_size=8", "model.activation_checkpointing=1"]),
    Case("bf16-dp2-zero1", MINI, [*BF16, "parallel.zero_stage=1", "parallel.global_batch_size=8"], 2),
    Case("bf16-dp2-zero2", MINI, [*BF16, "parallel.zero_stage=2", "parallel.global_batch_size=8"], 2),
    Case("124m-dp2-zero1", str(REPO / "configs" / "gpt2-124m.yaml"),
         ["train.precision=fp32", "model.n_positions=128", "parallel.micro_batch_size=2",
          "parallel.global_batch_size=4", "parallel.zero_stage=1"], 2),
]
"""gpt2-mini (30M parameters) in every layout and optimizer path, and gpt2-124m at a short sequence."""
# The test's share (about a minute each on two cores): DP, TP and PP, ZeRO 1 (tp2, pp2, 124m), 2 and 3,
# activation checkpointing and the 124M model. bf16 on a CPU takes three minutes a case: its two cases,
# and the rest, run in tools/bench_plan.py.
TESTED = ("dp2-zero2", "dp2-zero3", "tp2", "pp2", "micro4-checkpointing", "124m-dp2-zero1")
