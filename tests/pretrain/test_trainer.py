"""The trainer end to end: `python -m pretrain` and `python -m pretrain.launch` on real text."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import load_config
from pretrain.schedule import lr_multiplier
from tests.conftest import REPO

TINY = str(REPO / "configs" / "gpt2-tiny.yaml")
METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_second", "consumed_samples"}


def train(run_dir: Path, shards: str, *settings: str, nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    module = ["-m", "pretrain.launch", "--nproc", str(nproc)] if nproc > 1 else ["-m", "pretrain"]
    command = [sys.executable, *module, "--config", TINY, "--set", f"data.prefixes=[{shards}]", f"run.dir={run_dir}",
               "eval.interval=0", *settings]
    env = dict(os.environ, PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, shards):
    run_dir = tmp_path_factory.mktemp("single")
    result = train(run_dir, shards, "train.max_steps=4", "eval.interval=2", "eval.iterations=1", "logging.interval=1")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


@pytest.mark.slow
def test_single_process_run_logs_every_form(single_process_run):
    run_dir, result = single_process_run
    rows = metrics(run_dir)
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3, 4]
    assert all(METRIC_KEYS <= row.keys() for row in steps)
    assert [row["consumed_samples"] for row in steps] == [8, 16, 24, 32]
    assert steps[-1]["loss"] < steps[0]["loss"] < math.log(50257) + 0.5
    valid = [row for row in rows if "valid_loss" in row]
    assert [row["step"] for row in valid] == [2, 4]
    assert valid[0]["valid_perplexity"] == pytest.approx(math.exp(valid[0]["valid_loss"]))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    saved = load_config(run_dir / "config.yaml")
    assert saved.run.dir == str(run_dir) and saved.train.max_steps == 4
    assert "step      4 | loss" in result.stderr and "tok/s" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("nproc,settings", [
    (8, ["parallel.tensor_parallel_size=2", "parallel.pipeline_parallel_size=2", "parallel.zero_stage=1"]),
    (2, ["parallel.zero_stage=3"]),
], ids=["tp2pp2dp2-zero1", "dp2-zero3"])
def test_other_layouts_train_the_same_curve(tmp_path, shards, single_process_run, nproc, settings):
    """Same seed and data, another layout: the same global batches, so the same losses (fp32)."""
    result = train(tmp_path, shards, "train.max_steps=4", *settings, nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = [row["loss"] for row in metrics(single_process_run[0]) if "loss" in row]
    losses = [row["loss"] for row in metrics(tmp_path)]
    assert losses == pytest.approx(reference, rel=1e-5)


@pytest.mark.slow
def test_bf16_pipeline_follows_the_fp32_curve_within_bf16_precision(tmp_path, shards, single_process_run):
    settings = ["train.max_steps=3", "train.precision=bf16", "parallel.tensor_parallel_size=2",
                "parallel.pipeline_parallel_size=2"]
    result = train(tmp_path, shards, *settings, nproc=4)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = [row["loss"] for row in metrics(single_process_run[0]) if "loss" in row][:3]
    assert [row["loss"] for row in metrics(tmp_path)] == pytest.approx(reference, rel=2e-3)


@pytest.mark.slow
def test_compiled_blocks_train_the_eager_curve(tmp_path, shards, single_process_run):
    result = train(tmp_path, shards, "train.max_steps=4", "eval.interval=2", "eval.iterations=1", "train.compile=true")
    assert result.returncode == 0, result.stderr[-3000:]
    eager, compiled = metrics(single_process_run[0]), metrics(tmp_path)
    for key in ("loss", "valid_loss"):
        assert [row[key] for row in compiled if key in row] == pytest.approx([row[key] for row in eager if key in row],
                                                                             abs=1e-5)


@pytest.mark.parametrize("settings,message", [
    (["parallel.pipeline_parallel_size=2", "parallel.zero_stage=2"], "DeepSpeed supports only ZeRO-0/1 with pipelines"),
    (["data.prefixes=[/nonexistent/web]"], "data.prefixes: neither /nonexistent/web.bin/.idx nor /nonexistent/web.json"),
    (["model.vocab_size=32000"], "model.vocab_size=32000 but data.tokenizer 'gpt2' has 50257 tokens"),
    (["train.precision=fp64"], "train.precision='fp64' must be one of bf16, fp16, fp32"),
    (["train.precision=bf16", "parallel.zero_stage=0"], "train.gradient_dtype=fp32 needs parallel.zero_stage >= 1"),
    (["train.compile=true", "parallel.zero_stage=3"], "train.compile=true is tested with parallel.zero_stage <= 2"),
    pytest.param(["train.precision=fp16"], "train.precision=fp16 needs a GPU", id="fp16-on-cpu",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fp16 works on a GPU")),
])
def test_impossible_settings_stop_at_start_up_naming_the_setting(tmp_path, shards, settings, message):
    nproc = 2 if any("pipeline" in s for s in settings) else 1
    result = train(tmp_path, shards, *settings, nproc=nproc, timeout=300)
    assert result.returncode == 2
    assert message in result.stderr


def test_schedule_warms_up_then_decays_to_the_floor():
    config = load_config(None, ["train.max_steps=100", "schedule.warmup=10", "schedule.min_lr_ratio=0.1"])
    assert lr_multiplier(0, config) == pytest.approx(0.1)
    assert lr_multiplier(9, config) == pytest.approx(1.0)
    assert lr_multiplier(10, config) == pytest.approx(1.0)
    assert lr_multiplier(55, config) == pytest.approx(0.55)  # cosine midpoint: (1 + 0.1) / 2
    assert lr_multiplier(100, config) == pytest.approx(0.1)
    linear = load_config(None, ["train.max_steps=100", "schedule.decay=linear", "schedule.min_lr_ratio=0.0"])
    assert lr_multiplier(50, linear) == pytest.approx(0.5)
    tokens = load_config(None, ["train.max_steps=100", "schedule.unit=tokens", "schedule.warmup=4096",
                                "parallel.global_batch_size=8", "model.n_positions=256"])  # 2048 tokens per step
    assert lr_multiplier(0, tokens) == pytest.approx(1 / 4096) and lr_multiplier(2, tokens) == pytest.approx(1.0)


def test_global_batch_is_the_same_for_every_data_parallel_size(single_process_group, shards, tmp_path):
    """Step k's samples, gathered over DP ranks in rank order, do not depend on DP or the micro batch."""
    import torch

    from data_pipeline.tokenizers import load_tokenizer
    from pretrain.data import build_datasets, micro_batches, resolve_blend
    from pretrain.parallel.layout import ParallelLayout

    config = load_config(TINY, [f"data.prefixes=[{shards}]", "train.max_steps=6", "eval.interval=0"])
    tokenizer = load_tokenizer("gpt2")
    blend = resolve_blend(config.data.prefixes, tokenizer)
    train_data, _ = build_datasets(config, tokenizer, blend, tmp_path, data_parallel_size=1)

    def global_batch(step: int, dp: int, micro: int) -> torch.Tensor:
        layout = ParallelLayout(world_size=dp, micro_batch_size=micro, global_batch_size=8)
        return torch.cat([tokens for rank in range(dp) for tokens, _ in micro_batches(train_data, step, layout, rank)])

    for step in (0, 5):
        reference = global_batch(step, 1, 8)
        assert reference.shape == (8, 256)
        for dp, micro in ((2, 1), (4, 2), (8, 1)):
            assert torch.equal(global_batch(step, dp, micro), reference)
    assert not torch.equal(global_batch(0, 1, 8), global_batch(5, 1, 8))


@pytest.mark.slow
def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop_the_run(tmp_path, shards):
    """An absurd learning rate blows the weights up after step 1: later steps are skipped, then the run stops."""
    result = train(tmp_path, shards, "train.max_steps=8", "optim.lr=1e30", "optim.gradient_clipping=0",
                   "schedule.warmup=0", "train.max_consecutive_skips=2", "logging.interval=1")
    assert result.returncode == 3
    assert "2 consecutive steps (up to step 3) had a non-finite loss" in result.stderr
    assert "train.max_consecutive_skips=2" in result.stderr
    rows = metrics(tmp_path)
    assert [(row["step"], row["skipped"]) for row in rows] == [(1, False), (2, True)]
    assert rows[1]["loss"] is None and rows[1]["skipped_steps"] == 1
