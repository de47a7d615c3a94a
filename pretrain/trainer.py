"""The trainer: named steps (`setup`, `train_step`, `evaluate`, `run`) over a DeepSpeed engine.

setup builds, in order: process groups -> the validated layout -> the model
(pipeline stages and tensor-parallel layers) -> activation checkpointing ->
AdamW with the schedule -> deepspeed.initialize -> the datasets.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from data_pipeline.tokenizers import load_tokenizer
from pretrain.checkpoint import CheckpointError, CheckpointManager, config_hash
from pretrain.config import Config, ConfigError
from pretrain.data import build_datasets, micro_batches, resolve_blend
from pretrain.metrics import MetricsWriter, device_peak_tflops, memory_gib
from pretrain.model.presets import flops_per_token, parameter_count
from pretrain.optim import SkipNonFiniteAdamW
from pretrain.parallel.build import apply_activation_checkpointing, build_model
from pretrain.parallel.distributed import (
    collective_device,
    init_distributed,
    initialize_model_parallel,
    model_parallel_config,
)
from pretrain.parallel.engine import deepspeed_config, evaluate_loss, initialize_engine, train_step
from pretrain.parallel.layout import ParallelLayout
from pretrain.parallel.reshard import (
    checkpoint_client_state,
    convert_on_rank_zero,
    group_settings,
    reshard_refusal,
    repair_after_universal_load,
)
from pretrain.schedule import lr_multiplier

log = logging.getLogger("pretrain")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings only; never on biases or LayerNorm parameters."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


MODEL_SHAPE_KEYS = ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")


@dataclass
class ResumePoint:
    tag: str
    manifest: dict
    reshard: bool
    """Saved with another layout (TP, PP, DP or ZeRO stage): load it through the universal form."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradients."""


