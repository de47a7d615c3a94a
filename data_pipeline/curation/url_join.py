"""The WebText join: each crawled page gets the Reddit record of its URL (karma, submissions, first date).

tools/reddit_urls.py writes the URL list, one JSON object per distinct normalized URL:
{"url", "score", "submissions", "first_created_utc"}. A page matches the record of its own
URL, or of any URL that redirected to it in the archive (the WARC reader records those as
`redirected_from`), after the same normalization; the highest-karma match wins. A page
with no match is dropped: only pages the list links to belong to WebText.

A year of Reddit links is tens of millions of URLs, too many to hold as a Python dict in
every worker. So the list becomes, once per run, a sorted array of 64-bit URL hashes
with the numbers beside them (work/url_index.npy); workers memory-map it and look pages
up by binary search. When the join is the first stage, web archive pages are looked up before
their HTML is extracted, so a Common Crawl file costs extraction only for the listed pages
(filter_phase.py); the removed record of an unlisted page holds its URL, not its text.

Two distinct URLs share a hash with probability about n^2 / 2^65
(1e-5 for 30M URLs); of such a pair (or of a URL listed twice) the first row is found.
"""

from __future__ import annotations

import array
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import xxhash

from data_pipeline.curation.document import Document, Stage
from data_pipeline.readers import InputError
from data_pipeline.webtext.urls import normalize_url

log = logging.getLogger("curate")

INDEX_DTYPE = np.dtype([("hash", "<u8"), ("score", "<i8"), ("submissions", "<i8"), ("first_created_utc", "<i8")])
FIELDS = ("score", "submissions", "first_created_utc")
UNLISTED = "metadata:not_in_url_list"  # named after the metadata a page lacks, like the metadata filter's reasons


def url_hash(normalized: str) -> int:
    return xxhash.xxh3_64_intdigest(normalized.encode())


def build_url_index(urls_file: str) -> np.ndarray:
    """The URL list as INDEX_DTYPE rows sorted by hash; a bad line is an error naming it."""
    columns = {name: array.array("q") for name in FIELDS}  # 8 bytes a value while reading, not a tuple a row
    hashes = array.array("Q")
    with open(urls_file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                normalized = normalize_url(record["url"])
                values = tuple(int(record[name]) for name in FIELDS)
            except (ValueError, KeyError, TypeError) as error:
                raise InputError(f"{urls_file}:{number}: not a URL-list record {{url, score, submissions, "
                                 f"first_created_utc}} ({type(error).__name__}: {error}); make the list with "
                                 "tools/reddit_urls.py") from error
            if normalized is None:
                raise InputError(f"{urls_file}:{number}: {record['url']!r} is not an http(s) URL")
            hashes.append(url_hash(normalized))
            for name, value in zip(FIELDS, values):
                columns[name].append(value)
    order = np.argsort(np.frombuffer(hashes, dtype=np.uint64), kind="stable")
    index = np.empty(len(hashes), dtype=INDEX_DTYPE)
    index["hash"] = np.frombuffer(hashes, dtype=np.uint64)[order]
    for name in FIELDS:
        index[name] = np.frombuffer(columns[name], dtype=np.int64)[order]
    return index


class UrlMetadata(Stage):
    """Joins a page to its URL's record in `urls_file`; drops it as `metadata:not_in_url_list` otherwise."""

    name = "url_metadata"

    def __init__(self, urls_file: str | None = None, field: str = "url", index: str | None = None):
        super().__init__()
        if not urls_file:
            raise ValueError("url_metadata needs urls_file: pass --url-metadata urls.jsonl (made by "
                             "tools/reddit_urls.py)")
        if not os.path.isfile(urls_file):
            raise ValueError(f"url_metadata.urls_file: {urls_file} does not exist")
        self.urls_file, self.field, self.index_path = urls_file, field, index
        self.index: np.ndarray | None = None  # loaded on first use, in the worker

    @classmethod
    def prepare(cls, settings: dict, work: Path, build: bool = True) -> dict:
        """Once per run, before the workers start: the sorted index under `work` (one per list), and its
        path in the settings. With `build` false (ranks but the first) it must be there already."""
        path = work / f"url_index-{xxhash.xxh3_64_hexdigest(os.path.abspath(settings['urls_file']).encode())}.npy"
        if not path.is_file():
            if not build:
                raise FileNotFoundError(f"{path} is missing: the first rank builds it, and every rank must see "
                                        "the output directory (a shared file system)")
            began = time.perf_counter()
            index = build_url_index(settings["urls_file"])
            log.info("url_metadata: %d URLs of %s indexed in %.1f s", len(index), settings["urls_file"],
                     time.perf_counter() - began)
            partial = path.with_name(path.name + ".partial")
            with open(partial, "wb") as f:
                np.save(f, index)
            os.replace(partial, path)
        return {**settings, "index": str(path)}

    def _lookup(self, url) -> np.ndarray | None:
        normalized = normalize_url(url) if isinstance(url, str) else None
        if normalized is None:
            return None
        hashes, wanted = self.index["hash"], url_hash(normalized)
        at = int(np.searchsorted(hashes, np.uint64(wanted)))
        return self.index[at] if at < len(hashes) and int(hashes[at]) == wanted else None

    def best_match(self, url, redirected_from) -> np.void | None:
        """The highest-karma record of `url` or of a URL that redirected to it, or None."""
        if self.index is None:
            self.index = (np.load(self.index_path, mmap_mode="r") if self.index_path
                          else build_url_index(self.urls_file))
        candidates = [url, *(redirected_from if isinstance(redirected_from, list) else [])]
        matches = [row for row in map(self._lookup, candidates) if row is not None]
        return max(matches, key=lambda row: int(row["score"])) if matches else None

    def count_unlisted(self) -> str:
        """Count a page found unlisted before it became a document (its text never extracted); its reason."""
        self.stats.seen += 1
        self.stats.dropped[UNLISTED] += 1
        return UNLISTED

    def apply(self, doc: Document) -> Document | str:
        best = self.best_match(doc.metadata.get(self.field), doc.metadata.get("redirected_from"))
        if best is None:
            return UNLISTED
        doc.metadata.update({name: int(best[name]) for name in FIELDS})
        return doc
