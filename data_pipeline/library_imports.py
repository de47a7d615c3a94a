"""Import megatron-core and DeepSpeed without paying for torch.compile at import time.

megatron-core decorates a few dozen fused kernels (GeGLU, SwiGLU, bias-dropout-add, ...) with
`torch.compile` when its modules load, and DeepSpeed's Muon optimizer does the same when its
engine checks which optimizers ZeRO supports. Each decoration imports and configures Inductor:
together about 2.5 s of CPU in every process, and every rank of every run pays it. This project
calls none of those kernels (it uses megatron-core's tensor-parallel layers, cross-entropy,
parallel_state and datasets, and AdamW). So while these modules load, `torch.compile` returns a
wrapper that compiles on its first call instead: nothing changes for a kernel that is ever
called, and nothing is paid for one that is not.

`import data_pipeline.library_imports` before anything from megatron.core (pretrain.model.gpt2
and data_pipeline.shards do), and call `import_deepspeed_optimizers()` before deepspeed.initialize.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch


def _compile_on_first_call(real_compile):
    def compile(model=None, **options):
        if model is None:  # used as @torch.compile(mode=...)
            return lambda function: compile(function, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = real_compile(model, **options)
            return compiled(*args, **kwargs)

        return call

    return compile


@contextlib.contextmanager
def compile_on_first_call():
    real_compile = torch.compile
    torch.compile = _compile_on_first_call(real_compile)
    try:
        yield
    finally:
        torch.compile = real_compile


def import_deepspeed_optimizers() -> None:
    """The module DeepSpeed's engine imports to check the optimizer (it holds compiled Muon steps)."""
    with compile_on_first_call():
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401


# megatron-core warns at import that Transformer Engine and Apex are absent; the parts we use
# need neither, so the warnings are only noise in every log.
with compile_on_first_call(), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import megatron.core  # noqa: F401  (its __init__ loads tensor_parallel, transformer, ...)
    import megatron.core.datasets.indexed_dataset  # noqa: F401
