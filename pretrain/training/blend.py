"""data.prefixes resolved to shard prefixes and blend weights, each prefix checked against the tokenizer its
shards were made with. No torch: `python -m pretrain --check` runs this (pretrain/training/run_check.py)."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.tokenizers import Tokenizer


class DataError(ValueError):
    """Data settings that cannot work; names the setting and the file."""


# Megatron's .idx header: 9 bytes of magic, a version (<Q), then the token dtype's code; the code's item size.
_IDX_DTYPE_OFFSET = 17
_ITEM_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}


def bare_shard_tokens(prefix: str) -> int:
    """The token count of PREFIX.bin, from its size and the item size its .idx names (no index read)."""
    with open(prefix + ".idx", "rb") as index:
        header = index.read(_IDX_DTYPE_OFFSET + 1)
    code = header[_IDX_DTYPE_OFFSET] if len(header) > _IDX_DTYPE_OFFSET else None
    if not header.startswith(b"MMIDIDX") or code not in _ITEM_SIZES:
        raise DataError(f"data.prefixes: {prefix}.idx is not a Megatron index file; "
                        "make shards with tools/preprocess_data.py --output-prefix PREFIX")
    return Path(prefix + ".bin").stat().st_size // _ITEM_SIZES[code]


def _shards_of(prefix: str, tokenizer_sha256: str) -> list[tuple[str, float]]:
    """(shard prefix, token count) for PREFIX: itself if PREFIX.bin exists, else the
    shards listed in PREFIX.json (written by tools/preprocess_data.py)."""
    if Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file():
        return [(prefix, float(bare_shard_tokens(prefix)))]
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


def resolve_blend(prefixes: list, tokenizer: Tokenizer, sample_tokens: int = 1) -> tuple[list[str], list[float]]:
    """data.prefixes -> (shard prefixes, weights). A prefix made of several shards
    shares its weight among them by token count. A prefix with fewer than `sample_tokens`
    tokens (one training sample: model.n_positions + 1) is refused: megatron-core would
    fail on an empty one and fill samples from one short document repeated over and over."""
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
        if total < sample_tokens:
            summary = Path(prefix + ".json")
            why = (f"its documents may all have been filtered out or skipped (see {summary}); "
                   if summary.is_file() and not Path(prefix + ".bin").is_file() else "")
            raise DataError(f"data.prefixes: {prefix} holds {int(total)} tokens, fewer than one training sample needs "
                            f"({sample_tokens} = model.n_positions + 1); {why}give it more text")
        for shard, tokens in shards:
            paths.append(shard)
            weights.append(weight * tokens / total)
    return paths, weights
