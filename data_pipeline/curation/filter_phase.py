"""Phase 1, one task per input file: read -> stages -> survivors, their dedup keys, and every removal.

Survivors go to work/filtered/NNNNN.jsonl.zst and their keys to work/keys/ (keys.py);
every dropped or unreadable record goes to removed/NNNNN.jsonl.zst with its reason.
The task's marker, written last, holds its counts and stage stats.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.atomic import write_text_atomically
from data_pipeline.curation.config import CurationConfig
from data_pipeline.curation.dedup import document_key
from data_pipeline.curation.dedup_stages import DedupKeys
from data_pipeline.curation.document import Document, Stage
from data_pipeline.curation.keys import KeyFiles
from data_pipeline.curation.layout import Layout
from data_pipeline.curation.tasks import report
from data_pipeline.curation.writers import JsonlZstWriter
from data_pipeline.curation.url_join import UrlMetadata
from data_pipeline.readers import Chunk, chunk_records, iter_chunks
from data_pipeline.warc import WarcItem


SOURCE_FIELD = "__curation_source"  # where a survivor's file:line waits in work/ (a record may have its own "source")


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
    unreadable_reasons: Counter = field(default_factory=Counter)
    """How many records became no document, by reason (http_status, not_html, malformed_json, ...)."""
    kept: int = 0
    removed: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    stages: dict = field(default_factory=dict)


def make_document(record: dict, number: int, path: str, file_index: int, config: CurationConfig) -> Document:
    metadata = {k: v for k, v in record.items() if k != config.text_key}
    identifier = metadata.get(config.id_key)
    source = f"{path}:{number + 1}"
    return Document(record[config.text_key], str(identifier) if identifier is not None else source, source, metadata,
                    document_key(file_index, number))


def document_record(doc: Document, config: CurationConfig, **extra) -> dict:
    return {config.id_key: doc.id, config.text_key: doc.text, **{k: v for k, v in doc.metadata.items()
                                                                 if k != config.id_key}, **extra}


def run_stages(doc: Document, stages: list[Stage]) -> Document | str:
    """The document after every stage, or the reason of the first stage that dropped it."""
    for stage in stages:
        doc = stage(doc)
        if isinstance(doc, str):
            return doc
    return doc


def unlisted_pages(chunk: Chunk, join: UrlMetadata) -> list[tuple[int, WarcItem]]:
    """Take the web archive pages the URL list does not hold out of `chunk` (set to None) before their
    HTML is extracted, counted as the join's drops: in a Common Crawl file nearly every page is one."""
    unlisted = []
    for offset, item in enumerate(chunk.items):
        if join.best_match(item.url, item.redirected_from) is None:
            unlisted.append((chunk.first_record + offset, item))
            chunk.items[offset] = None
    return unlisted


def filter_shard(task: ShardTask) -> dict:
    """Phase 1 for one input file (in a worker process)."""
    began, config, layout = time.perf_counter(), task.config, task.layout
    stages, labels = config.build_stages(), config.stage_labels()
    result = ShardResult(task.index, bytes_in=input_size(task.path))
    kept_out = JsonlZstWriter(layout.filtered(task.index))
    removed_out = JsonlZstWriter(layout.removed / f"{task.index:05d}.jsonl.zst")
    keys = KeyFiles(layout, task.index) if config.deduplicates else None
    if keys is not None:
        stages, labels = [*stages, DedupKeys(config.minhash, keys.add)], [*labels, DedupKeys.name]
    join_first = stages[0] if stages and isinstance(stages[0], UrlMetadata) else None
    for chunk in iter_chunks(task.path, task.index, config.text_key, whole_records=True):
        unlisted = unlisted_pages(chunk, join_first) if join_first and chunk.kind == "warc" else []
        for number, item in unlisted:
            removed_out.write({config.id_key: item.record_id, "url": item.url, "date": item.date,
                               **({"redirected_from": item.redirected_from} if item.redirected_from else {}),
                               "source": f"{task.path}:{number + 1}", "reason": join_first.count_unlisted()})
        records, numbers, skipped = chunk_records(chunk, config.text_key, config.id_key)
        report(len(records) + len(skipped) + len(unlisted), chunk.disk_bytes)
        result.read += len(records) + len(skipped) + len(unlisted)
        result.unreadable += len(skipped)
        for bad, raw in skipped:  # unreadable records are removed with their reason and content, never lost
            result.unreadable_reasons[f"input:{bad.reason}"] += 1
            removed_out.write({"source": f"{bad.file}:{bad.line}", "reason": f"input:{bad.reason}",
                               "detail": bad.detail, "raw": raw})
        for record, number in zip(records, numbers):
            doc = make_document(record, number, task.path, task.index, config)
            outcome = run_stages(doc, stages)
            if isinstance(outcome, str):
                removed_out.write(document_record(doc, config, source=doc.source, reason=outcome))
            else:
                kept_out.write(document_record(outcome, config, **{SOURCE_FIELD: doc.source}))
    if keys is not None:
        keys.close()
    kept_out.commit()
    removed_out.commit()
    result.kept, result.removed = kept_out.count, removed_out.count
    result.stages = {label: stage.stats.to_dict() for label, stage in zip(labels, stages)}
    result.seconds = time.perf_counter() - began
    summary = {**result.__dict__, "documents": result.read, "bytes": result.bytes_in}
    write_text_atomically(layout.marker("filter", task.index), json.dumps(summary))
    return summary


def input_size(path: str) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