class Trainer:
    def __init__(self, config: Config):
        self.config = config
        self.run_dir = Path(config.run.dir)
        self.step = 0
        self.metrics: MetricsWriter | None = None
        self.stop_requested = False
        self.skipped_steps = 0
        self.consecutive_skips = 0

    # ---- setup -------------------------------------------------------------------

    def setup(self) -> None:
        config = self.config
        init_distributed()
        self.rank = dist.get_rank()
        tp = config.parallel.tensor_parallel_size
        self.model_config = config.model.gpt_config(tp)
        self.layout = ParallelLayout(
            dist.get_world_size(), tp, config.parallel.pipeline_parallel_size, config.parallel.zero_stage,
            config.parallel.micro_batch_size, config.parallel.global_batch_size,
        ).validate(self.model_config)
        if config.train.precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("train.precision=fp16 needs a GPU (DeepSpeed has no fp16 on CPU); use bf16 or fp32 here")
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        if self.tokenizer.vocab_size != config.model.vocab_size:
            raise ConfigError(f"model.vocab_size={config.model.vocab_size} but data.tokenizer {config.data.tokenizer!r} "
                              f"has {self.tokenizer.vocab_size} tokens; set model.vocab_size={self.tokenizer.vocab_size}")
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
            log.info("%s; model %.1fM parameters", self.layout.describe(), parameter_count(self.model_config) / 1e6)
        topology = initialize_model_parallel(self.layout)
        self.checkpoints = CheckpointManager(Path(config.checkpoint.dir or self.run_dir / "checkpoints"),
                                             config.checkpoint.keep_last, config.checkpoint.keep_every)
        self.resume_point = self._find_resume_point()
        self.engine = self._build_engine(topology, load_universal=self.resume_point is not None
                                         and self.resume_point.reshard)
        from megatron.core import parallel_state

        self.data_rank = parallel_state.get_data_parallel_rank()
        self.blend = resolve_blend(config.data.prefixes, self.tokenizer)  # the datasets' and the manifests'
        self.train_data, self.valid_data = build_datasets(config, self.tokenizer, self.blend, self.run_dir,
                                                          self.layout.data_parallel_size)
        for signum in (signal.SIGTERM, signal.SIGUSR1):  # before resuming: a signal mid-conversion waits for it
            signal.signal(signum, self._request_stop)
        self.resume()
        self.metrics = MetricsWriter(self.run_dir, config.logging.interval, config.logging.tensorboard,
                                     enabled=self.rank == 0)

    def _request_stop(self, signum, _frame) -> None:
        log.warning("received %s: saving a checkpoint after this step, then exiting", signal.Signals(signum).name)
        self.stop_requested = True

    def _build_engine(self, topology, load_universal: bool = False):
        config, layout = self.config, self.layout
        model = build_model(self.model_config, layout, topology, model_parallel_config(layout), config.train.seed,
                            config.model.partition_method)
        apply_activation_checkpointing(model, config.model.activation_checkpointing)
        self.optimizer = SkipNonFiniteAdamW(parameter_groups(model, config.optim.weight_decay), lr=config.optim.lr,
                                            betas=tuple(config.optim.betas), eps=config.optim.eps)
        schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_multiplier(step, config))
        extra = {**config.deepspeed, "checkpoint": {**config.deepspeed.get("checkpoint", {}),
                                                    "load_universal": load_universal}}
        ds_config = deepspeed_config(layout, config.train.precision, config.optim.gradient_clipping, extra)
        return initialize_engine(model, layout, topology, self.optimizer, ds_config, lr_scheduler=schedule)

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
        """What decides how the model and optimizer state are cut; a change means resharding on resume."""
        layout = self.layout
        record = {"tensor_parallel_size": layout.tensor_parallel_size,
                  "pipeline_parallel_size": layout.pipeline_parallel_size,
                  "data_parallel_size": layout.data_parallel_size, "zero_stage": layout.zero_stage}
        if layout.pipeline_parallel_size > 1:  # where the stages are cut
            record["partition_method"] = self.config.model.partition_method
        return record

    def model_shape(self) -> dict:
        return {key: getattr(self.model_config, key) for key in MODEL_SHAPE_KEYS}

    def save(self) -> None:
        self.checkpoints.save(self.engine, self.step, self.manifest(), checkpoint_client_state(self.model_config))

    def _find_resume_point(self) -> ResumePoint | None:
        """The checkpoint to continue from (`latest`), checked, and whether it must be resharded."""
        self.checkpoints.clean_partial_saves()
        tag = self.checkpoints.latest()
        if tag is None:
            return None
        manifest = self.checkpoints.verify(tag, self.model_shape())
        saved_batch, batch = manifest["data"]["global_batch_size"], self.layout.global_batch_size
        if saved_batch != batch:
            raise CheckpointError(
                f"checkpoint {tag} was trained with parallel.global_batch_size={saved_batch}, this run has {batch}; "
                f"the data order is counted in global batches, so keep parallel.global_batch_size={saved_batch}")
        reshard = manifest["layout"] != self.layout_record()
        refusal = reshard and reshard_refusal(manifest["layout"], self.layout_record())
        if refusal:
            raise CheckpointError(f"checkpoint {tag} was saved with layout {manifest['layout']}, this run is "
                                  f"{self.layout_record()}: {refusal}")
        return ResumePoint(tag, manifest, reshard)

    def resume(self) -> None:
        """Continue from the resume point, resharding it first if the layout changed."""
        point = self.resume_point
        if point is None:
            return
        universal = None
        if point.reshard:
            log.info("checkpoint %s has layout %s, this run %s: resharding", point.tag, point.manifest["layout"],
                     self.layout_record())
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
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop; every rank must agree to save together."""
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ---- steps --------------------------------------------------------------------

    def train_step(self) -> dict:
        """One optimizer step on global batch `self.step`; returns its metrics."""
        lr = self.engine.get_lr()[0]
        batches = micro_batches(self.train_data, self.step, self.layout, self.data_rank)
        overflows_before = self.engine.skipped_steps  # fp16: DeepSpeed's loss scaler skips overflows itself
        began = time.perf_counter()
        loss = train_step(self.engine, batches)
        seconds = time.perf_counter() - began
        self.step += 1
        skipped = self.optimizer.skipped_last_step or self.engine.skipped_steps > overflows_before
        self._count_skip(skipped, loss)
        return {**self._step_metrics(loss, lr, seconds), "skipped": skipped, "skipped_steps": self.skipped_steps}

    def _count_skip(self, skipped: bool, loss: float) -> None:
        self.skipped_steps += skipped
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        if skipped:
            log.warning("step %d skipped: non-finite loss or gradients (loss %s); %d in a row", self.step, loss,
                        self.consecutive_skips)
        limit = self.config.train.max_consecutive_skips
        if self.consecutive_skips >= limit:
            raise TrainingDiverged(
                f"{self.consecutive_skips} consecutive steps (up to step {self.step}) had a non-finite loss or "
                f"gradients (train.max_consecutive_skips={limit}); the weights are those of the last good step. "
                "Lower optim.lr, check the data, or resume from an earlier checkpoint")

    def _step_metrics(self, loss: float, lr: float, seconds: float) -> dict:
        tokens = self.layout.global_batch_size * self.config.model.n_positions
        tokens_per_second = tokens / seconds
        flops = flops_per_token(self.model_config, self.model_config.n_positions)
        tflops = tokens_per_second * flops / self.layout.world_size / 1e12
        peak = device_peak_tflops()
        grad_norm = self.engine.get_global_grad_norm()
        scale = self.engine.optimizer.cur_scale if self.config.train.precision == "fp16" else None
        return {
            "step": self.step, "loss": loss, "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "loss_scale": scale, "tokens_per_second": tokens_per_second, "tflops_per_device": tflops,
            "mfu": tflops / peak if peak else None, "memory_gib": memory_gib(),
            "consumed_samples": self.step * self.layout.global_batch_size,
        }

    def evaluate(self) -> dict:
        """Validation loss and perplexity over the first eval.iterations global batches of the valid split."""
        losses = [evaluate_loss(self.engine, micro_batches(self.valid_data, batch, self.layout, self.data_rank))
                  for batch in range(self.config.eval.iterations)]
        loss = sum(losses) / len(losses)
        return {"step": self.step, "valid_loss": loss, "valid_perplexity": math.exp(min(loss, 50.0))}

    def run(self) -> None:
        config = self.config
        while self.step < config.train.max_steps:
            self.metrics.write(self.train_step())
            if config.eval.interval and self.step % config.eval.interval == 0:
                self.metrics.write(self.evaluate())
            stop = self._stop_agreed()
            if stop or self.step % config.checkpoint.interval == 0 or self.step == config.train.max_steps:
                self.save()
            if stop:
                log.warning("stopped at step %d after a signal; run the same command to resume", self.step)
                return
        if self.rank == 0:
            log.info("finished %d steps; metrics in %s", self.step, self.run_dir / "metrics.jsonl")

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
