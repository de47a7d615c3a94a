"""The trainer end to end: `python -m pretrain` and `python -m pretrain.launch` on real text."""

from __future__ import annotations

import json
import re
import math
from pathlib import Path

import pytest

from pretrain.config import load_config
from pretrain.training.schedule import lr_multiplier
from tests.conftest import SHORT, SMALL_VOCABULARY
from tests.training import (FREQUENT_WORDS, TINY, assert_same_as_reference, assert_task_figures_equal, data_settings,
                            metrics, reference_settings, train, with_tasks)

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_second", "consumed_samples", "step_seconds",
               "compute_seconds", "compute_tokens_per_second", "compute_tflops_per_device"}


@pytest.mark.slow
def test_single_process_run_logs_every_form(single_process_run):
    run_dir, result = single_process_run
    rows = metrics(run_dir)
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3, 4]
    assert all(METRIC_KEYS <= row.keys() for row in steps)
    # The step's time counts from the previous step's end (the loop around the compute included), so it is at
    # least the compute's, and its throughput at most the compute's.
    assert all(row["step_seconds"] >= row["compute_seconds"] > 0 for row in steps)
    assert all(row["tokens_per_second"] <= row["compute_tokens_per_second"] for row in steps)
    assert all(row["tokens_per_second"] == pytest.approx(8 * 64 / row["step_seconds"]) for row in steps)  # 64: SHORT
    assert [row["consumed_samples"] for row in steps] == [8, 16, 24, 32]
    assert steps[-1]["loss"] < steps[0]["loss"] < math.log(SMALL_VOCABULARY) + 0.5
    valid = [row for row in rows if "valid_loss" in row]
    assert [row["step"] for row in valid] == [2, 4]
    assert valid[0]["valid_perplexity"] == pytest.approx(math.exp(valid[0]["valid_loss"]))
    assert [sorted(row["tasks"]) for row in valid] == [["choice", "lambada", "one"]] * 2
    saved = load_config(run_dir / "config.yaml")
    assert saved.run.dir == str(run_dir) and saved.train.max_steps == 4
    assert "step      4 | loss" in result.stderr and "tok/s" in result.stderr
    assert "shm_comm" not in result.stdout + result.stderr  # DeepSpeed's CPU all-reduce op: not compiled, not loaded
    assert f"lambada ({10 + len(FREQUENT_WORDS)} examples): acc " in result.stderr
    assert "choice (9 examples): acc " in result.stderr and ", acc_norm " in result.stderr


@pytest.mark.slow
def test_tensorboard_holds_training_validation_and_task_curves(single_process_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = (single_process_run[0] / "tensorboard").glob("events.out.tfevents.*")
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"train/loss", "train/lr", "valid/loss", "valid/perplexity", "tasks/lambada/acc",
            "tasks/lambada/perplexity", "tasks/choice/acc_norm", "valid/tasks_seconds"} <= set(tags)
    assert [event.step for event in EventAccumulator(str(events)).Reload().Scalars("tasks/choice/acc")] == [2, 4]


