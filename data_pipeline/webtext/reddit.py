"""Pushshift Reddit submission dumps -> the WebText URL list: each distinct outbound link once, with
its highest karma, its number of submissions and its first submission time.

Three phases, so that memory holds one partition of the URLs at a time, whatever the number of
submissions (a year of dumps is hundreds of millions of submissions, tens of millions of URLs):
  1. spill      one task per dump file: read, classify each submission, and append the kept ones
                as `url<TAB>score<TAB>created_utc` lines to partition crc32(url) % N
                (spill/pPPPP/FFFFF.tsv);
  2. aggregate  one task per partition: its spills into a dict url -> [highest score, submissions,
                first created_utc]; URLs whose highest score is under the minimum karma are
                dropped, the others written sorted by URL (spill/sorted/pPPPP.tsv), and the
                partition's spills deleted;
  3. merge      the sorted partitions merged into the output, one JSON object per line, sorted by
                URL (code point order, which is UTF-8 byte order): the same bytes whatever the
                number of partitions or workers.
The output and its statistics appear whole or not at all (a temporary name, then a rename); the
spill directory is removed at the end, also after a failure.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import shutil
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_pipeline.atomic import fsync_path, write_text_atomically
from data_pipeline.curation.tasks import report, run_tasks
from data_pipeline.readers import JSONL_SUFFIXES, InputError, is_blank, iter_chunks, parse_json_record, resolve_inputs
from data_pipeline.webtext.urls import MALFORMED_URL, MEDIA, NOT_HTTP, REDDIT, WIKIPEDIA, classify_link

# Why a submission gives no link, in the order they are tested (the first that applies is counted).
# truncated_stream counts once per damaged file: the rest of that file is lost.
SUBMISSION_DROP_REASONS = (
    "malformed_json", "invalid_utf8", "not_an_object", "truncated_stream", "missing_url", "self_post",
    MALFORMED_URL, NOT_HTTP, REDDIT, WIKIPEDIA, MEDIA, "bad_score", "bad_created_utc",
)
_PARSE_REASONS = ("malformed_json", "invalid_utf8", "not_an_object")
EXAMPLES_PER_REASON = 3

# One partition per this much compressed input: about a million submissions, a few hundred
# thousand distinct URLs, a few hundred MB of dict while aggregating it. The cap stays under the
# usual limit of 1024 open files (phase 1 holds one spill per partition open, phase 3 reads all).
BYTES_PER_PARTITION = 512 << 20
MAX_PARTITIONS = 900


@dataclass(frozen=True)
class LinkRules:
    min_karma: int = 3  # GPT-2's rule, applied to a URL's highest karma over its submissions
    keep_wikipedia: bool = False
    keep_media: bool = False


def resolve_dumps(patterns: list[str]) -> list[str]:
    """The dump files named by paths, globs and directories, in order; anything but jsonl
    (plain, .gz, .zst) is an error naming it."""
    inputs = resolve_inputs(patterns)
    for path in inputs:
        if not path.endswith(JSONL_SUFFIXES):
            raise InputError(f"unsupported input for a Reddit dump: {path} "
                             "(expected Pushshift .zst, .jsonl or .jsonl.gz)")
    return inputs


def default_partitions(inputs: list[str]) -> int:
    total = sum(os.path.getsize(path) for path in inputs)
    return min(MAX_PARTITIONS, max(1, math.ceil(total / BYTES_PER_PARTITION)))


# ---- one submission ------------------------------------------------------------


def _as_integer(value) -> int | None:
    """An int from a JSON number or digit string (some Pushshift months store created_utc as "1134365188")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def submission_link(record: dict, rules: LinkRules = LinkRules()) -> tuple[tuple[str, int, int] | None, str | None]:
    """((normalized url, score, created_utc), None) for a submission WebText keeps, else (None, reason)."""
    url = record.get("url")
    if not isinstance(url, str) or not url.strip():
        return None, "missing_url"
    if record.get("is_self") is True:
        return None, "self_post"
    # Reddit's API HTML-escapes '&' in link URLs; only '&amp;' is undone (html.unescape would also
    # turn a parameter such as '&copy=1' into '©=1').
    normalized, reason = classify_link(url.replace("&amp;", "&"), rules.keep_wikipedia, rules.keep_media)
    if reason:
        return None, reason
    score = _as_integer(record.get("score"))
    if score is None:
        return None, "bad_score"
    created = _as_integer(record.get("created_utc"))
    if created is None:
        return None, "bad_created_utc"
    return (normalized, score, created), None


