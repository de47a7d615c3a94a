"""python -m pretrain.launch --nproc N --config CONFIG.yaml [--set key=value ...]

Starts N local ranks of `python -m pretrain` (gloo on CPU, NCCL on GPUs) with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set, forwards SIGTERM
and SIGUSR1 to them (so a preempted run can save and exit), and exits with the
first non-zero exit code among them. Ctrl-C asks the ranks to save after their step
and exit, as SIGTERM does; a second Ctrl-C stops them at once (exit 130). For several
nodes, use srun (slurm/).

On CPU the ranks are forked from this process after it has imported torch,
DeepSpeed, megatron-core and the trainer once: each rank would otherwise spend
about 3 s of CPU on those imports (an 8-rank run, 25 s of a 2-core machine).
Where a GPU is visible every rank is a fresh process, because CUDA does not
survive a fork.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import traceback

from pretrain.parallel.distributed import host_rendezvous
from pretrain.training import stop_signals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, required=True, help="processes to start on this machine")
    args, rest = parser.parse_known_args(argv)
    if args.nproc < 1:
        print("error: --nproc must be at least 1", file=sys.stderr)
        return 2
    # Until the ranks start, a stop signal (SIGTERM, SIGUSR1, a first Ctrl-C) is recorded, as in a rank (the
    # imports below install the same handlers), and ends the launcher before it starts any; a second Ctrl-C
    # exits at once.
    stop_signals.install(quiet=True)
    start = fork_rank if ranks_on_cpu() else spawn_rank
    if start is fork_rank:
        preload()
        share_the_cores(args.nproc)
    refusal = check_before_starting(rest, args.nproc)
    if refusal is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    if stop_signals.received():
        print(f"pretrain.launch: {stop_signals.received()} before any rank started: nothing was started",
              file=sys.stderr)
        return 128 + signal.SIGINT if stop_signals.received() == "SIGINT" else 0
    signal.signal(signal.SIGINT, lambda *_: sys.exit(128 + signal.SIGINT))  # Ctrl-C while forking: just stop
    # The store serves the ranks until they end. Its server thread is running when the ranks are forked: a
    # forked rank never touches the copy it inherits (it connects as a client, and leaves through os._exit).
    store, rendezvous = host_rendezvous(args.nproc)
    children = []
    for rank in range(args.nproc):
        children.append(start({"RANK": str(rank), "WORLD_SIZE": str(args.nproc), "LOCAL_RANK": str(rank),
                               **rendezvous}, rest))

    interrupts = 0

    def forward(signum, _frame):
        nonlocal interrupts
        if signum == signal.SIGINT:  # Ctrl-C: the terminal sends it to the ranks too (one process group)
            interrupts += 1
            # The first asks every rank to save after its step, as SIGTERM does (the ranks that got the
            # terminal's SIGINT get this too: one request); the second stops them at once.
            signum = signal.SIGTERM if interrupts == 1 else signal.SIGKILL
            if interrupts == 2:
                print("pretrain.launch: second Ctrl-C: stopping the ranks now, without a checkpoint", file=sys.stderr)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, forward)
    code = wait_for(children, quiet=lambda: interrupts > 1)
    del store
    return 128 + signal.SIGINT if interrupts > 1 else code


def check_before_starting(argv: list[str], nproc: int) -> str | None:
    """What `python -m pretrain --check` would refuse for `nproc` ranks (settings, data, the checkpoint to
    resume), found once here: otherwise every rank would start, and print the same error. None: go on."""
    from pretrain.__main__ import CHECK_ERRORS, parse_args
    from pretrain.config import load_config
    from pretrain.training.run_check import plan_run

    arguments = parse_args(argv)  # a malformed command line: argparse's usage and exit 2, once
    if arguments.check:
        return None  # the rank checks, and says ok
    try:
        plan_run(load_config(arguments.config, arguments.set), nproc)
    except (*CHECK_ERRORS, OSError) as error:
        return str(error)
    return None


def ranks_on_cpu() -> bool:
    if os.environ.get("PRETRAIN_DEVICE", "").lower() == "cpu":
        return True
    import torch

    return not torch.cuda.is_available()


def preload() -> None:
    """What every rank imports before its first step, imported once here so that forks share it."""
    import pretrain.__main__

    pretrain.__main__.import_the_trainer()  # first: it sets DS_ACCELERATOR before DeepSpeed is imported

    import deepspeed.pipe  # noqa: F401
    import megatron.core.datasets.blended_megatron_dataset_builder  # noqa: F401
    import megatron.core.datasets.gpt_dataset  # noqa: F401
    from data_pipeline.library_imports import import_deepspeed_optimizers

    import_deepspeed_optimizers()


def share_the_cores(nproc: int) -> None:
    """The forked ranks divide this machine's cores between them, as slurm/pretrain.sbatch does with
    OMP_NUM_THREADS: otherwise each rank runs one intra-op thread per core, and the threads of one rank
    spin while the others hold the cores (4 ranks of gpt2-tiny on 2 cores: 32 s of CPU for 5 steps
    instead of 15). The ranks inherit the setting; an OMP_NUM_THREADS the user set is kept."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // nproc))


def spawn_rank(environment: dict, argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pretrain", *argv], env=dict(os.environ, **environment))


class ForkedRank:
    """A forked rank, with the part of Popen's interface that `wait_for` and `forward` use."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)  # -N for a signal, as Popen
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def fork_rank(environment: dict, argv: list[str]) -> ForkedRank:
    sys.stdout.flush()
    sys.stderr.flush()  # or the child would print this process's buffered output again
    pid = os.fork()
    if pid:
        return ForkedRank(pid)
    os._exit(run_forked_rank(environment, argv))


def run_forked_rank(environment: dict, argv: list[str]) -> int:
    """In the child: what `python -m pretrain ARGV` would do, and its exit code."""
    from pretrain.training import stop_signals
    from pretrain.__main__ import main as rank_main

    code = 1
    try:
        os.environ.update(environment)
        stop_signals.install(quiet=False)  # the child inherited the launcher's handlers, and its silence
        code = rank_main(argv)
    except SystemExit as stop:  # argparse's exit 2, or sys.exit() somewhere below
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001  (a crash: its traceback, and exit 1 as an unforked rank would)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


STOP_GRACE_SECONDS = 10.0


def wait_for(children: list, grace: float = STOP_GRACE_SECONDS, quiet=lambda: False) -> int:
    """Wait for every child; if one fails, stop the rest (they would hang in a collective): SIGTERM, then
    SIGKILL for those still there after `grace` seconds. A rank waiting for the failed one at start-up, or
    in a collective, takes SIGTERM as a request to save after its step, which never comes. `quiet()` true:
    the ranks were stopped on purpose, and the failure is not announced."""
    while True:
        codes = [child.poll() for child in children]
        failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            rank, code = failed[0]
            if not quiet():
                print(f"pretrain.launch: rank {rank} exited with code {code}; stopping the other ranks",
                      file=sys.stderr)
            for child in children:
                child.terminate()
            deadline = time.monotonic() + grace
            while any(child.poll() is None for child in children) and time.monotonic() < deadline:
                time.sleep(0.1)
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGKILL)
                child.wait()
            return code
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
