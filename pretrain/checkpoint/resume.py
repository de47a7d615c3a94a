"""Which checkpoint a run continues from, and every reason it would refuse to: read from the files alone.

No torch: `python -m pretrain --check` and `python -m pretrain.launch` run this before any rank starts
(pretrain/training/run_check.py), so a run that would stop at its resume says so in a second, once; the
trainer takes the same answer at start-up. sharded.py writes what this reads (`latest`, `manifest.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
LATEST = "latest"
MODEL_SHAPE_KEYS = ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; names the file or the mismatch."""


@dataclass
class ResumePoint:
    tag: str
    manifest: dict
    reshard: bool
    """Saved with another layout (TP, PP, DP or ZeRO stage): load it through the universal form."""
    weights_only: bool = False
    """A step-0 checkpoint on another layout or precision: it has no optimizer history, so only its
    weights are loaded (any layout, ZeRO stage and precision) and the optimizer starts fresh."""
    data_changes: list[str] = field(default_factory=list)
    """What decides the data order and differs from the checkpoint (allowed by checkpoint.allow_data_change)."""
    ours: dict | None = None
    """This run's layout record."""

    def describe(self) -> str:
        how = ("its weights only (step 0)" if self.weights_only
               else f"resharded from {reshard_text(self.manifest['layout'], self.ours)}" if self.reshard
               else "same layout")
        return f"{self.tag} at step {self.manifest['step']} ({how})"


def layout_text(record: dict, cut: bool = False) -> str:
    """'TP=2 PP=2 DP=2 ZeRO-1'; with `cut`, and where a pipeline has one, how its stages are cut."""
    method = f", stages cut by {record['partition_method']}" if cut and "partition_method" in record else ""
    return (f"TP={record['tensor_parallel_size']} PP={record['pipeline_parallel_size']} "
            f"DP={record['data_parallel_size']} ZeRO-{record['zero_stage']}{method}")


def reshard_text(saved: dict, ours: dict | None) -> str:
    """The saved layout, with the pipeline's cut where only that differs (model.partition_method)."""
    return layout_text(saved, cut=ours is not None and layout_text(saved) == layout_text(ours))


def verify_files(directory: Path, manifest: dict) -> None:
    """Every file the manifest lists is there with its recorded size, or the error names it."""
    for name, size in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is missing {name}; it cannot be used")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path} has {path.stat().st_size} bytes, the manifest says {size}: "
                                  "truncated or overwritten; use an older checkpoint")


def latest_tag(directory: Path) -> str | None:
    """The tag `DIRECTORY/latest` names, or None for a directory with no checkpoint yet."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    try:
        tag = pointer.read_text().strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{pointer} is not a step name; point it at a step_* directory (echo step_NNNNNNN "
                              f"> {pointer})") from None
    if not (Path(directory) / tag / MANIFEST).is_file():
        raise CheckpointError(f"{pointer} names {tag}, but {Path(directory) / tag / MANIFEST} is missing; "
                              "restore that checkpoint or point latest at another step_* directory")
    return tag


def verified_manifest(directory: Path, expected_model: dict) -> dict:
    """The manifest of the checkpoint in `directory`, after checking every file and the model shape."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{directory / MANIFEST} cannot be read ({error}); restore it, or point "
                              f"{directory.parent / LATEST} at an older step_* directory") from None
    missing = sorted({"files", "model", "step", "layout"} - set(manifest)) if isinstance(manifest, dict) else ["all"]
    if missing:
        raise CheckpointError(f"{directory / MANIFEST} is not a manifest of this project (missing: "
                              f"{', '.join(missing)}); restore it, or point {directory.parent / LATEST} at an "
                              "older step_* directory")
    verify_files(directory, manifest)
    if manifest["model"] != expected_model:
        differences = {k: (manifest["model"].get(k), v) for k, v in expected_model.items()
                       if manifest["model"].get(k) != v}
        raise CheckpointError(f"checkpoint {directory} holds a different model; (checkpoint, config): {differences}")
    return manifest


def layout_record(layout, partition_method: str) -> dict:
    """What decides how the model and optimizer state are cut; a change means resharding on resume."""
    record = {"tensor_parallel_size": layout.tensor_parallel_size,
              "pipeline_parallel_size": layout.pipeline_parallel_size,
              "data_parallel_size": layout.data_parallel_size, "zero_stage": layout.zero_stage}
    if layout.pipeline_parallel_size > 1:  # where the stages are cut
        record["partition_method"] = partition_method
    return record


