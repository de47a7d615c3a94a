"""One fork server per test session, shared by multi-rank tests (tests/pretrain/ranks.py) and by
command-line runs (tests/cli.py).

A fresh interpreter spends about 3 s of CPU importing torch, DeepSpeed, megatron-core and our
trainer before it does anything; the suite starts hundreds of processes. The server imports them
once, and every process the tests start is forked from it. multiprocessing keeps one fork server
per interpreter, so the list of what it preloads lives here, in one place: whichever caller starts
the server first, it preloads all of it.

The server keeps the environment of the moment it starts (set DS_ACCELERATOR before: DeepSpeed
picks its accelerator at import); each process sets its own variables on top.
"""

from __future__ import annotations

import multiprocessing
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# MKL's AVX-512 code path made a forked run's step-1 loss differ by 3 float32 ulps from run to run (about one
# run in four; fresh interpreters never did), MKL_CBWR=AVX512 too; its AVX2 path gave the same loss 24 times
# of 24 at the same speed for these small models. Set here, before any test builds a command's environment,
# so every command and rank the tests start inherits it (tests/README.md, "A nondeterminism").
os.environ.setdefault("MKL_CBWR", "AVX2")

PRELOAD = [
    "torch", "data_pipeline.library_imports",  # megatron-core, quietly and without compiling
    "deepspeed", "deepspeed.pipe", "megatron.core.datasets.gpt_dataset",
    "megatron.core.datasets.blended_megatron_dataset_builder",
    # Not pretrain.__main__: importing it installs the stop-signal handlers, and the server's children
    # (the ranks of tests/pretrain/ranks.py) must die on SIGTERM as fresh processes do.
    "pretrain.training.trainer", "pretrain.launch", "pretrain.parallel.build", "pretrain.parallel.engine",
    "pretrain.model.loss", "pretrain.inference.loading", "pretrain.checkpoint.weights", "pretrain.checkpoint.huggingface",
    "deepspeed.runtime.zero.muon.muon_optimizer",  # what DeepSpeed's engine imports to check the optimizer
]


def context() -> multiprocessing.context.ForkServerContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server first starts, then kept for the session
    return ctx
