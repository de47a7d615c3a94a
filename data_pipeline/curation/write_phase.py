"""Phase 3, one task per input file: the survivors pass the dedup stages; kept documents go to
documents/NNNNN.jsonl.zst (or .parquet), duplicates to removed/dedup-NNNNN.jsonl.zst naming the
document they repeat."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from data_pipeline.atomic import write_text_atomically
from data_pipeline.curation.config import CurationConfig
from data_pipeline.curation.dedup_phase import duplicates_of_file
from data_pipeline.curation.dedup_stages import DropDuplicates
from data_pipeline.curation.document import Document, Stage
from data_pipeline.curation.filter_phase import SOURCE_FIELD, document_record, run_stages
from data_pipeline.curation.keys import KeyStore
from data_pipeline.curation.layout import Layout
from data_pipeline.curation.tasks import report
from data_pipeline.curation.writers import JsonlZstWriter, document_writer
from data_pipeline.readers import read_jsonl

PROGRESS_EVERY = 4096  # documents written between two progress reports


@dataclass
class WriteTask:
    index: int
    layout: Layout
    config: CurationConfig
    keep_work: bool = False


def dedup_stages(task: WriteTask) -> list[Stage]:
    """The write phase's stages for this file: exact, then minhash, each with the file's rows of the dedup result."""
    if not task.config.deduplicates:
        return []
    rows = duplicates_of_file(np.load(task.layout.duplicates, mmap_mode="r"), task.index)
    store = KeyStore(task.layout)
    kinds = [kind for kind, enabled in (("exact", task.config.exact_dedup), ("minhash", task.config.minhash))
             if enabled]
    return [DropDuplicates(kind, rows, store.id_of) for kind in kinds]


def survivors(task: WriteTask) -> Iterator[Document]:
    """The documents the filter phase kept, as it kept them, with their keys."""
    layout, config = task.layout, task.config
    if config.deduplicates:
        keys = map(int, np.fromfile(layout.keys(task.index, "doc"), dtype=np.int64))  # 8 bytes a key, not an int object
    else:
        keys = itertools.repeat(-1)  # no dedup: no stage reads the key
    for key, record in zip(keys, read_jsonl(layout.filtered(task.index)), strict=config.deduplicates):
        text, source = record.pop(config.text_key), record.pop(SOURCE_FIELD)
        yield Document(text, record[config.id_key], source, record, key)


def write_shard(task: WriteTask) -> dict:
    """Phase 3 for one input file."""
    layout, config, began = task.layout, task.config, time.perf_counter()
    stages = dedup_stages(task)
    kept_ahead = None
    if config.output_format == "parquet":  # the schema is settled by reading the kept documents ahead
        ahead = dedup_stages(task)
        kept_ahead = (document_record(d, config) for d in survivors(task) if not isinstance(run_stages(d, ahead), str))
    kept = document_writer(layout.documents, task.index, config.output_format, config.text_key, config.id_key,
                           kept_ahead)
    removed = JsonlZstWriter(layout.removed / f"dedup-{task.index:05d}.jsonl.zst")
    for number, doc in enumerate(survivors(task)):
        if number % PROGRESS_EVERY == PROGRESS_EVERY - 1:
            report(PROGRESS_EVERY, 0)
        outcome = run_stages(doc, stages)
        if isinstance(outcome, str):
            removed.write(document_record(doc, config, source=doc.source, reason=outcome))
        else:
            kept.write(document_record(doc, config))
    kept.commit()
    removed.commit()
    summary = {"index": task.index, "kept": kept.count, "removed": removed.count, "bytes_out": kept.bytes,
               "seconds": time.perf_counter() - began, "documents": kept.count + removed.count, "bytes": kept.bytes,
               "stages": {stage.name: stage.stats.to_dict() for stage in stages}}
    write_text_atomically(layout.marker("write", task.index), json.dumps(summary))
    if not task.keep_work:
        layout.filtered(task.index).unlink()  # read by this task alone; its marker now stands for it
    return summary
