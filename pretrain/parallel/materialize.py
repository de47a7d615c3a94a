"""A model built on the meta device, given its initial weights where it will train, one layer at a time.

Building the whole model on a rank's CPU and then moving it to the GPU held every parameter in host
memory first (6.2 GB for the 1.5B model, on each of a node's 8 ranks). Instead the model is
constructed under `torch.device("meta")`, which allocates nothing, and each layer this rank holds is
then constructed again for real on the CPU, by the same constructor with the same arguments, and its
parameters moved to the target device in place of the meta ones. The weights are therefore exactly
those of a whole-model build for the same seed, in every layout: each layer draws its values from
(seed, parameter name) (pretrain/model/gpt2.py Initializer) and megatron-core splits them for tensor
parallelism as it always does. The host never holds more than one layer (with megatron-core's
full-size copy of its largest weight while it splits it).
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.model.gpt2 import Block, FinalNorm, Initializer, PositionEmbedding, WordEmbedding

LAYERS = (WordEmbedding, PositionEmbedding, Block, FinalNorm)


def layer_index(name: str, module: nn.Module) -> int:
    """The index a layer was constructed with, from its name in GPT2 or a pipeline stage (`2`, `tied_modules.embed`,
    ...): the word embedding is layer 0 wherever it appears (the last stage's tied head is built as layer 0 too)."""
    return 0 if isinstance(module, WordEmbedding) else int(name.rsplit(".", 1)[-1])


def materialize(model: nn.Module, config, parallel, seed: int, device: torch.device | str) -> int:
    """Every meta layer of `model` built for real, its parameters placed on `device`; returns the count."""
    init, built = Initializer(seed, config.init_std), set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, LAYERS) or id(module) in built or not any(p.is_meta for p in module.parameters()):
            continue  # not a layer, built already (a tied layer appears under two names), or never on meta
        with torch.device("cpu"):
            real = type(module)(config, parallel, init, layer_index(name, module))
        mine, theirs = dict(module.named_parameters()), dict(real.named_parameters())
        if mine.keys() != theirs.keys():
            raise RuntimeError(f"layer {name}: the rebuilt {type(module).__name__} has parameters {sorted(theirs)}, "
                               f"the meta one {sorted(mine)}")
        for key, parameter in theirs.items():
            owner_name, _, attribute = key.rpartition(".")
            owner = module.get_submodule(owner_name)
            placed = nn.Parameter(parameter.data.to(device), requires_grad=parameter.requires_grad)
            placed.__dict__.update(parameter.__dict__)  # megatron-core's attributes (tensor_model_parallel, ...)
            owner._parameters[attribute] = placed
        del real, theirs  # this layer's host copy goes before the next is built
        built.add(id(module))
    still = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if still and torch.device(device).type != "meta":  # tools/bench_startup.py --to meta measures the host alone
        raise RuntimeError(f"tensors outside any layer were left on the meta device: {still}")
    return len(built)
