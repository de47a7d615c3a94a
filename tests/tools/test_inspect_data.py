"""tools/inspect_data.py on real shards: the summary against an independent count of the
input, and a step's samples against the trainer's own micro_batches."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from data_pipeline.preprocess import preprocess
from data_pipeline.sample_text import write_jsonl
from tests.conftest import REPO, run_tool

os.environ.setdefault("DS_ACCELERATOR", "cpu")

TINY = str(REPO / "configs" / "gpt2-tiny.yaml")
EOD = 50256  # GPT-2's <|endoftext|>


def inspect(capsys, *argv: str) -> tuple[int, str, str]:
    """tools/inspect_data.py's main() in this process (torch and megatron-core load once per session)."""
    from tools.inspect_data import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def corpus(real_documents) -> list[dict]:
    """80 ABC news articles, 71 to ~1000 tokens long."""
    return real_documents[:80]


def make_shards(directory, name: str, documents: list[dict], shard_size_tokens: int) -> str:
    """GPT-2 token shards made as tools/preprocess_data.py makes them; returns the prefix."""
    prefix = str(directory / name)
    preprocess([str(write_jsonl(directory / f"{name}.jsonl", documents))], prefix, "gpt2", workers=1,
               shard_size_tokens=shard_size_tokens, show_progress=False)
    return prefix


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus) -> str:
    """The corpus in 3 shards of 25 to 30 documents."""
    prefix = make_shards(tmp_path_factory.mktemp("shards"), "news", corpus, shard_size_tokens=6000)
    assert len(json.loads(open(prefix + ".json").read())["shards"]) == 3
    return prefix


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """megatron-core's blended dataset needs torch.distributed for the trainer's build_datasets."""
    import torch.distributed as dist

    if not dist.is_initialized():
        store = tmp_path_factory.mktemp("dist") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield


def test_summary_counts_equal_an_independent_count_of_the_input(capsys, shards, corpus, gpt2_tokenizer):
    code, out, _ = inspect(capsys, shards, "--json")
    assert code == 0
    figures = last_json(out)
    ids = [gpt2_tokenizer.encode(document["text"]) + [EOD] for document in corpus]
    lengths = np.array([len(document) for document in ids])
    total = figures["total"]
    assert total["documents"] == len(corpus) == sum(shard["documents"] for shard in figures["shards"])
    assert total["tokens"] == lengths.sum() == sum(shard["tokens"] for shard in figures["shards"])
    assert total["dtypes"] == ["uint16"]
    expected = {"min": lengths.min(), "max": lengths.max(), "mean": lengths.mean(),
                **{f"p{q}": np.percentile(lengths, q) for q in (10, 50, 90, 99)}}
    assert total["document_length"] == pytest.approx(expected)
    used = {token for document in ids for token in document}
    assert total["vocabulary"] == {"distinct_ids": len(used), "largest_id": max(used), "vocab_size": 50257,
                                   "fits": True}
    sha = gpt2_tokenizer.identity()["sha256"]
    assert all(shard["tokenizer"] == {"name": "gpt2", "sha256": sha} for shard in figures["shards"])
    assert "fits gpt2's 50,257" in out and f"{len(corpus)} documents" in out


def test_a_single_shard_is_summarized_with_the_tokenizer_its_prefix_recorded(capsys, shards, gpt2_tokenizer):
    listed = json.loads(open(shards + ".json").read())["shards"][1]
    code, out, _ = inspect(capsys, f"{shards}_00001.bin", "--json")
    assert code == 0
    shard = last_json(out)["shards"][0]
    assert (shard["documents"], shard["tokens"]) == (listed["documents"], listed["tokens"])
    assert shard["tokenizer"]["sha256"] == gpt2_tokenizer.identity()["sha256"]


def test_show_documents_decodes_the_first_documents(capsys, shards, corpus):
    code, out, _ = inspect(capsys, shards, "--show-documents", "2", "--max-chars", "0")
    assert code == 0
    for document in corpus[:2]:
        assert document["text"].splitlines()[0] in out
    assert f"{shards}_00000 document 1:" in out and f"{shards}_00000 document 2:" not in out