# ---- phase 1: spill ------------------------------------------------------------


@dataclass
class _Tally:
    """What one file gave: counts per drop reason and the first few examples of each, as file:line."""

    path: str
    read: int = 0
    kept: int = 0
    uncompressed_bytes: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def drop(self, reason: str, line: int, detail: str) -> None:
        self.dropped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(f"{self.path}:{line}: {reason}: {detail}")


@dataclass(frozen=True)
class SpillTask:
    file_index: int
    path: str
    spill_dir: str
    partitions: int
    rules: LinkRules


def spill_file(task: SpillTask) -> dict:
    """Phase 1 for one dump file (run in a worker): its kept links appended to their partitions."""
    tally = _Tally(task.path)
    spills: dict[int, object] = {}  # partition -> open file, created on first use
    try:
        for chunk in iter_chunks(task.path, task.file_index, "url"):
            for offset, line in enumerate(chunk.items):
                tally.uncompressed_bytes += len(line)
                if not is_blank(line):
                    _spill_line(line, chunk.first_record + offset + 1, task, tally, spills)
            for problem in chunk.stream_errors:
                tally.read += 1
                tally.drop(problem.reason, problem.line, problem.detail)
            report(len(chunk.items), chunk.disk_bytes)
    finally:
        for spill in spills.values():
            spill.close()
    if tally.read and sum(tally.dropped[reason] for reason in _PARSE_REASONS) == tally.read:
        raise InputError(f"cannot decode {task.path}: none of its {tally.read:,} lines is a JSON object "
                         "(compressed data behind a plain .jsonl name?)")
    return {"documents": tally.read, "bytes": os.path.getsize(task.path), "path": task.path,
            "read": tally.read, "kept": tally.kept, "uncompressed_bytes": tally.uncompressed_bytes,
            "dropped": dict(tally.dropped), "examples": tally.examples}


def _spill_line(line: bytes, number: int, task: SpillTask, tally: _Tally, spills: dict) -> None:
    tally.read += 1
    record, problem = parse_json_record(line)
    if problem:
        tally.drop(problem[0], number, problem[1])
        return
    link, reason = submission_link(record, task.rules)
    if reason:
        tally.drop(reason, number, repr(record.get("url"))[:200])
        return
    url, score, created = link
    partition = zlib.crc32(url.encode("utf-8")) % task.partitions
    spill = spills.get(partition)
    if spill is None:
        path = Path(task.spill_dir, f"p{partition:04d}", f"{task.file_index:05d}.tsv")
        path.parent.mkdir(parents=True, exist_ok=True)
        spill = spills[partition] = open(path, "w", encoding="utf-8", newline="\n", buffering=1 << 16)
    spill.write(f"{url}\t{score}\t{created}\n")  # a normalized URL holds no tab or newline
    tally.kept += 1


# ---- phase 2: aggregate ---------------------------------------------------------


@dataclass(frozen=True)
class AggregateTask:
    partition: int
    spill_dir: str
    min_karma: int


