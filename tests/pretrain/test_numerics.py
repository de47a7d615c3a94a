"""bf16 numerics under real DeepSpeed engines: gradient accumulation dtype, the loss-scale
read for every optimizer wrapper, and the once-per-step skip of non-finite steps."""

from __future__ import annotations

import os

import pytest
import torch

from pretrain.model.gpt2 import GPT2, GPTConfig
from pretrain.parallel.distributed import init_distributed, model_parallel_config
from pretrain.parallel.deepspeed_config import deepspeed_config
from pretrain.parallel.engine import loss_scale
from pretrain.parallel.layout import ParallelLayout
from pretrain.planner.memory import DEEPSPEED_CLASSES, RunShape
from tests.pretrain.ranks import start_ranks

MICRO_BATCHES = 64


def accumulated_gradient_error(layout: ParallelLayout, gradient_dtype: str) -> float:
    """Relative error of DeepSpeed's gradient, accumulated over 64 bf16 micro-batches, against
    the float64 sum of the very same bf16 micro-batch gradients."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    config = GPTConfig(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=512, padded_vocab_size=512)
    model = GPT2(config, model_parallel_config(layout), seed=7)
    reference_model = GPT2(config, model_parallel_config(layout), seed=7).to(torch.bfloat16)  # the same weights
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (1, 33), generator=generator) for _ in range(MICRO_BATCHES)]

    reference = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in reference_model.named_parameters()}
    for tokens in batches:
        reference_model.zero_grad()
        (reference_model(tokens[:, :-1], tokens[:, 1:]) / MICRO_BATCHES).backward()
        for name, p in reference_model.named_parameters():
            reference[name] += p.grad.double()

    ds_config = deepspeed_config(layout, "bf16", gradient_dtype=gradient_dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    for index, tokens in enumerate(batches):
        engine.backward(engine(tokens[:, :-1], tokens[:, 1:]))
        if index < MICRO_BATCHES - 1:
            engine.step()  # only counts the micro-batch: the window closes after the last one
    assert engine.is_gradient_accumulation_boundary()
    errors, norms = 0.0, 0.0
    for name, p in engine.module.named_parameters():
        gradient = safe_get_full_grad(p).double()
        errors += (gradient - reference[name]).square().sum().item()
        norms += reference[name].square().sum().item()
    engine.step()  # close the accumulation window cleanly
    return (errors / norms) ** 0.5


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_fp32_gradient_accumulation_matches_the_fp32_sum_far_more_closely_than_bf16(single_process_group,
                                                                                     zero_stage, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    init_distributed("gloo")  # DeepSpeed's communication layer joins the existing group
    layout = ParallelLayout(world_size=1, zero_stage=zero_stage, micro_batch_size=1,
                            global_batch_size=MICRO_BATCHES).validate(GPTConfig(n_layer=2, n_embd=64, n_head=4))
    in_fp32 = accumulated_gradient_error(layout, "fp32")
    in_bf16 = accumulated_gradient_error(layout, "bf16")
    assert in_fp32 < 1e-6, in_fp32  # only fp32 summation order differs from the float64 sum
    assert in_bf16 > 1e-3, in_bf16  # 64 additions with an 8-bit mantissa
    assert in_fp32 < in_bf16 / 1000


def test_bf16_with_fp32_gradients_at_zero_0_is_refused_naming_the_settings():
    with pytest.raises(ValueError, match="train.gradient_dtype=fp32 needs parallel.zero_stage >= 1"):
        deepspeed_config(ParallelLayout(world_size=1, zero_stage=0), "bf16")
    assert "data_types" not in deepspeed_config(ParallelLayout(world_size=1, zero_stage=0), "fp32")
    assert deepspeed_config(ParallelLayout(world_size=1, zero_stage=0), "bf16", gradient_dtype="bf16")[
        "data_types"] == {"grad_accum_dtype": "bf16"}


def test_the_loss_scale_is_read_from_every_wrapper_deepspeed_may_pick():
    """fp16 needs a GPU; what we read must exist on every class DeepSpeed may wrap the optimizer in."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls in (FP16_Optimizer, FP16_UnfusedOptimizer, DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        assert isinstance(getattr(cls, "loss_scale"), property), cls.__name__
    assert not hasattr(BF16_Optimizer, "loss_scale")  # read as None: bf16 has no loss scale

    class Scaled:  # what a wrapper exposes, in its three forms
        def __init__(self, value):
            self.loss_scale = value

    assert loss_scale(Scaled(65536.0)) == 65536.0 and loss_scale(Scaled(torch.tensor(8.0))) == 8.0
    assert loss_scale(Scaled(None)) is None and loss_scale(torch.optim.SGD([torch.zeros(1, requires_grad=True)],
                                                                           lr=1)) is None