def trainer_batches(shards: str, step: int, world_size: int, data_rank: int, tmp_path, *settings: str,
                    split: str = "train"):
    """What the trainer's own build_datasets + micro_batches feed (tokens, labels) at `step`."""
    from data_pipeline.tokenizers import load_tokenizer
    from pretrain.config import load_config
    from pretrain.training.blend import resolve_blend
    from pretrain.training.data import build_datasets, micro_batches
    from pretrain.parallel.layout import ParallelLayout

    config = load_config(TINY, [f"data.prefixes=[{shards}]", *settings])
    tokenizer = load_tokenizer("gpt2")
    train, valid = build_datasets(config, tokenizer, resolve_blend(config.data.prefixes, tokenizer), tmp_path,
                                  data_parallel_size=world_size)
    layout = ParallelLayout(world_size, micro_batch_size=config.parallel.micro_batch_size,
                            global_batch_size=config.parallel.global_batch_size)
    return micro_batches(train if split == "train" else valid, step, layout, data_rank)


def tool_batches(record: dict) -> list[tuple[list, list]]:
    return [([s["tokens"] for s in batch], [s["labels"] for s in batch]) for batch in record["micro_batches"]]


def as_lists(batches) -> list[tuple[list, list]]:
    return [(tokens.tolist(), labels.tolist()) for tokens, labels in batches]


TRAIN = ("train.max_steps=6", "eval.interval=0")


def test_step_samples_are_the_trainers_micro_batches_rank_by_rank(capsys, shards, process_group, tmp_path):
    records = {}
    for step, rank in ((3, 0), (3, 1), (4, 1)):
        argv = ["--config", TINY, "--set", f"data.prefixes=[{shards}]", *TRAIN, "--step", str(step),
                "--world-size", "2", "--data-rank", str(rank), "--json"]
        if (step, rank) == (3, 1):  # once as a user runs it: its own process group, its own temporary cache
            result = run_tool("inspect_data.py", *argv, "--show-tokens", timeout=300)
            assert result.returncode == 0, result.stderr[-3000:]
            assert "micro-batch 1, sequence 1: sample 31 of the train split" in result.stdout
            assert "    ids: [" in result.stdout and "Warning" not in result.stderr
            records[step, rank] = last_json(result.stdout)
        else:
            code, out, err = inspect(capsys, *argv)
            assert code == 0, err
            records[step, rank] = last_json(out)
        reference = trainer_batches(shards, step, 2, rank, tmp_path / f"{step}-{rank}", *TRAIN)
        assert tool_batches(records[step, rank]) == as_lists(reference)
        assert [len(batch) for batch in records[step, rank]["micro_batches"]] == [2, 2]  # 8 / DP 2, micro batch 2
    assert tool_batches(records[3, 0]) != tool_batches(records[3, 1])  # ranks read different samples
    assert tool_batches(records[3, 1]) != tool_batches(records[4, 1])  # and another step others
    assert [s["sample"] for batch in records[3, 1]["micro_batches"] for s in batch] == [28, 29, 30, 31]


def test_step_samples_name_the_documents_they_are_cut_from(capsys, shards, process_group):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    code, out, _ = inspect(capsys, "--config", TINY, "--set", f"data.prefixes=[{shards}]", *TRAIN, "--step", "5",
                           "--json")
    assert code == 0
    sequences = [s for batch in last_json(out)["micro_batches"] for s in batch]
    assert len(sequences) == 8 and any(len(s["sources"]) > 1 for s in sequences)
    opened = {}  # kept open: an array read from a shard is a view of its memory map
    for sequence in sequences:  # the named document ranges, read straight from the shards, are the sequence
        read = []
        for piece in sequence["sources"]:
            shard = opened.setdefault(piece["shard"], IndexedDataset(piece["shard"]))
            read += shard.get(piece["document"], offset=piece["offset"], length=piece["length"]).tolist()
        assert read == sequence["tokens"] + sequence["labels"][-1:]
        assert sequence["eod_positions"] == [i for i, token in enumerate(sequence["tokens"]) if token == EOD]
    assert "micro-batch 3, sequence 1: sample 47 of the train split, 256 tokens" in out
    assert "<|endoftext|>" in out


