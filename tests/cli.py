"""The project's command lines, run in their own processes as a user runs them, started faster.

`run([sys.executable, "-m", "pretrain", ...])` and `run([sys.executable, "tools/evaluate.py", ...])`
behave like subprocess.run: the command gets its own process, argv, environment, working
directory, stdout and stderr, and ends with its own exit code (a traceback and 1 for a crash, -N
for a signal). The difference is only how the process starts: forked from the session's fork server
(tests/forkserver.py), which has imported torch, DeepSpeed, megatron-core and the trainer, instead
of a fresh interpreter that spends ~3 s of CPU on those imports. `start` is the Popen form: the
test may signal the process (`send_signal`, `terminate`, `kill`) and `wait` for it.

Anything else (an executable that is not this Python, `-c`, ...) goes to subprocess as it is.
The Slurm tests and the demo test start real interpreters (srun and tools/demo.py do), so the
plain start-up path stays tested end to end.
"""

from __future__ import annotations

import atexit
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

from tests.forkserver import context


class Command:
    """A started command: the parts of subprocess.Popen the tests use."""

    def __init__(self, args: list[str], process, out: Path, err: Path, scratch: tempfile.TemporaryDirectory):
        self.args, self._process, self._out, self._err, self._scratch = args, process, out, err, scratch
        self.pid = process.pid
        self.stdout: str | None = None
        self.stderr: str | None = None

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        self._collect()
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.stdout, self.stderr

    def output_so_far(self) -> tuple[str, str]:
        """What the command has written until now (for tests that wait for a line)."""
        return tuple(path.read_text(errors="replace") if path.exists() else "" for path in (self._out, self._err))

    def _collect(self) -> None:
        if self.stdout is None:
            self.stdout, self.stderr = self.output_so_far()
            self._scratch.cleanup()


def start(args: list[str], cwd: str | Path | None = None, env: dict | None = None) -> Command | subprocess.Popen:
    if not forkable(args):
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scratch = tempfile.TemporaryDirectory(prefix="cli-")
    out, err = Path(scratch.name) / "stdout", Path(scratch.name) / "stderr"
    process = context().Process(target=_execute, args=(list(args), str(cwd or os.getcwd()),
                                                       dict(os.environ if env is None else env), str(out), str(err)))
    process.start()
    return Command(list(args), process, out, err, scratch)


def run(args: list[str], cwd: str | Path | None = None, env: dict | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)."""
    command = start(args, cwd, env)
    try:
        stdout, stderr = command.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        command.kill()
        command.wait()
        raise
    return subprocess.CompletedProcess(args, command.returncode, stdout, stderr)


def forkable(args: list[str]) -> bool:
    """`python -m MODULE ...` or `python SCRIPT.py ...` with this interpreter."""
    if len(args) < 2 or os.path.realpath(args[0]) != os.path.realpath(sys.executable):
        return False
    return (args[1] == "-m" and len(args) > 2) or args[1].endswith(".py")


def _execute(args: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """In the forked process: become `python ARGS` and exit as it would."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", encoding="utf-8", buffering=1, closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
    for signum in (signal.SIGTERM, signal.SIGUSR1):  # what a fresh interpreter starts with
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = 1
    try:
        if args[1] == "-m":
            sys.argv = [args[2], *args[3:]]
            # The server imported the module already; a fresh interpreter would not say so.
            warnings.filterwarnings("ignore", message=".* found in sys.modules after import of package",
                                    category=RuntimeWarning)
            runpy.run_module(args[2], run_name="__main__", alter_sys=True)
        else:
            script = os.path.abspath(args[1])
            sys.argv = [args[1], *args[2:]]
            sys.path.insert(0, os.path.dirname(script))  # as the interpreter does for a script
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001  (a crash: the traceback and 1, as the interpreter gives)
        traceback.print_exc()
    try:
        atexit._run_exitfuncs()  # what the interpreter runs at exit: flushes, temporary files
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
