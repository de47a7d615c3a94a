"""python -m pretrain --config CONFIG.yaml [--set section.key=value ...]

Runs under torchrun, srun, or python -m pretrain.launch (it reads RANK /
WORLD_SIZE / LOCAL_RANK, or the SLURM_* variables); alone it is one process.
Starting again with the same run directory resumes from its latest checkpoint.
SIGTERM or SIGUSR1 saves a checkpoint after the current step and exits 0.
Exit codes: 0 done (or stopped by a signal, checkpoint saved), 2 a setting or a
checkpoint that cannot work (the message names it), 3 training diverged (too many
consecutive steps with non-finite loss or gradients, each skipped).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not __import__("torch").cuda.is_available() else "cuda")

from pretrain.checkpoint import CheckpointError  # noqa: E402
from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.data import DataError  # noqa: E402
from pretrain.parallel.distributed import environment_from_launcher  # noqa: E402
from pretrain.parallel.layout import LayoutError  # noqa: E402
from pretrain.trainer import Trainer, TrainingDiverged  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (configs/gpt2-tiny.yaml, ...)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. --set optim.lr=3e-4 parallel.tensor_parallel_size=2")
    return parser.parse_args(argv)


def configure_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")
    logging.getLogger("pretrain").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def main(argv=None) -> int:
    args = parse_args(argv)
    environment_from_launcher()
    configure_logging()
    try:
        config = load_config(args.config, args.set)
    except (ConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    trainer = Trainer(config)
    try:
        trainer.setup()
        trainer.run()
    except (ConfigError, LayoutError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
