"""data.prefixes resolved to shard prefixes and blend weights, each prefix checked against the tokenizer its
shards were made with. No torch: `python -m pretrain --check` runs this (pretrain/training/run_check.py)."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.tokenizers import Tokenizer


class DataError(ValueError):
    """Data settings that cannot work; names the setting and the file."""


def _shards_of(prefix: str, tokenizer_sha256: str) -> list[tuple[str, float]]:
    """(shard prefix, token count) for PREFIX: itself if PREFIX.bin exists, else the
    shards listed in PREFIX.json (written by tools/preprocess_data.py)."""
    if Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file():
        return [(prefix, 1.0)]
    summary_path = Path(prefix + ".json")
    if not summary_path.is_file():
        raise DataError(f"data.prefixes: neither {prefix}.bin/.idx nor {prefix}.json exists; "
                        "make shards with tools/preprocess_data.py --output-prefix PREFIX")
    summary = json.loads(summary_path.read_text())
    made_with = summary["tokenizer"]["sha256"]
    if made_with != tokenizer_sha256:
        raise DataError(f"{summary_path} was tokenized with {summary['tokenizer']['name']} (sha256 {made_with[:12]}), "
                        f"not with data.tokenizer (sha256 {tokenizer_sha256[:12]}); set data.tokenizer to match")
    directory = summary_path.parent
    return [(str(directory / shard["name"]), float(shard["tokens"])) for shard in summary["shards"]]


def resolve_blend(prefixes: list, tokenizer: Tokenizer) -> tuple[list[str], list[float]]:
    """data.prefixes -> (shard prefixes, weights). A prefix made of several shards
    shares its weight among them by token count."""
    if not prefixes:
        raise DataError("data.prefixes is empty; give shard prefixes, e.g. --set data.prefixes=[data/web]")
    if all(isinstance(p, str) for p in prefixes):
        weighted = [(1.0, p) for p in prefixes]
    elif len(prefixes) % 2 == 0 and all(isinstance(w, (int, float)) and isinstance(p, str)
                                        for w, p in zip(prefixes[::2], prefixes[1::2])):
        weighted = list(zip(map(float, prefixes[::2]), prefixes[1::2]))
    else:
        raise DataError(f"data.prefixes={prefixes!r} must be prefixes, or alternating weight and prefix")
    sha = tokenizer.identity()["sha256"]
    paths, weights = [], []
    for weight, prefix in weighted:
        shards = _shards_of(prefix, sha)
        total = sum(tokens for _, tokens in shards)
        for shard, tokens in shards:
            paths.append(shard)
            weights.append(weight * tokens / total)
    return paths, weights
