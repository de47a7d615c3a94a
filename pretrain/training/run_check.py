"""What a config and a world size imply, checked before any process group exists: the layout against the
model, precision and DeepSpeed settings, the tokenizer against model.vocab_size, the data prefixes, the
evaluation tasks, the distillation teacher. `python -m pretrain --check` runs only this, and imports torch
only for what needs it (a GPU to ask about, task files to score, a teacher to read), so a check on a CPU
login node takes well under a second; every rank runs it again at start-up (pretrain/training/trainer.py)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from data_pipeline.tokenizers import Tokenizer, load_tokenizer
from pretrain.checkpoint.resume import MODEL_SHAPE_KEYS, ResumePoint, find_resume_point
from pretrain.config import Config, ConfigError
from pretrain.model.presets import parameter_count
from pretrain.model.shape import GPTConfig
from pretrain.parallel.deepspeed_config import deepspeed_config
from pretrain.parallel.environment import wants_gpu
from pretrain.parallel.layout import ParallelLayout
from pretrain.training.blend import resolve_blend

if TYPE_CHECKING:
    from pretrain.training.tasks import TrainingTask


@dataclass
class RunPlan:
    """What a config and a world size imply, checked before any process group exists."""

    model_config: GPTConfig
    layout: ParallelLayout
    tokenizer: Tokenizer
    blend: tuple[list[str], list[float]]
    tasks: list[TrainingTask]
    teacher_config: GPTConfig | None = None
    """distill.teacher's model shape; None when not distilling."""
    resume_point: ResumePoint | None = None
    """The checkpoint the run continues from, checked; None for a run that starts at step 0."""
    checkpoint_bytes: int = 0
    """The predicted size of one checkpoint."""
    warnings: tuple[str, ...] = ()
    """What --check and the trainer say but do not refuse."""


def check_settings(config: Config, world_size: int, on_gpu: bool | None = None) -> tuple[GPTConfig, ParallelLayout]:
    """The checks of the model, layout, precision and DeepSpeed settings alone (no files read):
    the model and layout, or the one-line error that names the setting. tools/plan.py --config
    runs these for the GPUs it plans for (`on_gpu`; default: this machine)."""
    tp = config.parallel.tensor_parallel_size
    model_config = config.model.gpt_config(tp)
    layout = ParallelLayout(
        world_size, tp, config.parallel.pipeline_parallel_size, config.parallel.zero_stage,
        config.parallel.micro_batch_size, config.parallel.global_batch_size,
    ).validate(model_config)
    if config.parallel.bucket_size < 1:
        raise ConfigError(f"parallel.bucket_size={config.parallel.bucket_size} must be a positive number of "
                          "elements (default 40000000)")
    try:  # the DeepSpeed config this run would generate; a refusal names the setting
        deepspeed_config(layout, config.train.precision, config.optim.gradient_clipping, config.deepspeed,
                         config.train.gradient_dtype)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.train.compile and (layout.zero_stage == 3 or layout.tensor_parallel_size > 1):
        raise ConfigError("train.compile=true is tested with parallel.zero_stage <= 2 and "
                          "parallel.tensor_parallel_size=1 only (ZeRO-3 gathers parameters inside the blocks; "
                          "megatron-core's tensor-parallel layers communicate in backward); set train.compile=false")
    if config.train.precision == "fp16" and not (wants_gpu() if on_gpu is None else on_gpu):
        raise ConfigError("train.precision=fp16 needs a GPU (DeepSpeed has no fp16 on CPU); use bf16 or fp32 here")
    return model_config, layout