# ---- skipping non-finite steps: 2 ranks, every precision and ZeRO stage ------------------------

CASES = [("fp32", "fp32", 0), ("fp32", "fp32", 1), ("fp32", "fp32", 2), ("fp32", "fp32", 3),
         ("bf16", "bf16", 0), ("bf16", "fp32", 1), ("bf16", "fp32", 2), ("bf16", "fp32", 3)]


def _full_weights(engine) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    parts = []
    for p in engine.module.parameters():
        full = safe_get_full_fp32_param(p)
        parts.append((full if full is not None else p.detach()).float().flatten().cpu())
    return torch.cat(parts)


def _skip_worker(rank: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import deepspeed

    from pretrain.training.optim import SkipNonFiniteAdamW
    from pretrain.training.trainer import parameter_groups

    init_distributed("gloo")
    results = {}
    for precision, gradient_dtype, zero_stage in CASES:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
        optimizer = SkipNonFiniteAdamW(parameter_groups(model, 0.1), lr=0.01)  # two groups: ZeRO steps each
        layout = ParallelLayout(world_size=2, zero_stage=zero_stage, micro_batch_size=1, global_batch_size=4)
        config = deepspeed_config(layout, precision, 1.0, gradient_dtype=gradient_dtype)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
        record = []
        for step in range(3):
            before, skipped_before, decisions_before = _full_weights(engine), engine.skipped_steps, \
                optimizer.guard.decisions
            for micro in range(2):
                x = torch.full((1, 8), 0.5 + step + micro)
                if step == 1 and micro == 1 and rank == 1:  # one micro-batch of one rank only
                    x[0, 3] = float("nan")
                engine.backward(engine(x.to(engine.module[0].weight.dtype)).float().square().mean())
                engine.step()
            skipped = optimizer.guard.finish_step() or engine.skipped_steps > skipped_before
            record.append((skipped, bool(torch.equal(before, _full_weights(engine))),
                           optimizer.guard.decisions - decisions_before, _full_weights(engine)))
        results[(precision, gradient_dtype, zero_stage)] = (type(engine.optimizer).__name__, record)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.slow
def test_a_non_finite_gradient_on_one_rank_skips_the_step_everywhere_deciding_once(tmp_path):
    start_ranks(_skip_worker, (str(tmp_path),), 2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    for case in CASES:
        wrapper, record = ranks[0][case]
        precision, gradient_dtype, zero_stage = case  # the planner's memory model knows which wrapper it gets
        shape = RunShape(GPTConfig(), ParallelLayout(2, zero_stage=zero_stage), precision, gradient_dtype)
        assert DEEPSPEED_CLASSES[shape.optimizer] == wrapper, case
        for rank_results in ranks:
            steps = rank_results[case][1]
            assert [skipped for skipped, *_ in steps] == [False, True, False], (case, wrapper)
            assert [unchanged for _, unchanged, *_ in steps] == [False, True, False], (case, wrapper)
            assert all(decisions <= 1 for _, _, decisions, _ in steps), (case, wrapper)  # once per step at most
            assert steps[0][2] == 1 and steps[2][2] == 1, (case, wrapper)  # ours decided the finite steps
        assert torch.equal(ranks[0][case][1][2][3], ranks[1][case][1][2][3]), case  # replicas stay identical


def test_deepspeed_sections_are_refined_key_by_key_and_pipelines_keep_immediate_bf16_updates():
    pipeline = ParallelLayout(world_size=2, pipeline_parallel_size=2)
    refined = deepspeed_config(pipeline, "bf16", extra={"bf16": {"check_grad_overflow": True}})
    assert refined["bf16"] == {"enabled": True, "immediate_grad_update": True, "check_grad_overflow": True}
    with pytest.raises(ValueError, match="deepspeed.bf16.immediate_grad_update=false with a pipeline"):
        deepspeed_config(pipeline, "bf16", extra={"bf16": {"immediate_grad_update": False}})