def reshard_refusal(saved: dict, ours: dict) -> str | None:
    """Why a checkpoint saved with layout `saved` cannot be resharded onto `ours`, or None if it can.

    DeepSpeed's universal checkpoint covers ZeRO-1/2 (and its bf16 optimizer) in
    any TP x PP x DP, and ZeRO-3 across data-parallel sizes. It has no ZeRO-0
    path, cannot move optimizer state between ZeRO-3 and ZeRO-1/2, and under
    ZeRO-3 restores megatron-core's tensor-parallel slices unsliced.
    """
    stages = (saved["zero_stage"], ours["zero_stage"])
    keep = (f"resume on the saved layout (parallel.tensor_parallel_size={saved['tensor_parallel_size']} "
            f"parallel.pipeline_parallel_size={saved['pipeline_parallel_size']} parallel.zero_stage={saved['zero_stage']}"
            f", {saved['tensor_parallel_size'] * saved['pipeline_parallel_size'] * saved['data_parallel_size']} "
            "processes)")
    if 0 in stages:
        return f"ZeRO-0 checkpoints cannot be resharded: {keep}, or use parallel.zero_stage=1 from the start"
    if (stages[0] == 3) != (stages[1] == 3):
        return (f"DeepSpeed cannot convert optimizer state between ZeRO-3 and ZeRO-1/2 "
                f"(parallel.zero_stage {stages[0]} -> {stages[1]}): {keep}")
    if 3 in stages and (saved["tensor_parallel_size"] > 1 or ours["tensor_parallel_size"] > 1):
        return ("under ZeRO-3 only the data-parallel size may change (DeepSpeed does not re-slice megatron-core's "
                f"tensor-parallel weights); keep parallel.tensor_parallel_size={saved['tensor_parallel_size']}, "
                f"or {keep}")
    return None


def data_changes(manifest: dict, config, tokenizer_sha256: str, blend: tuple[list, list]) -> list[str]:
    """What decides the data order and differs from the checkpoint: 'key: saved -> now' each.
    (A key an older manifest lacks is not compared.)"""
    saved_data, saved_config = manifest.get("data", {}), manifest.get("config", {}).get("data", {})
    compared = [
        ("data.prefixes", saved_config.get("prefixes"), config.data.prefixes),
        ("data.split", saved_config.get("split"), config.data.split),
        ("train.seed", saved_data.get("seed"), config.train.seed),
        ("data.tokenizer (sha256)", saved_data.get("tokenizer_sha256"), tokenizer_sha256),
    ]
    changes = [f"{key}: {saved!r} -> {now!r}" for key, saved, now in compared if saved not in (None, now)]
    paths, weights = blend
    if not changes and "shards" in saved_data and (saved_data["shards"], saved_data["weights"]) != (paths, weights):
        changes.append(f"the shards behind data.prefixes (remade?): {saved_data['shards']} with weights "
                       f"{saved_data['weights']} -> {paths} with weights {weights}")
    return changes


def find_resume_point(directory: Path, config, layout, model_shape: dict, tokenizer_sha256: str,
                      blend: tuple[list, list]) -> ResumePoint | None:
    """The checkpoint a run of `config` on `layout` continues from (`latest` in `directory`), checked
    against everything the resume would refuse: its files, the model shape, the global batch, the data
    order, a layout DeepSpeed cannot reshard. None where there is no checkpoint yet."""
    tag = latest_tag(directory)
    if tag is None:
        return None
    manifest = verified_manifest(Path(directory) / tag, model_shape)
    ours = layout_record(layout, config.model.partition_method)
    if manifest["step"] == 0:  # no data consumed, no optimizer history: data, batch and layout are free
        other = (manifest["layout"], manifest.get("precision")) != (ours, config.train.precision)
        return ResumePoint(tag, manifest, reshard=False, weights_only=other)
    saved_batch, batch = manifest.get("data", {}).get("global_batch_size", layout.global_batch_size), layout.global_batch_size
    if saved_batch != batch:
        raise CheckpointError(
            f"checkpoint {tag} was trained with parallel.global_batch_size={saved_batch}, this run has {batch}; "
            f"the data order is counted in global batches, so keep parallel.global_batch_size={saved_batch}")
    changes = data_changes(manifest, config, tokenizer_sha256, blend)
    if changes and not config.checkpoint.allow_data_change:
        raise CheckpointError(
            f"checkpoint {tag} was trained on other data: {'; '.join(changes)} (checkpoint -> this "
            "run). Resuming would silently change the data order: restore those settings, or set "
            "checkpoint.allow_data_change=true to continue on the new data (it is then logged and recorded "
            "in metrics.jsonl)")
    reshard = manifest["layout"] != ours
    refusal = reshard and reshard_refusal(manifest["layout"], ours)
    if refusal:
        raise CheckpointError(f"checkpoint {tag} was saved on {reshard_text(manifest['layout'], ours)}, this run is "
                              f"{reshard_text(ours, manifest['layout'])}: {refusal}")
    return ResumePoint(tag, manifest, reshard, data_changes=changes, ours=ours)
