"""Shared fixtures: real English text from the gensim wheel, and a runner for tools/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# One intra-op thread per process (torch reads this when it loads; a value set outside is kept). On two
# cores a second thread mostly spins waiting for the first on these small models: the distillation tests
# alone took 142 s of CPU for 101 s of wall time with two threads, 75 s for 75 s with one; the whole
# suite 1,443 s of CPU instead of 1,652 s. pretrain.launch gave each of 2+ ranks one thread on two cores already;
# it keeps a value set outside, so its own division of the cores (share_the_cores) does not run in the suite.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

pytest.register_assert_rewrite("tests.training")  # its comparisons show the values that differ

REPO = Path(__file__).resolve().parents[1]

# The smallest shape that still runs every path of a training run: gpt2-tiny with 64-token windows
# (a step costs a third of the 256-token one). Tests that need the full window say so.
SHORT = ("model.n_positions=64",)
SMALL_VOCABULARY = 2100  # the training tests' tokenizer (the `shards` fixture): 2,176 rows at TP 1, 2,304 at TP 2


@pytest.fixture(scope="session")
def real_documents() -> list[dict]:
    from data_pipeline.sample_text import real_documents as load

    documents = load()
    assert len(documents) > 400, "gensim's test data should give ~400 real documents"
    return documents


@pytest.fixture(scope="session")
def gpt2_shards(tmp_path_factory, real_documents) -> str:
    """Real text (news + Wikipedia) as GPT-2 token shards: 3 shards, ~780k tokens. Read-only: shared by
    the modules that need GPT-2's own vocabulary (Hugging Face, the planner's measured memory)."""
    from data_pipeline.preprocess import preprocess
    from data_pipeline.sample_text import write_jsonl

    directory = tmp_path_factory.mktemp("gpt2_shards")
    corpus = write_jsonl(directory / "real.jsonl", real_documents)
    prefix = str(directory / "real")
    summary = preprocess([str(corpus)], prefix, "gpt2", workers=2, shard_size_tokens=300_000, show_progress=False)
    assert len(summary["shards"]) == 3
    return prefix


@pytest.fixture(scope="session")
def shards(tmp_path_factory, real_documents) -> str:
    """The same real text as shards of a 2,100-piece SentencePiece BPE tokenizer trained on it: 3 shards,
    ~1.2M tokens. Read-only: shared by every module that trains (tests/training.py's `data_settings` gives
    a run the tokenizer and vocabulary their PREFIX.json records).

    Why not GPT-2's 50,257 tokens: in gpt2-tiny (4 blocks of 128) the output layer over them is 89% of a
    step's FLOPs and of its Adam state. Over 2,000 tokens the same 12-step run took 6.0 s instead of 14.4 s,
    and every path of a run is the same: 2,100 tokens are padded to 2,176 rows at TP 1 and 2,304 at TP 2 (a
    multiple of 128 x TP), so the padding columns are masked, and a resume on another tensor-parallel size
    strips and re-pads them, as with GPT-2's 50,257 (50,304 and 50,432)."""
    from data_pipeline.preprocess import preprocess
    from data_pipeline.sample_text import write_jsonl
    from data_pipeline.tokenizers import train_sentencepiece

    directory = tmp_path_factory.mktemp("shards")
    corpus = write_jsonl(directory / "real.jsonl", real_documents)
    tokenizer = train_sentencepiece((document["text"] for document in real_documents), directory / "tokenizer",
                                    SMALL_VOCABULARY, threads=1)
    prefix = str(directory / "real")
    summary = preprocess([str(corpus)], prefix, tokenizer.files["model"], workers=2, shard_size_tokens=450_000,
                         show_progress=False)
    assert len(summary["shards"]) == 3
    return prefix


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from data_pipeline.tokenizers import load_tokenizer

    return load_tokenizer("gpt2")


def run_tool(script: str, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run tools/<script> as a user would, from the repository root (in a process forked from the
    session's fork server: tests/cli.py)."""
    from tests import cli

    return cli.run([sys.executable, str(REPO / "tools" / script), *args], cwd=REPO,
                   env=dict(env or os.environ, PYTHONUNBUFFERED="1"), timeout=timeout)


def pytest_collection_modifyitems(config, items):
    """The tests that check a run started in the background go last (tests/head_start.py), and after them the
    ones that time something (marked `timing`): by then the background runs are over and the CPUs quiet."""
    from tests.head_start import last

    items.sort(key=lambda item: (item.get_closest_marker("timing") is not None, last(item)))


def pytest_terminal_summary(terminalreporter):
    from tests.head_start import summary

    if summary():
        terminalreporter.write_line(summary())


@pytest.fixture(scope="session", autouse=True)
def background_runs(request, tmp_path_factory):
    """The long runs that start with the session, in the background (tests/head_start.py): name -> Future."""
    from tests import head_start

    runs, pool = head_start.start(request, tmp_path_factory)
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session")
def demo_run(background_runs, tmp_path_factory):
    """(DEMO_OUT, the finished `tools/demo.py`), run in the background from the session's start."""
    from tests.head_start import finished, run_demo

    return finished(background_runs, "demo", lambda: run_demo(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="session")
def readme_tour(background_runs, demo_run, tmp_path_factory):
    """(the directory, each README tour command's outcome), run after the demo in the background."""
    from tests.head_start import finished
    from tests.test_readme_commands import run_tour

    return finished(background_runs, "tour", lambda: run_tour(lambda: demo_run, tmp_path_factory.mktemp("tour")))


@pytest.fixture(scope="session")
def training_task_files(tmp_path_factory, real_documents) -> list[str]:
    """The evaluation tasks the reference run scores (tests/training.py)."""
    from tests.training import write_task_files

    return write_task_files(tmp_path_factory.mktemp("tasks"), real_documents)


@pytest.fixture(scope="session")
def single_process_run(tmp_path_factory, shards, training_task_files):
    """The one-process reference run that every layout's run is compared with: (run directory, result).
    One per session: the trainer's layout tests and the Slurm multi-node test share it."""
    from tests.training import reference_settings, train

    run_dir = tmp_path_factory.mktemp("single")
    result = train(run_dir, shards, *reference_settings(training_task_files))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result
