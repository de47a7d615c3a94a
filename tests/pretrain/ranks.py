"""Starting the ranks of a multi-process test: forked from a server that imported torch, DeepSpeed and
megatron-core once, instead of one fresh interpreter per rank (~3.5 s of imports each on this
machine's cores). Each rank still initializes its own process group and parallel state.

The server starts at the first call and keeps the environment of that moment: `start_ranks` sets the
rendezvous (MASTER_ADDR, MASTER_PORT) in each rank, and a rank function sets the other variables it needs
itself (RANK, WORLD_SIZE, ...) and seeds its own generators (numpy's global one is copied from the server,
not reseeded)."""

from __future__ import annotations

import os

import torch.multiprocessing as mp

from pretrain.parallel.distributed import host_rendezvous
from tests.forkserver import PRELOAD


def start_ranks(function, args: tuple, nprocs: int) -> None:
    """function(rank, *args) on `nprocs` processes, with MASTER_ADDR and MASTER_PORT set to a rendezvous
    this process hosts (pretrain.parallel.distributed.host_rendezvous); returns when all ended, raises if
    one failed."""
    mp.set_forkserver_preload(PRELOAD)  # read when the server first starts, then kept for the session
    store, rendezvous = host_rendezvous(nprocs)
    mp.start_processes(_in_rendezvous, args=(rendezvous, function, *args), nprocs=nprocs, join=True,
                       start_method="forkserver")
    del store  # kept until every rank has ended


def _in_rendezvous(rank: int, rendezvous: dict, function, *args) -> None:
    os.environ.update(rendezvous)
    function(rank, *args)
