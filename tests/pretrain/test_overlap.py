"""Overlapped data-parallel communication (pretrain/parallel/overlap.py) changes when gradients and weights
travel, not what they are: real DeepSpeed BF16_Optimizer engines on gloo, the same steps with the overlap
on and off, compared bit for bit; and on, the buckets are reduced during backward."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from tests.pretrain.fidelity_worker import TINY, Scenario, local_view, rank_micro_batches
from tests.pretrain.ranks import start_ranks

STEPS = 4


@dataclass(frozen=True)
class Overlap:
    pipeline_parallel_size: int
    overlap: bool
    bucket_size: int = 5000  # elements: the tiny model's 0.27M parameters make dozens of buckets
    compile: bool = False
    precision: str = "bf16"
    zero_stage: int = 1
    immediate_grad_update: bool = True

    @property
    def scenario(self) -> Scenario:  # DP 2, micro batch 2 x 2 accumulation steps
        return Scenario(1, self.pipeline_parallel_size, 2, steps=STEPS, zero_stage=self.zero_stage)


def run_rank(rank: int, case: Overlap, out_dir: str) -> None:
    scenario = case.scenario
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(scenario.world_size), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain.parallel.build import apply_compile, build_model
    from pretrain.parallel.deepspeed_config import deepspeed_config
    from pretrain.parallel.distributed import init_distributed, initialize_model_parallel, model_parallel_config
    from pretrain.parallel.engine import initialize_engine, train_step
    from pretrain.parallel.layout import ParallelLayout
    from pretrain.parallel.overlap import install

    init_distributed("gloo")
    layout = ParallelLayout(scenario.world_size, 1, scenario.pipeline_parallel_size, case.zero_stage,
                            scenario.micro_batch_size, scenario.global_batch_size).validate(TINY)
    topology = initialize_model_parallel(layout)
    model = build_model(TINY, layout, topology, model_parallel_config(layout), scenario.seed)
    apply_compile(model, case.compile)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    config = deepspeed_config(layout, case.precision, 1.0, overlap_communication=case.overlap,
                              bucket_size=case.bucket_size,
                              extra={"bf16": {"immediate_grad_update": case.immediate_grad_update}})
    engine = initialize_engine(model, layout, topology, optimizer, config)
    overlap = install(engine, case.bucket_size) if case.overlap else None
    if not case.immediate_grad_update:  # the last gradients would reach the buffer after the buckets started
        assert overlap is None
    if case.precision == "fp32":  # DeepSpeed's own overlap_comm, not ours
        assert overlap is None and bool(config["zero_optimization"].get("overlap_comm")) is case.overlap
        assert not case.overlap or engine.optimizer.overlap_comm
    data_rank = parallel_state.get_data_parallel_rank()
    losses, norms, early = [], [], []
    for step in range(scenario.steps):
        losses.append(train_step(engine, rank_micro_batches(step, scenario, data_rank)).item())
        norms.append(float(engine.get_global_grad_norm()))
        early.append(overlap.reduced_in_backward if overlap else 0)
    if overlap:
        overlap.finish_weights()
    torch.save({"losses": losses, "norms": norms, "early": early, "buckets": len(overlap.buckets) if overlap else 0,
                "final": {name: tensor.float() for name, (tensor, _) in
                          local_view((n, p, p) for n, p in model.named_parameters()).items()}},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@lru_cache(maxsize=None)
def run(case: Overlap, out_root: str) -> list[dict]:
    out = Path(out_root) / (f"pp{case.pipeline_parallel_size}-{case.overlap}-{case.bucket_size}-{case.compile}-"
                            f"{case.precision}-zero{case.zero_stage}-{case.immediate_grad_update}")
    out.mkdir(parents=True, exist_ok=True)
    start_ranks(run_rank, (case, str(out)), case.scenario.world_size)
    return [torch.load(out / f"rank{r}.pt") for r in range(case.scenario.world_size)]


@pytest.fixture(scope="module")
def out_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("overlap"))


def assert_same_training(on: list[dict], off: list[dict]) -> None:
    for with_overlap, without in zip(on, off):
        assert with_overlap["losses"] == without["losses"]
        assert with_overlap["norms"] == without["norms"]
        for name, tensor in without["final"].items():
            assert torch.equal(with_overlap["final"][name], tensor), name
    assert on[0]["losses"][-1] < on[0]["losses"][0]  # it trained


def test_gradients_reduced_during_backward_give_the_same_training(out_root):
    """DP 2 with two accumulation steps: every bucket's all-reduce starts inside the last micro-batch's
    backward, and the weights gathered under the next forward are DeepSpeed's to the bit."""
    on, off = run(Overlap(1, True), out_root), run(Overlap(1, False), out_root)
    assert_same_training(on, off)
    buckets = on[0]["buckets"]
    assert buckets > 8
    assert all(rank["early"] == [buckets] * STEPS for rank in on)


def test_pipeline_stages_gather_weights_under_the_forward_with_the_same_training(out_root):
    """PP 2 x DP 2: the pipeline engine reduces after its schedule (nothing reduced in backward), and the
    weight gather still waits in the stages' forwards: the same steps."""
    on, off = run(Overlap(2, True), out_root), run(Overlap(2, False), out_root)
    assert_same_training(on, off)
    assert all(rank["early"] == [0] * STEPS for rank in on)


@pytest.mark.slow
def test_compiled_blocks_wait_for_their_weights_outside_the_graph(out_root):
    """train.compile: the waits run eagerly before each compiled block's graph (a hook inside it would be
    traced), and the compiled run is the same with the overlap as without."""
    on, off = run(Overlap(1, True, compile=True), out_root), run(Overlap(1, False, compile=True), out_root)
    assert_same_training(on, off)
    assert all(rank["early"] == [on[0]["buckets"]] * STEPS for rank in on)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_fp32_zero_1_and_2_take_deepspeeds_own_overlap_with_the_same_training(out_root, zero_stage):
    """fp32 runs through DeepSpeed's ZeRO-1/2 optimizer, whose overlap_comm (with parallel.bucket_size
    buckets) the setting turns on: the same losses, norms and weights as without (on CPU its reduction
    runs on the one stream; on a GPU on a side stream)."""
    on = run(Overlap(1, True, precision="fp32", zero_stage=zero_stage), out_root)
    off = run(Overlap(1, False, precision="fp32", zero_stage=zero_stage), out_root)
    for with_overlap, without in zip(on, off):
        assert with_overlap["losses"] == pytest.approx(without["losses"], rel=1e-6)
        assert with_overlap["norms"] == pytest.approx(without["norms"], rel=1e-5)
        for name, tensor in without["final"].items():
            assert torch.allclose(with_overlap["final"][name], tensor, rtol=0, atol=1e-6), name


@pytest.mark.slow
def test_without_immediate_gradient_updates_the_overlap_steps_aside(out_root):
    """deepspeed.bf16.immediate_grad_update=false adds the last micro-batch's gradients to the buffer after
    backward, when the buckets would already be on their way: the overlap is refused (a warning), and the run
    trains as DeepSpeed's own path does."""
    on = run(Overlap(1, True, immediate_grad_update=False), out_root)
    off = run(Overlap(1, False, immediate_grad_update=False), out_root)
    assert_same_training(on, off)
    assert all(rank["buckets"] == 0 for rank in on)
