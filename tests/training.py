"""Training runs for tests: the command line on gpt2-tiny, its metrics, and the evaluation tasks that the
trainer's reference run scores (tests/conftest.py's `single_process_run`, shared by the layout tests and the
Slurm multi-node test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import cli
from tests.conftest import REPO, SHORT

TINY = str(REPO / "configs" / "gpt2-tiny.yaml")


def data_settings(shards: str) -> tuple[str, ...]:
    """data.prefixes=[shards], with the tokenizer and vocabulary size their PREFIX.json records (the
    `shards` fixture's SentencePiece model, or GPT-2's)."""
    tokenizer = json.loads(Path(shards + ".json").read_text())["tokenizer"]
    spec = tokenizer["files"]["model"] if tokenizer["name"] == "sentencepiece" else tokenizer["name"]
    return f"data.prefixes=[{shards}]", f"data.tokenizer={spec}", f"model.vocab_size={tokenizer['vocab_size']}"


def train_command(run_dir: Path, shards: str, *settings: str, nproc: int = 1) -> list[str]:
    """`python -m pretrain[.launch]` on gpt2-tiny with `settings` last (they override the ones before)."""
    module = ["-m", "pretrain.launch", "--nproc", str(nproc)] if nproc > 1 else ["-m", "pretrain"]
    return [sys.executable, *module, "--config", TINY, "--set", *data_settings(shards), f"run.dir={run_dir}",
            "eval.interval=0", *settings]


def train_env() -> dict[str, str]:
    """What every test's training command runs with: CPU ranks, output unbuffered so a killed run's log is whole."""
    return dict(os.environ, PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")


def train(run_dir: Path, shards: str, *settings: str, nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """`train_command`, as subprocess.run gives it. tests/cli.py forks it from the session's fork server,
    which has imported torch, DeepSpeed and the trainer: ~3 s of CPU less per start."""
    return cli.run(train_command(run_dir, shards, *settings, nproc=nproc), cwd=REPO, env=train_env(), timeout=timeout)


def metrics(run_dir: Path, saves: bool = False) -> list[dict]:
    """metrics.jsonl's rows; a save's row (`"event": "checkpoint"`, written when the save completes, among
    later steps' rows) only with `saves`."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows if saves else [row for row in rows if row.get("event") != "checkpoint"]


# Texts whose last word even a model trained for 4 steps predicts greedily (some of them): lambada's
# accuracy is then neither 0 nor 1, so the greedy test under every layout counts.
FREQUENT_WORDS = ["the the the the the the the the the the", "In the middle of the city the", "He said that the",
                  ", , , , , , , ,", "and the and the and the and the", "of the of the of the of the"]


def with_tasks(task_files: list[str]) -> str:
    return f"eval.tasks=[{','.join(task_files)}]"


def assert_task_figures_equal(ours: dict, expected: dict, rel: float = 1e-5) -> None:
    """{task: {figure: value}}: the same tasks and figures, numbers within `rel`."""
    assert ours.keys() == expected.keys()
    for task, figures in expected.items():
        assert ours[task].keys() == figures.keys(), task
        for figure, value in figures.items():
            assert ours[task][figure] == (value if isinstance(value, str) or value is None
                                          else pytest.approx(value, rel=rel)), (task, figure)


# "The same run" in fp32 is compared within these tolerances, as a margin. A forked run's step-1 loss once
# differed by 3 float32 ulps from run to run (10.845475 or 10.845479 for gpt2-tiny at 64 tokens on GPT-2's
# vocabulary, which the training tests then used; about one run in four; gradient norm and step 2 the same):
# MKL's AVX-512 code path. tests/forkserver.py pins MKL's AVX2 path (MKL_CBWR), which gave the same loss in
# 24 forked runs of 24. A resume or a teacher that lost any state moves these figures by far more.
SAME = 1e-6  # relative, for losses and gradient norms
# The logged KL is a difference of two sums (cross-entropy with and without the teacher; near 10.8 on GPT-2's
# vocabulary, 7.7 on the tests' 2,100 tokens), so 3 ulps of those became 4e-6 of it; the objective holds it
# times alpha T^2.
SAME_KL = 2e-5  # absolute


def write_task_files(directory: Path, real_documents: list[dict]) -> list[str]:
    """A lambada and a plain multiple-choice task from real text (one context longer than the window)."""
    from data_pipeline.sample_text import write_jsonl

    words = [document["text"].split() for document in real_documents]
    lambada = [" ".join(words[i][:12 + i % 7]) for i in range(10, 20)] + FREQUENT_WORDS
    choices = [{"context": " ".join(words[40 + e][:15]), "label": e % 4,
                "choices": [" ".join(words[60 + e + 7 * c][20:20 + n]) for c, n in enumerate((2, 5, 9, 14))]}
               for e in range(8)]
    choices.append({"context": " ".join(words[48]), "choices": ["a b", "the end of it"], "label": 1})
    write_jsonl(directory / "lambada.jsonl", [{"text": text} for text in lambada])
    write_jsonl(directory / "choice.jsonl", choices)
    write_jsonl(directory / "one.jsonl", choices[:1])  # fewer examples than data-parallel ranks
    return [str(directory / name) for name in ("lambada.jsonl", "choice.jsonl", "one.jsonl")]


# The reference run's settings (after train_command's): 4 steps of 64-token windows, validation and the
# tasks at steps 2 and 4, every step logged. A layout test adds its layout to these and compares.
def reference_settings(task_files: list[str]) -> tuple[str, ...]:
    return (*SHORT, "train.max_steps=4", "eval.interval=2", "eval.iterations=1", "logging.interval=1",
            with_tasks(task_files))


def assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    """Another layout's run of `reference_settings`: the same global batches, so the same losses (fp32), and
    the same validation loss and task figures, within 1e-5."""
    expected, rows = metrics(reference), metrics(run_dir)
    assert [row["step"] for row in rows if "loss" in row] == [row["step"] for row in expected if "loss" in row]
    assert [row["loss"] for row in rows if "loss" in row] == pytest.approx(
        [row["loss"] for row in expected if "loss" in row], rel=1e-5)
    references, validations = [row for row in expected if "valid_loss" in row], [row for row in rows if "valid_loss" in row]
    assert [row["step"] for row in validations] == [row["step"] for row in references] == [2, 4]
    for validation, reference_row in zip(validations, references):
        assert validation["valid_loss"] == pytest.approx(reference_row["valid_loss"], rel=1e-5)
        assert_task_figures_equal(validation["tasks"], reference_row["tasks"])
