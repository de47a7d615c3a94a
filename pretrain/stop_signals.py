"""Stop requests by signal (SIGTERM: preemption, requeue, scancel; SIGUSR1: the time limit is
near), recorded from the first moment of the process.

`python -m pretrain` installs the handler before importing torch: a rank spends minutes in
imports, model building and DeepSpeed's initialization before it trains, and a signal's
default action there would kill it. The trainer reads the request after each step (and once
before the first) and every rank saves together. Nothing here imports more than the standard
library, so that installing it costs nothing.
"""

from __future__ import annotations

import logging
import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: str | None = None


def _record(signum, _frame) -> None:
    global _received
    _received = signal.Signals(signum).name
    logging.getLogger("pretrain").warning("received %s: saving a checkpoint after this step, then exiting",
                                          _received)


def install() -> None:
    for signum in SIGNALS:
        signal.signal(signum, _record)


def received() -> str | None:
    """The name of the last stop signal received ("SIGTERM", "SIGUSR1"), or None."""
    return _received
