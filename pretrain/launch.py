"""python -m pretrain.launch --nproc N --config CONFIG.yaml [--set key=value ...]

Starts N local processes of `python -m pretrain` (gloo on CPU, NCCL on GPUs) with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set, forwards SIGTERM
and SIGUSR1 to them (so a preempted run can save and exit), and exits with the
first non-zero exit code among them. For several nodes, use srun (slurm/).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from pretrain.parallel.distributed import free_port


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, required=True, help="processes to start on this machine")
    args, rest = parser.parse_known_args(argv)
    if args.nproc < 1:
        print("error: --nproc must be at least 1", file=sys.stderr)
        return 2
    port = str(free_port())
    children = []
    for rank in range(args.nproc):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(args.nproc), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        children.append(subprocess.Popen([sys.executable, "-m", "pretrain", *rest], env=env))

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, forward)
    return wait_for(children)


def wait_for(children: list[subprocess.Popen]) -> int:
    """Wait for every child; if one fails, stop the rest (they would hang in a collective)."""
    while True:
        codes = [child.poll() for child in children]
        failed = [code for code in codes if code not in (None, 0)]
        if failed:
            for child in children:
                if child.poll() is None:
                    child.terminate()
            for child in children:
                child.wait()
            return failed[0]
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
