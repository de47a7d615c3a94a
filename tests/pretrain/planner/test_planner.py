"""The layout planner: its refusals are the trainer's, its numbers follow their formulas, and its memory
model predicts the peak memory real runs of this trainer reach (the slow test at the end)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pretrain.config import load_config
from pretrain.model.presets import model_config, parameter_count
from pretrain.parallel.layout import ParallelLayout
from pretrain.planner.hardware import Cluster, accelerator
from pretrain.planner.memory import (STAGE3_PREFETCH_BUCKET_SIZE, RunShape, estimate_memory, estimate_stage,
                                     peak_memory, stage_layers, stage_parameters)
from pretrain.planner.report import run_from_config
from pretrain.planner.search import plan_layouts, refusal
from pretrain.planner.targets import target_model
from pretrain.planner.timing import step_time
from tests.conftest import REPO
from tests.head_start import finished
from tests.pretrain.planner.measured_memory import TESTED_CASES, measure_all, shorter

H100_NODES = Cluster(8, 8, accelerator("h100"))


def run_shape(preset: str, world: int, tp=1, pp=1, zero=1, micro=1, global_batch=64, **kwargs) -> RunShape:
    model = target_model(preset, tp)
    return RunShape(model, ParallelLayout(world, tp, pp, zero, micro, global_batch), **kwargs)


def plan_tool(*args: str) -> subprocess.CompletedProcess:
    """tools/plan.py's main() in this process (imports paid once), as a finished command: code, stdout, stderr."""
    import contextlib
    import io
    import os

    from tools.plan import main

    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse's errors
                code = exit_.code
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(["tools/plan.py", *args], code, out.getvalue(), err.getvalue())


# ---- the model's arithmetic -------------------------------------------------------------------------------

@pytest.mark.parametrize("pp", [1, 2, 4, 8])
def test_stages_hold_the_whole_model_with_the_tied_head_on_the_last(pp):
    run = run_shape("gpt2-1.5b", 64, pp=pp)
    stages = stage_layers(run)
    assert len(stages) == pp and all(stages)
    total = sum(stage_parameters(run, layers) for layers in stages)
    embedding = run.model.padded_vocab_size * run.model.n_embd
    assert total == parameter_count(run.model, include_padding=True) + (embedding if pp > 1 else 0)


