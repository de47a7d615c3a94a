"""Tokenizing into Megatron shards: exact round trip, formats, bad input, resume."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.preprocess import StrictModeError, preprocess
from data_pipeline.readers import InputError
from data_pipeline.sample_text import write_jsonl
from data_pipeline.shards import indexed_dataset_module
from tests.conftest import REPO, run_tool


def shard_documents(summary: dict, output_prefix: str) -> list[list[int]]:
    """Every document of every shard, in shard order, read with megatron-core's IndexedDataset."""
    IndexedDataset = indexed_dataset_module().IndexedDataset
    directory = Path(output_prefix).parent
    documents = []
    for shard in summary["shards"]:
        dataset = IndexedDataset(str(directory / shard["name"]))
        assert len(dataset) == shard["documents"]
        documents.extend(dataset[i].tolist() for i in range(len(dataset)))
    return documents


def expected_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    return [ids + [tokenizer.eod_id] for ids in tokenizer.encode_batch(texts)]


def shard_bytes(output_prefix: str) -> dict[str, bytes]:
    directory = Path(output_prefix).parent
    return {p.name: p.read_bytes() for p in sorted(directory.glob(Path(output_prefix).name + "_*")) }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, real_documents):
    """The real documents split across two jsonl files."""
    directory = tmp_path_factory.mktemp("corpus")
    half = len(real_documents) // 2
    write_jsonl(directory / "a.jsonl", real_documents[:half])
    write_jsonl(directory / "b.jsonl", real_documents[half:])
    return directory


def test_round_trip_is_exact_across_shards_for_any_worker_count(corpus, tmp_path, real_documents, gpt2_tokenizer):
    expected = expected_documents(gpt2_tokenizer, [doc["text"] for doc in real_documents])
    outputs = {}
    for workers in (1, 3):
        prefix = str(tmp_path / f"w{workers}" / "corpus")
        summary = preprocess([str(corpus / "*.jsonl")], prefix, "gpt2", workers=workers,
                             shard_size_tokens=60_000, show_progress=False)
        assert shard_documents(summary, prefix) == expected
        assert summary["documents"] == len(expected)
        assert summary["tokens"] == sum(map(len, expected))
        assert len(summary["shards"]) >= 10  # documents really cross shard boundaries
        assert all(shard["tokens"] >= 60_000 for shard in summary["shards"][:-1])
        assert summary["dtype"] == "uint16" and summary["skipped"]["total"] == 0
        outputs[workers] = shard_bytes(prefix)
    assert outputs[1] == outputs[3], "shard bytes must not depend on the worker count"


def test_summary_names_inputs_and_tokenizer(corpus, tmp_path, gpt2_tokenizer):
    prefix = str(tmp_path / "out" / "c")
    preprocess([str(corpus / "a.jsonl"), str(corpus / "b.jsonl")], prefix, show_progress=False)
    summary = json.loads(Path(prefix + ".json").read_text())
    assert [Path(entry["path"]).name for entry in summary["inputs"]] == ["a.jsonl", "b.jsonl"]
    assert summary["tokenizer"]["sha256"] == gpt2_tokenizer.identity()["sha256"]
    assert summary["tokenizer"]["name"] == "gpt2"
    assert [shard["name"] for shard in summary["shards"]] == ["c_00000"]


