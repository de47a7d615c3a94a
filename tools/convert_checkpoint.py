#!/usr/bin/env python
"""Convert checkpoints: ours (any layout, ZeRO 0-3) to Hugging Face or one fp32 file, and back.

    # a run's latest checkpoint (or its checkpoints/ dir, or one step_NNNNNNN dir) -> transformers
    python tools/convert_checkpoint.py --to hf --checkpoint runs/gpt2-124m --output hf/gpt2-124m
    # consolidated weights in one file, for inspection (torch.load; or a model for the other tools)
    python tools/convert_checkpoint.py --to fp32 --checkpoint runs/gpt2-124m --output gpt2-124m.pt
    # a Hugging Face GPT-2 directory -> a step-0 checkpoint that python -m pretrain continues from
    python tools/convert_checkpoint.py --from hf --input hf/gpt2 --output ckpt/gpt2 \\
        --tensor-parallel-size 2 --pipeline-parallel-size 2
    python -m pretrain --config configs/gpt2-124m.yaml --set checkpoint.dir=ckpt/gpt2 data.prefixes=[data/web]

--to hf writes config.json (vocabulary size, context, activation and layer-norm
epsilon explicit), model.safetensors (the vocabulary unpadded, no attention-mask
buffers, the output head tied to the embedding) and, for GPT-2's BPE, the tokenizer
files; transformers' GPT2LMHeadModel.from_pretrained reads it. The weights are the
fp32 master weights (ZeRO 1-3) or the module weights (ZeRO-0). Merging a ZeRO 1-3
checkpoint goes through DeepSpeed's universal form in --work-dir, which needs about
three times the model's fp32 size on disk for a moment.

--from hf runs the trainer for 0 steps on TP x PP local CPU processes: it builds the
model in that layout, loads the Hugging Face weights into each rank's slices and saves
a sharded fp32 checkpoint at step 0 (a fresh optimizer). Continuing from it works on
any layout and precision: a step-0 checkpoint on another layout gives only its weights.

Outputs appear complete or not at all (written beside, then renamed). Exit codes: 0
done, 2 unusable arguments or an input that cannot be read (the message names it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.cli import OneLineErrorParser  # noqa: E402
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pretrain.checkpoint.resume import layout_text  # noqa: E402
from pretrain.checkpoint.sharded import LATEST, CheckpointError  # noqa: E402
from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.checkpoint.huggingface import DTYPES, HFFormatError  # noqa: E402
from pretrain.parallel.layout import LayoutError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class UsageError(ValueError):
    """Arguments that cannot work together."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=("hf", "fp32"), help="convert a checkpoint of ours to this format")
    direction.add_argument("--from", dest="source_format", choices=("hf",),
                           help="convert a model in this format to a checkpoint of ours")
    parser.add_argument("--checkpoint", help="--to: a run directory, its checkpoints/, or one step_NNNNNNN directory")
    parser.add_argument("--input", help="--from hf: a Hugging Face GPT-2 directory (config.json + weights)")
    parser.add_argument("--output", required=True, help="the directory (--to hf, --from hf) or file (--to fp32)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="--to hf: the weights' dtype")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="--from hf: the checkpoint's TP size")
    parser.add_argument("--pipeline-parallel-size", type=int, default=1, help="--from hf: its pipeline stages")
    parser.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2),
                        help="--from hf: its ZeRO stage (a ZeRO-3 run continues from any of them)")
    parser.add_argument("--work-dir", help="--to: where ZeRO partitions are merged (default: the output's "
                                           "directory)")
    return parser.parse_args(argv)


def _check(args: argparse.Namespace) -> None:
    output = Path(args.output)
    if args.to:
        if not args.checkpoint:
            raise UsageError(f"--to {args.to} needs --checkpoint (a run, its checkpoints/ or a step_* directory)")
        if args.input:
            raise UsageError("--input is for --from hf; a checkpoint to convert is given with --checkpoint")
    else:
        if not args.input:
            raise UsageError("--from hf needs --input, a Hugging Face GPT-2 directory")
        if args.checkpoint:
            raise UsageError("--checkpoint is for --to; the model to convert is given with --input")
    if output.is_file() or (output.is_dir() and any(output.iterdir())):
        raise UsageError(f"--output {output} already exists; remove it or choose another path")
    if args.to == "fp32" and output.is_dir():
        raise UsageError(f"--output {output} is a directory; --to fp32 writes one file, e.g. {output / 'model.pt'}")


