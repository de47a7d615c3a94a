"""The curation executor on real text: every document kept or removed with a reason, global dedup across
files, identical output for 1 and 2 workers and for a spilled dedup, and resume after a kill."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

from data_pipeline.curation.pipeline import CurationConfig, CurationConfigError, curate
from data_pipeline.readers import read_jsonl
from tests.conftest import REPO, run_tool

CONFIG = {
    "stages": ["normalize", {"metadata": {"field": "score", "min": 1}}, {"url": {"remove_wikipedia": True}},
               "gopher_repetition", {"gopher_quality": {"min_words": 20}}, "exact_dedup", "minhash_dedup"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, real_documents) -> list[Path]:
    """Real documents in 3 files, with exact copies and near copies planted across files, and 2 broken lines."""
    directory = tmp_path_factory.mktemp("raw")
    rng = random.Random(0)
    files: list[list[str]] = [[], [], []]
    for i, d in enumerate(real_documents):
        host = "en.wikipedia.org" if d["source"] == "wikipedia" and i % 2 else "news.example"
        record = {"id": f"doc{i}", "text": d["text"], "url": f"https://{host}/{i}", "score": 1 + i % 4}
        files[i % 3].append(json.dumps(record))
        if i % 10 == 0:
            files[(i + 1) % 3].append(json.dumps({**record, "id": f"copy{i}"}))
        if i % 10 == 5:
            words = d["text"].split()
            words[rng.randrange(len(words))] = "changed"
            files[(i + 2) % 3].append(json.dumps({**record, "id": f"near{i}", "text": " ".join(words)}))
    files[0].insert(3, '{"id": "broken", "text": ')
    files[1].insert(5, "[1, 2]")
    paths = []
    for k, lines in enumerate(files):
        paths.append(directory / f"part{k}.jsonl")
        paths[-1].write_text("\n".join(lines) + "\n")
    return paths


def records(directory: Path, pattern: str) -> list[dict]:
    return [r for path in sorted(directory.glob(pattern)) for r in read_jsonl(path)]


def output_bytes(output: Path) -> dict[str, bytes]:
    """Decompressed contents of every output file (compression level aside, the data must be identical)."""
    return {str(p.relative_to(output)): zstandard.ZstdDecompressor().stream_reader(p.open("rb")).read()
            for p in sorted(output.glob("*/*.jsonl.zst"))}


@pytest.fixture(scope="module")
def curated(tmp_path_factory, corpus):
    output = tmp_path_factory.mktemp("curated")
    stats = curate([str(p) for p in corpus], output, CurationConfig.from_dict(CONFIG), workers=2, show_progress=False)
    return output, stats


def test_every_document_is_kept_or_removed_with_a_reason(curated, corpus):
    output, stats = curated
    lines = sum(len(p.read_text().splitlines()) for p in corpus)
    kept, removed = records(output / "documents", "*.jsonl.zst"), records(output / "removed", "*.jsonl.zst")
    assert stats["read"] == lines == len(kept) + len(removed) == stats["kept"] + stats["removed"]
    assert all(r["reason"] for r in removed)
    broken = {r["reason"]: (r["source"], r["raw"]) for r in removed if r["reason"].startswith("input:")}
    assert broken == {"input:malformed_json": (f"{corpus[0]}:4", '{"id": "broken", "text": '),
                      "input:not_an_object": (f"{corpus[1]}:6", "[1, 2]")}
    assert not any("wikipedia.org" in r["url"] for r in kept)
    assert stats["stages"]["url"]["dropped"]["url:wikipedia"] > 10
    assert json.loads((output / "stats.json").read_text()) == stats


def test_duplicates_are_found_across_files_and_point_at_the_earliest_copy(curated):
    output, stats = curated
    dedup = {r["id"]: r for r in records(output / "removed", "dedup-*.jsonl.zst")}
    kept_ids = {r["id"] for r in records(output / "documents", "*.jsonl.zst")}
    planted_copies = [i for i in range(0, 406, 10) if f"doc{i}" in kept_ids]
    assert len(planted_copies) > 20
    for i in planted_copies:  # the copy sits in the next file, so the original is earlier
        assert dedup[f"copy{i}"]["reason"] == "exact_dedup:duplicate" and dedup[f"copy{i}"]["duplicate_of"] == f"doc{i}"
    near = [r for r in dedup.values() if r["id"].startswith("near") or r["duplicate_of"].startswith("near")]
    assert len(near) > 20 and all(r["reason"] == "minhash_dedup:duplicate" for r in near)
    assert all(r["duplicate_of"] in kept_ids for r in dedup.values())
    assert stats["stages"]["exact_dedup"]["dropped"]["exact_dedup:duplicate"] >= len(planted_copies)


def test_one_worker_and_a_spilled_dedup_give_the_same_output(curated, corpus, tmp_path):
    output, _ = curated
    config = CurationConfig.from_dict({**CONFIG, "memory_mb": 0.05})  # forces many dedup partitions on disk
    curate([str(p) for p in corpus], tmp_path, config, workers=1, show_progress=False)
    assert output_bytes(tmp_path) == output_bytes(output)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_output(curated, corpus, tmp_path):
    output, _ = curated
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(CONFIG))  # JSON is YAML
    command = [sys.executable, str(REPO / "tools" / "curate.py"), "--config", str(config), "--input",
               *map(str, corpus), "--output", str(tmp_path / "out"), "--workers", "1", "--quiet"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_done = tmp_path / "out" / "work" / "done" / "filter-00000.json"
    while not first_done.exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first_done.exists() and not (tmp_path / "out" / "stats.json").exists(), "the kill should land mid-run"
    finished = first_done.stat().st_mtime_ns
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert first_done.stat().st_mtime_ns == finished  # the finished file was not redone
    assert output_bytes(tmp_path / "out") == output_bytes(output)


@pytest.mark.parametrize("config,message", [
    ({"stages": ["exact_dedup", "normalize"]}, "comes after a dedup stage"),
    ({"stages": ["gopher"]}, "unknown stage 'gopher'"),
    ({"stages": [{"length": {"unit": "lines"}}]}, "stages[0] length: length.unit='lines'"),
    ({"stages": [{"gopher_quality": {"min_wordz": 3}}]}, "stages[0] gopher_quality"),
    ({"stage": []}, "unknown top-level keys ['stage']"),
])
def test_bad_configs_are_refused_naming_the_entry(config, message):
    with pytest.raises(CurationConfigError) as error:
        CurationConfig.from_dict(config)
    assert message in str(error.value)


def test_the_tool_prints_the_summary_and_refuses_unusable_arguments(corpus, tmp_path):
    result = run_tool("curate.py", "--config", str(REPO / "configs" / "data" / "fineweb.yaml"), "--input",
                      *map(str, corpus), "--output", str(tmp_path / "out"), "--workers", "1", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    for stage in ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "exact_dedup", "minhash_dedup"):
        assert f"\n{stage} " in result.stdout
    assert " read = " in result.stdout
    missing = run_tool("curate.py", "--config", str(REPO / "configs" / "data" / "fineweb.yaml"), "--input",
                       str(tmp_path / "absent.jsonl"), "--output", str(tmp_path / "x"))
    assert missing.returncode == 2 and "absent.jsonl" in missing.stderr
    other = run_tool("curate.py", "--config", str(REPO / "configs" / "data" / "webtext.yaml"), "--input",
                     *map(str, corpus), "--output", str(tmp_path / "out"))
    assert other.returncode == 2 and "another config" in other.stderr


@pytest.mark.slow
def test_four_mpi_ranks_give_the_same_output_as_one_process(curated, corpus, tmp_path):
    """mpiexec -n 4: ranks split the files (one rank gets none), exchange buckets by hash, dedup globally."""
    output, stats = curated
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(CONFIG))
    mpiexec = Path(sys.executable).parent / "mpiexec"
    result = subprocess.run([str(mpiexec), "-n", "4", sys.executable, str(REPO / "tools" / "curate.py"), "--config",
                             str(config), "--input", *map(str, corpus), "--output", str(tmp_path / "out"),
                             "--workers", "1", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 4 rank(s)" in result.stderr
    assert output_bytes(tmp_path / "out") == output_bytes(output)
    mpi_stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert {k: mpi_stats[k] for k in ("read", "kept", "removed")} == {k: stats[k] for k in ("read", "kept", "removed")}
    assert result.stdout.count(" read = ") == 1  # the summary comes from rank 0 alone


def test_parquet_output_holds_the_same_documents_as_jsonl(curated, corpus, tmp_path):
    import pyarrow.parquet as pq

    output, stats = curated
    config = CurationConfig.from_dict({**CONFIG, "output_format": "parquet"})
    assert curate([str(p) for p in corpus], tmp_path, config, workers=1, show_progress=False)["kept"] == stats["kept"]
    shards = sorted((tmp_path / "documents").glob("*.parquet"))
    assert [p.stem for p in shards] == [p.name.removesuffix(".jsonl.zst")
                                        for p in sorted((output / "documents").glob("*.jsonl.zst"))]
    rows = [row for p in shards for row in pq.read_table(p).to_pylist()]
    assert rows == records(output / "documents", "*.jsonl.zst")
    assert pq.read_schema(shards[0]).names[:2] == ["id", "text"]
    assert records(tmp_path / "removed", "*.jsonl.zst") == records(output / "removed", "*.jsonl.zst")


def test_many_input_files_dedup_within_a_small_open_file_limit(tmp_path, real_documents):
    """The dedup looks up keys in every file on every rank; with 300 files it must not hold each one open."""
    import resource

    inputs = []
    for i in range(300):
        d = real_documents[i % len(real_documents)]
        inputs.append(str(tmp_path / f"in{i:03d}.jsonl"))
        Path(inputs[-1]).write_text(json.dumps({"id": f"d{i}", "text": d["text"]}) + "\n")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"stages": ["exact_dedup", "minhash_dedup"]}))

    def limit_open_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    result = subprocess.run([sys.executable, str(REPO / "tools" / "curate.py"), "--config", str(config), "--input",
                             *inputs, "--output", str(tmp_path / "out"), "--quiet"], cwd=REPO, capture_output=True,
                            text=True, preexec_fn=limit_open_files, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    copies = 300 - len({d["text"] for d in real_documents[:300]})
    assert stats["read"] == 300 and stats["stages"]["exact_dedup"]["dropped"]["exact_dedup:duplicate"] == copies


def test_resuming_notices_an_edited_word_list_and_accepts_a_run_begun_before_output_format(tmp_path):
    from data_pipeline.curation.pipeline import Layout, OutputMismatchError, claim_output

    words = tmp_path / "bad_words.txt"
    words.write_text("levee\n")
    config = CurationConfig.from_dict({"stages": [{"c4": {"bad_words_file": str(words)}}]})
    layout = Layout(tmp_path / "out")
    layout.make()
    claim_output(layout, ["a.jsonl"], config)
    claim_output(layout, ["a.jsonl"], config)  # the same run resumes
    run = json.loads((layout.work / "run.json").read_text())
    del run["config"]["output_format"]  # as written before the setting existed
    (layout.work / "run.json").write_text(json.dumps(run))
    claim_output(layout, ["a.jsonl"], config)
    words.write_text("levee\ndam\n")
    with pytest.raises(OutputMismatchError, match="another config"):
        claim_output(layout, ["a.jsonl"], config)


def test_an_input_whose_documents_are_all_removed_passes_dedup(tmp_path, real_documents):
    """Every document of the first file fails the length rule: its key files are empty, and the dedup
    (exact and MinHash) must take them as empty rather than crash after the whole filter phase."""
    short = write_lines(tmp_path / "short.jsonl", [{"id": f"s{i}", "text": "too short"} for i in range(5)])
    long = write_lines(tmp_path / "long.jsonl", [{"id": f"l{i}", "text": d["text"]} for i, d in
                                                 enumerate(real_documents[:20] + real_documents[:3])])
    config = CurationConfig.from_dict({"stages": [{"length": {"min": 20}}, "exact_dedup", "minhash_dedup"]})
    stats = curate([str(short), str(long)], tmp_path / "out", config, show_progress=False)
    assert stats["stages"]["length"]["dropped"] == {"length:under_20_words": 5}
    assert stats["kept"] == 20 and stats["stages"]["exact_dedup"]["dropped"] == {"exact_dedup:duplicate": 3}


def write_lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("keep_work", [False, True])
def test_a_finished_run_leaves_only_its_markers_in_work_unless_asked(curated, corpus, tmp_path, keep_work):
    output = tmp_path / "out"
    stats = curate([str(p) for p in corpus], output, CurationConfig.from_dict(CONFIG), show_progress=False,
                   keep_work=keep_work)
    left = {p.relative_to(output / "work").parts[0] for p in (output / "work").rglob("*") if p.is_file()}
    biggest = max(p.stat().st_size for p in (output / "work").rglob("*") if p.is_file())
    if keep_work:
        assert {"filtered", "keys", "duplicates.npy"} <= left
    else:
        assert left == {"done", "run.json"} and biggest < 4096
    assert output_bytes(output) == output_bytes(curated[0])
    again = curate([str(p) for p in corpus], output, CurationConfig.from_dict(CONFIG), show_progress=False)
    assert again == stats and output_bytes(output) == output_bytes(curated[0])  # finished: nothing redone


def test_a_records_own_source_field_is_kept(tmp_path, real_documents):
    rows = [{"id": f"d{i}", "text": d["text"], "source": "common-crawl"} for i, d in enumerate(real_documents[:5])]
    path = write_lines(tmp_path / "in.jsonl", rows)
    curate([str(path)], tmp_path / "out", CurationConfig.from_dict({"stages": ["exact_dedup"]}), show_progress=False)
    assert [r["source"] for r in records(tmp_path / "out" / "documents", "*.jsonl.zst")] == ["common-crawl"] * 5


def test_a_finished_run_whose_stats_were_deleted_rebuilds_them_from_its_markers(curated, corpus, tmp_path):
    output = tmp_path / "out"
    stats = curate([str(p) for p in corpus], output, CurationConfig.from_dict(CONFIG), show_progress=False)
    (output / "stats.json").unlink()  # work/ is gone too: nothing to dedup again from
    again = curate([str(p) for p in corpus], output, CurationConfig.from_dict(CONFIG), show_progress=False)
    assert {k: v for k, v in again.items() if k != "seconds"} | {"stages": None} == \
        {k: v for k, v in stats.items() if k != "seconds"} | {"stages": None}
    assert {name: (row["seen"], row["kept"], row["dropped"]) for name, row in again["stages"].items()} == \
        {name: (row["seen"], row["kept"], row["dropped"]) for name, row in stats["stages"].items()}
