"""The curation executor: stages over input shards in worker processes, then a global dedup.

Three phases, each resumable:
  1. filter   one task per input file: read -> stages (normalize, filters) -> survivors
              to `work/filtered/NNNNN.jsonl.zst` with their dedup keys and MinHash
              signatures appended to `work/keys/NNNNN.*.bin`; every dropped or unreadable
              record to `removed/NNNNN.jsonl.zst` with its reason.
  2. dedup    bucket records of every survivor, spilled into partitions by hash so memory
              holds one partition at a time -> verified pairs -> clusters ->
              `work/duplicates.npy` (removed key, kept key, reason).
  3. write    one task per input file: survivors that are not duplicates to
              `documents/NNNNN.jsonl.zst`; duplicates to `removed/dedup-NNNNN.jsonl.zst`
              with the id of the document they duplicate.
A task writes under temporary names and leaves a `.done` marker last, so a re-run
skips finished work and produces the same bytes as an uninterrupted run. Stages
never know about workers or files; this module owns those.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.atomic import write_text_atomically
from data_pipeline.curation.dedup import (
    BUCKET_DTYPE,
    DUPLICATES_DTYPE,
    REASON_CODES,
    REASON_NAMES,
    MinHasher,
    MinHashSettings,
    bucket_records,
    document_key,
    exact_key,
    key_parts,
    cluster,
    partition_of,
    verified_pairs,
)
from data_pipeline.curation.distributed import Coordinator
from data_pipeline.curation.document import Document, Stage, StageStats
from data_pipeline.curation.filters import (
    C4Filter,
    FineWebFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
    LengthFilter,
    MetadataFilter,
    Normalize,
    UrlFilter,
)
from data_pipeline.curation.tasks import report, run_tasks
from data_pipeline.curation.writers import OUTPUT_FORMATS, JsonlZstWriter, document_writer
from data_pipeline.readers import chunk_records, iter_chunks, read_jsonl

log = logging.getLogger("curate")

STAGES: dict[str, type[Stage]] = {cls.name: cls for cls in (
    Normalize, MetadataFilter, UrlFilter, LengthFilter, GopherQualityFilter, GopherRepetitionFilter, C4Filter,
    FineWebFilter, LanguageFilter)}
DEDUP_STAGES = ("exact_dedup", "minhash_dedup")
SIGNATURE_FLUSH = 4096  # documents buffered before their keys are appended to disk
PROGRESS_EVERY = 4096  # documents written between two progress reports


class CurationConfigError(ValueError):
    """A curation config that cannot run; the message names the entry."""


@dataclass
class CurationConfig:
    stages: list[tuple[str, dict]]
    """Per-document stages, in order: (name, settings)."""
    exact_dedup: bool = False
    minhash: MinHashSettings | None = None
    text_key: str = "text"
    id_key: str = "id"
    memory_mb: float = 1024
    """Memory for one dedup partition of bucket records; more partitions spill to disk if needed."""
    output_format: str = "jsonl.zst"
    """Of the kept documents: jsonl.zst or parquet (removed/ is always jsonl.zst: its records vary in shape)."""

    @classmethod
    def from_dict(cls, data: dict) -> CurationConfig:
        unknown = set(data) - {"stages", "text_key", "id_key", "memory_mb", "output_format"}
        if unknown:
            raise CurationConfigError(f"unknown top-level keys {sorted(unknown)}; expected stages, text_key, "
                                      "id_key, memory_mb, output_format")
        stages, exact, minhash = [], False, None
        for position, entry in enumerate(data.get("stages") or []):
            name, settings = _stage_entry(entry, position)
            if name == "exact_dedup":
                exact = True
            elif name == "minhash_dedup":
                try:
                    minhash = MinHashSettings(**settings)
                except TypeError as error:
                    raise CurationConfigError(f"stages[{position}] minhash_dedup: {error}") from error
            elif exact or minhash:
                raise CurationConfigError(f"stages[{position}] {name} comes after a dedup stage; dedup is global "
                                          "and runs last, so list exact_dedup and minhash_dedup at the end")
            else:
                stages.append((name, settings))
        memory_mb = data.get("memory_mb", 1024)
        if not isinstance(memory_mb, (int, float)) or memory_mb <= 0:
            raise CurationConfigError(f"memory_mb={memory_mb!r} must be a positive number of megabytes")
        output_format = data.get("output_format", "jsonl.zst")
        if output_format not in OUTPUT_FORMATS:
            raise CurationConfigError(f"output_format={output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
        config = cls(stages, exact, minhash, data.get("text_key", "text"), data.get("id_key", "id"), memory_mb,
                     output_format)
        config.build_stages()  # refuse bad settings now, not in a worker
        return config

    def stage_labels(self) -> list[str]:
        """Each stage's name in stats, numbered from the second use on (metadata, metadata#2, ...)."""
        seen: dict[str, int] = {}
        labels = []
        for name, _ in self.stages:
            seen[name] = seen.get(name, 0) + 1
            labels.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
        return labels

    def build_stages(self) -> list[Stage]:
        built = []
        for position, (name, settings) in enumerate(self.stages):
            try:
                built.append(STAGES[name](**settings))
            except (TypeError, ValueError) as error:
                raise CurationConfigError(f"stages[{position}] {name}: {error}") from error
        return built