def test_bytes_per_parameter_follow_each_optimizer_path():
    """Mixed precision with ZeRO-1 over 8 ranks (BF16_Optimizer): 2 bytes of bf16 weights, 4 of fp32
    gradients for the whole model, 12 / 8 of master weights and moments; fp32 without ZeRO: 4 + 4 + 8."""
    mixed = estimate_memory(run_shape("gpt2-1.5b", 8, zero=1, global_batch=8))[0]
    P = mixed.parts["local_parameters"]
    assert (mixed.parameters, mixed.optimizer) == (2 * P, 12 * P // 8)
    assert mixed.gradients == 4 * P and mixed.parts["optimizer_path"] == "bf16_optimizer"
    plain = estimate_memory(run_shape("gpt2-1.5b", 8, zero=0, global_batch=8, precision="fp32"))[0]
    assert (plain.parameters, plain.optimizer) == (4 * P, 8 * P)
    # its peak is the step: the gradients, and torch's foreach Adam's one fp32 temporary per tensor
    assert plain.moment == "optimizer step" and plain.gradients == 8 * P
    fp16 = run_shape("gpt2-1.5b", 8, zero=0, global_batch=8, precision="fp16")
    assert fp16.optimizer == "mixed_whole" and estimate_memory(fp16)[0].parameters == 2 * P
    zero3 = estimate_memory(run_shape("gpt2-1.5b", 8, zero=3, global_batch=8))[0]
    gathered = 2 * (50304 * 1600 + STAGE3_PREFETCH_BUCKET_SIZE)  # the largest layer (the embedding) and a prefetch
    assert zero3.parameters == 2 * P // 8 + gathered and zero3.optimizer == 12 * P // 8


def test_bf16_without_zero_takes_deepspeeds_bf16_optimizer_with_a_pipeline_only():
    """DeepSpeed picks BF16_Optimizer (master weights split over data parallel) for bf16 gradients at
    ZeRO-0 with a pipeline, FP16_UnfusedOptimizer (whole) without one."""
    piped = run_shape("gpt2-1.5b", 64, pp=4, zero=0, micro=1, global_batch=256, gradient_dtype="bf16")
    flat = run_shape("gpt2-1.5b", 64, pp=1, zero=0, micro=1, global_batch=256, gradient_dtype="bf16")
    assert (piped.optimizer, flat.optimizer) == ("bf16_optimizer", "mixed_whole")
    stage = estimate_memory(piped)[0]
    assert stage.optimizer == 12 * stage.parts["local_parameters"] // 16


def test_activation_checkpointing_and_tensor_parallelism_shrink_activations():
    base = peak_memory(run_shape("gpt2-1.5b", 8, micro=8, global_batch=64))
    checkpointed = peak_memory(run_shape("gpt2-1.5b", 8, micro=8, global_batch=64, activation_checkpointing=1))
    assert checkpointed.activations < base.activations / 4
    split = peak_memory(run_shape("gpt2-1.5b", 25, tp=25, micro=8, global_batch=8))  # 25 heads: TP 25 is valid
    assert split.activations < base.activations / 2  # layer-norm inputs and outputs stay whole


def test_the_first_pipeline_stage_holds_a_micro_batch_per_stage_in_flight():
    run = run_shape("gpt2-1.5b", 64, pp=4, zero=1, micro=1, global_batch=256)
    in_flight = [estimate.parts["micro_batches_in_flight"] for estimate in estimate_memory(run)]
    assert in_flight == [4, 3, 2, 1]


def test_step_time_parts_follow_their_formulas():
    run = run_shape("gpt2-1.5b", 64, pp=4, micro=2, global_batch=512)
    time = step_time(run, H100_NODES)
    assert 0 < time.mfu < 0.5  # never above the assumed efficiency of the matmuls
    # BF16_Optimizer over 16 ranks on two nodes (400 Gbit/s = 50 GB/s per GPU): a ring all-reduce of the fp32
    # gradients, 2 (n - 1) / n x 4 P bytes, then an all-gather of the bf16 weights, (n - 1) / n x 2 P bytes.
    two_nodes = run_shape("gpt2-1.5b", 16, micro=8, global_batch=128, overlap=False)
    P = stage_parameters(two_nodes, stage_layers(two_nodes)[0])
    expected = (2 * 15 / 16 * 4 * P + 15 / 16 * 2 * P) / 50e9
    assert step_time(two_nodes, Cluster(2, 8, accelerator("h100"))).data_parallel == pytest.approx(expected)
    inside = step_time(two_nodes, Cluster(1, 16, accelerator("h100"))).data_parallel  # NVLink, 450 GB/s
    assert inside == pytest.approx(expected * 50 / 450)
    alone = step_time(run_shape("gpt2-1.5b", 1, global_batch=8, micro=8), Cluster(1, 1, accelerator("h100")))
    assert alone.data_parallel == 0 and alone.pipeline_bubble == 0 and alone.tensor_parallel == 0


def test_overlap_hides_what_the_last_backward_and_the_next_forward_can_hold():
    """With parallel.overlap_communication, K buckets of the reduction R behind the last micro-batch's
    backward W show max(R / K, R - W (K - 1) / K); the dp broadcasts of the weights behind the first
    forward, likewise; what is hidden is the rest. ZeRO-2 through DeepSpeed's overlap_comm hides each
    micro-batch's reduction alike; off, or at ZeRO-3, nothing is hidden."""
    from pretrain.planner.timing import all_reduce_seconds, overlapped

    cluster = Cluster(2, 8, accelerator("h100"))
    on, off = (run_shape("gpt2-1.5b", 16, micro=8, global_batch=256, overlap=flag) for flag in (True, False))
    with_overlap, without = step_time(on, cluster), step_time(off, cluster)
    P = stage_parameters(on, stage_layers(on)[0])
    per_micro = with_overlap.compute / on.layout.gradient_accumulation_steps
    reduce = all_reduce_seconds(4 * P, 16, 50.0)
    expected = (overlapped(reduce, per_micro * 2 / 3, -(-P // on.overlap_bucket_size))
                + overlapped(2 * P / 50e9, per_micro / 3, 16))
    assert with_overlap.data_parallel == pytest.approx(expected)
    assert with_overlap.data_parallel + with_overlap.data_parallel_hidden == pytest.approx(reduce + 2 * P / 50e9)
    assert with_overlap.data_parallel < without.data_parallel / 2 and without.data_parallel_hidden == 0
    assert overlapped(1.0, 10.0, 4) == 0.25 and overlapped(1.0, 0.4, 5) == pytest.approx(0.68)
    # ZeRO-2 (DeepSpeedZeroOptimizer): DeepSpeed's overlap_comm hides each micro-batch's reduction, not the gather.
    zero2, zero2_off = (run_shape("gpt2-1.5b", 16, zero=2, micro=8, global_batch=256, overlap=flag) for flag in (1, 0))
    buckets = -(-P // zero2.bucket)
    assert step_time(zero2, cluster).data_parallel_hidden == pytest.approx(
        2 * (reduce - overlapped(reduce, per_micro * 2 / 3, buckets)))
    assert step_time(zero2_off, cluster).data_parallel_hidden == 0
    zero3 = run_shape("gpt2-1.5b", 16, zero=3, micro=8, global_batch=256)
    assert step_time(zero3, cluster).data_parallel_hidden == 0


def test_the_shipped_xl_recipe_is_the_recommended_layout_and_keeps_its_mfu_at_scale():
    """configs/gpt2-1.5b.yaml on 8 nodes of 8 H100s: at least 40% MFU (25.2% before the overlap), one node
    at least 45%, and the layout the planner recommends for both."""
    config = load_config(REPO / "configs/gpt2-1.5b.yaml")
    for nodes, floor in ((8, 0.40), (1, 0.45)):
        cluster = Cluster(nodes, 8, accelerator("h100"))
        run = run_from_config(config, cluster)
        assert step_time(run, cluster).mfu >= floor, nodes
        plan = plan_layouts(lambda tp: target_model("gpt2-1.5b", tp), cluster, config.parallel.global_batch_size)
        best = plan.recommended.run
        assert (best.layout, best.activation_checkpointing) == (run.layout, run.activation_checkpointing), nodes


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0),
                                        ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-40GB", 312.0),
                                        ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0),
                                        ("NVIDIA B200", 2250.0), ("NVIDIA GB200", 2500.0),
                                        ("NVIDIA RTX A1000", None), ("Tesla V100-SXM2-32GB", None)])
