"""Parallelism applied to the model from outside, in named, ordered steps:

    build_model                  layers -> GPT2 (one stage) or a DeepSpeed PipelineModule (stages);
                                 tensor parallelism is already inside the layers (megatron-core)
    apply_activation_checkpointing   none, every block, or every k-th block
    (then deepspeed.initialize, in the trainer)
"""

from __future__ import annotations

from torch import nn

from pretrain.model.gpt2 import (
    GPT2,
    TIED_EMBEDDING,
    Block,
    GPTConfig,
    Initializer,
    WordEmbedding,
    language_model_loss,
    layer_classes,
    lm_head,
)
from pretrain.parallel.layout import ParallelLayout


def build_pipeline(config: GPTConfig, topology, parallel, seed: int, partition_method: str = "parameters"):
    """The layer sequence as a DeepSpeed PipelineModule.

    The word embedding appears twice, as a TiedLayerSpec: on the first stage it
    embeds, on the last it is the output head; DeepSpeed keeps the two copies
    equal by all-reducing their gradients. `partition_method` is DeepSpeed's:
    "parameters" (balance parameter counts), "uniform", or "type:Block".
    """
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    init = Initializer(seed, config.init_std)
    specs = []
    for index, cls in enumerate(layer_classes(config)):
        if cls is WordEmbedding:
            specs.append(TiedLayerSpec(TIED_EMBEDDING, WordEmbedding, config, parallel, init, index,
                                       tied_weight_attr="word.weight"))
        else:
            specs.append(LayerSpec(cls, config, parallel, init, index))
    specs.append(TiedLayerSpec(TIED_EMBEDDING, WordEmbedding, config, parallel, init, 0,
                               forward_fn=lm_head, tied_weight_attr="word.weight"))
    return PipelineModule(layers=specs, loss_fn=language_model_loss, topology=topology,
                          partition_method=partition_method)


def build_model(config: GPTConfig, layout: ParallelLayout, topology, parallel, seed: int,
                partition_method: str = "parameters") -> nn.Module:
    if layout.pipeline_parallel_size == 1:
        model = GPT2(config, parallel, seed)
    else:
        model = build_pipeline(config, topology, parallel, seed, partition_method)
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