def _stage_entry(entry, position: int) -> tuple[str, dict]:
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise CurationConfigError(f"stages[{position}] must be a stage name or {{name: {{settings}}}}, got {entry!r}")
    (name, settings), = entry.items()
    if name not in STAGES and name not in DEDUP_STAGES:
        raise CurationConfigError(f"stages[{position}]: unknown stage {name!r}; known: "
                                  f"{', '.join([*STAGES, *DEDUP_STAGES])}")
    if settings is not None and not isinstance(settings, dict):
        raise CurationConfigError(f"stages[{position}] {name}: settings must be a mapping, got {settings!r}")
    return name, dict(settings or {})


def load_curation_config(path: str | Path) -> CurationConfig:
    import yaml

    with open(path, encoding="utf-8") as f:
        return CurationConfig.from_dict(yaml.safe_load(f) or {})


# ---- files ------------------------------------------------------------------------


@dataclass
class Layout:
    """Where everything goes under the output directory."""

    root: Path

    def __post_init__(self):
        self.root = Path(self.root)
        self.work, self.documents, self.removed = self.root / "work", self.root / "documents", self.root / "removed"

    def filtered(self, index: int) -> Path:
        return self.work / "filtered" / f"{index:05d}.jsonl.zst"

    def keys(self, index: int, kind: str) -> Path:
        return self.work / "keys" / f"{index:05d}.{kind}.bin"

    def marker(self, phase: str, index: int) -> Path:
        return self.work / "done" / f"{phase}-{index:05d}.json"

    def make(self) -> None:
        for directory in (self.work / "filtered", self.work / "keys", self.work / "done", self.documents, self.removed):
            directory.mkdir(parents=True, exist_ok=True)


# ---- phase 1: filter, one task per input file ---------------------------------------


@dataclass
class ShardTask:
    index: int
    path: str
    config: CurationConfig
    layout: Layout


@dataclass
class ShardResult:
    index: int
    read: int = 0
    unreadable: int = 0
    kept: int = 0
    removed: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    stages: dict = field(default_factory=dict)


def make_document(record: dict, number: int, path: str, config: CurationConfig) -> Document:
    metadata = {k: v for k, v in record.items() if k != config.text_key}
    identifier = metadata.get(config.id_key)
    source = f"{path}:{number + 1}"
    return Document(record[config.text_key], str(identifier) if identifier is not None else source, source, metadata)


def document_record(doc: Document, config: CurationConfig, **extra) -> dict:
    return {config.id_key: doc.id, config.text_key: doc.text, **{k: v for k, v in doc.metadata.items()
                                                                 if k != config.id_key}, **extra}


class KeyFiles:
    """Per-document dedup keys, appended to raw files in batches so memory stays flat."""

    KINDS = {"doc": np.int64, "exact": np.uint64, "bands": np.uint64, "signature": np.uint32}

    def __init__(self, layout: Layout, index: int, hasher: MinHasher | None):
        self.hasher, self.buffer = hasher, {kind: [] for kind in self.KINDS}
        self.files = {kind: open(layout.keys(index, kind), "wb") for kind in self.KINDS}
        self.ids = open(layout.keys(index, "ids"), "w", encoding="utf-8")  # one JSON string per line

    def add(self, key: int, text: str, identifier: str) -> None:
        self.ids.write(json.dumps(identifier) + "\n")
        self.buffer["doc"].append(key)
        self.buffer["exact"].append(exact_key(text))
        if self.hasher is not None:
            signature = self.hasher.signature(text)
            self.buffer["signature"].append(signature)
            self.buffer["bands"].append(self.hasher.band_hashes(signature))
        if len(self.buffer["doc"]) >= SIGNATURE_FLUSH:
            self.flush()

    def flush(self) -> None:
        for kind, values in self.buffer.items():
            if values:
                self.files[kind].write(np.asarray(values, dtype=self.KINDS[kind]).tobytes())
            values.clear()

    def close(self) -> None:
        self.flush()
        for f in self.files.values():
            f.close()
        self.ids.close()