def test_mfu_peaks_are_found_by_the_device_name_torch_reports(name, peak):
    from pretrain.planner.hardware import peak_tflops_by_device_name

    assert peak_tflops_by_device_name(name) == peak


def test_compute_time_counts_the_trainers_own_flops():
    from pretrain.model.presets import flops_per_token
    from pretrain.planner.timing import COMPUTE_EFFICIENCY, LAUNCH_SECONDS_PER_BLOCK

    run = run_shape("gpt2-1.5b", 8, micro=4, global_batch=64)
    time = step_time(run, Cluster(1, 8, accelerator("h100")))
    tokens = 64 * run.sequence
    expected = flops_per_token(run.model, run.sequence) * tokens / (8 * 989e12 * COMPUTE_EFFICIENCY)
    launches = run.layout.gradient_accumulation_steps * run.model.n_layer * LAUNCH_SECONDS_PER_BLOCK
    assert time.compute == pytest.approx(expected + launches, rel=1e-9)
    checkpointed = step_time(run_shape("gpt2-1.5b", 8, micro=4, global_batch=64, activation_checkpointing=1),
                             Cluster(1, 8, accelerator("h100")))
    assert 1.25 < checkpointed.compute / time.compute < 1.34  # a block's forward again: about a third more


def test_data_parallel_scales_weakly_across_nodes():
    """More nodes, the same batch per GPU (llm.c's 128 sequences): tokens/s grows, by less than the node
    count: the gradients cross the network instead of NVLink."""
    def tokens_per_second(nodes: int) -> float:
        world = nodes * 8
        return step_time(run_shape("gpt2-1.5b", world, micro=8, global_batch=128 * world),
                         Cluster(nodes, 8, accelerator("h100"))).tokens_per_second

    one, eight = tokens_per_second(1), tokens_per_second(8)
    assert 4 * one < eight < 8 * one


