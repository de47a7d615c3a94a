"""What the tools' command lines share: one-line argument errors and loading a model to use."""

from __future__ import annotations

import argparse
from pathlib import Path


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's errors as one line, `error: ...`, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a run directory, checkpoints/ or step_NNNNNNN directory, a Hugging Face GPT-2 "
                             "directory, or a consolidated .pt file")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def load_model_or_explain(checkpoint: str, device: str | None, quiet: bool = False):
    """pretrain.inference.loading.load_model, or ValueError in one line naming what to fix (the path, the device)."""
    import torch

    from pretrain.checkpoint.sharded import CheckpointError
    from pretrain.inference.loading import load_model

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no GPU that torch can use; use --device cpu")
    if not Path(checkpoint).exists():
        raise ValueError(f"--checkpoint {checkpoint} does not exist")
    if quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "Loading weights" of a Hugging Face directory
    try:
        return load_model(checkpoint, device=device)
    except (CheckpointError, ValueError, OSError) as error:  # HFFormatError is a ValueError
        message = " ".join(str(error).split())
        raise ValueError(message if checkpoint in message else f"{checkpoint}: {message}") from None
