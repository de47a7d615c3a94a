"""Tokenizing across MPI ranks: the shards, journal and summary of one process, byte for byte, for any
number of ranks; resume across rank counts; an error on one rank stops them all.

The planning of shards from token files is checked against a plain document loop first (no
processes), then the whole path in this process (the path a run resumed with one process takes),
then real `mpiexec -n R tools/preprocess_data.py` runs on real text.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.preprocess import Position, Run, deal_files, open_run, preprocess
from data_pipeline.sample_text import write_jsonl
from data_pipeline.shards import TokenFiles, plan_shards
from data_pipeline.tokenizers import load_tokenizer
from tests.conftest import REPO

TOOL = str(REPO / "tools" / "preprocess_data.py")
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")


# ---- planning shards from token files, against a plain loop ------------------------------------


def planned_by_loop(files: list[tuple[np.ndarray, np.ndarray]], start: tuple[int, int], size: int):
    """(documents as (file, position in file), end) per shard, closing a shard as preprocess.consume does."""
    shards, current, tokens = [], [], 0
    for index in range(start[0], len(files)):
        lengths, records = files[index]
        for position, (length, record) in enumerate(zip(lengths.tolist(), records.tolist())):
            if index == start[0] and record < start[1]:
                continue
            current.append((index, position))
            tokens += length
            if tokens >= size:
                shards.append((current, (index, record + 1)))
                current, tokens = [], 0
    if current:
        shards.append((current, (len(files), 0)))
    return shards


def test_planned_shards_are_the_ones_a_document_loop_makes(tmp_path):
    rng = np.random.default_rng(0)
    token_files, files = TokenFiles(str(tmp_path / "c")), []
    token_files.claim({"run": "synthetic"})
    for index in range(6):
        count = int(rng.integers(0, 40))  # some files hold no document at all
        lengths = rng.integers(1, 60, size=count)
        records = np.cumsum(rng.integers(1, 4, size=count)) - 1  # gaps: skipped records
        writer = token_files.writer(index, 0, np.uint16)
        writer.add(np.arange(lengths.sum()) % 50_000, lengths, records, [], 0)
        writer.finish()
        files.append((lengths, records))
    for size in (1, 17, 100, 333, 10**9):
        for start in ((0, 0), (2, 5), (5, 0), (6, 0)):
            plan = plan_shards(token_files, start, len(files), 7, size)
            expected = planned_by_loop(files, start, size)
            assert [shard.index for shard in plan] == list(range(7, 7 + len(expected)))
            assert [shard.end for shard in plan] == [end for _, end in expected], (size, start)
            documents = [[(index, d) for index, begin, end, _ in shard.pieces for d in range(begin, end)]
                         for shard in plan]
            assert documents == [docs for docs, _ in expected], (size, start)
            for shard in plan:
                for index, begin, _, first_token in shard.pieces:
                    assert first_token == files[index][0][:begin].sum()


def test_files_are_dealt_largest_first_to_the_least_loaded_rank(tmp_path):
    sizes = [10, 70, 30, 30, 5, 60]
    header = {"inputs": [{"path": f"/in/{i}", "bytes": size} for i, size in enumerate(sizes)]}
    run = Run([f"/in/{i}" for i in range(6)], header, str(tmp_path / "c"), Position(1, 4), 0, False, False)
    dealt = deal_files(TokenFiles(run.output_prefix), run, 3)
    assert dealt == [[(1, 4)], [(4, 0), (5, 0)], [(2, 0), (3, 0)]]  # file 0 is before the start: finished
    assert sorted(item for share in dealt for item in share) == [(1, 4), (2, 0), (3, 0), (4, 0), (5, 0)]


# ---- the whole path in this process (as when a run across ranks is resumed by one process) ---------


def corpus_with_bad_records(directory: Path, documents: list[dict]) -> Path:
    """Real documents over five files of every kind, with bad records among them: a truncated .zst,
    a file with no record, bad lines at the start and at the very end."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = random.Random(0)
    bad = [b'{"text": "unterminated', b'{"text": null}', b"", b"   ", b'{"body": "no text"}', b'{"text": " "}']

    def lines(docs: list[dict]) -> bytes:
        out = [rng.choice(bad) for _ in range(2)]
        for doc in docs:
            out.append(json.dumps(doc).encode())
            if rng.random() < 0.15:
                out.append(rng.choice(bad))
        return b"\n".join(out + [b'{"text": 5}']) + b"\n"

    directory.mkdir(parents=True, exist_ok=True)
    n = len(documents)
    (directory / "a.jsonl").write_bytes(lines(documents[: n // 5]))
    zst = zstandard.ZstdCompressor().compress(lines(documents[n // 5: 2 * n // 5]))
    (directory / "b.jsonl.zst").write_bytes(zst[: len(zst) * 9 // 10])  # truncated: the rest is lost
    (directory / "c.jsonl").write_bytes(b"\n\n")
    table = pa.table({"text": [d["text"] for d in documents[2 * n // 5: 3 * n // 5]]})
    pq.write_table(table, directory / "d.parquet", row_group_size=30)
    (directory / "e.jsonl.gz").write_bytes(gzip.compress(lines(documents[3 * n // 5:])))
    return directory


def output_files(prefix: str) -> dict[str, bytes]:
    """Every file the run leaves: shards, PREFIX.json and the journal; no token files, nothing temporary."""
    directory = Path(prefix).parent
    assert not Path(prefix + ".work").exists() and not list(directory.glob("*.tmp"))
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def begin_as_if_across_ranks(inputs: list[str], prefix: str, size: int) -> None:
    """Leave PREFIX.work/ claimed for this run, as a run across ranks killed early would: a re-run, by
    any number of processes, then takes the path across ranks."""
    run, _ = open_run(inputs, prefix, load_tokenizer("gpt2"), "text", size)
    TokenFiles(prefix).claim(run.header)


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory, real_documents):
    return corpus_with_bad_records(tmp_path_factory.mktemp("mixed"), real_documents[:150])


@pytest.mark.parametrize("size", [1, 5_000, 40_000, 10**9])
def test_the_path_across_ranks_writes_one_process_bytes_with_skips_where_they_belong(mixed_corpus, tmp_path, size):
    inputs = [str(mixed_corpus)]
    reference = str(tmp_path / "one" / "c")
    summary = preprocess(inputs, reference, workers=1, shard_size_tokens=size, show_progress=False)
    assert summary["skipped"]["total"] > 10 and "truncated_stream" in summary["skipped"]["by_reason"]
    prefix = str(tmp_path / "ranks" / "c")
    begin_as_if_across_ranks(inputs, prefix, size)
    assert preprocess(inputs, prefix, workers=2, shard_size_tokens=size, show_progress=False) == summary
    assert output_files(prefix) == output_files(reference)
    done = json.loads(Path(prefix + ".progress.jsonl").read_text().splitlines()[-1])["done"]
    if size == 1:  # every document ends a shard, so the bad last line comes after the last one
        assert [skip["line"] for skip in done["skipped"]] == [summary["skipped"]["records"][-1]["line"]]


def test_a_one_process_run_cut_short_resumes_on_the_path_across_ranks(mixed_corpus, tmp_path):
    """The journal of a one-process run killed after 3 shards, then the path across ranks from there:
    mid-file, finished shards untouched."""
    inputs, size = [str(mixed_corpus)], 2_000
    prefix = str(tmp_path / "o" / "c")
    assert len(preprocess(inputs, prefix, workers=1, shard_size_tokens=size, show_progress=False)["shards"]) > 12
    reference = output_files(prefix)
    journal = Path(prefix + ".progress.jsonl")
    journal.write_text("".join(journal.read_text().splitlines(keepends=True)[:4]))  # header + 3 shards
    Path(prefix + ".json").unlink()
    cut = json.loads(journal.read_text().splitlines()[-1])["shard"]["end"]
    assert cut["record"] > 0, "the resume should start inside a file"
    kept = {i: Path(f"{prefix}_{i:05d}.bin").stat().st_ino for i in range(3)}
    begin_as_if_across_ranks(inputs, prefix, size)
    preprocess(inputs, prefix, workers=1, shard_size_tokens=size, show_progress=False)
    assert output_files(prefix) == reference
    assert {i: Path(f"{prefix}_{i:05d}.bin").stat().st_ino for i in range(3)} == kept


def test_token_files_of_another_run_are_not_used(mixed_corpus, tmp_path):
    inputs, prefix = [str(mixed_corpus)], str(tmp_path / "o" / "c")
    reference = preprocess(inputs, str(tmp_path / "ref" / "c"), workers=1, show_progress=False)
    stale = TokenFiles(prefix)
    stale.claim({"another": "run"})
    (stale.root / "00000.json").write_text("{}")
    assert preprocess(inputs, prefix, workers=1, show_progress=False) == reference
    assert not stale.root.exists()


def test_across_ranks_files_finished_by_another_run_are_tokenized_again(mixed_corpus, tmp_path):
    """A work directory of another run is emptied before anything in it is counted as done (counting first
    left its files out of the deal, then emptied the directory, and the plan found no token files)."""
    inputs, prefix = [str(mixed_corpus)], str(tmp_path / "o" / "c")
    stale = TokenFiles(prefix)
    stale.claim({"another": "run"})
    for suffix, content in (("tokens", b""), ("docs", b""), ("json", json.dumps(
            {"index": 0, "first_record": 0, "documents": 0, "tokens": 0, "token_bytes": 0, "skipped": []}))):
        path = stale.path(0, suffix)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    assert stale.finished(0) is not None  # it looks finished
    run, _ = open_run(inputs, prefix, load_tokenizer("gpt2"), "text", 10**9)
    dealt = deal_files(stale, run, 2)
    assert sorted(item for share in dealt for item in share) == [(i, 0) for i in range(len(run.inputs))]
    assert [p.name for p in stale.root.iterdir()] == ["header.json"]


# ---- real MPI ranks ------------------------------------------------------------------------------


def run_ranks(ranks: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """tools/preprocess_data.py as one process (ranks=1, no mpiexec) or under `mpiexec -n ranks`."""
    launcher = [MPIEXEC, "-n", str(ranks)] if ranks > 1 else []
    return subprocess.run([*launcher, sys.executable, TOOL, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def start_ranks(ranks: int, *args: str) -> subprocess.Popen:
    """As run_ranks, in its own process group, so that the test can kill the launcher and every rank."""
    launcher = [MPIEXEC, "-n", str(ranks)] if ranks > 1 else []
    return subprocess.Popen([*launcher, sys.executable, TOOL, *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of `pid` (Z: a zombie), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (mpiexec puts each rank in a process group of its own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children.get(parent, [])]
        found += frontier
    return found


def kill_all(process: subprocess.Popen) -> None:
    """SIGKILL the launcher, the ranks and their workers at once, as a node failure would."""
    victims = [process.pid, *descendants(process.pid)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    deadline = time.monotonic() + 30
    while any(process_state(pid) not in (None, "Z") for pid in victims) and time.monotonic() < deadline:
        time.sleep(0.05)


def journal_shards(prefix: str) -> int:
    path = Path(prefix + ".progress.jsonl")
    return sum('"shard"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory, real_documents):
    """~15 MB of real text over eight files of different sizes and kinds, bad records among them."""
    directory = tmp_path_factory.mktemp("big")
    corpus_with_bad_records(directory / "mixed", real_documents)
    for i, copies in enumerate((1, 1, 2)):
        write_jsonl(directory / f"part-{i}.jsonl", real_documents[i:] * copies)
    return directory


@pytest.mark.slow
def test_one_two_and_three_ranks_write_the_same_bytes(big_corpus, tmp_path):
    args = ["--input", str(big_corpus), "--workers", "1", "--shard-size-tokens", "40000"]
    outputs, stdouts = {}, {}
    for ranks in (1, 2, 3):
        prefix = str(tmp_path / f"r{ranks}" / "c")
        result = run_ranks(ranks, *args, "--output-prefix", prefix)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[ranks], stdouts[ranks] = output_files(prefix), result.stdout.replace(f"r{ranks}/", "")
        if ranks > 1:
            assert f"tokenizing on {ranks} rank(s)" in result.stderr
            assert f"on {ranks} rank(s) x 1 workers" in result.stderr
            assert result.stdout.count(" documents, ") == 1  # the summary comes from rank 0 alone
    summary = json.loads(outputs[1]["c.json"])
    assert len(summary["shards"]) >= 20 and summary["skipped"]["total"] >= 25
    assert outputs[2] == outputs[1] and outputs[3] == outputs[1]
    assert stdouts[2] == stdouts[1] == stdouts[3]


@pytest.mark.slow
def test_runs_killed_mid_run_resume_with_other_rank_counts_to_the_same_bytes(big_corpus, tmp_path):
    args = ["--input", str(big_corpus), "--workers", "1", "--quiet"]
    small = ["--shard-size-tokens", "1500"]  # ~1,500 shards: writing them takes long enough to kill it
    reference = str(tmp_path / "ref" / "c")
    assert run_ranks(1, *args, *small, "--output-prefix", reference).returncode == 0
    total = len(json.loads(Path(reference + ".json").read_text())["shards"])

    # killed by SIGKILL with 2 ranks while tokenizing, resumed by one process: finished files are kept
    prefix = str(tmp_path / "tokenizing" / "c")
    process = start_ranks(2, *args, *small, "--output-prefix", prefix)
    markers = lambda: [p for p in Path(prefix + ".work").glob("0*.json")]  # noqa: E731
    wait_for(lambda: len(markers()) >= 2, "two input files tokenized", process)
    kill_all(process)
    done_files = {p.name: p.stat().st_ino for p in markers()}
    assert 2 <= len(done_files) < 8 and journal_shards(prefix) == 0, "the kill should land while tokenizing"
    result = run_ranks(1, *args, *small, "--output-prefix", prefix)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"tokenized {8 - len(done_files)} files" in result.stderr and "on 1 rank(s)" in result.stderr
    assert output_files(prefix) == output_files(reference)

    # killed with 3 ranks while writing shards, resumed with 2: journaled shards are kept
    prefix = str(tmp_path / "writing" / "c")
    process = start_ranks(3, *args, *small, "--output-prefix", prefix)
    wait_for(lambda: journal_shards(prefix) >= 3, "three shards journaled", process)
    kill_all(process)
    finished = journal_shards(prefix)
    assert 3 <= finished < total, "the kill should land while writing shards"
    kept = {i: Path(f"{prefix}_{i:05d}.bin").stat().st_ino for i in range(finished)}
    result = run_ranks(2, *args, *small, "--output-prefix", prefix)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming after {finished} finished shards" in result.stderr
    assert "tokenized 0 files" in result.stderr
    assert {i: Path(f"{prefix}_{i:05d}.bin").stat().st_ino for i in range(finished)} == kept
    assert output_files(prefix) == output_files(reference)


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank_with_its_message(tmp_path, real_documents):
    """An undecodable file (first in input order, so its rank meets it at once) while the other rank
    tokenizes a large file: both stop, each says why, and the large file is left unfinished.

    The large files are 12 copies of the real text (about 40 MB, some 7 s of tokenizing alone): with 4
    copies, a rank that started 2-3 s before its peer on a loaded machine (the suite's background runs)
    once finished its whole file before the failure reached it, and the test failed though nothing was
    wrong."""
    corpus, copies = tmp_path / "corpus", 12
    for name in ("big-1", "big-2"):
        write_jsonl(corpus / f"{name}.jsonl", real_documents * copies)
    bad = corpus / "a-bad.jsonl.zst"
    bad.write_bytes(b"this is not a zstd frame\n" * 100)
    prefix = str(tmp_path / "o" / "c")
    began = time.monotonic()
    result = run_ranks(2, "--input", str(corpus), "--output-prefix", prefix, "--workers", "1", "--quiet",
                       timeout=300)
    elapsed = time.monotonic() - began
    assert result.returncode == 2  # the failed rank's code: the other rank exits 0, not 1 (2 | 1 = 3)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, result.stderr[-3000:]
    assert any(line.startswith(f"error: cannot decode {bad}: ") for line in errors)
    assert any(line.startswith("error: another rank failed: rank ") and f"cannot decode {bad}" in line
               for line in errors)
    assert not list(Path(prefix + ".work").glob("0*.json")), "the other rank should stop mid-file"
    assert journal_shards(prefix) == 0 and not Path(prefix + ".json").exists()

    with open(corpus / "big-2.jsonl", "a") as f:
        f.write('{"text": "unterminated\n')
    strict = run_ranks(2, "--input", str(corpus / "big-1.jsonl"), str(corpus / "big-2.jsonl"), "--output-prefix",
                       str(tmp_path / "strict" / "c"), "--workers", "1", "--quiet", "--strict", timeout=300)
    assert strict.returncode == 1 and "Traceback" not in strict.stderr, strict.stderr[-3000:]
    line = len(real_documents) * copies + 1
    assert f"error: {corpus / 'big-2.jsonl'}:{line}: malformed_json" in strict.stderr
    assert "another rank failed: rank " in strict.stderr
    print(f"\nan undecodable file on one rank stopped both ranks; the run ended after {elapsed:.1f} s")
