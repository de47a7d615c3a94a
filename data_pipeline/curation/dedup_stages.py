"""Dedup as two stages, so its counts, time and drop reasons come out like every other stage's.

Dedup is global (a copy may sit in any input file), so it cannot decide one document
at a time. It is split around the global step (dedup_phase.py):
  dedup_keys      last stage of the filter phase: hashes each surviving document
                  (exact key, MinHash signature and bands) and hands the keys to the
                  executor's key files; keeps everything.
  exact_dedup,    first stages of the write phase: drop the documents the global step
  minhash_dedup   found to repeat an earlier one, naming it in `duplicate_of`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from data_pipeline.curation.dedup import REASON_CODES, MinHasher, MinHashSettings, exact_key
from data_pipeline.curation.document import Document, Stage


class DedupKeys(Stage):
    """Computes the dedup keys of each document and passes them to `sink(key, id, exact, signature, bands)`."""

    name = "dedup_keys"

    def __init__(self, minhash: MinHashSettings | None, sink: Callable):
        super().__init__()
        self.hasher = MinHasher(minhash) if minhash else None
        self.sink = sink

    def apply(self, doc: Document) -> Document:
        signature = bands = None
        if self.hasher is not None:
            signature = self.hasher.signature(doc.text)
            bands = self.hasher.band_hashes(signature)
        self.sink(doc.key, doc.id, exact_key(doc.text), signature, bands)
        return doc


class DropDuplicates(Stage):
    """Drops the documents of one input file that the global dedup removed for `kind` (exact or minhash).

    `duplicates` holds that file's rows of the dedup result (DUPLICATES_DTYPE: doc,
    kept, reason), sorted by doc; `original_id(key)` gives the id of a kept document.
    """

    def __init__(self, kind: str, duplicates: np.ndarray, original_id: Callable[[int], str]):
        self.name = f"{kind}_dedup"
        super().__init__()
        self.code, self.duplicates, self.original_id = REASON_CODES[kind], duplicates, original_id

    def apply(self, doc: Document) -> Document | str:
        at = int(np.searchsorted(self.duplicates["doc"], doc.key))
        if at == len(self.duplicates) or self.duplicates["doc"][at] != doc.key or self.duplicates["reason"][at] != self.code:
            return doc
        doc.metadata["duplicate_of"] = self.original_id(int(self.duplicates["kept"][at]))
        return f"{self.name}:duplicate"
