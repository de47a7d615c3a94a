"""Parallelism applied to the model from outside, in named, ordered steps:

    build_model                  layers -> GPT2 (one stage) or a DeepSpeed PipelineModule (stages,
                                 pretrain/parallel/pipeline.py: each rank builds its own stage only);
                                 tensor parallelism is already inside the layers (megatron-core);
                                 built on the meta device, then given weights layer by layer on the
                                 rank's device (pretrain/parallel/materialize.py)
    apply_activation_checkpointing   none, every block, or every k-th block
    apply_compile                torch.compile each block (train.compile)
    (then deepspeed.initialize, in the trainer)
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.model.gpt2 import GPT2, Block, GPTConfig
from pretrain.parallel.distributed import collective_device
from pretrain.parallel.layout import ParallelLayout
from pretrain.parallel.materialize import materialize
from pretrain.parallel.pipeline import build_pipeline


def build_model(config: GPTConfig, layout: ParallelLayout, topology, parallel, seed: int,
                partition_method: str = "parameters", device: torch.device | str | None = None) -> nn.Module:
    """This rank's part of the model with its initial weights on `device` (default: where its collectives run,
    the GPU under NCCL): constructed on the meta device, then layer by layer (pretrain/parallel/materialize.py),
    so the host never holds the whole model."""
    device = collective_device() if device is None else device
    if layout.pipeline_parallel_size == 1:
        with torch.device("meta"):
            model = GPT2(config, parallel, seed)
        materialize(model, config, parallel, seed, device)
    else:
        model = build_pipeline(config, topology, parallel, seed, partition_method, device)
    return without_empty_extra_state(model)


_EXTRA_STATE = "._extra_state"


def without_empty_extra_state(model: nn.Module) -> nn.Module:
    """Leave megatron-core's empty `_extra_state` entries out of the model's state dict.

    Its linear layers reserve that slot for Transformer Engine and fill it with
    None; DeepSpeed's universal-checkpoint converter takes every entry for a
    tensor and fails on them. They carry nothing; on load megatron-core puts them
    back itself.
    """
    def drop(_module, state_dict, _prefix, _metadata):
        for key in [k for k, v in state_dict.items() if k.endswith(_EXTRA_STATE) and v is None]:
            del state_dict[key]

    model.register_state_dict_post_hook(drop)
    return model


def apply_activation_checkpointing(model: nn.Module, every: int) -> int:
    """Recompute activations of every `every`-th block in backward (0: none, 1: all).

    Blocks are counted by their global index, so the choice does not depend on
    how the pipeline is cut. Returns how many local blocks were marked.
    """
    if every < 0:
        raise ValueError(f"model.activation_checkpointing={every} must be 0 (off) or a positive interval")
    marked = 0
    for name, module in model.named_modules():
        if isinstance(module, Block):
            block_index = int(name.split(".")[-1]) - 2  # layer index -> block number
            module.checkpoint_activations = every > 0 and block_index % every == 0
            marked += module.checkpoint_activations
    return marked


def apply_compile(model: nn.Module, enabled: bool) -> int:
    """torch.compile every local block in place (parameter names unchanged); returns how many.

    Per block, not the whole model: the blocks are where the time goes, they are all
    alike (one compiled graph serves them all), and the pipeline engine, the tied
    head and the chunked loss stay eager, outside what the compiler must understand.
    """
    blocks = [module for module in model.modules() if isinstance(module, Block)] if enabled else []
    for block in blocks:
        block.compile()
    return len(blocks)
