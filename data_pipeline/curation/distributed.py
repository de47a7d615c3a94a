"""The few collective operations curation needs, for one process or many MPI ranks.

`mpiexec -n R python tools/curate.py ...` (or `srun`) gives R ranks: they split
the input files, exchange dedup bucket records by hash, and meet in barriers
between phases. Alone, the same code runs with `Coordinator(None)`, for which
every collective is trivial. The output directory must be on a file system all
ranks see (as for any Slurm job's output).
"""

from __future__ import annotations

import os


class PeerFailure(RuntimeError):
    """The ranks cannot work together: another rank failed (it prints its own error), or the
    launcher started several tasks that MPI does not see as one world."""


class AnotherRankFailed(PeerFailure):
    """This rank is fine but another failed and said why. The tools exit 0 on it and leave the exit code
    to the rank that failed: mpiexec (MPICH) ORs the ranks' codes, so a 2 here and a 1 there would end
    the job with a 3 that no tool returns; srun keeps the largest, which is the failed rank's too."""


class Coordinator:
    def __init__(self, comm=None):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.world = comm.Get_size() if comm is not None else 1

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()

    def all_to_all(self, outgoing: list) -> list:
        """outgoing[d] goes to rank d; returns what every rank sent to this one, by sender."""
        return self.comm.alltoall(outgoing) if self.comm is not None else outgoing

    def gather(self, value) -> list | None:
        """Every rank's value on rank 0 (None elsewhere)."""
        return self.comm.gather(value, root=0) if self.comm is not None else [value]

    def broadcast(self, value):
        return self.comm.bcast(value, root=0) if self.comm is not None else value

    def all_max(self, value: int) -> int:
        from_all = self.comm.allgather(value) if self.comm is not None else [value]
        return max(from_all)

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed, so none waits forever in the next collective."""
        if self.comm is None:
            if error is not None:
                raise error
            return
        failures = self.comm.allgather(None if error is None else f"rank {self.rank}: {type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [f for f in failures if f]
        if failed:
            raise AnotherRankFailed("another rank failed: " + "; ".join(failed))

    def owns(self, index: int) -> bool:
        """Input files are dealt to ranks round-robin."""
        return index % self.world == self.rank


# Set by the launchers to the number of processes started together: mpiexec (MPICH, Open MPI, PMIx)
# and srun (SLURM_STEP_NUM_TASKS, which is 1 in a batch script itself).
_TASK_COUNT_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS")


def world_communicator():
    """MPI.COMM_WORLD when launched as several tasks, else None (no MPI initialization at all).

    Under srun without an MPI plugin every task would see a world of one and all of
    them would curate every file into the same output; that is refused.
    """
    tasks = max(int(os.environ.get(variable) or 1) for variable in _TASK_COUNT_VARIABLES)
    if tasks <= 1:
        return None
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() != tasks:
        raise PeerFailure(f"started as one of {tasks} tasks, but MPI sees a world of {comm.Get_size()}: "
                          "launch the ranks with the mpiexec of the MPI that mpi4py uses (MPICH's, beside "
                          "the venv's Python; inside a Slurm job too, as slurm/curate.sbatch does)")
    return comm
