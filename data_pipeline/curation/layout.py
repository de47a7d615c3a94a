"""Where a curation run keeps its files, and what it is made from.

    OUTPUT/documents/NNNNN.jsonl.zst   kept documents, one file per input file
    OUTPUT/removed/                    every dropped record with its reason
    OUTPUT/stats.json                  written last: the run is finished when it exists
    OUTPUT/work/run.json               the inputs and config; a re-run must match them to resume
    OUTPUT/work/done/                  one small marker per finished task
    OUTPUT/work/filtered, keys, ...    survivors and dedup keys between phases; removed at the end
                                       unless --keep-work
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.atomic import write_text_atomically
from data_pipeline.curation.config import CurationConfig


class OutputMismatchError(ValueError):
    """The output directory holds a run made from other inputs or another config."""


@dataclass
class Layout:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root)
        self.work, self.documents, self.removed = self.root / "work", self.root / "documents", self.root / "removed"
        self.stats = self.root / "stats.json"

    def filtered(self, index: int) -> Path:
        return self.work / "filtered" / f"{index:05d}.jsonl.zst"

    def keys(self, index: int, kind: str) -> Path:
        return self.work / "keys" / f"{index:05d}.{kind}.bin"

    def marker(self, phase: str, index: int) -> Path:
        return self.work / "done" / f"{phase}-{index:05d}.json"

    @property
    def duplicates(self) -> Path:
        return self.work / "duplicates.npy"

    def make(self) -> None:
        for directory in (self.work / "filtered", self.work / "keys", self.work / "done", self.documents, self.removed):
            directory.mkdir(parents=True, exist_ok=True)

    def remove_work(self) -> None:
        """Everything under work/ but the markers and run.json: what a finished run no longer needs."""
        for path in self.work.iterdir():
            if path.name not in ("done", "run.json"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def claim_output(layout: Layout, inputs: list[str], config: CurationConfig) -> None:
    """Record what this output is made from; a re-run must match it to resume."""
    identity = {"inputs": inputs, "config": config.record()}
    path = layout.work / "run.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        recorded["config"].setdefault("output_format", "jsonl.zst")  # runs begun before the setting existed
        if recorded != json.loads(json.dumps(identity)):
            raise OutputMismatchError(f"{layout.root} holds a curation run of other inputs or another config "
                                      f"(see {path}); choose a new --output, or delete it to start over")
    write_text_atomically(path, json.dumps(identity, indent=1, sort_keys=True))
