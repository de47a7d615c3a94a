"""What a run shows on the console, and what goes to its log files instead.

The console (stderr) holds what a person watches: rank 0's start summary (layout, model, data, resume
point, where the config and logs are), one line per logged step, checkpoints, and every rank's warnings
and errors. Everything else goes to RUN_DIR/logs/rank_NNNNN.log, one file per rank, appended at each
start: where each rank runs, the resolved config, and what DeepSpeed, megatron-core and torch say while
they build (their warnings and DeepSpeed's prints). Before the run directory is known, those records wait
in memory; a start that fails before then has its error on the console.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import sys
from pathlib import Path

DETAIL = "pretrain.detail"  # a logger for the files only: placement, the resolved config, library output
LOG_DIRECTORY = "logs"
_FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(message)s"


class ConsoleFilter(logging.Filter):
    """Ours (not DETAIL): rank 0's from INFO, other ranks' from WARNING; any library's errors."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        ours = record.name == "pretrain" or (record.name.startswith("pretrain.") and record.name != DETAIL)
        return ours and (self.rank == 0 or record.levelno >= logging.WARNING)


_pending: logging.handlers.MemoryHandler | None = None


def configure(rank: int) -> None:
    """Console handler with ConsoleFilter; every record from INFO held in memory until `open_log_file`."""
    global _pending
    formatter = logging.Formatter(_FORMAT.format(rank=rank))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    console.addFilter(ConsoleFilter(rank))
    _pending = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    _pending.setFormatter(formatter)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(console)
    root.addHandler(_pending)
    logging.getLogger("pretrain").setLevel(logging.INFO)
    # DeepSpeed's logger prints to stdout itself at its own level: through ours instead, warnings only. It is
    # made when deepspeed is first imported, which one process (no launcher's preload) may not have done yet.
    import deepspeed.utils.logging  # noqa: F401

    library = logging.getLogger("DeepSpeed")
    for handler in list(library.handlers):
        library.removeHandler(handler)
    library.setLevel(logging.WARNING)
    library.propagate = True
    logging.captureWarnings(True)  # Python warnings (deprecations inside the libraries) become records


def open_log_file(run_dir: Path, rank: int) -> Path | None:
    """Start RUN_DIR/logs/rank_NNNNN.log (appended), with the records held since `configure`; None where
    `configure` was not called (a Trainer inside another program keeps that program's logging)."""
    global _pending
    if _pending is None:
        return None
    directory = Path(run_dir) / LOG_DIRECTORY
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rank_{rank:05d}.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(_FORMAT.format(rank=rank)))
    root = logging.getLogger()
    _pending.setTarget(handler)
    _pending.flush()
    root.removeHandler(_pending)
    _pending.close()
    _pending = None
    root.addHandler(handler)
    return path


class _LogStream:
    """A file-like object whose lines become DETAIL records: for libraries that print()."""

    def __init__(self):
        self.partial = ""

    def write(self, text: str) -> int:
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        for line in lines:
            if line.strip():
                logging.getLogger(DETAIL).info("%s", line)
        return len(text)

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def prints_to_log():
    """What libraries print to stdout meanwhile (DeepSpeed's "Using topology: ...") goes to the log file."""
    stream = _LogStream()
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        stream.write("\n")