def test_valid_split_shows_the_trainers_validation_batch(capsys, shards, process_group, tmp_path):
    settings = ("train.max_steps=6", "eval.interval=2", "eval.iterations=2", "data.split=80,20,0")
    code, out, err = inspect(capsys, "--config", TINY, "--set", f"data.prefixes=[{shards}]", *settings,
                             "--split", "valid", "--step", "1", "--json")
    assert code == 0, err
    reference = trainer_batches(shards, 1, 1, 0, tmp_path, *settings, split="valid")
    assert tool_batches(last_json(out)) == as_lists(reference)


@pytest.fixture(scope="module")
def broken(tmp_path_factory, real_documents) -> dict:
    """A .bin without its .idx; GPT-2's files under another name (another tokenizer identity); and
    a shard of 2 documents, whose validation part under data.split=90,10,0 is empty."""
    from data_pipeline.tokenizers import bundled_gpt2_files

    directory = tmp_path_factory.mktemp("broken")
    (directory / "lonely.bin").write_bytes(b"\0" * 64)
    vocab, encoder = bundled_gpt2_files()
    (directory / "other").mkdir()
    shutil.copy(vocab, directory / "other" / "vocab.bpe")
    shutil.copy(encoder, directory / "other" / "encoder.json")
    two = make_shards(directory, "two", real_documents[80:82], shard_size_tokens=1 << 20)
    return {"lonely": str(directory / "lonely"), "other_tokenizer": str(directory / "other"), "two": two}


@pytest.mark.parametrize("argv,message", [
    (["{missing}"], "neither {missing}.bin/.idx nor {missing}.json exists"),
    (["{lonely}"], "{lonely}.bin has no lonely.idx beside it"),
    (["{shards}", "--tokenizer", "{other_tokenizer}"], "records tokenizer gpt2 (sha256"),
    (["--config", TINY, "--set", "data.prefixes=[{shards}]", "data.tokenizer={other_tokenizer}", "--step", "0"],
     "was tokenized with gpt2"),
    (["--config", TINY, "--set", "data.prefixes=[{shards}]", *TRAIN, "--step", "6"],
     "--step=6 must be in [0, 6): the train split has train.max_steps=6"),
    (["--config", TINY, "--set", "data.prefixes=[{shards}]", "--step", "0", "--world-size", "2", "--data-rank", "2"],
     "--data-rank=2 must be in [0, 2)"),
    (["--config", TINY, "--set", "data.prefixes=[{shards}]", *TRAIN, "--split", "valid", "--step", "0"],
     "--split valid: the config has eval.interval=0"),
    (["--config", TINY], "--config needs --step S"),
    (["{shards}", "--step", "1"], "--step: for --config only"),
    (["--config", TINY, "--set", "data.prefixes=[{shards},{two}]", *TRAIN, "--step", "0"],
     "data.split='90,10,0' leaves the validation part of {two}_00000 (2 documents) empty, and megatron-core builds"),
    (["--config", TINY, "--set", "data.prefixes=[{shards},{two}]", "eval.interval=5", "--step", "0"],
     "data.split='90,10,0' leaves the validation part of {two}_00000 (2 documents) empty, and 16 validation"),
], ids=["missing-prefix", "bin-without-idx", "wrong-tokenizer", "config-wrong-tokenizer", "step-past-max-steps",
        "rank-past-data-parallel-size", "valid-without-evaluation", "config-without-step", "step-without-config",
        "empty-undrawn-split-part", "empty-drawn-split-part"])
def test_unusable_arguments_are_refused_in_one_line(capsys, shards, broken, argv, message, tmp_path):
    names = {"shards": shards, "missing": str(tmp_path / "absent"), **broken}
    code, out, err = inspect(capsys, *[argument.format(**names) for argument in argv])
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message.format(**names) in err


def test_the_command_line_refuses_with_exit_2_and_shows_examples_in_help(tmp_path):
    result = run_tool("inspect_data.py", str(tmp_path / "absent"), timeout=120)
    assert result.returncode == 2
    assert result.stderr == (f"error: {tmp_path / 'absent'}: neither {tmp_path / 'absent'}.bin/.idx nor "
                             f"{tmp_path / 'absent'}.json exists; give a shard or the --output-prefix that "
                             "tools/preprocess_data.py was run with\n")
    result = run_tool("inspect_data.py", "--help", timeout=120)
    assert result.returncode == 0
    assert "python tools/inspect_data.py --config configs/gpt2-tiny.yaml --step 0" in result.stdout
