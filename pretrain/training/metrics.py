"""Training metrics, written by rank 0 in three forms: a console line per interval,
TensorBoard events, and RUN_DIR/metrics.jsonl (one JSON object per step)."""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path

import torch

from data_pipeline.peak_memory import peak_rss_bytes

log = logging.getLogger("pretrain")

@functools.cache  # the device does not change during a run; read once, not at every step
def device_peak_tflops() -> float | None:
    """Dense bf16 peak of this GPU, for MFU (the planner's table of data-sheet figures); None if unknown."""
    from pretrain.planner.hardware import peak_tflops_by_device_name

    return peak_tflops_by_device_name(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def memory_gib() -> float:
    """Peak memory of this process: GPU allocations on CUDA, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return peak_rss_bytes() / 2**30


def _json_safe(value):
    """NaN and inf are not JSON: a skipped step's loss (or an infinite perplexity) is written as null."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _figure(name: str, value: float | None, form: str) -> str:
    """"name value", or "name -" for a figure that is not a finite number (written as null)."""
    return f"{name} {'-' if value is None else format(value, form)}"


class MetricsWriter:
    def __init__(self, run_dir: Path, console_interval: int, tensorboard: bool, enabled: bool):
        self.enabled, self.console_interval = enabled, console_interval
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self._board = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        metrics = _json_safe(metrics)
        self._jsonl.write(json.dumps(metrics) + "\n")
        self._jsonl.flush()
        step = metrics["step"]
        if self._board is not None:
            for tag, value in self.scalars(metrics):
                self._board.add_scalar(tag, value, step)
        if "event" in metrics:
            return  # the trainer logs events itself
        if step % self.console_interval == 0 or "valid_loss" in metrics:
            log.info(self.console_line(metrics))

    @staticmethod
    def scalars(metrics: dict) -> list[tuple[str, float]]:
        """TensorBoard's (tag, value) pairs: train/*, valid/* and tasks/<task>/<figure>."""
        pairs = []
        for key, value in metrics.items():
            if key == "tasks":
                pairs += [(f"tasks/{name}/{figure}", number) for name, figures in value.items()
                          for figure, number in figures.items() if isinstance(number, (int, float))]
            elif key != "step" and isinstance(value, (int, float)):
                pairs.append((f"valid/{key[6:]}" if key.startswith("valid_") else
                              "valid/tasks_seconds" if key == "tasks_seconds" else f"train/{key}", value))
        return pairs

    @staticmethod
    def console_line(m: dict) -> str:
        if "valid_loss" in m:
            parts = [f"step {m['step']:>6}", _figure("valid loss", m["valid_loss"], ".4f"),
                     _figure("valid perplexity", m["valid_perplexity"], ".2f")]
            for name, figures in m.get("tasks", {}).items():
                shown = [_figure(figure, figures[figure], ".4f") for figure in ("acc", "acc_norm", "perplexity")
                         if figure in figures]
                parts.append(f"{name} ({figures['examples']} examples): {', '.join(shown)}")
            if "tasks_seconds" in m:
                parts.append(f"tasks took {m['tasks_seconds']:.1f} s")
            return " | ".join(parts)
        loss = "skipped (non-finite)" if m["loss"] is None else f"{m['loss']:.4f}"
        distilling = [_figure(name.replace("_", " "), m[name], ".4f") for name in ("lm_loss", "kl_loss", "cosine_loss")
                      if name in m]  # the objective's terms (pretrain/training/distill.py)
        parts = [f"step {m['step']:>6}", f"loss {loss}", *distilling, f"lr {m['lr']:.3e}",
                 f"grad norm {m['grad_norm']:.3f}" if m.get("grad_norm") is not None else "grad norm -",
                 f"loss scale {m['loss_scale']:g}" if m.get("loss_scale") else None,
                 f"{m['tokens_per_second']:,.0f} tok/s", f"{m['tflops_per_device']:.2f} TFLOP/s/device",
                 f"MFU {m['mfu']:.1%} (compute {m['compute_mfu']:.1%})" if m.get("mfu") is not None else None,
                 f"{m['step_seconds']:.2f} s/step (compute {m['compute_seconds']:.2f})" if "step_seconds" in m else None,
                 f"mem {m['memory_gib']:.2f} GiB"]
        return " | ".join(p for p in parts if p)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._board:
            self._board.close()
