"""Stop requests by signal (SIGTERM: preemption, requeue, scancel; SIGUSR1: the time limit is
near), recorded from the first moment of the process.

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

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: str | None = None


def _record(signum, _frame) -> None:
    global _received
    _received = signal.Signals(signum).name
    # One write to stderr, not logging: the handler runs between any two bytecodes of the main thread, and
    # a rank signalled while `import torch` walked logging's registry of loggers crashed with "dictionary
    # changed size during iteration" when the handler looked up its logger (a test saw it under load).
    line = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} [rank {os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0'))}] "
            f"WARNING received {_received}: saving a checkpoint after this step, then exiting\n")
    try:
        os.write(2, line.encode())
    except OSError:  # stderr closed: the request is recorded all the same
        pass


def install() -> None:
    for signum in SIGNALS:
        signal.signal(signum, _record)


def received() -> str | None:
    """The name of the last stop signal received ("SIGTERM", "SIGUSR1"), or None."""
    return _received