def filter_shard(task: ShardTask) -> dict:
    """Phase 1 for one input file (in a worker process)."""
    began, config, layout = time.perf_counter(), task.config, task.layout
    stages = config.build_stages()
    hasher = MinHasher(config.minhash) if config.minhash else None
    result = ShardResult(task.index, bytes_in=input_size(task.path))
    kept_out = JsonlZstWriter(layout.filtered(task.index))
    removed_out = JsonlZstWriter(layout.removed / f"{task.index:05d}.jsonl.zst")
    keys = KeyFiles(layout, task.index, hasher)
    for chunk in iter_chunks(task.path, task.index, config.text_key, whole_records=True):
        records, numbers, skipped = chunk_records(chunk, config.text_key, config.id_key)
        report(len(records) + len(skipped), chunk.disk_bytes)
        result.read += len(records) + len(skipped)
        result.unreadable += len(skipped)
        for bad, raw in skipped:  # unreadable records are removed with their reason and content, never lost
            removed_out.write({"source": f"{bad.file}:{bad.line}", "reason": f"input:{bad.reason}",
                               "detail": bad.detail, "raw": raw})
        for record, number in zip(records, numbers):
            doc = make_document(record, number, task.path, config)
            for stage in stages:
                outcome = stage(doc)
                if isinstance(outcome, str):
                    removed_out.write(document_record(doc, config, source=doc.source, reason=outcome))
                    break
                doc = outcome
            else:
                kept_out.write(document_record(doc, config, source=doc.source))
                keys.add(document_key(task.index, number), doc.text, doc.id)
    keys.close()
    kept_out.commit()
    removed_out.commit()
    result.kept, result.removed = kept_out.count, removed_out.count
    result.stages = {label: stage.stats.to_dict() for label, stage in zip(config.stage_labels(), stages)}
    result.seconds = time.perf_counter() - began
    summary = {**result.__dict__, "documents": result.read, "bytes": result.bytes_in}
    write_text_atomically(layout.marker("filter", task.index), json.dumps(summary))
    return summary


def input_size(path: str) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


# ---- phase 2: global dedup ------------------------------------------------------------


