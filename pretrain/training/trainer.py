"""The trainer: named steps (`setup`, `train_step`, `evaluate`, `run`) over a DeepSpeed engine.

setup builds, in order: process groups -> the validated layout -> the model
(pipeline stages and tensor-parallel layers) -> activation checkpointing ->
AdamW with the schedule -> deepspeed.initialize -> the datasets.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from data_pipeline.atomic import write_text_atomically
from data_pipeline.tokenizers import load_tokenizer
from pretrain.training import stop_signals
from pretrain.checkpoint.resume import MODEL_SHAPE_KEYS, layout_record, reshard_text
from pretrain.checkpoint.sharded import CheckpointManager, config_hash
from pretrain.config import Config, ConfigError
from pretrain.training.data import NextBatch, build_datasets, micro_batches
from pretrain.training.distill import FrozenTeacher, attach, student_from_teacher
from pretrain.training.metrics import MetricsWriter, device_peak_tflops, memory_gib
from pretrain.model.presets import flops_per_token, parameter_count
from pretrain.training.optim import SkipNonFiniteAdamW
from pretrain.parallel.build import apply_activation_checkpointing, apply_compile, build_model
from pretrain.checkpoint.huggingface import is_hf_directory
from pretrain.inference.loading import Weights, load_weights, save_consolidated
from pretrain.parallel.distributed import (
    bind_device,
    collective_device,
    control_group,
    init_distributed,
    initialize_model_parallel,
    model_parallel_config,
    on_rank_zero,
)
from pretrain.parallel.deepspeed_config import deepspeed_config
from pretrain.parallel.overlap import install as install_overlap
from pretrain.parallel.engine import (
    evaluate_loss,
    initialize_engine,
    loss_scale,
    train_step,
)
from pretrain.checkpoint.reshard import (
    checkpoint_client_state,
    convert_on_rank_zero,
    group_settings,
    repair_after_universal_load,
)
from pretrain.training.schedule import lr_multiplier
from pretrain.training import console
from pretrain.training.run_check import check_writable, plan_run
from pretrain.training.tasks import EngineScorer, evaluate_tasks
from pretrain.checkpoint.weights import load_into

log = logging.getLogger("pretrain")
STOP_FILE = "STOP"  # RUN_DIR/STOP: the kill switch
INITIAL_WEIGHTS = ".initial-weights.pt"  # RUN_DIR/: model.init_from consolidated once, removed after loading
TEACHER_WEIGHTS = ".teacher-weights.pt"  # RUN_DIR/: distill.teacher consolidated on each start, removed after
EXIT_RECORD = "exit.json"  # RUN_DIR/exit.json: why the last clean exit happened (read by slurm/pretrain.sbatch)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings only; never on biases or LayerNorm parameters."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradients."""


def host_name() -> str:
    """The Slurm node name under srun (what sinfo and srun's errors call it), else the hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def git_commit() -> str:
    """The commit this code runs from, "+ local changes" when the tree differs, or why unknown."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + (" + local changes" if dirty else "")


