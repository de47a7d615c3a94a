"""One config tree: dataclasses with a docstring per field, loaded from YAML,
overridden by dotted command-line keys (`--set optim.lr=3e-4`); CLI > file >
defaults. Validated once, with errors that name the key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_pipeline.tokenizers import padded_vocab_size
from pretrain.model.shape import GPTConfig
from pretrain.parallel.deepspeed_config import OVERLAP_BUCKET_SIZE


class ConfigError(ValueError):
    """A setting that does not exist or cannot hold the value given; names the key."""


@dataclass
class ModelSection:
    n_layer: int = 4
    """Transformer blocks."""
    n_embd: int = 128
    """Hidden size."""
    n_head: int = 4
    """Attention heads; must divide by parallel.tensor_parallel_size."""
    n_positions: int = 256
    """Context length; also the training sequence length."""
    vocab_size: int = 50257
    """Real vocabulary size (the tokenizer's); padding to 128 x TP is derived."""
    dropout: float = 0.0
    """Dropout everywhere; 0 for pretraining."""
    activation_checkpointing: int = 0
    """Recompute every k-th block in backward: 0 off, 1 every block."""
    partition_method: str = "parameters"
    """How pipeline stages are cut: DeepSpeed's "parameters", "uniform" or "type:Block"."""
    init_from: str = ""
    """Start from these weights instead of random ones: a Hugging Face GPT-2 directory, a checkpoint of
    ours (a run, its checkpoints/ or one step_* directory; any layout), or a file written by
    tools/convert_checkpoint.py --to fp32. The optimizer starts fresh at step 0. Used only when
    there is no checkpoint to resume from. The model section must match the weights' shape."""

    def gpt_config(self, tensor_parallel_size: int) -> GPTConfig:
        return GPTConfig(
            n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head, n_positions=self.n_positions,
            vocab_size=self.vocab_size, padded_vocab_size=padded_vocab_size(self.vocab_size, tensor_parallel_size),
            dropout=self.dropout,
        )


@dataclass
class ParallelSection:
    tensor_parallel_size: int = 1
    """Tensor-parallel ranks per model replica."""
    pipeline_parallel_size: int = 1
    """Pipeline stages."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0-3 without a pipeline, 0-1 with one."""
    micro_batch_size: int = 1
    """Sequences per rank per forward pass."""
    global_batch_size: int = 8
    """Sequences per optimizer step; gradient accumulation is derived from it."""
    overlap_communication: bool = True
    """With data parallelism under bf16 ZeRO-1 (DeepSpeed's BF16_Optimizer): reduce the gradients in
    buckets while the last micro-batch's backward runs, and gather the updated weights while the next
    forward runs (pretrain/parallel/overlap.py). false: DeepSpeed's blocking reduction and gather."""
    bucket_size: int = OVERLAP_BUCKET_SIZE
    """Elements per gradient bucket reduced at once when overlapping (160 MB in fp32)."""


@dataclass
class OptimSection:
    lr: float = 6e-4
    """Peak learning rate (AdamW)."""
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on weight matrices and embeddings; never on biases or LayerNorms."""
    gradient_clipping: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""


@dataclass
class ScheduleSection:
    warmup: int = 0
    """Linear warm-up length, in `unit`s."""
    decay: str = "cosine"
    """After warm-up: cosine, linear or constant."""
    min_lr_ratio: float = 0.1
    """The decay's floor, as a fraction of optim.lr."""
    unit: str = "steps"
    """What warm-up and decay count: steps or tokens."""
    decay_end: int = 0
    """Where the decay reaches its floor, in `unit`s; 0 means the end of training."""


@dataclass
class TrainSection:
    max_steps: int = 100
    """Optimizer steps to train for."""
    seed: int = 1234
    """Seeds initialization and the data order."""
    precision: str = "bf16"
    """bf16, fp16 (dynamic loss scaling) or fp32."""
    gradient_dtype: str = "fp32"
    """bf16 only: the dtype gradients are accumulated over micro-batches and all-reduced in.
    fp32 (the default) is exact enough over many micro-batches; bf16 saves memory and
    bandwidth but loses small contributions. fp32 needs parallel.zero_stage >= 1."""
    compile: bool = False
    """torch.compile each transformer block (inductor, CPU or GPU); the first steps are slower
    while it compiles. The pipeline engine and the loss stay eager."""
    max_consecutive_skips: int = 5
    """Stop after this many steps in a row with non-finite loss or gradients."""
    distributed_timeout_minutes: float = 10.0
    """A collective that waits longer than this fails the run instead of hanging (a dead or stuck
    rank). It covers the world group and megatron-core's tensor/pipeline/data groups; DeepSpeed's
    own groups keep torch's default (10 minutes under NCCL, 30 under gloo). Must exceed the longest
    wait of one rank for another: a checkpoint save, or rank 0 building the data indices on a
    first run over a large corpus."""
    exit_after_minutes: float = 0.0
    """Save and exit (to be requeued) after this much wall time; 0 never. For clusters whose
    time-limit signal cannot be relied on."""


@dataclass
class DataSection:
    prefixes: list = field(default_factory=list)
    """Shard prefixes (PREFIX for PREFIX.bin/.idx), or alternating weight and prefix."""
    tokenizer: str = "gpt2"
    """The tokenizer the shards were made with (see tools/preprocess_data.py)."""
    split: str = "969,30,1"
    """Train, validation and test proportions of every prefix."""
    cache_dir: str = ""
    """Where megatron-core caches sample indices; default RUN_DIR/data_cache."""


@dataclass
class CheckpointSection:
    dir: str = ""
    """Checkpoint directory; default RUN_DIR/checkpoints."""
    interval: int = 100
    """Save every this many steps (and at the end, and on SIGTERM / SIGUSR1)."""
    at_end: bool = True
    """Save when train.max_steps is reached. false: a benchmark or measurement that keeps no weights
    (saves every checkpoint.interval steps and on a stop still happen)."""
    keep_last: int = 2
    """Keep this many most recent checkpoints."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this; 0 keeps none extra."""
    check_space: bool = True
    """Refuse to start (and `--check` refuses) when the checkpoint directory's file system lacks room for
    keep_last + 1 checkpoints of the predicted size. false: for file systems whose free space is not what
    they report (quotas enforced elsewhere, object stores)."""
    async_save: bool = True
    """(also `checkpoint.async`) Write checkpoints in the background: a save blocks the step loop only while each rank copies its
    state to host memory; the checkpoint becomes `latest` once every rank's files are written. A second
    save waits for the first. false: a save returns when the checkpoint is complete."""
    allow_data_change: bool = False
    """Resume even though data.prefixes (or the shards behind them), data.split, train.seed or
    data.tokenizer differ from the checkpoint's; the change is logged and written to metrics.jsonl.
    Without it such a resume is refused: it would silently change the data order."""


@dataclass
class LoggingSection:
    interval: int = 1
    """Console line every this many steps; metrics.jsonl gets every step's row, written then (the loss and
    gradient norm stay on the device until then)."""
    tensorboard: bool = True
    """Write TensorBoard events to RUN_DIR/tensorboard."""


@dataclass
class EvalSection:
    interval: int = 0
    """Validation loss every this many steps; 0 disables."""
    iterations: int = 10
    """Global batches per validation."""
    tasks: list = field(default_factory=list)
    """Zero-shot task files scored with each validation (tools/evaluate.py's formats: lambada,
    hellaswag, choice; jsonl), divided over the data-parallel ranks; the figures are logged under
    "tasks" with the validation loss. Needs eval.interval > 0."""
    task_max_examples: int = 0
    """Score only the first this many examples of each task; 0 all of them."""


@dataclass
class DistillSection:
    teacher: str = ""
    """Distil from this model (empty: ordinary pretraining): a checkpoint of ours (a run, its checkpoints/
    or one step_* directory; any layout), a Hugging Face GPT-2 directory, or a file written by
    tools/convert_checkpoint.py --to fp32. It must share the student's tokenizer. It runs frozen in the
    student's TP x PP layout and precision; it is read again on every start, never saved with the student."""
    temperature: float = 2.0
    """Both distributions are softened by this before the KL (Hinton et al. 2015); the term is scaled by
    its square, so that its gradients keep their size."""
    alpha: float = 0.5
    """Weight of the soft-target term, alpha x T^2 x KL(teacher || student); 1 - alpha goes to the ordinary
    next-token cross entropy. 0 trains exactly as without a teacher (the teacher still runs)."""
    hidden_cosine: float = 0.0
    """Weight of 1 - cosine(student, teacher) of the last hidden states (after the final LayerNorm), as
    DistilBERT; needs model.n_embd equal to the teacher's. 0 leaves it out."""
    init_from_teacher_layers: list = field(default_factory=list)
    """Start the student from the teacher's blocks at these indices (0-based, e.g. [0, 2, 4, 7, 9, 11] as
    DistilGPT2), plus its embeddings and final LayerNorm; model.n_layer must equal their number and the
    widths must match. Used only on a fresh start (like model.init_from, which it replaces)."""


@dataclass
class RunSection:
    dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, TensorBoard events, checkpoints."""


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    distill: DistillSection = field(default_factory=DistillSection)
    run: RunSection = field(default_factory=RunSection)
    deepspeed: dict = field(default_factory=dict)
    """Extra DeepSpeed config keys, merged over the generated ones."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "train.precision": ("bf16", "fp16", "fp32"),
    "train.gradient_dtype": ("fp32", "bf16"),
    "schedule.decay": ("cosine", "linear", "constant"),
    "schedule.unit": ("steps", "tokens"),
}