def to_hf_or_fp32(args: argparse.Namespace) -> str:
    from data_pipeline.tokenizers import GPT2BPETokenizer, load_tokenizer
    from pretrain.checkpoint.huggingface import write_hf_directory
    from pretrain.inference.loading import load_weights, save_consolidated

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    weights = load_weights(args.checkpoint, args.work_dir or str(output.parent))
    print(f"read {weights.description} in {time.monotonic() - began:.1f} s", file=sys.stderr)
    if args.to == "fp32":
        save_consolidated(weights, output)
        return f"wrote {output}: {len(weights.state)} tensors, fp32"
    tokenizer = load_tokenizer(weights.tokenizer)
    partial = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        write_hf_directory(weights.config, weights.state, partial, tokenizer, args.dtype)
        as_umask_allows(partial)
        if output.is_dir():
            output.rmdir()  # empty (checked above)
        os.replace(partial, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    note = "" if isinstance(tokenizer, GPT2BPETokenizer) else (
        f"; the tokenizer ({weights.tokenizer}) is not GPT-2 BPE: copy its files beside the model yourself")
    return f"wrote {output}: GPT2LMHeadModel, {args.dtype}{note}"


def as_umask_allows(directory: Path) -> None:
    """The permissions a plain mkdir and open would give, for a tree written in a mkdtemp directory
    (private, 0700): others on a shared cluster can read a model that is published."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def from_hf_settings(args: argparse.Namespace, checkpoint_dir: Path, run_dir: Path) -> list[str]:
    """The trainer's settings for a 0-step run that saves the Hugging Face weights in our layout."""
    from pretrain.checkpoint.huggingface import hf_tokenizer_spec, read_hf_config

    source = Path(args.input).resolve()  # the trainer runs from the repository root
    config = read_hf_config(source)
    model = [f"model.{key}={getattr(config, key)}" for key in ("n_layer", "n_embd", "n_head", "n_positions",
                                                               "vocab_size")]
    return [*model, f"model.init_from={source}", f"data.tokenizer={hf_tokenizer_spec(source, config.vocab_size)}",
            # fp32: the exact weights (a bf16 save would keep only a rounded copy outside the optimizer);
            # the checkpoint continues in any precision.
            "data.prefixes=[]", "train.max_steps=0", "train.precision=fp32",
            f"parallel.tensor_parallel_size={args.tensor_parallel_size}",
            f"parallel.pipeline_parallel_size={args.pipeline_parallel_size}", f"parallel.zero_stage={args.zero_stage}",
            "parallel.micro_batch_size=1", "parallel.global_batch_size=1", f"checkpoint.dir={checkpoint_dir}",
            f"run.dir={run_dir}", "logging.tensorboard=false", "eval.interval=0"]


def from_hf(args: argparse.Namespace) -> str:
    from pretrain.training.run_check import plan_run

    output = Path(args.output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    processes = args.tensor_parallel_size * args.pipeline_parallel_size
    partial = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        settings = from_hf_settings(args, partial / "checkpoints", partial / "run")
        plan_run(load_config(None, settings), processes)  # a layout the model cannot take is refused here
        launcher = ["-m", "pretrain.launch", "--nproc", str(processes)] if processes > 1 else ["-m", "pretrain"]
        print(f"building the model on {processes} CPU process(es) and saving it at step 0 ...", file=sys.stderr)
        result = subprocess.run([sys.executable, *launcher, "--set", *settings], cwd=REPO, capture_output=True,
                                text=True, env=dict(os.environ, PRETRAIN_DEVICE="cpu", DS_ACCELERATOR="cpu"))
        if result.returncode == 2:  # the trainer's one-line reason: a weight file it cannot read, ...
            reason = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
            raise UsageError(reason[-1][len("error: "):] if reason else result.stderr.strip()[-500:])
        if result.returncode != 0:
            raise RuntimeError(f"the trainer failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        if output.is_dir():
            output.rmdir()  # empty (checked above)
        os.replace(partial / "checkpoints", output)
        # The launcher's helpers that DeepSpeed drops beside checkpoints are of no use for ours.
        for leftover in ("zero_to_fp32.py", "zero_to_torch.py"):
            (output / leftover).unlink(missing_ok=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    manifest = json.loads((output / (output / LATEST).read_text().strip() / "manifest.json").read_text())
    return (f"wrote {output}: step 0, {layout_text(manifest['layout'])}, {manifest['precision']}; continue with "
            f"python -m pretrain --config CONFIG --set checkpoint.dir={output} data.prefixes=[...]")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        _check(args)
        print(to_hf_or_fp32(args) if args.to else from_hf(args))
    except (UsageError, CheckpointError, HFFormatError, ConfigError, LayoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
