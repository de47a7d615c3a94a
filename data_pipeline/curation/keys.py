"""Per-document dedup keys on disk, one set of raw array files per input file.

work/keys/NNNNN.<kind>.bin, one row per document that reached dedup, in input order:
    doc        int64      the document key (file index << 32 | record number), ascending
    exact      2 x uint64 xxh3-128 of the text
    signature  P x uint32 MinHash signature (minhash_dedup only)
    bands      B x uint64 hash of each band of the signature (minhash_dedup only)
    ids        the document ids, one JSON string per line
    idpos      int64      byte offset of each line of `ids`, and the end: an id is found without a scan
Arrays rather than Python objects, so that bookkeeping per document stays a few dozen bytes
at hundreds of millions of documents.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from data_pipeline.curation.dedup import bucket_records
from data_pipeline.curation.layout import Layout

SIGNATURE_FLUSH = 4096  # documents buffered before their keys are appended to disk


class KeyFiles:
    """Writes one input file's keys, appended in batches so memory stays flat."""

    KINDS = {"doc": np.int64, "exact": np.uint64, "bands": np.uint64, "signature": np.uint32, "idpos": np.int64}

    def __init__(self, layout: Layout, index: int):
        self.buffer = {kind: [] for kind in self.KINDS}
        self.files = {kind: open(layout.keys(index, kind), "wb") for kind in self.KINDS}
        self.ids = open(layout.keys(index, "ids"), "wb")

    def add(self, key: int, identifier: str, exact: tuple[int, int], signature: np.ndarray | None,
            bands: np.ndarray | None) -> None:
        self.buffer["idpos"].append(self.ids.tell())
        self.ids.write(json.dumps(identifier).encode() + b"\n")
        self.buffer["doc"].append(key)
        self.buffer["exact"].append(exact)
        if signature is not None:
            self.buffer["signature"].append(signature)
            self.buffer["bands"].append(bands)
        if len(self.buffer["doc"]) >= SIGNATURE_FLUSH:
            self.flush()

    def flush(self) -> None:
        for kind, values in self.buffer.items():
            if values:
                self.files[kind].write(np.asarray(values, dtype=self.KINDS[kind]).tobytes())
            values.clear()

    def close(self) -> None:
        self.buffer["idpos"].append(self.ids.tell())
        self.flush()
        for f in self.files.values():
            f.close()
        self.ids.close()


def mapped(path: Path, dtype) -> np.ndarray:
    """A read-only memory map of a raw array file (numpy cannot map an empty file)."""
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.empty(0, dtype)


class KeyStore:
    """The keys of every input file, memory-mapped on demand and looked up by document key.

    Every rank looks keys up in every file, so nothing is read whole: the OS keeps
    only the pages touched, and at most MAPS_OPEN maps (each holding a file
    descriptor) are open at once, however many input files there are.
    """

    MAPS_OPEN = 96
    KINDS = {"doc": (np.int64, 1), "exact": (np.uint64, 2), "signature": (np.uint32, None), "idpos": (np.int64, 1),
             "ids": (np.uint8, 1)}

    def __init__(self, layout: Layout, num_perm: int = 0):
        self.layout, self.num_perm = layout, num_perm
        self.array = functools.lru_cache(maxsize=self.MAPS_OPEN)(self._map)

    def count(self, index: int) -> int:
        return self.layout.keys(index, "doc").stat().st_size // 8

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

    def id_of(self, key: int) -> str:
        index = key >> 32
        row = int(np.searchsorted(self.array("doc", index), key))
        start, end = self.array("idpos", index)[row:row + 2].tolist()
        return json.loads(self.array("ids", index)[start:end].tobytes())

    def bucket_records(self, index: int, bands: int, exact: bool) -> np.ndarray:
        keys = np.asarray(self.array("doc", index))
        band_hashes = np.fromfile(self.layout.keys(index, "bands"), dtype=np.uint64).reshape(len(keys), bands)
        return bucket_records(keys, band_hashes, np.asarray(self.array("exact", index)[:, 0]) if exact else None)