def check_writable(key: str, directory: Path) -> None:
    """`directory` takes files, or can be made: probed with a directory made and removed in it (or in its
    nearest existing parent), which finds what permission bits do not (a file in the way, /proc, a
    read-only mount). Only a probe: the run makes the directory itself."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={directory} cannot be made: {existing} is a file; set {key} to a directory path")
    try:
        Path(tempfile.mkdtemp(prefix=".write-check-", dir=existing)).rmdir()
    except OSError as error:
        raise ConfigError(f"{key}={directory} cannot be written ({error.strerror} in {existing}); "
                          f"set {key} to a writable place") from None


def plan_run(config: Config, world_size: int) -> RunPlan:
    """Validate the settings that can be checked without processes (layout against the
    model and world size, precision, tokenizer, data prefixes); raise the one-line error
    that names the setting. `python -m pretrain --check` runs only this."""
    model_config, layout = check_settings(config, world_size)
    if config.train.distributed_timeout_minutes <= 0:
        raise ConfigError(f"train.distributed_timeout_minutes={config.train.distributed_timeout_minutes} must be positive")
    if config.train.exit_after_minutes < 0:
        raise ConfigError(f"train.exit_after_minutes={config.train.exit_after_minutes} must be at least 0 (0: never)")
    for key, value in (("checkpoint.interval", config.checkpoint.interval), ("logging.interval", config.logging.interval)):
        if value < 1:  # a step count every so many steps: 0 would divide by zero mid-run
            raise ConfigError(f"{key}={value} must be at least 1")
    for key, directory in (("run.dir", config.run.dir), ("checkpoint.dir", config.checkpoint.dir)):
        if directory:
            check_writable(key, Path(directory))
    tokenizer = load_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size != config.model.vocab_size:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} but data.tokenizer {config.data.tokenizer!r} "
                          f"has {tokenizer.vocab_size} tokens; set model.vocab_size={tokenizer.vocab_size}")
    if config.model.init_from and not Path(config.model.init_from).exists():
        raise ConfigError(f"model.init_from={config.model.init_from} does not exist; give a Hugging Face GPT-2 "
                          "directory, a checkpoint of ours or a consolidated weights file")
    tasks = plan_tasks(config, tokenizer, model_config.n_positions)
    teacher_config = None
    if config.distill.teacher or config.distill.init_from_teacher_layers:
        from pretrain.training.distill import check_distill  # reads the teacher's record: torch

        teacher_config = check_distill(config, model_config, layout, tokenizer)
    blend = ([], [])
    if config.train.max_steps or config.data.prefixes:  # a run of 0 steps saves the initial state: no data needed
        blend = resolve_blend(config.data.prefixes, tokenizer, sample_tokens=model_config.n_positions + 1)
    checkpoints = Path(config.checkpoint.dir or Path(config.run.dir) / "checkpoints")
    shape = {key: getattr(model_config, key) for key in MODEL_SHAPE_KEYS}
    resume_point = find_resume_point(checkpoints, config, layout, shape, tokenizer.identity()["sha256"], blend)
    size = checkpoint_bytes(model_config, config.train.precision, layout.zero_stage)
    warnings = check_checkpoint_room(config, checkpoints, size)
    return RunPlan(model_config, layout, tokenizer, blend, tasks, teacher_config, resume_point, size, warnings)


REPOSITORY = Path(__file__).resolve().parents[2]


def check_checkpoint_room(config: Config, checkpoints: Path, size: int) -> tuple[str, ...]:
    """Refuse a checkpoint directory without room for checkpoint.keep_last + 1 checkpoints of `size` bytes
    (the ones kept and the one being written; those already there count as room); the warnings to print."""
    key = "checkpoint.dir" if config.checkpoint.dir else "run.dir"
    existing = checkpoints
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    held = sum(f.stat().st_size for d in checkpoints.glob("step_*") if d.is_dir() for f in d.rglob("*") if f.is_file()) \
        if checkpoints.is_dir() else 0
    count = max(config.checkpoint.keep_last, 1) + 1
    if config.checkpoint.check_space and free + held < count * size:
        raise ConfigError(
            f"{key}: {checkpoints} has {free / 1e9:.1f} GB free (and {held / 1e9:.1f} GB of checkpoints), but "
            f"checkpoint.keep_last={config.checkpoint.keep_last} + 1 checkpoints of about {size / 1e9:.1f} GB need "
            f"{count * size / 1e9:.1f} GB; free space, lower checkpoint.keep_last, or set checkpoint.dir to a larger "
            "file system (a scratch directory); checkpoint.check_space=false where the free space shown is not real")
    warnings = []
    if count * size >= 1e9 and checkpoints.resolve().is_relative_to(REPOSITORY):
        warnings.append(f"checkpoints go to {checkpoints}, inside the repository checkout: "
                        f"{count * size / 1e9:.0f} GB or more over the run; set checkpoint.dir to a scratch directory")
    return tuple(warnings)


def checkpoint_bytes(model: GPTConfig, precision: str, zero_stage: int) -> int:
    """About what one checkpoint holds: the weights in the model's dtype (2 or 4 bytes a parameter) and
    Adam's two fp32 moments (8), with fp32 master weights (4) where the optimizer keeps them apart from
    the model's (every ZeRO stage; at ZeRO-0 only under bf16/fp16). 21.8 GB for the 1.5B model in bf16."""
    weights = 4 if precision == "fp32" else 2
    master = 0 if precision == "fp32" and zero_stage == 0 else 4
    return parameter_count(model, include_padding=True) * (weights + master + 8)


def plan_tasks(config: Config, tokenizer: Tokenizer, window: int) -> list[TrainingTask]:
    """eval.tasks read and tokenized, or the ConfigError that names the file (and line)."""
    section = config.eval
    if section.tasks and section.interval <= 0:
        raise ConfigError("eval.tasks are scored every eval.interval steps; set eval.interval > 0")
    if section.interval > 0 and section.iterations < 1:
        raise ConfigError(f"eval.iterations={section.iterations}: validation needs at least one global batch "
                          "(or set eval.interval=0 to turn validation off)")
    if section.task_max_examples < 0:
        raise ConfigError(f"eval.task_max_examples={section.task_max_examples} must be at least 0 (0: all)")
    if not section.tasks:
        return []
    from pretrain.inference.evaluation import EvaluationError  # scoring code: torch
    from pretrain.training.tasks import read_training_tasks

    try:
        return read_training_tasks(section.tasks, tokenizer, section.task_max_examples, window)
    except EvaluationError as error:
        raise ConfigError(f"eval.tasks: {error}") from None