def write_all_formats(directory: Path, documents: list[dict]) -> dict[str, str]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = "".join(json.dumps(doc) + "\n" for doc in documents).encode()
    (directory / "docs.jsonl.gz").write_bytes(gzip.compress(lines))
    (directory / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    table = pa.table({"id": [d["id"] for d in documents], "text": [d["text"] for d in documents]})
    pq.write_table(table, directory / "docs.parquet", row_group_size=50)
    datasets.Dataset.from_dict(table.to_pydict()).save_to_disk(str(directory / "hf"))
    return {
        "gz": str(directory / "docs.jsonl.gz"),
        "zst": str(directory / "docs.jsonl.zst"),
        "parquet": str(directory / "docs.parquet"),
        "datasets": str(directory / "hf"),
    }


def test_every_input_format_gives_the_same_tokens(tmp_path, real_documents, gpt2_tokenizer):
    documents = real_documents[:120]
    expected = expected_documents(gpt2_tokenizer, [doc["text"] for doc in documents])
    for name, path in write_all_formats(tmp_path, documents).items():
        prefix = str(tmp_path / f"out_{name}" / "x")
        summary = preprocess([path], prefix, workers=2, shard_size_tokens=20_000, show_progress=False)
        assert shard_documents(summary, prefix) == expected, name
        assert summary["skipped"]["total"] == 0, name


def test_sentencepiece_tokenizer_shards(tmp_path, corpus, real_documents):
    from data_pipeline.tokenizers import train_sentencepiece

    tokenizer = train_sentencepiece((d["text"] for d in real_documents), tmp_path / "sp", vocab_size=800)
    prefix = str(tmp_path / "sp_out" / "c")
    summary = preprocess([str(corpus / "a.jsonl")], prefix, str(tmp_path / "sp" / "tokenizer.model"),
                         workers=2, shard_size_tokens=100_000, show_progress=False)
    half = len(real_documents) // 2
    assert shard_documents(summary, prefix) == expected_documents(tokenizer, [d["text"] for d in real_documents[:half]])
    assert summary["tokenizer"]["name"] == "sentencepiece"


# ---- bad input -------------------------------------------------------------------

BAD_LINES = [
    (json.dumps({"text": "First good document."}).encode(), None),
    (b'{"text": "unterminated', "malformed_json"),
    (b'{"text": "caf\xe9 latin-1"}', "invalid_utf8"),
    (json.dumps({"body": "wrong key"}).encode(), "missing_text_key"),
    (json.dumps({"text": "   \n "}).encode(), "empty_document"),
    (json.dumps({"text": None}).encode(), "null_text"),
    (json.dumps({"text": 42}).encode(), "not_a_string"),
    (b'["a", "list"]', "not_an_object"),
    (json.dumps({"text": "Second good document."}).encode(), None),
]


@pytest.fixture
def bad_file(tmp_path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    return path


def test_each_bad_record_is_counted_with_file_and_line(bad_file, tmp_path, gpt2_tokenizer):
    prefix = str(tmp_path / "out" / "bad")
    summary = preprocess([str(bad_file)], prefix, workers=2, show_progress=False)
    expected_skips = [(number, reason) for number, (_, reason) in enumerate(BAD_LINES, 1) if reason]
    records = summary["skipped"]["records"]
    assert [(r["line"], r["reason"]) for r in records] == expected_skips
    assert all(r["file"] == str(bad_file) and r["detail"] for r in records)
    assert summary["skipped"]["by_reason"]["malformed_json"] == 1
    assert summary["skipped"]["total"] + summary["documents"] == len(BAD_LINES)
    assert shard_documents(summary, prefix) == expected_documents(
        gpt2_tokenizer, ["First good document.", "Second good document."])


def test_blank_lines_are_skipped_uncounted_and_later_lines_keep_their_numbers(tmp_path, gpt2_tokenizer):
    lines = [json.dumps({"text": "First."}).encode(), b"", b"   ", b"\t\r", b'{"text": "unterminated',
             b"", json.dumps({"text": "Second."}).encode(), json.dumps({"text": 7}).encode()]
    path = tmp_path / "blank.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    summary = preprocess([str(path)], str(tmp_path / "o" / "x"), workers=1, show_progress=False)
    assert [(r["line"], r["reason"]) for r in summary["skipped"]["records"]] == [(5, "malformed_json"),
                                                                                (8, "not_a_string")]
    assert summary["skipped"]["total"] == 2 and summary["documents"] == 2
    assert shard_documents(summary, str(tmp_path / "o" / "x")) == expected_documents(gpt2_tokenizer,
                                                                                       ["First.", "Second."])


@pytest.mark.parametrize("name,content", [("not-zstd.jsonl.zst", b"plain text, not a zstd frame\n" * 50),
                                          ("not-gzip.jsonl.gz", b"plain text, not gzip\n" * 50)])
def test_a_file_that_fails_to_decode_before_its_first_record_is_an_error_naming_it(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=f"cannot decode {path}"):
        preprocess([str(path)], str(tmp_path / "o" / "x"), workers=1, show_progress=False)
    result = run_tool("preprocess_data.py", "--input", str(path), "--output-prefix", str(tmp_path / "cli" / "x"),
                      "--workers", "1", "--quiet")
    assert result.returncode == 2 and result.stderr.startswith(f"error: cannot decode {path}"), result.stderr


def test_strict_fails_at_the_first_bad_record(bad_file, tmp_path):
    with pytest.raises(StrictModeError, match=rf"{bad_file}:2: malformed_json"):
        preprocess([str(bad_file)], str(tmp_path / "o" / "x"), strict=True, show_progress=False)
    result = run_tool("preprocess_data.py", "--input", str(bad_file), "--output-prefix",
                      str(tmp_path / "cli" / "x"), "--strict", "--workers", "1", "--quiet")
    assert result.returncode == 1
    assert f"{bad_file}:2: malformed_json" in result.stderr


@pytest.mark.parametrize("compression", ["zst", "gz"])
def test_truncated_compressed_file_reports_where_data_was_lost(tmp_path, real_documents, gpt2_tokenizer, compression):
    import zstandard

    documents = real_documents  # ~3.5 MB: many zstd blocks, so a cut leaves whole blocks before it
    lines = "".join(json.dumps(doc) + "\n" for doc in documents).encode()
    data = zstandard.ZstdCompressor().compress(lines) if compression == "zst" else gzip.compress(lines)
    path = tmp_path / f"cut.jsonl.{compression}"
    path.write_bytes(data[: len(data) * 6 // 10])
    summary = preprocess([str(path)], str(tmp_path / "o" / "x"), workers=1, show_progress=False)
    kept = summary["documents"]
    assert 0 < kept < len(documents)
    assert shard_documents(summary, str(tmp_path / "o" / "x")) == expected_documents(
        gpt2_tokenizer, [d["text"] for d in documents[:kept]])
    [skip] = summary["skipped"]["records"]
    assert skip["reason"] == "truncated_stream" and skip["line"] == kept + 1 and skip["file"] == str(path)


def test_missing_input_is_a_one_line_error_with_exit_code_2(tmp_path):
    result = run_tool("preprocess_data.py", "--input", str(tmp_path / "absent.jsonl"),
                      "--output-prefix", str(tmp_path / "o" / "x"), "--quiet")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: input not found: {tmp_path / 'absent.jsonl'}"
    with pytest.raises(InputError):
        preprocess([str(tmp_path / "nothing-*.jsonl")], str(tmp_path / "o" / "x"), show_progress=False)


def test_unwritable_output_is_a_one_line_error_with_exit_code_2(bad_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_tool("preprocess_data.py", "--input", str(bad_file), "--output-prefix",
                      str(blocker / "sub" / "x"), "--quiet")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: cannot write output prefix {blocker / 'sub' / 'x'}")


def test_unsupported_format_names_the_file(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text("a,b\n")
    with pytest.raises(InputError, match="unsupported input format: .*notes.csv"):
        preprocess([str(path)], str(tmp_path / "o" / "x"), show_progress=False)


# ---- resume ------------------------------------------------------------------------


def journal_shards(prefix: str) -> int:
    path = Path(prefix + ".progress.jsonl")
    return sum('"shard"' in line for line in path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_killed_run_resumes_to_identical_output(tmp_path, real_documents):
    """SIGKILL mid-run, re-run the same command: finished shards are kept, output is identical."""
    corpus = write_jsonl(tmp_path / "big.jsonl", real_documents * 3)
    args = ["--input", str(corpus), "--workers", "1", "--shard-size-tokens", "40000", "--quiet"]
    reference = str(tmp_path / "ref" / "c")
    assert run_tool("preprocess_data.py", *args, "--output-prefix", reference).returncode == 0
    total_shards = len(json.loads(Path(reference + ".json").read_text())["shards"])

    prefix = str(tmp_path / "killed" / "c")
    command = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), *args, "--output-prefix", prefix]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while journal_shards(prefix) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the tool ended before the kill"
    os.killpg(process.pid, signal.SIGKILL)  # the tool and its tokenizing worker, as a node failure would
    process.wait()
    finished = journal_shards(prefix)
    assert 3 <= finished < total_shards, "the kill should land mid-run"
    assert not Path(prefix + ".json").exists()
    kept = {i: Path(f"{prefix}_{i:05d}.bin").stat().st_ino for i in range(finished)}

    result = run_tool("preprocess_data.py", *args, "--output-prefix", prefix)
    assert result.returncode == 0, result.stderr
    assert f"resuming after {finished} finished shards" in result.stderr
    assert {i: Path(f"{prefix}_{i:05d}.bin").stat().st_ino for i in range(finished)} == kept
    assert shard_bytes(prefix) == shard_bytes(reference)
    summary, reference_summary = (json.loads(Path(p + ".json").read_text()) for p in (prefix, reference))
    assert summary["shards"] == reference_summary["shards"]
    assert not list(Path(prefix).parent.glob("*.tmp"))


def test_rerun_redoes_damaged_shards_and_survives_a_torn_journal_line(corpus, tmp_path):
    prefix = str(tmp_path / "o" / "c")
    first = preprocess([str(corpus / "a.jsonl")], prefix, shard_size_tokens=10_000, show_progress=False)
    reference = shard_bytes(prefix)
    assert len(first["shards"]) >= 4
    Path(f"{prefix}_00002.bin").write_bytes(b"\0" * 10)  # damaged: wrong size
    with open(prefix + ".progress.jsonl", "a") as journal:
        journal.write('{"shard": {"ind')  # torn by a kill mid-append
    second = preprocess([str(corpus / "a.jsonl")], prefix, shard_size_tokens=10_000, show_progress=False)
    assert shard_bytes(prefix) == reference
    assert second == first


def test_rerun_with_other_settings_is_refused(corpus, tmp_path):
    from data_pipeline.shards import JournalMismatch

    prefix = str(tmp_path / "o" / "c")
    preprocess([str(corpus / "a.jsonl")], prefix, shard_size_tokens=10_000, show_progress=False)
    with pytest.raises(JournalMismatch, match="another --output-prefix"):
        preprocess([str(corpus / "a.jsonl")], prefix, shard_size_tokens=20_000, show_progress=False)


PEAK_MEMORY_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from data_pipeline.peak_memory import peak_rss_bytes
from tools.preprocess_data import main

if __name__ == "__main__":
    assert main({args!r}) == 0
    print("maxrss_kb", peak_rss_bytes() // 1024)
"""


def peak_rss_mb(tmp_path, corpus_path, name: str) -> float:
    args = ["--input", str(corpus_path), "--output-prefix", str(tmp_path / name / "c"), "--workers", "2", "--quiet"]
    script = tmp_path / f"measure_{name}.py"
    script.write_text(PEAK_MEMORY_SCRIPT.format(repo=str(REPO), args=args))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split("maxrss_kb")[1]) / 1024


@pytest.mark.slow
def test_memory_stays_flat_as_the_corpus_grows(tmp_path, real_documents):
    """Peak memory of the writing process barely moves when the input grows 16-fold (3.5 -> 56 MB)."""
    small = write_jsonl(tmp_path / "small.jsonl", real_documents)
    large = write_jsonl(tmp_path / "large.jsonl", real_documents * 16)
    growth_mb = large.stat().st_size / 1e6 - small.stat().st_size / 1e6
    rss_growth = peak_rss_mb(tmp_path, large, "large") - peak_rss_mb(tmp_path, small, "small")
    assert rss_growth < 0.25 * growth_mb, f"peak RSS grew {rss_growth:.1f} MB for {growth_mb:.0f} MB more input"


def test_directories_expand_in_name_order_and_datasets_directories_count_once(tmp_path, real_documents):
    from data_pipeline.readers import resolve_inputs

    write_all_formats(tmp_path, real_documents[:10])
    write_jsonl(tmp_path / "nested" / "b.jsonl", real_documents[:2])
    write_jsonl(tmp_path / "nested" / "a.jsonl", real_documents[:2])
    names = [str(Path(p).relative_to(tmp_path)) for p in resolve_inputs([str(tmp_path)])]
    assert names == ["docs.jsonl.gz", "docs.jsonl.zst", "docs.parquet", "hf", "nested/a.jsonl", "nested/b.jsonl"]