# ---- refusals are the trainer's ---------------------------------------------------------------------------

def test_gpt2_xl_heads_allow_tensor_parallel_1_5_or_25_only():
    # 40 GPUs: a multiple of 2, 4, 5 and 8
    for tp in (1, 5):
        assert refusal(run_shape("gpt2-1.5b", 40, tp=tp, global_batch=40)) is None
    assert refusal(run_shape("gpt2-1.5b", 50, tp=25, global_batch=50)) is None
    for tp in (2, 4, 8):
        reason = refusal(RunShape(model_config("gpt2-1.5b", tp), ParallelLayout(40, tp, 1, 1, 1, 40)))
        assert f"parallel.tensor_parallel_size={tp} does not divide the model's 25 attention heads; " \
               "choose one of 1, 5, 25" in reason


@pytest.mark.parametrize("shape, words", [
    (dict(pp=2, zero=2), "cannot be combined with pipeline parallelism"),
    (dict(pp=2, zero=3), "cannot be combined with pipeline parallelism"),
    (dict(micro=3, global_batch=64), "is not a multiple of parallel.micro_batch_size"),
    (dict(zero=0), "needs parallel.zero_stage >= 1"),
])
def test_impossible_layouts_are_refused_with_the_trainers_reason(shape, words):
    assert words in refusal(run_shape("gpt2-124m", 8, **shape))


def test_a_model_too_big_for_the_gpus_gets_no_recommendation():
    small = Cluster(1, 1, accelerator("h100"))
    plan = plan_layouts(lambda tp: target_model("gpt3-175b", tp), small, 8)
    assert plan.ranked and plan.recommended is None and not any(c.fits for c in plan.ranked)


