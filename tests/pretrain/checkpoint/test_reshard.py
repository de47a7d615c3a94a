"""Resume on another layout: 2x2x2 -> 1x1x2 -> 1x2x2 (TP x PP x DP) continues the uninterrupted curve."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pretrain.checkpoint.sharded import tag_for
from tests import cli
from tests.conftest import REPO, SHORT
from tests.training import metrics, train, train_command, train_env

GLOBAL_BATCH = 8  # configs/gpt2-tiny.yaml


def layout(tp: int, pp: int, dp: int) -> dict:
    return {"nproc": tp * pp * dp,
            "settings": [f"parallel.tensor_parallel_size={tp}", f"parallel.pipeline_parallel_size={pp}"]}


# A short warm-up and a decay end that every run shares: the learning rate differs from step to step,
# and a resumed run must continue the same schedule.
SCHEDULE = ("schedule.warmup=2", "schedule.decay_end=8")


def run_on(run_dir: Path, shards: str, tp: int, pp: int, dp: int, *settings: str):
    """`train` on TP x PP x DP, with 64-token windows and the shared schedule."""
    chosen = layout(tp, pp, dp)
    return train(run_dir, shards, *SHORT, *chosen["settings"], *SCHEDULE, *settings, nproc=chosen["nproc"],
                 timeout=900)


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics(run_dir) if "loss" in row}


def assert_same_curve(ours: dict, reference: dict, steps, label: str, tolerance: float = 1e-6) -> None:
    """Within `tolerance` relative of the uninterrupted run at every resumed step.

    The issue asks for 1e-4 in fp32; fp32 resharding measures about 1e-7, so 1e-6 is
    used there, tight enough to catch an optimizer setting lost on the way.
    """
    worst = max(abs(ours[step] - reference[step]) / abs(reference[step]) for step in steps)
    print(f"\n{label}: largest relative loss difference over steps {list(steps)}: {worst:.1e}")
    for step in steps:
        assert ours[step] == pytest.approx(reference[step], rel=tolerance), f"{label}, step {step}"


def manifest(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / tag_for(step) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards):
    """7 uninterrupted steps on TP=2 PP=2 DP=2 (8 processes), a checkpoint at step 3."""
    run_dir = tmp_path_factory.mktemp("straight_2x2x2")
    result = run_on(run_dir, shards, 2, 2, 2, "train.max_steps=7", "checkpoint.interval=3", "checkpoint.keep_last=5")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def rewound(straight: Path, destination: Path, step: int) -> Path:
    """The straight run as if it had stopped at `step`: later checkpoints gone, metrics still listing them."""
    shutil.copytree(straight, destination)
    for checkpoint in (destination / "checkpoints").glob("step_*"):
        if checkpoint.name != tag_for(step):
            shutil.rmtree(checkpoint)
    (destination / "checkpoints" / "latest").write_text(tag_for(step) + "\n")
    return destination


@pytest.mark.slow
def test_resume_on_new_layouts_continues_the_same_curve_and_data(straight, shards, tmp_path):
    run_dir = rewound(straight, tmp_path / "run", 3)
    check = cli.run([*train_command(run_dir, shards, *SHORT, "train.max_steps=5"), "--check", "--world-size", "2"],
                    cwd=REPO, env=train_env(), timeout=60)
    assert check.returncode == 0, check.stderr
    assert "resume: step_0000003 at step 3 (resharded from TP=2 PP=2 DP=2 ZeRO-1)" in check.stdout

    first = run_on(run_dir, shards, 1, 1, 2, "train.max_steps=5", "checkpoint.interval=100")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "resharding" in first.stderr and "resumed from step_0000003 at step 3" in first.stderr
    assert (run_dir / "checkpoints" / tag_for(3) / "universal" / "zero").is_dir()
    second = run_on(run_dir, shards, 1, 2, 2, "train.max_steps=7", "checkpoint.interval=100")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step_0000005 at step 5" in second.stderr

    rows = [row for row in metrics(run_dir) if "loss" in row]
    # Every step once, and the samples consumed continue from the checkpoint: nothing repeated or skipped.
    assert [row["step"] for row in rows] == list(range(1, 8))
    assert [row["consumed_samples"] for row in rows] == [GLOBAL_BATCH * step for step in range(1, 8)]
    assert_same_curve(losses_by_step(run_dir), losses_by_step(straight), range(4, 8), "2x2x2 -> 1x1x2 -> 1x2x2")
    assert manifest(run_dir, 5)["layout"] == {"tensor_parallel_size": 1, "pipeline_parallel_size": 1,
                                              "data_parallel_size": 2, "zero_stage": 1}
    assert manifest(run_dir, 7)["layout"]["pipeline_parallel_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("source,target,settings,tolerance", [
    ((2, 2, 1), (1, 1, 2), ["train.precision=bf16"], 1e-4),   # bf16: DeepSpeed's BF16_Optimizer -> ZeRO-1
    ((1, 1, 2), (1, 1, 1), ["parallel.zero_stage=3"], 1e-6),  # ZeRO-3 partitions over 2 ranks -> 1
], ids=["bf16-2x2x1-to-1x1x2", "zero3-dp2-to-dp1"])
def test_resume_on_another_layout_in_bf16_and_under_zero3(tmp_path, shards, source, target, settings,
                                                          tolerance):
    straight_run = tmp_path / "straight"
    result = run_on(straight_run, shards, *source, "train.max_steps=5", "checkpoint.interval=2",
                    "checkpoint.keep_last=5", *settings)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = rewound(straight_run, tmp_path / "run", 2)
    if "parallel.zero_stage=3" in settings:  # ZeRO-3 may change DP, not TP (DeepSpeed would not re-slice)
        refused = run_on(rewound(straight_run, tmp_path / "tp", 2), shards, 2, 1, 1, "train.max_steps=5", *settings)
        assert refused.returncode == 2 and "under ZeRO-3 only the data-parallel size may change" in refused.stderr
    resumed = run_on(run_dir, shards, *target, "train.max_steps=5", *settings)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resharding" in resumed.stderr
    assert_same_curve(losses_by_step(run_dir), losses_by_step(straight_run), range(3, 6),
                      f"{settings[0]}: {'x'.join(map(str, source))} -> {'x'.join(map(str, target))}", tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("settings,message", [
    (["parallel.global_batch_size=16"], "keep parallel.global_batch_size=8"),
    (["parallel.zero_stage=3"], "cannot convert optimizer state between ZeRO-3 and ZeRO-1/2"),
    (["parallel.zero_stage=0"], "ZeRO-0 checkpoints cannot be resharded"),
], ids=["global-batch", "zero-3", "zero-0"])
def test_a_resume_that_cannot_continue_the_run_is_refused_naming_the_setting(straight, shards, tmp_path,
                                                                            settings, message):
    """And `python -m pretrain --check` says so first, in one line, from the files alone (no torch)."""
    run_dir = rewound(straight, tmp_path / "run", 3)
    command = train_command(run_dir, shards, *SHORT, "train.max_steps=5", *settings)
    check = cli.run([*command, "--check"], cwd=REPO, env=train_env(), timeout=60)
    assert check.returncode == 2 and check.stderr.strip().splitlines() == [check.stderr.strip()]
    assert message in check.stderr and "checkpoint step_0000003 " in check.stderr
    assert check.stderr.strip().endswith("(checked for 1 rank: give --world-size N for N)")  # none was given
    result = run_on(run_dir, shards, 1, 1, 1, "train.max_steps=5", *settings)
    assert result.returncode == 2
    assert message in result.stderr


def tensor_parallel_split(info: dict, name: str) -> str:
    """How DeepSpeed's converter treats `name` under the saved patterns (its order: averaged, then
    row-parallel; a vocabulary tensor is concatenated by rows like the default, then unpadded)."""
    from deepspeed.checkpoint import constants as c

    def matches(key):
        return any(re.match(pattern, name) for pattern in info.get(key, []))

    if matches(c.PARAMETER_TO_AVERAGE_PATTERNS):
        return "replicated"
    if matches(c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS):
        return "rows"
    return "vocabulary" if matches(c.VOCABULARY_PARAMETER_PATTERNS) else "columns"


def test_the_tensor_parallel_split_given_to_deepspeed_matches_megatron_core(single_process_group):
    """Each parameter's merge rule for the universal checkpoint agrees with how megatron-core splits it."""
    from pretrain.model.gpt2 import GPT2, GPTConfig
    from pretrain.parallel.distributed import model_parallel_config
    from pretrain.checkpoint.reshard import tensor_parallel_split as split_rule
    from pretrain.checkpoint.reshard import universal_checkpoint_info

    config = GPTConfig(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=1000, padded_vocab_size=1024)
    model = GPT2(config, model_parallel_config(single_process_group))
    info = universal_checkpoint_info(config)
    for name, parameter in model.named_parameters():
        if not getattr(parameter, "tensor_model_parallel", False):
            expected = "replicated"
        elif name.endswith("word.weight"):
            expected = "vocabulary"
        else:
            expected = {0: "columns", 1: "rows"}[parameter.partition_dim]
        assert tensor_parallel_split(info, name) == expected, name
        assert split_rule(name) == expected, name  # what pretrain/checkpoint/weights.py merges module weights by
