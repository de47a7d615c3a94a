"""The planner's memory model against real runs: each tested case of pretrain/planner/measure.py run for
a few steps, with the process baselines they share (tests/pretrain/planner/test_planner.py checks the figures;
tests/head_start.py starts the runs when the session starts)."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pretrain.config import load_config
from pretrain.planner.measure import CASES, TESTED, baseline_gib, compare

# Each case runs at a shorter window than tools/bench_plan.py (the step is most of a run's CPU time, and it
# grows with the tokens): 256 tokens where the predicted peak is the forward, whose activations stay its
# largest part; 64 where it is the optimizer step, which holds no activations (pp2, and gpt2-124m already at 128).
WINDOWS = {"dp2-zero2": 256, "dp2-zero3": 256, "tp2": 256, "micro4-checkpointing": 256, "pp2": 64,
           "124m-dp2-zero1": 64}
TESTED_CASES = [case for case in CASES if case.name in TESTED]


def shorter(case):
    return dataclasses.replace(case, settings=[*case.settings, f"model.n_positions={WINDOWS[case.name]}"])


def measure_all(shards: str, work: Path, at_once: int = 2, environment: dict | None = None) -> dict:
    """case name -> compare()'s result for every tested case, `at_once` runs at a time: a run's peak resident
    memory does not depend on what else the machine runs. The process baselines are measured first, one per
    rank count and precision, and shared. The runs start with `environment` (default: this process's)."""
    cases, baselines = [shorter(case) for case in TESTED_CASES], {}
    first_of_each = {}  # (ranks, precision) -> the first case that has them, as compare() alone would pick
    for case in cases:
        first_of_each.setdefault((case.nproc, load_config(case.config, case.settings).train.precision), case)
    with ThreadPoolExecutor(at_once) as pool:
        list(pool.map(lambda case: baseline_gib(case, shards, work / "baselines", baselines, environment),
                      first_of_each.values()))
        return {result["case"]: result for result in pool.map(lambda case: compare(case, shards, work / case.name,
                                                                                     baselines, environment), cases)}