class KeyStore:
    """Dedup keys of every input file, memory-mapped on demand and looked up by document key.

    Every rank looks keys up in every file, so nothing is read whole: the OS keeps
    only the pages touched, and at most MAPS_OPEN maps (each holding a file
    descriptor) are open at once, however many input files there are.
    """

    MAPS_OPEN = 96
    KINDS = {"doc": (np.int64, 1), "exact": (np.uint64, 2), "signature": (np.uint32, None)}

    def __init__(self, layout: Layout, indices: list[int], num_perm: int):
        self.layout, self.num_perm = layout, num_perm
        self.counts = {i: layout.keys(i, "doc").stat().st_size // 8 for i in indices}
        self.array = functools.lru_cache(maxsize=self.MAPS_OPEN)(self._map)

    def _map(self, kind: str, index: int) -> np.ndarray:
        dtype, width = self.KINDS[kind]
        array = mapped(self.layout.keys(index, kind), dtype)
        return array if width == 1 else array.reshape(-1, width or self.num_perm)

    def _lookup(self, kind: str, keys: np.ndarray) -> np.ndarray:
        """The `kind` rows of `keys`, in their order; one vectorised search per file."""
        files = keys >> 32  # document_key: file index in the high half
        found = None
        for index in np.unique(files).tolist():
            at = np.flatnonzero(files == index)
            rows = np.asarray(self.array(kind, index)[np.searchsorted(self.array("doc", index), keys[at])])
            if found is None:
                found = np.empty((len(keys), *rows.shape[1:]), rows.dtype)
            found[at] = rows
        return found

    def signatures_of(self, keys: np.ndarray) -> np.ndarray:
        return self._lookup("signature", keys)

    def exact_low_of(self, keys: np.ndarray) -> np.ndarray:
        return self._lookup("exact", keys)[:, 1]

    def bucket_records(self, index: int, config: CurationConfig) -> np.ndarray:
        keys = np.asarray(self.array("doc", index))
        bands = (np.fromfile(self.layout.keys(index, "bands"), dtype=np.uint64).reshape(len(keys), -1)
                 if config.minhash else np.empty((len(keys), 0), np.uint64))
        exact = np.asarray(self.array("exact", index)[:, 0]) if config.exact_dedup else None
        return bucket_records(keys, bands, exact)


def mapped(path: Path, dtype) -> np.ndarray:
    """A read-only memory map of a raw array file (numpy cannot map an empty file)."""
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.empty(0, dtype)


def spill_partitions(store: KeyStore, indices: list[int], config: CurationConfig, directory: Path,
                     co: Coordinator) -> list[Path]:
    """Bucket records of every document, routed by hash into partitions small enough for `memory_mb`.

    Partition p belongs to rank p % world: each rank sends the records of its own
    input files, one file per round, to the ranks owning their partitions (an
    all-to-all by bucket hash), and writes what it receives to its partition files.
    Returns this rank's partitions.
    """
    bands = config.minhash.bands if config.minhash else 0
    total = sum(store.counts.values()) * (bands + config.exact_dedup)
    count = max(co.world, math.ceil(total * BUCKET_DTYPE.itemsize / (config.memory_mb * 2**20)))
    directory.mkdir(parents=True, exist_ok=True)
    files = {p: open(directory / f"partition-{p:05d}.bin", "wb") for p in range(co.rank, count, co.world)}
    mine = [i for i in indices if co.owns(i)]
    for round_ in range(co.all_max(len(mine))):
        records = store.bucket_records(mine[round_], config) if round_ < len(mine) else np.empty(0, BUCKET_DTYPE)
        owner = partition_of(records, count)
        for received in co.all_to_all([records[owner % co.world == rank] for rank in range(co.world)]):
            partition = partition_of(received, count)
            for p, f in files.items():
                f.write(received[partition == p].tobytes())
    for f in files.values():
        f.close()
    return [Path(f.name) for f in files.values()]


def deduplicate(layout: Layout, indices: list[int], config: CurationConfig, co: Coordinator) -> np.ndarray:
    """Phase 2: every duplicate (removed key, kept key, reason code), sorted by key; cached in work/.

    Each rank verifies the candidate pairs of its own partitions; rank 0 joins
    them into clusters (pairs are few next to documents) and writes the result.
    """
    target = layout.work / "duplicates.npy"
    if target.is_file():
        return np.load(target, mmap_mode="r")
    began = time.perf_counter()
    store = KeyStore(layout, indices, config.minhash.num_perm if config.minhash else 0)
    partitions = spill_partitions(store, indices, config, layout.work / "buckets", co)
    pairs = verified_pairs((np.fromfile(p, dtype=BUCKET_DTYPE) for p in partitions), store.signatures_of,
                           store.exact_low_of, config.minhash or MinHashSettings(verify_threshold=0))
    gathered = co.gather(pairs)
    if co.rank == 0:
        duplicates = cluster(np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered]))
        partial = target.with_name("duplicates.partial.npy")
        np.save(partial, duplicates)
        os.replace(partial, target)
        shutil.rmtree(layout.work / "buckets", ignore_errors=True)
        log.info("dedup: %d duplicates among %d documents in %d partition(s) on %d rank(s), %.1f s",
                 len(duplicates), sum(store.counts.values()), len(partitions) * co.world, co.world,
                 time.perf_counter() - began)
    co.barrier()
    return np.load(target, mmap_mode="r")


# ---- phase 3: write, one task per input file -------------------------------------------


@dataclass
class WriteTask:
    index: int
    layout: Layout
    config: CurationConfig
    duplicates: dict[int, tuple[str, str]]
    """Removed key in this file -> (reason, id of the document it duplicates)."""


def write_shard(task: WriteTask) -> dict:
    """Phase 3 for one input file: the survivors that are not duplicates, and the duplicates with whom they repeat."""
    layout, config, began = task.layout, task.config, time.perf_counter()
    kept_records = (record for duplicate, record in survivors(task) if duplicate is None)
    kept = document_writer(layout.documents, task.index, config.output_format, config.text_key, config.id_key,
                           kept_records if config.output_format == "parquet" else None)
    removed = JsonlZstWriter(layout.removed / f"dedup-{task.index:05d}.jsonl.zst")
    for number, (duplicate, record) in enumerate(survivors(task)):
        if number % PROGRESS_EVERY == PROGRESS_EVERY - 1:
            report(PROGRESS_EVERY, 0)
        if duplicate is None:
            kept.write(record)
        else:
            reason, original = duplicate
            removed.write({**record, "reason": reason, "duplicate_of": original})
    kept.commit()
    removed.commit()
    summary = {"index": task.index, "kept": kept.count, "removed": removed.count, "bytes_out": kept.bytes,
               "seconds": time.perf_counter() - began, "documents": kept.count + removed.count, "bytes": kept.bytes}
    write_text_atomically(layout.marker("write", task.index), json.dumps(summary))
    return summary


