"""Starting the ranks of a multi-process test: forked from a server that imported torch, DeepSpeed and
megatron-core once, instead of one fresh interpreter per rank (~3.5 s of imports each on this
machine's cores). Each rank still initializes its own process group and parallel state.

The server starts at the first call and keeps the environment of that moment: a rank function sets the
variables it needs itself (MASTER_ADDR, RANK, ...) and seeds its own generators (numpy's global one is
copied from the server, not reseeded)."""

from __future__ import annotations

import torch.multiprocessing as mp

from tests.forkserver import PRELOAD


def start_ranks(function, args: tuple, nprocs: int) -> None:
    """function(rank, *args) on `nprocs` processes; returns when all ended, raises if one failed."""
    mp.set_forkserver_preload(PRELOAD)  # read when the server first starts, then kept for the session
    mp.start_processes(function, args=args, nprocs=nprocs, join=True, start_method="forkserver")
