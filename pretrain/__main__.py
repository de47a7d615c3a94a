"""python -m pretrain --config CONFIG.yaml [--set section.key=value ...] [--check]

Runs under torchrun, srun, or python -m pretrain.launch (it reads RANK /
WORLD_SIZE / LOCAL_RANK, or the SLURM_* variables); alone it is one process.
Starting again with the same run directory resumes from its latest checkpoint.

Stopping early, always after the current step and with a checkpoint saved:
SIGTERM or SIGUSR1 (a preemption, a time-limit warning), the kill switch
(create RUN_DIR/STOP), or train.exit_after_minutes of wall time. The reason is
written to RUN_DIR/exit.json, which slurm/pretrain.sbatch reads to decide whether
to requeue. PRETRAIN_DEVICE=cpu trains with gloo on CPUs even where GPUs are visible.

--check validates the config for a world size (WORLD_SIZE, SLURM_NTASKS or
--world-size) without starting anything: the layout against the model, the
tokenizer, the data prefixes (enough tokens for a sample), the run and checkpoint
directories, and the checkpoint the run would resume from (everything the resume
would refuse). It prints the layout, the resume point and the run directory.

The console shows rank 0's start in five lines and one line per logged step;
every rank's full log (placement, resolved config, the libraries' output) is in
RUN_DIR/logs/rank_NNNNN.log.

Exit codes: 0 done (finished, or stopped early with a checkpoint saved), 2 a
setting, launch environment or checkpoint that cannot work (the message names
it), 3 training diverged (too many consecutive steps with non-finite loss or
gradients, each skipped). A crash exits 1 with a traceback (and, on a fatal
signal, every thread's stack from Python's fault handler).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys

from pretrain.training import stop_signals

stop_signals.install()  # before the imports below: a preemption during start-up must not kill the rank

from pretrain.checkpoint.resume import CheckpointError  # noqa: E402
from pretrain.training.blend import DataError  # noqa: E402
from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.parallel.environment import (  # noqa: E402
    LaunchError,
    environment_from_launcher,
    set_communication_defaults,
    wants_gpu,
)
from pretrain.parallel.layout import LayoutError  # noqa: E402
from pretrain.training.run_check import plan_run  # noqa: E402

# What --check can raise: none of these modules imports torch, so a check takes a fraction of a second.
CHECK_ERRORS = (ConfigError, LayoutError, DataError, LaunchError, CheckpointError)


def import_the_trainer():
    """torch, DeepSpeed's accelerator choice, megatron-core and the trainer: a training run's imports (seconds).
    Returns (Trainer, TrainingDiverged, every error that means a setting or file cannot work)."""
    import torch

    # DeepSpeed picks its accelerator at import; an invalid PRETRAIN_DEVICE is reported in main().
    cpu = os.environ.get("PRETRAIN_DEVICE", "").lower() == "cpu" or not torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if cpu else "cuda")

    from pretrain.checkpoint.huggingface import HFFormatError
    from pretrain.training.trainer import Trainer, TrainingDiverged

    return Trainer, TrainingDiverged, (*CHECK_ERRORS, HFFormatError)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (configs/gpt2-tiny.yaml, ...)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. --set optim.lr=3e-4 parallel.tensor_parallel_size=2")
    parser.add_argument("--check", action="store_true", help="validate the config and exit (no training)")
    parser.add_argument("--world-size", type=int, help="with --check: the number of ranks to check the layout for")
    return parser.parse_args(argv)


def configure_logging() -> None:
    from pretrain.training import console

    console.configure(int(os.environ.get("RANK", "0")))


def check(config, world_size: int | None) -> int:
    given = world_size or os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS")
    world_size = int(given or 1)
    wants_gpu()  # PRETRAIN_DEVICE=cuda on a node whose torch sees no GPU stops here, not on every rank
    try:
        plan = plan_run(config, world_size)
    except CHECK_ERRORS as error:
        if given:
            raise
        raise type(error)(f"{error} (checked for 1 rank: give --world-size N for N)") from None
    print(f"ok: {world_size} ranks, {plan.layout.describe()}; {len(plan.blend[0])} data shard(s)")
    point = plan.resume_point
    print(f"resume: {point.describe()}" if point else "resume: none (starts at step 0)")
    print(f"checkpoints: about {plan.checkpoint_bytes / 1e9:.2f} GB each, keep_last={config.checkpoint.keep_last}")
    for warning in plan.warnings:
        print(f"warning: {warning}")
    print(f"run_dir={config.run.dir}")  # slurm/pretrain.sbatch reads this line
    return 0


def report(error: Exception) -> None:
    """An error that stops the run, printed by the first rank to meet it (the others meet the same one)."""
    from pretrain.parallel.distributed import first_to_report

    if first_to_report():
        print(f"error: {error}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    faulthandler.enable()  # a segfault or abort prints every thread's Python stack
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # `kill -USR2 PID` shows where a hung rank is
    try:
        config = load_config(args.config, args.set)
        if args.check:
            return check(config, args.world_size)
        environment_from_launcher()
        set_communication_defaults(config.parallel.tensor_parallel_size)  # before CUDA starts
    except (*CHECK_ERRORS, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    Trainer, TrainingDiverged, setup_errors = import_the_trainer()
    configure_logging()
    trainer = Trainer(config)
    try:
        trainer.setup()
        trainer.run()
    except setup_errors as error:
        report(error)
        return 2
    except TrainingDiverged as error:
        report(error)
        return 3
    finally:
        trainer.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
