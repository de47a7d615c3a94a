"""slurm/preprocess.sbatch and slurm/curate.sbatch on a real Slurm cluster (two emulated nodes on this machine).

Each job runs one rank per node (MPICH's mpiexec inside the allocation) and must leave what one process leaves: the
same shard bytes, journal and summary; the same curated and removed documents and counts. A
requeue, the time-limit signal and a bad input are each checked against that too.

The jobs are independent, so they run side by side, each driven by its own thread (submit, wait for a
state, signal, wait for the end); the tests check what each scenario recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard

from data_pipeline.sample_text import write_jsonl
from tests.conftest import REPO, run_tool
from tests.slurm.jobs import job, wait_for, wait_until_done

pytestmark = pytest.mark.slow


# ---- helpers ------------------------------------------------------------------------------

SUBMITTED: list[str] = []  # every job of this module, cancelled at its end (a failed scenario leaves none running)


def submit(script: str, workdir: Path, *args: str, nodes: int = 2, cpus_per_task: int = 1) -> str:
    """sbatch slurm/<script> from `workdir` (its logs/ go there) with the tool's arguments; returns the job id."""
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    command = ["sbatch", "--parsable", f"--nodes={nodes}", f"--cpus-per-task={cpus_per_task}", "--time=10",
               str(REPO / "slurm" / script), *args]
    result = subprocess.run(command, cwd=workdir, env=dict(os.environ, PRETRAIN_PYTHON=sys.executable),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    SUBMITTED.append(result.stdout.strip().split(";")[0])
    return SUBMITTED[-1]


def log_of(workdir: Path, name: str, job_id: str) -> str:
    return (workdir / "logs" / f"{name}-{job_id}.out").read_text()


def shard_outputs(prefix: Path) -> dict[str, bytes]:
    """Shards, PREFIX.json and the journal; token files gone, nothing temporary left."""
    assert not Path(f"{prefix}.work").exists() and not list(prefix.parent.glob("*.tmp"))
    return {p.name: p.read_bytes() for p in sorted(prefix.parent.iterdir())}


def curated_outputs(output: Path) -> tuple[dict[str, bytes], dict]:
    """Decompressed kept and removed documents per file, and the counts of stats.json (times aside)."""
    files = {str(p.relative_to(output)): zstandard.ZstdDecompressor().stream_reader(p.open("rb")).read()
             for p in sorted(output.glob("*/*.jsonl.zst"))}
    stats = json.loads((output / "stats.json").read_text())
    counts = {key: stats[key] for key in ("inputs", "read", "kept", "removed", "bytes_in", "bytes_out")}
    counts["stages"] = {name: {k: v for k, v in row.items() if k != "seconds"} for name, row in stats["stages"].items()}
    return files, counts


# ---- inputs -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory, real_documents) -> Path:
    """~10 MB of real text in five jsonl files of different sizes, a few bad lines among them."""
    directory = tmp_path_factory.mktemp("text")
    for i, copies in enumerate((1, 1, 2, 1, 1)):
        documents = real_documents[i * 40:] * copies
        path = write_jsonl(directory / f"part-{i}.jsonl", documents)
        with open(path, "a") as f:
            f.write('{"text": "unterminated\n{"text": null}\n')
    return directory


@pytest.fixture(scope="module")
def reference_shards(tmp_path_factory, text_corpus) -> Path:
    prefix = tmp_path_factory.mktemp("one") / "c"
    result = run_tool("preprocess_data.py", "--input", str(text_corpus), "--output-prefix", str(prefix),
                      "--workers", "1", "--shard-size-tokens", "20000", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    return prefix


CURATION = {"stages": ["normalize", "gopher_repetition", {"gopher_quality": {"min_words": 20}}, "exact_dedup",
                       "minhash_dedup"]}


@pytest.fixture(scope="module")
def raw_corpus(tmp_path_factory, real_documents) -> tuple[Path, Path]:
    """Real documents over four files with exact and near copies planted across files, a broken line,
    and the curation config."""
    directory = tmp_path_factory.mktemp("raw")
    files: list[list[str]] = [[], [], [], []]
    for i, document in enumerate(real_documents):
        record = {"id": f"doc{i}", "text": document["text"], "url": f"https://news.example/{i}"}
        files[i % 4].append(json.dumps(record))
        if i % 10 == 0:
            files[(i + 1) % 4].append(json.dumps({**record, "id": f"copy{i}"}))
        if i % 10 == 5:
            words = document["text"].split()
            words[len(words) // 2] = "changed"
            files[(i + 2) % 4].append(json.dumps({**record, "id": f"near{i}", "text": " ".join(words)}))
    files[2].insert(3, '{"id": "broken", "text": ')
    for k, lines in enumerate(files):
        (directory / f"part{k}.jsonl").write_text("\n".join(lines) + "\n")
    config = directory / "config.json"
    config.write_text(json.dumps(CURATION))
    return directory, config


@pytest.fixture(scope="module")
def reference_curation(tmp_path_factory, raw_corpus) -> Path:
    directory, config = raw_corpus
    output = tmp_path_factory.mktemp("curated-one")
    result = run_tool("curate.py", "--config", str(config), "--input", str(directory / "*.jsonl"), "--output",
                      str(output), "--workers", "1", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    return output


# ---- the scenarios, each run in its own thread ------------------------------------------------

def preprocess_on_two_nodes(workdir: Path, text_corpus: Path) -> dict:
    prefix = workdir / "out" / "c"
    job_id = submit("preprocess.sbatch", workdir, "--input", str(text_corpus), "--output-prefix", str(prefix),
                    "--shard-size-tokens", "20000", cpus_per_task=2)
    return {"job": job_id, "state": wait_until_done(job_id), "prefix": prefix}


def preprocess_requeued(workdir: Path, text_corpus: Path) -> dict:
    prefix = workdir / "out" / "c"
    job_id = submit("preprocess.sbatch", workdir, "--input", str(text_corpus), "--output-prefix", str(prefix),
                    "--shard-size-tokens", "20000")
    wait_for(lambda: list(Path(f"{prefix}.work").glob("0*.json")), "an input file tokenized", interval=0.05)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    state = wait_for(lambda: int(job(job_id).get("Restarts", 0)) >= 1 and wait_until_done(job_id), "the requeue")
    return {"job": job_id, "state": state, "prefix": prefix}


def preprocess_undecodable(workdir: Path, text_corpus: Path) -> dict:
    bad = workdir / "in" / "a-bad.jsonl.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"not gzip at all\n" * 100)
    job_id = submit("preprocess.sbatch", workdir, "--input", str(bad), str(text_corpus), "--output-prefix",
                    str(workdir / "out" / "c"))
    return {"job": job_id, "state": wait_until_done(job_id, timeout=200), "bad": bad}


def curate_on_two_nodes(workdir: Path, raw_corpus: tuple[Path, Path]) -> dict:
    directory, config = raw_corpus
    output = workdir / "curated"
    job_id = submit("curate.sbatch", workdir, "--config", str(config), "--input", str(directory / "*.jsonl"),
                    "--output", str(output))
    return {"job": job_id, "state": wait_until_done(job_id), "output": output}


def curate_time_limit(workdir: Path, raw_corpus: tuple[Path, Path]) -> dict:
    """USR1 once a file is filtered, then, on a second job, at once (before anything is finished)."""
    directory, config = raw_corpus
    output = workdir / "curated"
    args = ("--config", str(config), "--input", str(directory / "*.jsonl"), "--output", str(output))
    job_id = submit("curate.sbatch", workdir, *args)
    wait_for(lambda: list((output / "work" / "done").glob("filter-*.json")), "a filtered file", interval=0.05)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    state = wait_for(lambda: int(job(job_id).get("Restarts", 0)) >= 1 and wait_until_done(job_id), "the requeue")

    early = workdir / "early"
    again = submit("curate.sbatch", early, *args[:-1], str(workdir / "early-output"))
    wait_for(lambda: (early / "logs" / f"curate-{again}.out").is_file()
             and "[sbatch] job" in log_of(early, "curate", again), "the batch script to start", interval=0.05)
    subprocess.run(["scancel", "--batch", "--signal=USR1", again], check=True)
    return {"job": job_id, "state": state, "output": output, "early": early, "again": again,
            "again_state": wait_until_done(again, timeout=200)}


@pytest.fixture(scope="module")
def scenarios(slurm_cluster, request, tmp_path_factory, text_corpus, raw_corpus):
    """name -> Future of (work directory, the scenario's record), all started at once, after the session's
    training jobs when their tests are selected too (`pretrain_scenarios`: they train while these wait on Slurm)."""
    if any(item.nodeid.startswith("tests/slurm/test_pretrain_sbatch.py") for item in request.session.items):
        request.getfixturevalue("pretrain_scenarios")
    runs = [(preprocess_on_two_nodes, text_corpus), (preprocess_requeued, text_corpus),
            (preprocess_undecodable, text_corpus), (curate_on_two_nodes, raw_corpus), (curate_time_limit, raw_corpus)]
    pool = ThreadPoolExecutor(max_workers=len(runs))

    def run(scenario, inputs):
        workdir = tmp_path_factory.mktemp(scenario.__name__)
        return workdir, scenario(workdir, inputs)

    started = {scenario.__name__: pool.submit(run, scenario, inputs) for scenario, inputs in runs}
    yield started
    subprocess.run(["scancel", *SUBMITTED], capture_output=True)  # threads still waiting see their jobs end
    pool.shutdown(wait=True)


# ---- tokenization ---------------------------------------------------------------------------

def test_preprocess_on_two_nodes_writes_the_shards_of_one_process(scenarios, reference_shards):
    workdir, record = scenarios["preprocess_on_two_nodes"].result()
    state, text = record["state"], log_of(workdir, "preprocess", record["job"])
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "0"), text[-3000:]
    assert "2 tasks on 2 node(s): node[1-2], 2 CPUs per task" in text
    assert "tokenizing on 2 rank(s)" in text and "on 2 rank(s) x 2 workers" in text  # --workers = CPUs per task
    assert "tokenization finished" in text and text.count(" records skipped ") == 1  # rank 0's summary only
    assert shard_outputs(record["prefix"]) == shard_outputs(reference_shards)


def test_a_requeued_preprocess_job_resumes_to_the_same_shards(scenarios, reference_shards):
    workdir, record = scenarios["preprocess_requeued"].result()
    state, text = record["state"], log_of(workdir, "preprocess", record["job"])
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-3000:]
    assert "SIGTERM (scontrol requeue" in text and "attempt 2" in text
    second_attempt = text.split("attempt 2")[1]
    tokenized = int(second_attempt.split("tokenized ")[1].split(" files")[0])
    assert tokenized < 5, "the requeued job should keep the files tokenized before the requeue"
    assert shard_outputs(record["prefix"]) == shard_outputs(reference_shards)


def test_an_undecodable_input_fails_the_job_with_every_rank_saying_why(scenarios):
    workdir, record = scenarios["preprocess_undecodable"].result()
    state, text, bad = record["state"], log_of(workdir, "preprocess", record["job"]), record["bad"]
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("FAILED", "2:0", "0"), text[-3000:]
    assert "tokenization failed with exit code 2" in text  # the tool's code, not mpiexec's OR of the ranks'
    assert f"error: cannot decode {bad}" in text
    assert any(line.startswith("error: another rank failed: rank ") and f"cannot decode {bad}" in line
               for line in text.splitlines())  # the other rank said so too, before the launcher ended the job
    assert "Traceback" not in text and "Not requeueing" in text


# ---- curation --------------------------------------------------------------------------------

def test_curate_on_two_nodes_gives_the_output_of_one_process(scenarios, reference_curation):
    workdir, record = scenarios["curate_on_two_nodes"].result()
    state, text = record["state"], log_of(workdir, "curate", record["job"])
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "0"), text[-3000:]
    assert "2 tasks on 2 node(s): node[1-2]" in text and "on 2 rank(s)" in text
    assert "curation finished" in text and text.count(" read = ") == 1  # rank 0's summary only
    files, counts = curated_outputs(record["output"])
    reference_files, reference_counts = curated_outputs(reference_curation)
    assert counts == reference_counts and counts["stages"]["exact_dedup"]["kept"] < counts["read"]
    assert files == reference_files and len(files) == 4 + 4 + 4  # documents/, removed/, removed/dedup-


def test_the_time_limit_signal_requeues_a_curation_job_that_made_progress(scenarios, reference_curation):
    """--signal=B:USR1 as Slurm delivers it (to the batch shell), once a file is filtered: the job stops its
    ranks and requeues itself, and the next attempt finishes the same output. Sent at once instead, before
    anything is finished, it fails rather than requeue forever."""
    workdir, record = scenarios["curate_time_limit"].result()
    state, text = record["state"], log_of(workdir, "curate", record["job"])
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-3000:]
    assert "USR1: the time limit is near" in text and f"requeueing job {record['job']}" in text and "attempt 2" in text
    assert curated_outputs(record["output"]) == curated_outputs(reference_curation)

    state, text = record["again_state"], log_of(record["early"], "curate", record["again"])
    assert (state["JobState"], state["Restarts"]) == ("FAILED", "0"), text[-3000:]
    assert "not requeueing, it would loop" in text or "before the ranks started: not starting" in text
