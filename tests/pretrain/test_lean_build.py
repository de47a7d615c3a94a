"""The lean build (pretrain/parallel/materialize.py: meta device, then layer by layer on the rank's device)
starts from exactly the weights of a whole-model build on the CPU, in every layout; and it never holds the
whole model on the host at once."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from tests.pretrain.fidelity_worker import TINY, Scenario
from tests.pretrain.ranks import start_ranks


def run_rank(rank: int, scenario: Scenario, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(scenario.world_size), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    from pretrain.model.gpt2 import GPT2
    from pretrain.parallel.build import build_model
    from pretrain.parallel.distributed import init_distributed, initialize_model_parallel, model_parallel_config
    from pretrain.parallel.layout import ParallelLayout
    from pretrain.parallel.pipeline import build_pipeline

    init_distributed("gloo")
    layout = ParallelLayout(scenario.world_size, scenario.tensor_parallel_size, scenario.pipeline_parallel_size,
                            0, scenario.micro_batch_size, scenario.global_batch_size).validate(TINY)
    topology = initialize_model_parallel(layout)
    parallel = model_parallel_config(layout)
    whole = GPT2(TINY, parallel, scenario.seed) if layout.pipeline_parallel_size == 1 else \
        build_pipeline(TINY, topology, parallel, scenario.seed)  # DeepSpeed's own build, on the CPU
    lean = build_model(TINY, layout, topology, parallel, scenario.seed)

    def attributes(p):
        return {key: getattr(p, key, None) for key in ("tensor_model_parallel", "partition_dim", "partition_stride")}

    torch.save({name: (p.detach().clone(), p.requires_grad, attributes(p)) for name, p in whole.named_parameters()},
               os.path.join(out_dir, f"whole{rank}.pt"))
    torch.save({name: (p.detach().clone(), p.requires_grad, attributes(p)) for name, p in lean.named_parameters()},
               os.path.join(out_dir, f"lean{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


@lru_cache(maxsize=None)
def run(tp: int, pp: int, out_root: str) -> list[tuple[dict, dict]]:
    scenario = Scenario(tp, pp, 1)
    out = Path(out_root) / f"tp{tp}pp{pp}"
    out.mkdir(parents=True, exist_ok=True)
    start_ranks(run_rank, (scenario, str(out)), scenario.world_size)
    return [(torch.load(out / f"whole{r}.pt"), torch.load(out / f"lean{r}.pt")) for r in range(scenario.world_size)]


@pytest.fixture(scope="module")
def out_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("lean"))


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_the_lean_build_starts_from_the_whole_builds_weights_in_every_layout(out_root, tp, pp):
    """Every rank's parameters: the same names, values (bit for bit), trainability and tensor-parallel
    attributes as DeepSpeed's and megatron-core's whole build on the CPU."""
    for whole, lean in run(tp, pp, out_root):
        assert lean.keys() == whole.keys()
        for name, (value, trainable, attributes) in whole.items():
            assert torch.equal(lean[name][0], value), name
            assert lean[name][1:] == (trainable, attributes), name


def test_a_layer_outside_the_known_kinds_is_an_error_not_a_meta_tensor_left_behind():
    from torch import nn

    from pretrain.parallel.distributed import model_parallel_config
    from pretrain.parallel.layout import ParallelLayout
    from pretrain.parallel.materialize import materialize

    with torch.device("meta"):
        stray = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(RuntimeError, match="left on the meta device: \\['0.weight', '0.bias'\\]"):
        materialize(stray, TINY, model_parallel_config(ParallelLayout(world_size=1)), 1234, "cpu")