@pytest.mark.slow
def test_tasks_scored_in_training_equal_tools_evaluate_on_the_checkpoint(single_process_run, training_task_files):
    """The trainer's scoring (padded training-shape batches, the chunked head) against the tool's (logits
    of the consolidated model) on the same weights: the step-4 checkpoint."""
    from tests.conftest import run_tool

    run_dir, _ = single_process_run
    result = run_tool("evaluate.py", "--checkpoint", str(run_dir), "--task", *training_task_files, "--json", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = json.loads(result.stdout.strip().splitlines()[-1])["tasks"]
    [trained] = [row["tasks"] for row in metrics(run_dir) if row["step"] == 4 and "tasks" in row]
    assert_task_figures_equal(trained, {Path(path).name.removesuffix(".jsonl"): expected[path] for path in training_task_files})
    assert 0 < trained["lambada"]["acc"] < 1 and 0 < trained["choice"]["acc"] < 1
    assert trained["one"]["examples"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("nproc,settings", [
    (8, ["parallel.tensor_parallel_size=2", "parallel.pipeline_parallel_size=2", "parallel.zero_stage=1"]),
    (2, ["parallel.zero_stage=3"]),
], ids=["tp2pp2dp2-zero1", "dp2-zero3"])
def test_other_layouts_train_the_same_curve(tmp_path, shards, single_process_run, training_task_files, nproc, settings):
    """Same seed and data, another layout: the same global batches, so the same losses (fp32), and the
    same validation loss and task figures (the examples divided over data-parallel ranks, scored with
    the vocabulary split over tensor-parallel ranks, through the pipeline, under ZeRO-3). Training after
    the step-2 scoring follows the same curve: the scoring left the engine as it was."""
    result = train(tmp_path, shards, *reference_settings(training_task_files), *settings, nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_as_reference(tmp_path, single_process_run[0])
    assert_compact_console(result.stderr, tmp_path, nproc)


@pytest.mark.slow
def test_one_fresh_process_prints_only_its_own_lines(tmp_path, shards):
    """`python -m pretrain` in a fresh interpreter (no launcher, no fork server: DeepSpeed is first imported
    after the console is set up): the console is compact there too, and stdout stays empty."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.training import train_command

    result = subprocess.run(train_command(tmp_path, shards, *SHORT, "train.max_steps=1"), cwd=REPO,
                            env=dict(os.environ, PRETRAIN_DEVICE="cpu"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == ""
    assert_compact_console(result.stderr, tmp_path, 1)
    assert "untested optimizer" in (tmp_path / "logs" / "rank_00000.log").read_text()  # DeepSpeed's, in the file


def assert_compact_console(console: str, run_dir: Path, nproc: int) -> None:
    """The console holds rank 0's lines only: a start of five lines (placement, layout and model, data,
    where the config and logs are, the resume point), then steps, evaluations, saves. What DeepSpeed,
    megatron-core and torch say, and every rank's place, are in the per-rank log files."""
    lines = console.strip().splitlines()
    assert all(" [rank 0] INFO " in line for line in lines), [line for line in lines if "[rank 0] INFO" not in line]
    start = lines[:next(i for i, line in enumerate(lines) if "| loss" in line or "saved checkpoint" in line)]
    assert len(start) == 5, start
    assert f"{nproc} ranks on 1 node(s)" in start[0] and "M parameters" in start[1] and "data: " in start[2]
    assert f"config: {run_dir / 'config.yaml'}; logs: {run_dir / 'logs'}" in start[3]
    assert "no checkpoint in" in start[4]
    logs = sorted((run_dir / "logs").iterdir())
    assert [path.name for path in logs] == [f"rank_{rank:05d}.log" for rank in range(nproc)]
    details = logs[0].read_text()
    assert "resolved config:" in details and "Using topology:" in details and f"rank {nproc - 1}: " in details


@pytest.mark.slow
def test_bf16_pipeline_follows_the_fp32_curve_within_bf16_precision(tmp_path, shards, single_process_run):
    settings = [*SHORT, "train.max_steps=3", "train.precision=bf16", "parallel.tensor_parallel_size=2",
                "parallel.pipeline_parallel_size=2"]
    result = train(tmp_path, shards, *settings, nproc=4)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = [row["loss"] for row in metrics(single_process_run[0]) if "loss" in row][:3]
    assert [row["loss"] for row in metrics(tmp_path)] == pytest.approx(reference, rel=2e-3)


@pytest.mark.slow
def test_compiled_blocks_train_the_eager_curve(tmp_path, shards, single_process_run):
    result = train(tmp_path, shards, *SHORT, "train.max_steps=4", "eval.interval=2", "eval.iterations=1",
                   "train.compile=true")
    assert result.returncode == 0, result.stderr[-3000:]
    eager, compiled = metrics(single_process_run[0]), metrics(tmp_path)
    for key in ("loss", "valid_loss"):
        assert [row[key] for row in compiled if key in row] == pytest.approx([row[key] for row in eager if key in row],
                                                                             abs=1e-5)


@pytest.mark.parametrize("settings,message", [
    (["parallel.pipeline_parallel_size=2", "parallel.zero_stage=2"], "DeepSpeed supports only ZeRO-0/1 with pipelines"),
    (["data.prefixes=[/nonexistent/web]"], "data.prefixes: neither /nonexistent/web.bin/.idx nor /nonexistent/web.json"),
    (["model.vocab_size=32000"], ("model.vocab_size=32000 but data.tokenizer ",
                                   f"has {SMALL_VOCABULARY} tokens; set model.vocab_size={SMALL_VOCABULARY}")),
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
    assert result.stderr.count("error: ") == 1, result.stderr  # once, also from two ranks under pretrain.launch
    for part in message if isinstance(message, tuple) else (message,):
        assert part in result.stderr


def test_check_imports_no_torch_and_says_ok_or_names_the_setting(shards, tmp_path):
    """`python -m pretrain --check` in a fresh interpreter on a CPU: the verdict without torch, DeepSpeed or
    megatron-core (3 s of imports before; slurm/pretrain.sbatch runs it before every job)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    probe = ("import sys; from pretrain.__main__ import main; code = main(sys.argv[1:]); "
             "print('imported:', sorted(m for m in ('torch', 'deepspeed', 'megatron') if m in sys.modules)); "
             "sys.exit(code)")
    common = [sys.executable, "-c", probe, "--config", TINY, "--check", "--world-size", "2", "--set",
              *data_settings(shards)]
    env = {**os.environ, "PRETRAIN_DEVICE": "cpu"}
    ok = subprocess.run(common, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "ok: 2 ranks, TP=1 PP=1 DP=2 ZeRO-1" in ok.stdout and "imported: []" in ok.stdout
    refused = subprocess.run([*common, "parallel.tensor_parallel_size=3"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "imported: []" in refused.stdout
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]  # one line, no traceback
    assert "world size 2 is not a multiple of parallel.tensor_parallel_size" in refused.stderr
    (tmp_path / "a_file").write_text("")
    unwritable = subprocess.run([*common, f"run.dir={tmp_path / 'a_file' / 'run'}"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
    assert unwritable.returncode == 2 and unwritable.stderr.strip().splitlines() == [unwritable.stderr.strip()]
    assert f"run.dir={tmp_path / 'a_file' / 'run'} cannot be made" in unwritable.stderr


def test_check_refuses_a_checkpoint_directory_without_room_and_warns_inside_the_checkout(shards, tmp_path):
    """A 1.5B-wide model (about 21 GB a checkpoint in bf16: weights 2, fp32 master 4, Adam 8 bytes a parameter):
    keep_last + 1 checkpoints must fit the file system's free space, or --check refuses naming the settings;
    checkpoint.check_space=false lets a quota-managed file system through; checkpoints of a gigabyte or more
    inside the repository checkout are warned about."""
    import subprocess
    import sys

    from tests.conftest import REPO

    big = ["model.n_layer=48", "model.n_embd=1600", "model.n_head=25"]
    common = [sys.executable, "-m", "pretrain", "--config", TINY, "--check", "--world-size", "1", "--set",
              *data_settings(shards), *big]
    refused = subprocess.run([*common, f"run.dir={tmp_path}", "checkpoint.keep_last=10000"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [refused.stderr.strip()]
    assert re.search(r"checkpoint.keep_last=10000 \+ 1 checkpoints of about 2\d\.\d GB need 2\d\d\d\d\d\.\d GB",
                     refused.stderr), refused.stderr
    assert "set checkpoint.dir to a larger file system" in refused.stderr
    inside = subprocess.run([*common, f"run.dir={REPO / 'runs' / 'space-check-probe'}", "checkpoint.check_space=false"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert inside.returncode == 0, inside.stderr
    assert re.search(r"checkpoints: about 2\d\.\d\d GB each, keep_last=2", inside.stdout), inside.stdout
    assert "warning: checkpoints go to" in inside.stdout and "inside the repository checkout" in inside.stdout


@pytest.mark.parametrize("where", ["under a file", "under /proc", "checkpoint.dir under a file", "writable"])
def test_a_run_or_checkpoint_directory_that_cannot_be_written_is_refused_at_start_up(tmp_path, shards, where):
    """Before any process starts (`--check` too): a run.dir or checkpoint.dir whose place is a file, or that
    no one can create (/proc), is one error naming the setting; a new directory under a writable one is fine
    and is not made by the check."""
    from pretrain.config import ConfigError
    from pretrain.training.run_check import plan_run

    (tmp_path / "a_file").write_text("not a directory")
    key, value, message = {
        "under a file": ("run.dir", tmp_path / "a_file" / "run", "is a file; set run.dir to a directory path"),
        "under /proc": ("run.dir", Path("/proc/no_such_process/run"), "cannot be written"),
        "checkpoint.dir under a file": ("checkpoint.dir", tmp_path / "a_file" / "ckpt", "is a file"),
        "writable": ("run.dir", tmp_path / "new" / "run", None),
    }[where]
    config = load_config(TINY, [*data_settings(shards), f"{key}={value}"])
    if message is None:
        plan_run(config, 1)
        assert not (tmp_path / "new").exists()
        return
    with pytest.raises(ConfigError) as refused:
        plan_run(config, 1)
    assert str(refused.value).startswith(f"{key}={value} ") and message in str(refused.value)


def test_task_files_that_cannot_be_scored_stop_at_start_up_naming_file_and_line(tmp_path, shards, training_task_files):
    from pretrain.config import ConfigError
    from pretrain.training.run_check import plan_run

    bad = tmp_path / "hellaswag.jsonl"
    bad.write_text('{"context": "A man", "choices": ["runs", "sits"], "label": 0}\n{"context": "A dog", "label": 1}\n')
    long = tmp_path / "long.jsonl"  # a choice of ~300 tokens: more than the 256-token window
    long.write_text(json.dumps({"context": "A", "choices": ["word " * 300, "no"], "label": 1}) + "\n")
    cut = tmp_path / "cut.jsonl"  # a line cut short in its string: that string named, where it starts
    cut.write_text('{"text": "The cat sat on the mat"}\n{"text": "A dog ran\n{"text": "after"}\n')
    copy = tmp_path / "lambada.jsonl.gz"
    copy.write_bytes(__import__("gzip").compress(Path(training_task_files[0]).read_bytes()))
    cases = [
        (["eval.interval=0", with_tasks(training_task_files)], "eval.tasks are scored every eval.interval steps; set eval.interval > 0"),
        (["eval.tasks=[/nonexistent/hellaswag.jsonl]"], "eval.tasks: task file not found: /nonexistent/hellaswag.jsonl"),
        ([with_tasks([str(bad)])], f"eval.tasks: {bad}:2: "),
        ([with_tasks([str(cut)])], f"eval.tasks: {cut}:2: Unterminated string starting at column 10 (malformed_json)"),
        ([with_tasks([training_task_files[0], str(copy)])], f"eval.tasks: {training_task_files[0]} and {copy} would both be logged as "
                                                   "'lambada'"),
        (["eval.task_max_examples=-1", with_tasks(training_task_files)], "eval.task_max_examples=-1 must be at least 0"),
        ([with_tasks([str(long)])], f"eval.tasks: {long}:1: a continuation of 301 tokens does not fit the "
                                    "model's 256-token window"),
        (["eval.iterations=0"], "eval.iterations=0: validation needs at least one global batch"),
    ]
    for settings, message in cases:
        config = load_config(TINY, [*data_settings(shards), "eval.interval=5", *settings])
        with pytest.raises(ConfigError) as refused:
            plan_run(config, world_size=1)
        assert str(refused.value).startswith(message), (settings, str(refused.value))
    config = load_config(TINY, [*data_settings(shards), "eval.task_max_examples=3", with_tasks(training_task_files)])
    assert [len(task.task.examples) for task in plan_run(config, world_size=1).tasks] == [3, 3, 1]


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
    from pretrain.training.blend import resolve_blend
    from pretrain.training.data import build_datasets, micro_batches
    from pretrain.parallel.layout import ParallelLayout

    config = load_config(TINY, [*data_settings(shards), "train.max_steps=6", "eval.interval=0"])
    tokenizer = load_tokenizer(config.data.tokenizer)
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

    # Read ahead in a background thread (NextBatch, the trainer's reader): the same batches, in order or after
    # a jump (a resume), and nothing read past the run's last step.
    from pretrain.training.data import NextBatch

    layout = ParallelLayout(world_size=2, micro_batch_size=2, global_batch_size=8)
    reader = NextBatch(train_data, layout, 1, steps=6)
    try:
        for step in (0, 1, 2, 4, 5):
            expected = micro_batches(train_data, step, layout, 1)
            got = reader(step)
            assert [torch.equal(a, b) for (a, _), (b, _) in zip(got, expected)] == [True, True]
        assert reader._pending is None  # step 5 is the last: nothing read ahead
    finally:
        reader.close()


@pytest.mark.slow
def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop_the_run(tmp_path, shards):
    """An absurd learning rate blows the weights up after step 1: later steps are skipped, then the run stops.
    Both ranks stop so; the error is printed once, by the first to claim it."""
    result = train(tmp_path, shards, *SHORT, "train.max_steps=8", "optim.lr=1e30", "optim.gradient_clipping=0",
                   "schedule.warmup=0", "train.max_consecutive_skips=2", "logging.interval=1", nproc=2)
    assert result.returncode == 3
    assert result.stderr.count("2 consecutive steps (up to step 3) had a non-finite loss") == 1, result.stderr
    assert "train.max_consecutive_skips=2" in result.stderr
    rows = metrics(tmp_path)
    assert [(row["step"], row["skipped"]) for row in rows] == [(1, False), (2, True)]
    assert rows[1]["loss"] is None and rows[1]["skipped_steps"] == 1
