"""Pipeline stages are cut where DeepSpeed's "parameters" method cuts them, and each rank builds only its own.

The per-layer parameter counts are computed, not built; they are checked against
built megatron-core layers (TP=1 here, TP=2 on gloo ranks), and the stage
boundaries against a stock DeepSpeed PipelineModule given the same layers.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from pretrain.model.gpt2 import Initializer, layer_classes
from pretrain.model.presets import model_config, parameter_count
from pretrain.parallel.distributed import model_parallel_config
from pretrain.parallel.pipeline import layer_parameter_counts
from tests.pretrain.ranks import start_ranks

WORLD_SIZE = 4
# Small vocabulary: blocks outweigh the embedding, so the cuts fall between blocks.
SMALL = dict(n_embd=64, n_positions=32, vocab_size=1000)
# (name, tensor_parallel_size, pipeline_parallel_size, model overrides, partition method)
CASES = [
    ("tiny-tp1-pp2", 1, 2, {}, "parameters"),
    ("tiny-tp1-pp4", 1, 4, {}, "parameters"),
    ("tiny-tp2-pp2", 2, 2, {}, "parameters"),
    ("small4-pp2", 1, 2, dict(SMALL, n_layer=4), "parameters"),
    ("small7-pp2", 1, 2, dict(SMALL, n_layer=7), "parameters"),
    ("small7-pp4", 1, 4, dict(SMALL, n_layer=7), "parameters"),
    ("small12-pp4", 1, 4, dict(SMALL, n_layer=12), "parameters"),
    ("small7-pp2-uniform", 1, 2, dict(SMALL, n_layer=7), "uniform"),
    ("small7-pp4-type", 1, 4, dict(SMALL, n_layer=7), "type:Block"),
]


def trainable_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def built_counts(config, parallel) -> dict[str, int]:
    """Trainable parameters of one built layer of each class, at its first place in the sequence."""
    init = Initializer(1234, config.init_std)
    first_index = {}
    for index, cls in enumerate(layer_classes(config)):
        first_index.setdefault(cls, index)
    return {cls.__name__: trainable_parameters(cls(config, parallel, init, index))
            for cls, index in first_index.items()}


def analytic_counts(config, tensor_parallel_size: int) -> dict[str, int]:
    return {cls.__name__: n for cls, n in layer_parameter_counts(config, tensor_parallel_size).items()}


def test_layer_counts_match_built_layers_tp1(single_process_group):
    config = model_config("gpt2-tiny")
    assert analytic_counts(config, 1) == built_counts(config, model_parallel_config(single_process_group))


def test_layer_counts_add_up_to_the_model_with_the_head_tied():
    config = model_config("gpt2-1.5b")
    counts = layer_parameter_counts(config, 1)
    total = sum(counts[cls] for cls in layer_classes(config))  # the head is the embedding, counted once
    assert total == parameter_count(config, include_padding=True)


def counting_constructions(monkeypatch, classes) -> Counter:
    """Wrap each class's __init__ so that every construction is tallied by class name."""
    built = Counter()
    for cls in classes:
        def counted(self, *args, _init=cls.__init__, _name=cls.__name__, **kwargs):
            built[_name] += 1
            _init(self, *args, **kwargs)
        monkeypatch.setattr(cls, "__init__", counted)
    return built


def build_case(tp: int, pp: int, overrides: dict, method: str) -> dict:
    """Our pipeline and a stock DeepSpeed one for the same layers: their cuts and what each built."""
    from deepspeed.pipe import PipelineModule

    from pretrain.parallel.distributed import initialize_model_parallel
    from pretrain.parallel.layout import ParallelLayout
    from pretrain.parallel.pipeline import build_pipeline, layer_specs

    config = model_config("gpt2-tiny", tensor_parallel_size=tp, **overrides)
    layout = ParallelLayout(WORLD_SIZE, tp, pp, global_batch_size=WORLD_SIZE).validate(config)
    topology = initialize_model_parallel(layout)
    parallel = model_parallel_config(layout)
    result = {}
    for name in ("ours", "stock"):
        with pytest.MonkeyPatch.context() as monkeypatch:
            built = counting_constructions(monkeypatch, set(layer_classes(config)))
            if name == "ours":
                module = build_pipeline(config, topology, parallel, 1234, method)
            else:
                module = PipelineModule(layer_specs(config, parallel, 1234), topology=topology,
                                        partition_method=method)
        parts = [int(p) for p in module.parts]
        stage = layer_specs(config, parallel, 1234)[parts[module.stage_id]:parts[module.stage_id + 1]]
        result[name] = {"parts": parts, "built": dict(built), "n_layer": config.n_layer, "method": method,
                        "stage_layers": dict(Counter(spec.typename.__name__ for spec in stage))}
    return result


def run_rank(rank: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    from pretrain.parallel.distributed import init_distributed, initialize_model_parallel
    from pretrain.parallel.layout import ParallelLayout

    init_distributed("gloo")
    config = model_config("gpt2-tiny", tensor_parallel_size=2)
    layout = ParallelLayout(WORLD_SIZE, tensor_parallel_size=2, global_batch_size=WORLD_SIZE).validate(config)
    initialize_model_parallel(layout)
    result = {"counts_tp2": {"analytic": analytic_counts(config, 2),
                             "built": built_counts(config, model_parallel_config(layout))},
              "cases": {name: build_case(*case) for name, *case in CASES}}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("pipeline_partition")
    start_ranks(run_rank, (str(out),), WORLD_SIZE)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


def test_layer_counts_match_built_layers_tp2(ranks):
    for result in ranks:
        assert result["counts_tp2"]["analytic"] == result["counts_tp2"]["built"]


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_stage_boundaries_match_deepspeed(ranks, case):
    for result in ranks:
        assert result["cases"][case]["ours"]["parts"] == result["cases"][case]["stock"]["parts"]


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_each_rank_builds_only_its_own_stage(ranks, case):
    for result in ranks:
        ours, stock = result["cases"][case]["ours"], result["cases"][case]["stock"]
        assert ours["built"] == ours["stage_layers"]
        if stock["method"] == "parameters":  # the stock module builds every block just to count it
            assert stock["built"]["Block"] >= stock["n_layer"]