def aggregate_partition(task: AggregateTask) -> dict:
    """Phase 2 for one partition (run in a worker): its URLs with their numbers, sorted, the
    ones under the minimum karma left out."""
    urls: dict[str, list[int]] = {}  # url -> [highest score, submissions, first created_utc]
    records = size = 0
    spills = Path(task.spill_dir, f"p{task.partition:04d}")
    for spill in sorted(spills.glob("*.tsv")):
        size, records_before = size + spill.stat().st_size, records
        with open(spill, encoding="utf-8", newline="\n") as lines:
            for line in lines:
                url, score, created = line[:-1].split("\t")
                score, created = int(score), int(created)
                records += 1
                entry = urls.get(url)
                if entry is None:
                    urls[url] = [score, 1, created]
                    continue
                entry[0] = max(entry[0], score)
                entry[1] += 1
                entry[2] = min(entry[2], created)
        report(records - records_before, spill.stat().st_size)
    low_karma = 0
    sorted_dir = Path(task.spill_dir, "sorted")
    sorted_dir.mkdir(exist_ok=True)
    with open(sorted_dir / f"p{task.partition:04d}.tsv", "w", encoding="utf-8", newline="\n") as out:
        for url in sorted(urls):
            score, submissions, created = urls[url]
            if score < task.min_karma:
                low_karma += 1
            else:
                out.write(f"{url}\t{score}\t{submissions}\t{created}\n")
    shutil.rmtree(spills, ignore_errors=True)  # so the disk holds the spill about once, not twice
    return {"documents": records, "bytes": size, "records": records, "distinct": len(urls), "low_karma": low_karma}


# ---- phase 3: merge -------------------------------------------------------------


def url_line(url: str, score: int | str, submissions: int | str, first_created_utc: int | str) -> str:
    """One output line: what json.dumps writes for the record with these keys, in this order."""
    return (f'{{"url": {json.dumps(url, ensure_ascii=False)}, "score": {score}, '
            f'"submissions": {submissions}, "first_created_utc": {first_created_utc}}}\n')


def merge_partitions(spill_dir: str, output: str, urls_total: int, show_progress: bool) -> None:
    """Phase 3: the sorted partitions merged by URL into `output`, written under a temporary name first.
    Lines sort as their URLs do: a tab sorts before every character a normalized URL can hold."""
    from tqdm import tqdm

    partial = output + ".tmp"
    sorted_files = [open(path, encoding="utf-8", newline="\n")
                    for path in sorted(Path(spill_dir, "sorted").glob("p*.tsv"))]
    try:
        with open(partial, "w", encoding="utf-8", newline="\n") as out, \
                tqdm(total=urls_total, unit="url", unit_scale=True, desc="writing", disable=not show_progress) as bar:
            for written, line in enumerate(heapq.merge(*sorted_files), 1):
                out.write(url_line(*line[:-1].split("\t")))
                if written % 65536 == 0:
                    bar.update(65536)
            bar.update(urls_total - bar.n)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    finally:
        for sorted_file in sorted_files:
            sorted_file.close()
    os.replace(partial, output)
    fsync_path(Path(output).resolve().parent)


# ---- the run --------------------------------------------------------------------


