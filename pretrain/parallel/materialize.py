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

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from pretrain.model.gpt2 import Block, FinalNorm, Initializer, PositionEmbedding, WordEmbedding

LAYERS = (WordEmbedding, PositionEmbedding, Block, FinalNorm)


def layer_index(name: str, module: nn.Module) -> int:
    """The index a layer was constructed with, from its name in GPT2 or a pipeline stage (`2`, `tied_modules.embed`,
    ...): the word embedding is layer 0 wherever it appears (the last stage's tied head is built as layer 0 too)."""
    return 0 if isinstance(module, WordEmbedding) else int(name.rsplit(".", 1)[-1])


def materialize(model: nn.Module, config, parallel, seed: int, device: torch.device | str,
                workers: int | None = None) -> int:
    """Every meta layer of `model` built for real, its parameters placed on `device`; returns the count.

    Layers are built by `workers` threads at once (default: torch's intra-op threads, at most 4): drawing
    the values is most of the time, each layer draws from its own generators, and torch releases the GIL
    while it draws, so the values are the same in any order and the build scales with the cores. The host
    then holds up to `workers` layers at a time."""
    init = Initializer(seed, config.init_std)
    layers, seen = [], set()
    for name, module in model.named_modules():
        if isinstance(module, LAYERS) and id(module) not in seen and any(p.is_meta for p in module.parameters()):
            seen.add(id(module))  # a tied layer appears under two names: built once
            layers.append((name, module))

    def build(item):
        name, module = item
        with torch.device("cpu"):
            return type(module)(config, parallel, init, layer_index(name, module))

    workers = workers or max(1, min(4, torch.get_num_threads()))
    with ThreadPoolExecutor(workers) as pool:
        # Submitted `workers` ahead of the placing, not all at once: a finished layer waits for its turn.
        pending = [pool.submit(build, item) for item in layers[:workers]]
        for index, (name, module) in enumerate(layers):
            real = pending[index].result()
            if index + workers < len(layers):
                pending.append(pool.submit(build, layers[index + workers]))
            place(name, module, real, device)
            pending[index] = None  # this layer's host copy goes now
            del real
    still = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if still and torch.device(device).type != "meta":  # tools/bench_startup.py --to meta measures the host alone
        raise RuntimeError(f"tensors outside any layer were left on the meta device: {still}")
    return len(layers)


def place(name: str, module: nn.Module, real: nn.Module, device) -> None:
    """`real`'s parameters, moved to `device`, in place of `module`'s meta ones (the same names)."""
    mine, theirs = dict(module.named_parameters()), dict(real.named_parameters())
    if mine.keys() != theirs.keys():
        raise RuntimeError(f"layer {name}: the rebuilt {type(module).__name__} has parameters {sorted(theirs)}, "
                           f"the meta one {sorted(mine)}")
    for key, parameter in theirs.items():
        owner_name, _, attribute = key.rpartition(".")
        placed = nn.Parameter(parameter.data.to(device), requires_grad=parameter.requires_grad)
        # Marks set on the meta one since (DeepSpeed's pipeline sets some), then megatron-core's from the constructor.
        placed.__dict__.update({**mine[key].__dict__, **parameter.__dict__})
        module.get_submodule(owner_name)._parameters[attribute] = placed