def survivors(task: WriteTask):
    """(None, record) for each filtered document that is kept, ((reason, original id), record) for a duplicate."""
    keys = np.fromfile(task.layout.keys(task.index, "doc"), dtype=np.int64)
    for key, record in zip(keys.tolist(), read_jsonl(task.layout.filtered(task.index)), strict=True):
        duplicate = task.duplicates.get(key)
        if duplicate is None:
            record.pop("source", None)
        yield duplicate, record


def ids_of(layout: Layout, keys: set[int]) -> dict[int, str]:
    """The document ids of `keys`, read from each file's id list."""
    wanted: dict[int, set[int]] = {}
    for key in keys:
        wanted.setdefault(key_parts(key)[0], set()).add(key)
    found = {}
    for index, members in wanted.items():
        doc_keys = np.fromfile(layout.keys(index, "doc"), dtype=np.int64)
        rows = {int(np.searchsorted(doc_keys, key)): key for key in members}
        with open(layout.keys(index, "ids"), encoding="utf-8") as f:
            for row, line in enumerate(f):
                if row in rows:
                    found[rows[row]] = json.loads(line)
    return found


# ---- the driver --------------------------------------------------------------------------


class OutputMismatchError(ValueError):
    """The output directory holds a run made from other inputs or another config."""


def claim_output(layout: Layout, inputs: list[str], config: CurationConfig) -> None:
    """Record what this output is made from; a re-run must match it to resume."""
    identity = {"inputs": inputs, "config": config_record(config)}
    path = layout.work / "run.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        recorded["config"].setdefault("output_format", "jsonl.zst")  # runs begun before the setting existed
        if recorded != json.loads(json.dumps(identity)):
            raise OutputMismatchError(f"{layout.root} holds a curation run of other inputs or another config "
                                      f"(see {path}); choose a new --output, or delete it to start over")
    write_text_atomically(path, json.dumps(identity, indent=1, sort_keys=True))


def config_record(config: CurationConfig) -> dict:
    """The config as it decides the output: with the sha256 of every file a stage reads (a block list, a
    word list), so editing one between a kill and the resume is noticed."""
    stages = []
    for name, settings in config.stages:
        digests = {f"{key}_sha256": hashlib.sha256(Path(value).read_bytes()).hexdigest()
                   for key, value in settings.items() if key.endswith("_file") and value}
        stages.append((name, {**settings, **digests}))
    return {"stages": stages, "exact_dedup": config.exact_dedup, "text_key": config.text_key,
            "id_key": config.id_key, "minhash": config.minhash.__dict__ if config.minhash else None,
            "output_format": config.output_format}


def curate(inputs: list[str], output: str | Path, config: CurationConfig, workers: int = 1,
           show_progress: bool = True, comm=None) -> dict:
    """Curate `inputs` into `output`; resumes a run left unfinished there. Returns the stats.

    With an MPI communicator, ranks take input files round-robin and the dedup is
    global across all of them; every rank returns the same stats.
    """
    co, layout, began = Coordinator(comm), Layout(output), time.perf_counter()
    indices = list(range(len(inputs)))
    mine = [i for i in indices if co.owns(i)]
    label = f"rank {co.rank} " if co.world > 1 else ""

    def phase(work):
        """Run `work` on every rank; if any rank fails, all stop."""
        error, result = None, None
        try:
            result = work()
        except BaseException as failure:  # noqa: BLE001 - re-raised below, on every rank
            error = failure
        co.agree(error)
        return result

    def prepare_output():
        if co.rank == 0:
            layout.make()
            claim_output(layout, inputs, config)

    phase(prepare_output)
    todo = [i for i in mine if not layout.marker("filter", i).is_file()]
    phase(lambda: run_tasks(filter_shard, [ShardTask(i, inputs[i], config, layout) for i in todo], workers,
                            label + "filter", show_progress, total=sum(input_size(inputs[i]) for i in todo)))
    dedup_began = time.perf_counter()
    if config.exact_dedup or config.minhash:
        duplicates = phase(lambda: deduplicate(layout, indices, config, co))
    else:
        duplicates = np.empty(0, dtype=DUPLICATES_DTYPE)
    dedup_seconds = time.perf_counter() - dedup_began
    writes = phase(lambda: write_tasks(layout, config, duplicates, mine))
    phase(lambda: run_tasks(write_shard, writes, workers, label + "write", show_progress, unit="doc",
                            total=sum(json.loads(layout.marker("filter", t.index).read_text())["kept"] for t in writes)))
    stats = None
    if co.rank == 0:
        filtered = [json.loads(layout.marker("filter", i).read_text()) for i in indices]
        written = [json.loads(layout.marker("write", i).read_text()) for i in indices]
        stats = build_stats(inputs, config, filtered, duplicates, written, dedup_seconds, time.perf_counter() - began)
        write_text_atomically(layout.root / "stats.json", json.dumps(stats, indent=1))
    return co.broadcast(stats)


