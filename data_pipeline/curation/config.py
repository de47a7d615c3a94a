"""The curation config: which stages run, in what order, with what settings; validated once, at start-up.

A config is a list of stages (YAML, see configs/data/), each a name or {name: {settings}}.
`exact_dedup` and `minhash_dedup` are global and must come last; they become two stages
of their own (dedup_keys in the filter phase, the duplicate removal in the write phase).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from data_pipeline.curation.dedup import MinHashSettings
from data_pipeline.curation.document import Stage
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
from data_pipeline.curation.url_join import UrlMetadata
from data_pipeline.curation.writers import OUTPUT_FORMATS
from data_pipeline.tokenizers import sha256_of_file

STAGES: dict[str, type[Stage]] = {cls.name: cls for cls in (
    Normalize, UrlMetadata, MetadataFilter, UrlFilter, LengthFilter, GopherQualityFilter, GopherRepetitionFilter,
    C4Filter, FineWebFilter, LanguageFilter)}
DEDUP_STAGES = ("exact_dedup", "minhash_dedup")
TOP_LEVEL_KEYS = ("stages", "text_key", "id_key", "memory_mb", "output_format")


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

    @property
    def deduplicates(self) -> bool:
        return self.exact_dedup or self.minhash is not None

    @classmethod
    def from_dict(cls, data: dict) -> CurationConfig:
        unknown = set(data) - set(TOP_LEVEL_KEYS)
        if unknown:
            raise CurationConfigError(f"unknown top-level keys {sorted(unknown)}; expected {', '.join(TOP_LEVEL_KEYS)}")
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

    def with_url_metadata(self, urls_file: str) -> CurationConfig:
        """This config joining every document to `urls_file` (tools/reddit_urls.py's output) first:
        the setting of a url_metadata stage it lists, else a new first stage."""
        stages = [(name, {**settings, "urls_file": urls_file}) if name == UrlMetadata.name else (name, settings)
                  for name, settings in self.stages]
        if not any(name == UrlMetadata.name for name, _ in stages):
            stages.insert(0, (UrlMetadata.name, {"urls_file": urls_file}))
        joined = replace(self, stages=stages)
        joined.build_stages()
        return joined

    def prepared(self, work: Path, build: bool = True) -> CurationConfig:
        """The config the workers run: a stage with a `prepare` step (an index built once per run, under
        `work`) gets the settings it returns. Build on one rank; the others find what it built."""
        stages = [(name, STAGES[name].prepare(settings, work, build) if hasattr(STAGES[name], "prepare")
                   else settings) for name, settings in self.stages]
        return replace(self, stages=stages)

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

    def record(self) -> dict:
        """The config as it decides the output, with the sha256 of every file a stage reads (a block
        list, a word list, a URL list), so editing one between a kill and the resume is noticed."""
        stages = []
        for name, settings in self.stages:
            digests = {f"{key}_sha256": sha256_of_file(value)
                       for key, value in settings.items() if key.endswith("_file") and value}
            stages.append((name, {**settings, **digests}))
        return {"stages": stages, "exact_dedup": self.exact_dedup, "text_key": self.text_key,
                "id_key": self.id_key, "minhash": self.minhash.__dict__ if self.minhash else None,
                "output_format": self.output_format}


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
