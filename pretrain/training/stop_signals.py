"""Stop requests by signal (SIGTERM: preemption, requeue, scancel; SIGUSR1: the time limit is
near; SIGINT: Ctrl-C), recorded from the first moment of the process. Ctrl-C is a stop request like
the others; a second Ctrl-C ends the process at once (exit 130), without a checkpoint.

`python -m pretrain` installs the handler before importing torch: a rank spends minutes in
imports, model building and DeepSpeed's initialization before it trains, and a signal's
default action there would kill it. The trainer reads the request after each step (and once
before the first) and every rank saves together. Nothing here imports more than the standard
library, so that installing it costs nothing.
"""

from __future__ import annotations

import os
import signal
import time

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_received: str | None = None
_interrupts = 0  # Ctrl-Cs so far
_quiet = False


def _record(signum, _frame) -> None:
    global _received, _interrupts
    if signum == signal.SIGINT:
        _interrupts += 1
        if _interrupts > 1:
            _say("second Ctrl-C: exiting now, without a checkpoint")
            os._exit(128 + signal.SIGINT)
    if _received is None:  # the first request names the stop (a Ctrl-C under pretrain.launch comes from the
        _received = signal.Signals(signum).name  # terminal, then as SIGTERM from the launcher: one request)
        again = " (Ctrl-C again to stop at once, without one)" if signum == signal.SIGINT else ""
        _say(f"received {_received}: saving a checkpoint after this step, then exiting{again}")


def _say(message: str) -> None:
    """Rank 0 says it: every rank gets the signal (srun and pretrain.launch pass it to all), and every
    rank stops with it (the trainer agrees the stop), so other ranks' lines would repeat rank 0's."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if rank != "0" or _quiet:
        return
    # One write to stderr, not logging: the handler runs between any two bytecodes of the main thread, and
    # a rank signalled while `import torch` walked logging's registry of loggers crashed with "dictionary
    # changed size during iteration" when the handler looked up its logger (a test saw it under load).
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} [rank 0] WARNING {message}\n"
    try:
        os.write(2, line.encode())
    except OSError:  # stderr closed: the request is recorded all the same
        pass


def install(quiet: bool | None = None) -> None:
    """Record stop signals from now on. `quiet`: say nothing when one comes (the launcher, which has no
    step to save after); None keeps the last choice (an import that installs again changes nothing)."""
    global _quiet
    if quiet is not None:
        _quiet = quiet
    for signum in SIGNALS:
        signal.signal(signum, _record)


def received() -> str | None:
    """The name of the first stop signal received ("SIGTERM", "SIGUSR1", "SIGINT"), or None."""
    return _received
