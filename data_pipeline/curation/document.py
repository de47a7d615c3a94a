"""A document in the curation pipeline, and the two kinds of stage that process it.

A `Stage` sees one document at a time and returns it (possibly changed) or a
drop reason; it counts what it did in its `StageStats`. A `Filter` is a stage
that only decides: `reason(doc)` is None to keep, or a short code such as
"gopher_quality:stop_words" to drop. Stages know nothing of workers, files or
MPI ranks: the executor (pipeline.py) owns those.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Document:
    text: str
    id: str
    """The record's own id if it has one (`id_key`), else `file:line`."""
    source: str
    """Where it came from, `file:line`, for reports."""
    metadata: dict = field(default_factory=dict)
    """Every other field of the input record (url, score, ...), written back out unchanged."""
    key: int = -1
    """Its place in the corpus, `input file index << 32 | record number` (dedup.document_key): the
    earliest of several copies is the one with the smallest key."""


@dataclass
class StageStats:
    name: str
    seen: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def add(self, other: StageStats) -> None:
        self.seen += other.seen
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.seconds += other.seconds

    def to_dict(self) -> dict:
        return {"seen": self.seen, "kept": self.kept, "dropped": dict(sorted(self.dropped.items())),
                "seconds": round(self.seconds, 3)}

    @classmethod
    def from_dict(cls, name: str, data: dict) -> StageStats:
        return cls(name, data["seen"], data["kept"], Counter(data["dropped"]), data["seconds"])


class Stage:
    """One step over documents. Subclasses set `name` and implement `apply`."""

    name = "stage"

    def __init__(self):
        self.stats = StageStats(self.name)

    def apply(self, doc: Document) -> Document | str:
        """The document to pass on, or a drop reason."""
        raise NotImplementedError

    def __call__(self, doc: Document) -> Document | str:
        began = time.perf_counter()
        result = self.apply(doc)
        self.stats.seconds += time.perf_counter() - began
        self.stats.seen += 1
        if isinstance(result, str):
            self.stats.dropped[result] += 1
        else:
            self.stats.kept += 1
        return result


class Filter(Stage):
    """A stage that keeps or drops, never changes the text."""

    def reason(self, doc: Document) -> str | None:
        """None to keep; a drop reason (`<filter>:<rule>`) otherwise."""
        raise NotImplementedError

    def apply(self, doc: Document) -> Document | str:
        reason = self.reason(doc)
        return doc if reason is None else reason