def _coerce(key: str, value, annotation):
    """Check (and gently convert) a YAML value for a field of type `annotation`."""
    kind = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}[annotation]
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML reads 3e-4 (no dot) as a string
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        article = "an" if annotation == "int" else "a"
        hint = " (a list is written [a, b])" if annotation == "list" else ""
        raise ConfigError(f"{key} must be {article} {annotation}, got {value!r}{hint}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key}={value!r} must be one of {', '.join(CHOICES[key])}")
    return value


# Settings whose name is a Python keyword, and the field that holds them.
ALIASES = {"checkpoint.async": "async_save"}


def _apply(target, values: dict, prefix: str = "") -> None:
    hints = {f.name: f.type for f in dataclasses.fields(target)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        name = ALIASES.get(key, name)
        if name not in hints:
            raise ConfigError(f"unknown setting {key!r}; known under {prefix or 'the top level'}: {', '.join(hints)}")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section; give it keys, e.g. {key}.{next(iter(vars(current)))}=...")
            _apply(current, value, key + ".")
        elif hints[name] == "dict":
            setattr(target, name, {**current, **_coerce(key, value, "dict")})
        else:
            setattr(target, name, _coerce(key, value, hints[name]))


def parse_override(text: str) -> dict:
    """"optim.lr=3e-4" -> {"optim": {"lr": 0.0003}}; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value {raw!r} is not valid YAML (a list is written [a, b])") from None
    nested: dict = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file, then each override in order."""
    config = Config()
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as error:
            raise ConfigError(f"the config file {path} cannot be read: {error.strerror}") from None
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            raise ConfigError(f"the config file {path} is not valid YAML{at}: "
                              f"{getattr(error, 'problem', None) or error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections")
        _apply(config, loaded)
    for override in overrides:
        _apply(config, parse_override(override))
    return config
