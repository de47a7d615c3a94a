"""A one-process gloo group with megatron-core's parallel state, for single-process model tests."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def single_process_group(tmp_path_factory):
    from pretrain.parallel.distributed import initialize_model_parallel
    from pretrain.parallel.layout import ParallelLayout

    if not dist.is_initialized():
        store = tmp_path_factory.mktemp("dist") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    layout = ParallelLayout(world_size=1)
    initialize_model_parallel(layout)
    yield layout
