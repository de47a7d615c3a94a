"""Every layout trains the same model as one process: loss, gradients, and weights after 10 steps.

TP x PP x DP runs on gloo (up to 8 processes) against the 1x1x1 reference, all
through the real stack: megatron-core's tensor-parallel layers, DeepSpeed's
PipelineModule / PipelineEngine, and its data-parallel gradient averaging.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch

from tests.pretrain.fidelity_worker import Scenario, run_rank
from tests.pretrain.ranks import start_ranks


def assemble(results: list[dict], key: str) -> dict[str, torch.Tensor]:
    """Full-size tensors from the ranks of data-parallel replica 0: TP shards concatenated."""
    shards: dict[str, dict[int, tuple[torch.Tensor, int | None]]] = {}
    for result in results:
        pipe, data, tensor_rank = result["coords"]
        if data == 0:
            for name, value in result[key].items():
                shards.setdefault(name, {})[tensor_rank] = value
    full = {}
    for name, by_rank in shards.items():
        split = by_rank[0][1]
        ordered = [by_rank[r][0] for r in sorted(by_rank)]
        full[name] = ordered[0] if split is None else torch.cat(ordered, dim=split)
    return full


@lru_cache(maxsize=None)
def run(scenario: Scenario, out_root: str) -> dict:
    out = Path(out_root) / f"tp{scenario.tensor_parallel_size}pp{scenario.pipeline_parallel_size}dp{scenario.data_parallel_size}"
    out = out.with_name(out.name + f"z{scenario.zero_stage}ac{scenario.activation_checkpointing}")
    out.mkdir(parents=True, exist_ok=True)
    start_ranks(run_rank, (scenario, str(out)), scenario.world_size)
    results = [torch.load(out / f"rank{r}.pt") for r in range(scenario.world_size)]
    losses = {tuple(r["losses"]) for r in results}
    assert len(losses) == 1, "every rank must report the same global-batch loss"
    return {"losses": results[0]["losses"], **{k: assemble(results, k) for k in ("initial", "gradients", "final")}}


@pytest.fixture(scope="module")
def out_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fidelity"))


@pytest.fixture(scope="module")
def reference(out_root) -> dict:
    return run(Scenario(1, 1, 1), out_root)


def max_abs_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 2, 2)]


@pytest.mark.parametrize("tp,pp,dp", LAYOUTS, ids=[f"tp{t}pp{p}dp{d}" for t, p, d in LAYOUTS])
def test_layout_matches_single_process(reference, out_root, tp, pp, dp):
    result = run(Scenario(tp, pp, dp), out_root)
    # Same initial model, whatever the layout.
    assert max_abs_difference(result["initial"], reference["initial"]) == 0
    # Same loss and gradients on the first step.
    assert result["losses"][0] == pytest.approx(reference["losses"][0], rel=1e-5)
    gradient_scale = max(g.abs().max().item() for g in reference["gradients"].values())
    assert max_abs_difference(result["gradients"], reference["gradients"]) < 1e-5 * gradient_scale
    # And the same training: 10 AdamW steps.
    assert result["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert max_abs_difference(result["final"], reference["final"]) < 1e-4
    assert reference["losses"][-1] < reference["losses"][0]  # it did train


def test_activation_checkpointing_changes_nothing_but_memory(reference, out_root):
    """Every block recomputed in backward, under TP=2 x PP=2: the same losses and weights."""
    result = run(Scenario(2, 2, 1, activation_checkpointing=1), out_root)
    assert result["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert max_abs_difference(result["final"], reference["final"]) < 1e-4