def write_tasks(layout: Layout, config: CurationConfig, duplicates: np.ndarray, mine: list[int]) -> list[WriteTask]:
    """Phase 3 tasks for this rank's unfinished files, each with its duplicates and whom they duplicate."""
    todo = [i for i in mine if not layout.marker("write", i).is_file()]
    in_todo = np.isin(duplicates["doc"] >> 32, todo)
    originals = ids_of(layout, set(duplicates["kept"][in_todo].tolist()))
    per_file: dict[int, dict] = {i: {} for i in todo}
    for doc, kept, reason in duplicates[in_todo].tolist():
        per_file[key_parts(doc)[0]][doc] = (f"{REASON_NAMES[reason]}_dedup", originals[kept])
    return [WriteTask(i, layout, config, per_file[i]) for i in todo]


def build_stats(inputs: list[str], config: CurationConfig, filtered: list[dict], duplicates: np.ndarray,
                written: list[dict], dedup_seconds: float, seconds: float) -> dict:
    """Counts per stage and reason, bytes in and out, time per stage; checks kept + removed = read."""
    read = sum(f["read"] for f in filtered)
    unreadable = sum(f["unreadable"] for f in filtered)
    stages: dict[str, StageStats] = {}
    for f in filtered:
        for name, data in f["stages"].items():
            stages.setdefault(name, StageStats(name)).add(StageStats.from_dict(name, data))
    rows = {"input": {"seen": read, "kept": read - unreadable, "dropped": {"input:unreadable": unreadable}, "seconds": 0}}
    rows.update({name: stat.to_dict() for name, stat in stages.items()})
    survivors = sum(f["kept"] for f in filtered)
    for reason, enabled in (("exact", config.exact_dedup), ("minhash", config.minhash is not None)):
        if enabled:
            name, dropped = f"{reason}_dedup", int((duplicates["reason"] == REASON_CODES[reason]).sum())
            rows[name] = {"seen": survivors, "kept": survivors - dropped, "dropped": {name: dropped},
                          "seconds": round(dedup_seconds, 3)}
            survivors -= dropped
    kept = sum(w["kept"] for w in written)
    removed = sum(f["removed"] for f in filtered) + sum(w["removed"] for w in written)
    if kept + removed != read:
        raise RuntimeError(f"curation lost documents: read {read}, kept {kept}, removed {removed}")
    return {"inputs": len(inputs), "read": read, "kept": kept, "removed": removed,
            "bytes_in": sum(f["bytes_in"] for f in filtered), "bytes_out": sum(w["bytes_out"] for w in written),
            "seconds": round(seconds, 3), "stages": rows}


def summary_table(stats: dict) -> str:
    lines = [f"{'stage':<20}{'kept':>12}{'dropped':>12}{'dropped %':>11}{'seconds':>10}"]
    for name, row in stats["stages"].items():
        dropped = sum(row["dropped"].values())
        share = 100 * dropped / row["seen"] if row["seen"] else 0.0
        lines.append(f"{name:<20}{row['kept']:>12,}{dropped:>12,}{share:>10.1f}%{row['seconds']:>10.1f}")
    lines.append(f"{'total':<20}{stats['kept']:>12,}{stats['removed']:>12,}"
                 f"{100 * stats['removed'] / max(stats['read'], 1):>10.1f}%{stats['seconds']:>10.1f}")
    return "\n".join(lines)
