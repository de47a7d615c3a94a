"""The install that `make setup` builds: the stack later pieces rely on is importable and works."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.version import Version


def test_torch_is_recent_enough():
    import torch

    assert Version(torch.__version__.split("+")[0]) >= Version("2.11")


def test_deepspeed_and_megatron_core_import_on_this_machine():
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    code = "import deepspeed, megatron.core, sentencepiece, tensorboard, datasets, tiktoken; print(deepspeed.__version__)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_mpiexec_from_the_mpich_wheel_runs_mpi4py_ranks():
    mpiexec = Path(sys.executable).parent / "mpiexec"
    assert mpiexec.exists() or shutil.which("mpiexec"), "the mpich wheel should put mpiexec in the venv"
    # Rank 0 prints what every rank saw (two ranks printing at once would interleave).
    code = ("from mpi4py import MPI; c = MPI.COMM_WORLD; seen = c.gather((c.rank, c.size, c.allreduce(c.rank)))\n"
            "if c.rank == 0: print(seen)")
    result = subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[(0, 2, 1), (1, 2, 1)]"