def build_url_list(inputs: list[str], output: str, rules: LinkRules = LinkRules(), workers: int = 1,
                   partitions: int | None = None, spill_dir: str | None = None, show_progress: bool = False) -> dict:
    """Reads the dump files `inputs` (resolved: see `resolve_dumps`) and writes the URL list to
    `output`, and its statistics to `output`.stats.json. Returns the statistics.

    `partitions` (default: one per 512 MiB of compressed input) bounds the memory of phase 2;
    `spill_dir` (default: next to the output) holds the temporary spills, about 100 bytes per kept
    submission."""
    began = time.perf_counter()
    partitions = default_partitions(inputs) if partitions is None else partitions
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ValueError(f"partitions must be between 1 and {MAX_PARTITIONS}, not {partitions}")
    Path(output).resolve().parent.mkdir(parents=True, exist_ok=True)
    spill = Path(spill_dir or Path(output).resolve().parent) / f"{Path(output).name}.spill.tmp"
    shutil.rmtree(spill, ignore_errors=True)  # left by a run that was killed
    spill.mkdir(parents=True)
    seconds = {}
    try:
        tasks = [SpillTask(index, path, str(spill), partitions, rules) for index, path in enumerate(inputs)]
        files = run_tasks(spill_file, tasks, min(workers, len(tasks)), "reading dumps", show_progress,
                          total=sum(os.path.getsize(path) for path in inputs))
        seconds["spill"] = time.perf_counter() - began
        spill_bytes = sum(p.stat().st_size for p in spill.glob("p*/*.tsv"))
        aggregate_tasks = [AggregateTask(p, str(spill), rules.min_karma) for p in range(partitions)]
        aggregates = run_tasks(aggregate_partition, aggregate_tasks, min(workers, partitions), "aggregating partitions",
                               show_progress, total=spill_bytes)
        seconds["aggregate"] = time.perf_counter() - began - seconds["spill"]
        written = sum(a["distinct"] - a["low_karma"] for a in aggregates)
        merge_partitions(str(spill), output, written, show_progress)
        seconds["merge"] = time.perf_counter() - began - seconds["spill"] - seconds["aggregate"]
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    seconds["total"] = time.perf_counter() - began
    stats = _statistics(files, aggregates, rules, partitions, workers, output, seconds)
    write_text_atomically(output + ".stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


def _statistics(files: list[dict], aggregates: list[dict], rules: LinkRules, partitions: int, workers: int,
                output: str, seconds: dict) -> dict:
    dropped, examples = Counter(), {}
    for result in files:
        dropped.update(result["dropped"])
        for reason, shown in result["examples"].items():
            examples.setdefault(reason, []).extend(shown)
    distinct = sum(a["distinct"] for a in aggregates)
    low_karma = sum(a["low_karma"] for a in aggregates)
    return {
        "output": output,
        "settings": {**asdict(rules), "partitions": partitions, "workers": workers},
        "inputs": [{key: f[key] for key in ("path", "bytes", "uncompressed_bytes", "read", "kept")} for f in files],
        "submissions": {
            "read": sum(f["read"] for f in files),
            "kept": sum(f["kept"] for f in files),
            "dropped": {reason: dropped[reason] for reason in SUBMISSION_DROP_REASONS},
            # every damaged file is listed (one each); other reasons show their first few
            "examples": {reason: examples[reason][:None if reason == "truncated_stream" else EXAMPLES_PER_REASON]
                         for reason in SUBMISSION_DROP_REASONS if reason in examples},
        },
        "urls": {"distinct": distinct, "written": distinct - low_karma, "dropped": {"low_karma": low_karma}},
        "bytes_in": sum(f["bytes"] for f in files),
        "bytes_uncompressed": sum(f["uncompressed_bytes"] for f in files),
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
    }


def summary_table(stats: dict) -> str:
    """The counts of a run, one row per drop reason, as printed by tools/reddit_urls.py."""
    submissions, urls = stats["submissions"], stats["urls"]

    def row(name: str, count: int, whole: int | None) -> str:
        share = f"{100 * count / whole:>9.1f}%" if whole else ""
        return f"{name:<28}{count:>14,}{share}"

    lines = [f"{'submissions':<28}{'count':>14}{'share':>10}", row("read", submissions["read"], submissions["read"])]
    lines += [row(f"  {reason}", count, submissions["read"])
              for reason, count in submissions["dropped"].items() if count]
    lines.append(row("kept (outbound links)", submissions["kept"], submissions["read"]))
    lines.append(f"{'urls':<28}{'count':>14}{'share':>10}")
    lines.append(row("distinct", urls["distinct"], urls["distinct"]))
    low_karma = f"  low_karma (< {stats['settings']['min_karma']})"
    lines.append(row(low_karma, urls["dropped"]["low_karma"], urls["distinct"]))
    lines.append(row("written", urls["written"], urls["distinct"]))
    return "\n".join(lines)