class Trainer:
    def __init__(self, config: Config):
        self.config = config
        self.run_dir = Path(config.run.dir)
        self.step = 0
        self.metrics: MetricsWriter | None = None
        self.started = time.monotonic()  # for train.exit_after_minutes
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.pending: list[dict] = []  # rows of steps whose device figures flush() has not read yet
        self._clock: float | None = None  # when the last step (or evaluation, or save) ended
        self.next_batch: NextBatch | None = None

    # ---- setup -------------------------------------------------------------------

    def setup(self) -> None:
        config = self.config
        check_writable("run.dir", self.run_dir)  # before the log file is made in it
        console.open_log_file(self.run_dir, int(os.environ.get("RANK", "0")))
        device = bind_device()
        logging.getLogger(console.DETAIL).info("rank %s of %s on %s: %s", os.environ.get("RANK", "0"),
                                               os.environ.get("WORLD_SIZE", "1"), host_name(), device)
        init_distributed(timeout_minutes=config.train.distributed_timeout_minutes)
        self.rank = dist.get_rank()
        self.control = control_group()  # the stop check's, on the host
        plan = plan_run(config, dist.get_world_size())
        for warning in plan.warnings if self.rank == 0 else ():
            log.warning(warning)
        self.model_config, self.layout, self.tokenizer, self.blend = plan.model_config, plan.layout, plan.tokenizer, plan.blend
        self.tasks, self.teacher_config = plan.tasks, plan.teacher_config
        self._log_start(device)
        with console.prints_to_log():  # DeepSpeed prints its topology
            topology = initialize_model_parallel(self.layout, config.train.distributed_timeout_minutes)
        self.checkpoints = CheckpointManager(Path(config.checkpoint.dir or self.run_dir / "checkpoints"),
                                             config.checkpoint.keep_last, config.checkpoint.keep_every,
                                             config.checkpoint.async_save, config.train.distributed_timeout_minutes)
        self.checkpoints.clean_partial_saves()
        self.resume_point = plan.resume_point  # run_check found and checked it, before the engine is built
        self._record_start()
        self._seed_random_state(topology)
        teacher_weights = None
        if self.teacher_config is not None:
            teacher_weights = self._read_weights(config.distill.teacher, "distill.teacher", TEACHER_WEIGHTS)
        with console.prints_to_log():
            self.engine = self._build_engine(topology, load_universal=self.resume_point is not None
                                             and self.resume_point.reshard, initial=self._initial_weights(teacher_weights))
        self.checkpoints.use_writer(self.engine)
        self.teacher = None
        if teacher_weights is not None:
            self.teacher = self._build_teacher(teacher_weights, topology)
        from megatron.core import parallel_state

        self.data_rank = parallel_state.get_data_parallel_rank()
        # Pinned batches for non-blocking copies; the pipeline engine copies (a pageable clone) itself.
        self.pin_memory = collective_device().type == "cuda" and self.layout.pipeline_parallel_size == 1
        self.train_data = self.valid_data = None  # a run of 0 steps may have no data
        if self.blend[0]:
            self.train_data, self.valid_data = build_datasets(config, self.tokenizer, self.blend, self.run_dir,
                                                              self.layout.data_parallel_size)
        stop_signals.install()  # (again: python -m pretrain did at start) a signal mid-conversion waits for it
        self.resume()
        self.metrics = MetricsWriter(self.run_dir, config.logging.interval, config.logging.tensorboard,
                                     enabled=self.rank == 0)
        changes = self.resume_point.data_changes if self.resume_point else []
        if changes and self.rank == 0:  # allowed by checkpoint.allow_data_change: on record
            log.warning("resuming on changed data (checkpoint.allow_data_change=true): %s", "; ".join(changes))
            self.metrics.write({"step": self.step, "event": "data_changed", "changes": changes})

    def _seed_random_state(self, topology) -> None:
        """Seed torch (CPU and every GPU) from train.seed, for dropout; a resumed run then
        restores the saved state. Tensor-parallel ranks share a seed (dropout on the
        replicated activations must agree); data-parallel replicas differ."""
        data_rank = topology.get_coord(dist.get_rank()).data
        torch.manual_seed(self.config.train.seed + data_rank)

    def _log_start(self, device: str) -> None:
        """Rank 0 says what runs where in a few lines; every rank's host and device and the resolved config
        go to the log file (console.py)."""
        placement = [None] * dist.get_world_size()
        dist.all_gather_object(placement, (host_name(), device))
        if self.rank != 0:
            return
        detail = logging.getLogger(console.DETAIL)
        for rank, (host, where) in enumerate(placement):
            detail.info("rank %d: %s, %s", rank, host, where)
        detail.info("resolved config:\n%s", yaml.safe_dump(self.config.to_dict(), sort_keys=False).rstrip())
        detail.info("environment: %s", " ".join(f"{key}={os.environ[key]}" for key in sorted(os.environ)
                                                 if key.startswith(("NCCL_", "CUDA_", "OMP_", "TORCH_"))))
        hosts = sorted({host for host, _ in placement})
        # "GPU 3 (NVIDIA H100 80GB HBM3; CUDA_VISIBLE_DEVICES=...)" -> "GPU (NVIDIA H100 80GB HBM3)"
        devices = sorted({f"GPU ({where.split('(', 1)[1].split(';')[0]})" if where.startswith("GPU") else where
                          for _, where in placement})
        log.info("git commit %s; %d ranks on %d node(s): %s; %s", git_commit(), len(placement), len(hosts),
                 ", ".join(hosts), ", ".join(devices))
        log.info("%s; model %.1fM parameters, %s", self.layout.describe(), parameter_count(self.model_config) / 1e6,
                 self.config.train.precision)
        if self.blend[0]:
            log.info("data: %s (%d shard(s)); split %s", ", ".join(map(str, self.config.data.prefixes)),
                     len(self.blend[0]), self.config.data.split)
        log.info("config: %s; logs: %s", self.run_dir / "config.yaml", self.run_dir / console.LOG_DIRECTORY)

    def _record_start(self) -> None:
        """RUN_DIR/config.yaml for this start, and no exit record yet; only once the checkpoint to resume
        from is accepted, so that a start refused for it leaves the run directory as it was."""
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / EXIT_RECORD).unlink(missing_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))

    def _read_weights(self, source: str, setting: str, scratch: str) -> Weights:
        """Full-size weights from `source`. A checkpoint of ours is consolidated once, by rank 0, into
        RUN_DIR/`scratch`, which every rank then reads (and rank 0 removes once all have)."""
        if not is_hf_directory(source) and not Path(source).is_file():
            consolidated = self.run_dir / scratch
            on_rank_zero(lambda: save_consolidated(load_weights(source, self.run_dir), consolidated),
                         consolidated.is_file, consolidated.with_name(consolidated.stem + "-failed"), self.rank,
                         f"read the weights of {setting}", stale=(consolidated,))
            source = str(consolidated)
        return load_weights(source)

    def _initial_weights(self, teacher: Weights | None = None):
        """Full-size weights to build the model with instead of random ones, or None: model.init_from
        or distill.init_from_teacher_layers on a fresh start, or a step-0 checkpoint's own on another
        layout."""
        point, source, layers = self.resume_point, self.config.model.init_from, self.config.distill.init_from_teacher_layers
        if point is not None and point.weights_only:
            setting = f"checkpoint {point.tag}"
            weights = self._read_weights(str(self.checkpoints.directory / point.tag), setting, INITIAL_WEIGHTS)
        elif point is None and source:
            setting = f"model.init_from={source}"
            weights = self._read_weights(source, setting, INITIAL_WEIGHTS)
        elif point is None and layers:
            setting = f"distill.init_from_teacher_layers={layers}"
            weights = student_from_teacher(teacher, layers, self.model_config)
        else:
            return None
        keys = (*MODEL_SHAPE_KEYS, "layer_norm_epsilon")
        differences = {key: (getattr(weights.config, key), getattr(self.model_config, key))
                       for key in keys if getattr(weights.config, key) != getattr(self.model_config, key)}
        if differences:
            raise ConfigError(f"{setting} holds another model: {differences} (weights, config); set the model "
                              "section to the weights' shape, e.g. " +
                              " ".join(f"model.{key}={saved}" for key, (saved, _) in differences.items()))
        if not load_tokenizer(weights.tokenizer).has_the_files_of(self.tokenizer):
            log.warning("%s was trained with tokenizer %r, this run reads data.tokenizer=%r: the same vocabulary "
                        "size, but other tokens", setting, weights.tokenizer, self.config.data.tokenizer)
        log.info("initial weights: %s", weights.description)
        return weights

    def _build_teacher(self, weights: Weights, topology) -> FrozenTeacher:
        """distill.teacher, frozen, in this run's layout and precision; its settings given to the student's loss."""
        config = self.config
        teacher = FrozenTeacher(weights, self.teacher_config, config.distill, self.layout, topology,
                                model_parallel_config(self.layout), config.train.precision,
                                config.model.partition_method)
        attach(self.engine.module, teacher.head)
        dist.barrier()  # every rank has read the consolidated file, if there was one
        if self.rank == 0:
            (self.run_dir / TEACHER_WEIGHTS).unlink(missing_ok=True)
            log.info("distilling from %s (%.1fM parameters): temperature %g, alpha %g, hidden_cosine %g",
                     weights.description, parameter_count(self.teacher_config) / 1e6, config.distill.temperature,
                     config.distill.alpha, config.distill.hidden_cosine)
        return teacher

    def _build_engine(self, topology, load_universal: bool = False, initial=None):
        config, layout = self.config, self.layout
        model = build_model(self.model_config, layout, topology, model_parallel_config(layout), config.train.seed,
                            config.model.partition_method)
        if initial is not None:  # before deepspeed.initialize, which casts, partitions and copies them
            load_into(model, initial.state, self.model_config)
            dist.barrier()  # every rank has read the consolidated file, if there was one
            if self.rank == 0:
                (self.run_dir / INITIAL_WEIGHTS).unlink(missing_ok=True)
        apply_activation_checkpointing(model, config.model.activation_checkpointing)
        apply_compile(model, config.train.compile)
        # lr 0 until the trainer sets the schedule's rate before each step: DeepSpeed's fp16 wrappers
        # take one optimizer step with zero gradients while they initialize, which must change nothing.
        self.optimizer = SkipNonFiniteAdamW(parameter_groups(model, config.optim.weight_decay), lr=0.0,
                                            betas=tuple(config.optim.betas), eps=config.optim.eps)
        extra = {**config.deepspeed, "checkpoint": {**config.deepspeed.get("checkpoint", {}),
                                                    "load_universal": load_universal}}
        ds_config = deepspeed_config(layout, config.train.precision, config.optim.gradient_clipping, extra,
                                     config.train.gradient_dtype, config.parallel.overlap_communication,
                                     config.parallel.bucket_size)
        engine = initialize_engine(model, layout, topology, self.optimizer, ds_config)
        if config.parallel.overlap_communication:
            install_overlap(engine, config.parallel.bucket_size)
        return engine

    # ---- checkpoints ----------------------------------------------------------------

    def manifest(self) -> dict:
        paths, weights = self.blend
        layout, config = self.layout, self.config.to_dict()
        return {
            "layout": self.layout_record(),
            "consumed_samples": self.step * layout.global_batch_size,
            "config_sha256": config_hash(config),
            "config": config,  # the resolved config, as RUN_DIR/config.yaml has it
            "model": self.model_shape(),
            "data": {"shards": paths, "weights": weights, "tokenizer_sha256": self.tokenizer.identity()["sha256"],
                     "seed": self.config.train.seed, "global_batch_size": layout.global_batch_size},
            "precision": self.config.train.precision,
        }

    def layout_record(self) -> dict:
        return layout_record(self.layout, self.config.model.partition_method)

    def model_shape(self) -> dict:
        return {key: getattr(self.model_config, key) for key in MODEL_SHAPE_KEYS}

    def save(self) -> None:
        self.checkpoints.save(self.engine, self.step, self.manifest(), checkpoint_client_state(self.model_config))

    def resume(self) -> None:
        """Continue from the resume point, resharding it first if the layout changed."""
        point = self.resume_point
        if point is None:
            if self.rank == 0:  # said aloud: a misspelt checkpoint.dir or run.dir would otherwise go unnoticed
                log.info("no checkpoint in %s: starting at step 0", self.checkpoints.directory)
            return
        if point.weights_only:  # loaded into the model before deepspeed.initialize (_initial_weights)
            if self.rank == 0:
                self._forget_metrics_after(0)
            log.info("started from the weights of %s (step 0, saved on %s in %s); the optimizer starts fresh",
                     point.tag, reshard_text(point.manifest["layout"], self.layout_record()),
                     point.manifest.get("precision"))
            return
        universal = None
        if point.reshard:
            log.info("checkpoint %s was saved on %s, this run is %s: resharding", point.tag,
                     reshard_text(point.manifest["layout"], self.layout_record()),
                     reshard_text(self.layout_record(), point.manifest["layout"]))
            universal = convert_on_rank_zero(self.checkpoints.directory / point.tag, self.rank)
            settings = group_settings(self.engine.optimizer)  # before the load overwrites them
        self.checkpoints.load(self.engine, point.tag, universal)
        if universal is not None:
            repair_after_universal_load(self.engine.optimizer, settings)
        self.step = point.manifest["step"]
        if self.rank == 0:
            self._forget_metrics_after(self.step)
            log.info("resumed from %s at step %d (%d samples consumed)", point.tag, self.step,
                     point.manifest["consumed_samples"])

    def _forget_metrics_after(self, step: int) -> None:
        """Drop metrics.jsonl lines past the checkpoint: those steps are trained again."""
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            rows = [(line, json.loads(line)) for line in path.read_text().splitlines() if line]
            # Steps up to the checkpoint stay, and its save's row; another event at the checkpoint's step is this
            # start's to write again. (A save's row comes in after later steps': it is written when complete.)
            kept = [line for line, row in rows if row["step"] < step
                    or (row["step"] == step and row.get("event") in (None, "checkpoint"))]
            path.write_text("".join(line + "\n" for line in kept))

    STOP_REASONS = ("signal:SIGTERM", "signal:SIGUSR1", "signal:SIGINT", "stop_file", "exit_after_minutes")

    def _stop_agreed(self, after_a_step: bool = True) -> str | None:
        """Why the run must stop now, if any rank has a reason; every rank gets the same answer,
        so all save together. Only rank 0 looks at the kill switch and the clock; the time
        budget counts only after a step, so that every run makes progress."""
        received = stop_signals.received()
        reasons = [received == "SIGTERM", received == "SIGUSR1", received == "SIGINT", False, False]
        if self.rank == 0:
            budget = self.config.train.exit_after_minutes
            reasons[3] = (self.run_dir / STOP_FILE).exists()
            reasons[4] = after_a_step and budget > 0 and time.monotonic() - self.started >= budget * 60
        flags = torch.tensor(reasons, dtype=torch.float32)  # on the host, over gloo: no wait for the GPU
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control)
        return next((reason for reason, flag in zip(self.STOP_REASONS, flags.tolist()) if flag), None)

    # ---- steps --------------------------------------------------------------------

    def train_step(self) -> None:
        """One optimizer step on global batch `self.step`. Its loss and gradient norm stay on the device, and
        its row waits in `self.pending` until `flush` reads them with those of the steps around it."""
        lr = self._set_learning_rate()
        if self.next_batch is None:
            self.next_batch = NextBatch(self.train_data, self.layout, self.data_rank, self.config.train.max_steps,
                                        pin_memory=self.pin_memory)
        batches = self.next_batch(self.step)
        skipped_before = self.engine.skipped_steps  # DeepSpeed's own checks (BF16_Optimizer, fp16 scaler)
        began = time.perf_counter()
        loss = train_step(self.engine, batches, self.teacher)
        ended = time.perf_counter()
        self.step += 1
        # Decided in the step already (DeepSpeed's norm check and the guard's are read on the host there).
        skipped = self.optimizer.guard.finish_step() or self.engine.skipped_steps > skipped_before
        # From the previous step's end: everything a step costs (the batch read, the metrics written, the stop
        # check), as a run's wall clock sees it. Evaluation and saves restart the clock: they have their own.
        step_seconds, self._clock = ended - (self._clock or began), ended
        self.pending.append({**self._step_metrics(loss.detach().clone(), lr, step_seconds, ended - began),
                             **self._distillation_terms(), "skipped": skipped})

    def flush(self) -> None:
        """The rows of the steps since the last flush, their device figures read now (one wait for the device,
        at logging.interval and before anything else the loop does): skips counted in order, rows written."""
        rows, self.pending = self.pending, []
        for row in rows:
            row["loss"], row["grad_norm"] = (None if value is None else float(value)
                                             for value in (row["loss"], row["grad_norm"]))
            self._count_skip(row["skipped"], row["loss"], row["step"])  # may stop the run: diverged
            self.metrics.write({**row, "skipped_steps": self.skipped_steps})
        for row in self.checkpoints.completed():  # saves finished in the background since (rank 0)
            self.metrics.write(row)

    def _distillation_terms(self) -> dict:
        """While distilling, the objective's terms over the global batch: lm_loss (the cross entropy
        against the data, what an ordinary run calls its loss), kl_loss (KL(teacher || student) at
        distill.temperature, before alpha x T^2) and cosine_loss (with distill.hidden_cosine)."""
        if self.teacher is None:
            return {}
        head = self.teacher.head
        sums = head.take(collective_device()) if head is not None else torch.zeros(4, device=collective_device())
        dist.all_reduce(sums)  # only the ranks holding the head recorded any; TP copies count in both parts
        cross_entropy, divergence, cosine = (sums[:3] / sums[3]).tolist()
        terms = {"lm_loss": cross_entropy, "kl_loss": divergence}
        return {**terms, "cosine_loss": cosine} if self.config.distill.hidden_cosine else terms

    def _set_learning_rate(self) -> float:
        """The schedule's learning rate for step `self.step`, set on every parameter group.

        A function of the step number alone (like nanoGPT's, unlike Megatron's, which holds the
        rate on a skipped step): a skipped step consumed its batch, so it advances the schedule,
        whichever check skipped it, and a resumed run needs no scheduler state."""
        lr = self.config.optim.lr * lr_multiplier(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _count_skip(self, skipped: bool, loss: float, step: int) -> None:
        self.skipped_steps += skipped
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        if skipped:
            log.warning("step %d skipped: non-finite loss or gradients (loss %s); %d in a row", step, loss,
                        self.consecutive_skips)
        limit = self.config.train.max_consecutive_skips
        if self.consecutive_skips >= limit:
            raise TrainingDiverged(
                f"{self.consecutive_skips} consecutive steps (up to step {step}) had a non-finite loss or "
                f"gradients (train.max_consecutive_skips={limit}); the weights are those of the last good step. "
                "Lower optim.lr, check the data, or resume from an earlier checkpoint")

    def _step_metrics(self, loss: torch.Tensor, lr: float, step_seconds: float, compute_seconds: float) -> dict:
        """The step's figures; loss and grad_norm still on the device (flush reads them). tokens_per_second,
        tflops_per_device and mfu count the whole step, from the previous step's end; the compute_ figures
        only its forward, backward and optimizer step, which is what a kernel benchmark would report: the gap
        between the two is what the loop around them costs."""
        tokens = self.layout.global_batch_size * self.config.model.n_positions
        flops = flops_per_token(self.model_config, self.model_config.n_positions)
        peak = device_peak_tflops()
        grad_norm = self.engine.get_global_grad_norm()  # a float, or a tensor DeepSpeed may reuse: kept as a copy
        grad_norm = grad_norm.detach().clone() if isinstance(grad_norm, torch.Tensor) else grad_norm
        scale = loss_scale(self.engine.optimizer) if self.config.train.precision == "fp16" else None
        figures = {"step": self.step, "loss": loss, "lr": lr,
                   "grad_norm": grad_norm, "loss_scale": scale,
                   "step_seconds": step_seconds, "compute_seconds": compute_seconds}
        for prefix, seconds in (("", step_seconds), ("compute_", compute_seconds)):
            tflops = tokens / seconds * flops / self.layout.world_size / 1e12
            figures |= {f"{prefix}tokens_per_second": tokens / seconds, f"{prefix}tflops_per_device": tflops,
                        f"{prefix}mfu": tflops / peak if peak else None}
        return {**figures, "memory_gib": memory_gib(), "consumed_samples": self.step * self.layout.global_batch_size}

    def evaluate(self) -> dict | None:
        """Validation loss and perplexity over the first eval.iterations global batches of the valid split,
        and the figures of the eval.tasks; None when a stop request came first (a preemption must not wait
        for the whole evaluation: the ranks agree between batches, and the run goes on to save)."""
        losses, iterations = [], self.config.eval.iterations
        for batch in range(iterations):
            losses.append(evaluate_loss(self.engine, micro_batches(self.valid_data, batch, self.layout,
                                                                   self.data_rank)))
            stop = self._stop_agreed()
            if stop and (batch + 1 < iterations or self.tasks):
                log.warning("evaluation at step %d left after %d of %d batches: %s", self.step, batch + 1,
                            iterations, stop)
                return None
        loss = sum(losses) / len(losses)
        figures = {"step": self.step, "valid_loss": loss, "valid_perplexity": math.exp(min(loss, 50.0))}
        if self.tasks:
            began = time.perf_counter()
            scorer = EngineScorer(self.engine, self.layout.micro_batch_size, self.layout.gradient_accumulation_steps,
                                  self.model_config.n_positions, collective_device(),
                                  fixed_length=self.layout.pipeline_parallel_size > 1 or self.config.train.compile)
            figures["tasks"] = evaluate_tasks(self.tasks, scorer)
            figures["tasks_seconds"] = time.perf_counter() - began
        return figures

    def run(self) -> str:
        """Train to train.max_steps or until a stop reason (signal, kill switch, time budget),
        saving after the step that saw it; returns the reason, "finished" at the end."""
        config, first = self.config, self.step
        stop = self._stop_agreed(after_a_step=False)  # a kill switch left in place, a signal during start-up
        self._clock = None  # the first step's time is its compute time (start-up is not a step's cost)
        while self.step < config.train.max_steps and stop is None:
            self.train_step()
            evaluating = config.eval.interval and self.step % config.eval.interval == 0
            if self.step % config.logging.interval == 0 or evaluating:
                self.flush()
            if evaluating:
                figures = self.evaluate()
                if figures is not None:
                    self.metrics.write(figures)
                self._clock = time.perf_counter()
            stop = self._stop_agreed()
            at_end = self.step == config.train.max_steps and config.checkpoint.at_end
            if stop or self.step % config.checkpoint.interval == 0 or at_end:
                self.flush()  # the rows up to the checkpoint's step, before it is on disk
                self.save()
                self._clock = time.perf_counter()
        if self.step == first and self.resume_point is None and stop is None:
            self.save()  # a run of 0 steps saves its initial state (tools/convert_checkpoint.py --from hf)
        self.checkpoints.wait()  # the last checkpoint complete before the exit is recorded
        self.flush()
        reason = "finished" if self.step >= config.train.max_steps else stop  # a stop in the last step: done
        if self.rank != 0:  # rank 0 records and reports for all
            return reason
        self._record_exit(reason, first)
        if reason == "finished":
            log.info("finished %d steps; metrics in %s", self.step, self.run_dir / "metrics.jsonl")
        elif reason == "stop_file":
            log.warning("stopped at step %d by the kill switch %s (%d steps this run); remove it and run the same "
                        "command (or resubmit) to continue", self.step, self.run_dir / STOP_FILE, self.step - first)
        else:
            log.warning("stopped at step %d (%s) with a checkpoint; run the same command to resume", self.step, reason)
        return reason

    def _record_exit(self, reason: str, first_step: int) -> None:
        """RUN_DIR/exit.json: the reason for this clean exit, so a batch script can decide
        whether to requeue (a time limit) or not (finished, kill switch, no progress)."""
        record = {"reason": reason, "step": self.step, "first_step": first_step,
                  "max_steps": self.config.train.max_steps}
        write_text_atomically(self.run_dir / EXIT_RECORD, json.dumps(record) + "\n")

    def close(self) -> None:
        if self.next_batch is not None:
            self.next_batch.close()
        if self.metrics is not None:
            self.metrics.close()