# ---- the command line -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xl_plan() -> dict:
    """The real command line, in its own process: stdout is one JSON object and nothing else."""
    done = subprocess.run([sys.executable, "tools/plan.py", "--preset", "gpt2-1.5b", "--nodes", "8",
                           "--gpus-per-node", "8", "--json"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_json_ranks_every_layout_that_runs_with_memory_per_gpu(xl_plan):
    layouts = xl_plan["layouts"]
    fitting = [layout for layout in layouts if layout["fits"]]
    assert fitting and xl_plan["recommended"] in fitting
    assert xl_plan["recommended"]["tokens_per_second"] >= 0.98 * fitting[0]["tokens_per_second"]
    speeds = [layout["tokens_per_second"] for layout in fitting]
    assert speeds == sorted(speeds, reverse=True)
    by_micro = {layout["micro_batch_size"]: layout["memory_gib"]["total"] for layout in layouts
                if (layout["pipeline_parallel_size"], layout["zero_stage"], layout["activation_checkpointing"]) == (1, 1, 0)}
    totals = [by_micro[micro] for micro in sorted(by_micro)]
    assert len(totals) > 2 and totals == sorted(totals)  # more tokens per micro-batch, more memory
    for layout in layouts:
        assert layout["tensor_parallel_size"] == 1  # 25 heads on 8-GPU nodes: TP 5 and 25 cannot divide 64 GPUs
        assert layout["gradient_accumulation_steps"] * layout["micro_batch_size"] * layout["data_parallel_size"] \
            == xl_plan["global_batch_size"]
    examples = " | ".join(refused["example"] for refused in xl_plan["refused"])
    assert "does not divide the model's 25 attention heads; choose one of 1, 5, 25" in examples
    assert "cannot be combined with pipeline parallelism" in examples


def test_the_recommendation_trains_as_printed(xl_plan, gpt2_shards, tmp_path):
    """The --set line the planner prints is accepted by the trainer's own check for that many ranks."""
    settings = xl_plan["recommended"]["settings"]
    done = subprocess.run([sys.executable, "-m", "pretrain", "--config", "configs/gpt2-1.5b.yaml", "--check",
                           "--world-size", "64", "--set", f"run.dir={tmp_path}", f"data.prefixes=[{gpt2_shards}]",
                           "checkpoint.check_space=false",  # 87 GB of checkpoints: not this test's question
                           *settings],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ok: 64 ranks" in done.stdout


def test_the_printed_settings_carry_the_planned_model_and_precision():
    done = plan_tool("--preset", "gpt3-1.3b", "--nodes", "1", "--gpus-per-node", "8", "--precision", "fp32", "--json")
    assert done.returncode == 0, done.stderr
    settings = json.loads(done.stdout)["recommended"]["settings"]
    for key in ("train.precision=fp32", "model.n_layer=24", "model.n_embd=2048", "model.n_head=16",
                "model.n_positions=2048"):
        assert key in settings


def test_check_mode_predicts_one_config_and_says_whether_it_fits():
    fits = plan_tool("--config", "configs/gpt2-124m.yaml", "--nodes", "1", "--gpus-per-node", "8")
    assert fits.returncode == 0, fits.stderr
    assert "stage 0: parameters" in fits.stdout and "fits: peak" in fits.stdout
    too_big = plan_tool("--config", "configs/gpt2-124m.yaml", "--set", "parallel.micro_batch_size=128",
                        "parallel.global_batch_size=1024",
                        "--gpu", "a100-40gb", "--nodes", "1", "--gpus-per-node", "8")
    assert too_big.returncode == 1 and "does NOT fit" in too_big.stdout
    refused = plan_tool("--config", "configs/gpt2-1.5b.yaml", "--set", "parallel.tensor_parallel_size=4")
    assert refused.returncode == 2
    assert "parallel.tensor_parallel_size=4 does not divide the model's 25 attention heads" in refused.stderr


def test_bad_arguments_are_one_line_errors():
    for args, words in ((["--preset", "gpt2-huge"], "--preset 'gpt2-huge' is not one of"),
                        (["--preset", "gpt2-124m", "--set", "a=1"], "--set goes with --config"),
                        (["--preset", "gpt2-124m", "--efficiency", "2"], "--efficiency 2.0 must be in (0, 1]"),
                        (["--config", "no/such.yaml"], "cannot be read"),
                        (["--preset", "gpt2-124m", "--global-batch-tokens", "1500"],
                         "--global-batch-tokens 1500 is not a whole number of 1024-token sequences"),
                        (["--preset", "gpt2-124m", "--interconnect-gbps", "0"], "must be a positive number"),
                        (["--config", "configs/gpt2-124m.yaml", "--precision", "fp32"], "--precision go(es) with --preset")):
        done = plan_tool(*args)
        assert done.returncode == 2 and words in done.stderr, (args, done.stderr)


def test_paper_scale_needs_tensor_and_pipeline_parallelism():
    done = plan_tool("--preset", "gpt3-175b", "--nodes", "128", "--gpus-per-node", "8", "--json")
    plan = json.loads(done.stdout)
    best = plan["recommended"]
    assert done.returncode == 0 and best is not None
    assert best["tensor_parallel_size"] > 1 and best["pipeline_parallel_size"] > 1
    assert best["tensor_parallel_size"] <= 8  # within a node
    assert best["memory_gib"]["total"] <= plan["cluster"]["usable_gib"]


# ---- predicted against measured ---------------------------------------------------------------------------

def peak_moment(case) -> str:
    """When rank 0's predicted peak falls: "forward" or "optimizer step"."""
    config = load_config(case.config, case.settings)
    return estimate_stage(run_from_config(config, Cluster(1, case.nproc, accelerator("h100"))), 0, resident=True).moment


@pytest.fixture(scope="module")
def measured(background_runs, gpt2_shards, tmp_path_factory) -> dict:
    """case name -> compare()'s result for every tested case (started when the session started, where the
    session runs this test: tests/head_start.py; otherwise now, two runs at a time)."""
    return finished(background_runs, "planner", lambda: measure_all(gpt2_shards, tmp_path_factory.mktemp("plan")))


@pytest.mark.slow
@pytest.mark.parametrize("case", TESTED_CASES, ids=lambda case: case.name)
def test_predicted_peak_memory_is_within_20_percent_of_a_real_run(case, measured):
    assert peak_moment(shorter(case)) == peak_moment(case), "the shorter window must leave the peak where it was"
    result = measured[case.name]
    assert abs(result["error"]) <= 0.20, result
    assert result["model_gib"] > result["baseline_gib"] / 2, "the case must exercise the model, not the baseline"
