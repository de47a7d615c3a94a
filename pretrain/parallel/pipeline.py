"""The layer sequence cut into pipeline stages: a DeepSpeed PipelineModule in which
each rank builds only the layers of its own stage.

DeepSpeed's "parameters" partitioning balances the layers' trainable-parameter
counts, and gets them by building every layer on every rank: for GPT-2 XL, the
whole model per rank before it keeps its stage. Here the counts come from the
layer sizes (`layer_parameter_counts`) and go into DeepSpeed's own balancing, so
the stages are cut exactly where DeepSpeed would cut them.
"""

from __future__ import annotations

import functools

from pretrain.model.gpt2 import (
    TIED_EMBEDDING,
    Block,
    FinalNorm,
    GPTConfig,
    Initializer,
    PositionEmbedding,
    WordEmbedding,
    layer_classes,
)
from pretrain.model.loss import head_loss, head_scores


def _column_parallel_linear(inputs: int, outputs: int, tensor_parallel_size: int) -> int:
    # Weight and bias are both split by output rows.
    return outputs // tensor_parallel_size * (inputs + 1)


def _row_parallel_linear(inputs: int, outputs: int, tensor_parallel_size: int) -> int:
    # The weight is split by input columns; the bias is added after the all-reduce, so it stays whole.
    return inputs // tensor_parallel_size * outputs + outputs


def layer_parameter_counts(config: GPTConfig, tensor_parallel_size: int) -> dict[type, int]:
    """Trainable parameters of one layer of each class, as built on one tensor-parallel rank."""
    C, tp = config.n_embd, tensor_parallel_size
    layer_norm = 2 * C  # weight and bias
    block = (2 * layer_norm
             + _column_parallel_linear(C, 3 * C, tp) + _row_parallel_linear(C, C, tp)  # attention
             + _column_parallel_linear(C, 4 * C, tp) + _row_parallel_linear(4 * C, C, tp))  # MLP
    return {
        WordEmbedding: config.padded_vocab_size // tp * C,  # this rank's rows of the padded vocabulary
        PositionEmbedding: config.n_positions * C,
        Block: block,
        FinalNorm: layer_norm,
    }


def layer_specs(config: GPTConfig, parallel, seed: int) -> list:
    """The layers as DeepSpeed LayerSpecs, built later by the stage that holds them.

    The word embedding appears twice, as a TiedLayerSpec: on the first stage it
    embeds, on the last it is the output head; DeepSpeed keeps the two copies
    equal by all-reducing their gradients.
    """
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    init = Initializer(seed, config.init_std)
    specs = []
    for index, cls in enumerate(layer_classes(config)):
        if cls is WordEmbedding:
            specs.append(TiedLayerSpec(TIED_EMBEDDING, WordEmbedding, config, parallel, init, index,
                                       tied_weight_attr="word.weight"))
        else:
            specs.append(LayerSpec(cls, config, parallel, init, index))
    specs.append(TiedLayerSpec(TIED_EMBEDDING, WordEmbedding, config, parallel, init, 0,
                               forward_fn=head_inputs, tied_weight_attr="word.weight"))
    return specs


def head_inputs(embedding: WordEmbedding, x):
    """The last stage's output: the hidden states and the tied embedding, which
    `pipeline_loss` turns into the loss chunk by chunk, never holding all the logits."""
    return x, embedding


def pipeline_loss(outputs: tuple, labels, distillation=None):
    """The training loss; while distilling (pretrain/training/distill.py), the labels of each micro-batch come
    with the teacher's last hidden states, as (labels, teacher_hidden)."""
    x, embedding = outputs
    if isinstance(labels, tuple):
        labels, teacher_hidden = labels
        return head_loss(x, embedding, labels, distillation=distillation, teacher_hidden=teacher_hidden)
    return head_loss(x, embedding, labels)


def pipeline_scores(outputs: tuple, labels):
    """The loss function while zero-shot tasks are scored (pretrain/parallel/engine.py score_batches)."""
    x, embedding = outputs
    return head_scores(x, embedding, labels)


@functools.cache
def _pipeline_module_counting_by_class() -> type:
    """A PipelineModule whose "parameters" partitioning looks layer sizes up by class.

    Defined on first use because DeepSpeed picks its accelerator when it is
    imported (DS_ACCELERATOR); like the rest of pretrain/parallel, this module
    imports DeepSpeed only once a pipeline is built.
    """
    from deepspeed.pipe import PipelineModule

    class PipelineModuleCountingByClass(PipelineModule):
        def __init__(self, layers, parameters_per_class: dict[type, int], materialize_on=None, **kwargs):
            # Set first: PipelineModule.__init__ partitions, and so counts, before it returns.
            self.parameters_per_class = parameters_per_class
            self.materialize_on = materialize_on  # (config, parallel, seed, device), or None to build as DeepSpeed does
            super().__init__(layers, **kwargs)

        def _build(self):
            # DeepSpeed builds this stage's layers here, then moves them to the device and broadcasts the tied
            # weights: the layers are built on the meta device and given their weights on the device in between.
            if self.materialize_on is None:
                return super()._build()
            import torch

            from pretrain.parallel.materialize import materialize

            with torch.device("meta"):
                super()._build()
            materialize(self, *self.materialize_on)

        def _count_layer_params(self) -> list[int]:
            # The list DeepSpeed's own count gives (every spec, each tied copy counted
            # where it appears), without building a layer.
            missing = {spec.typename for spec in self._layer_specs} - self.parameters_per_class.keys()
            if missing:
                names = sorted(cls.__name__ for cls in missing)
                raise KeyError(f"no parameter count for layer class(es) {names}; "
                               "add them to layer_parameter_counts in pretrain/parallel/pipeline.py")
            return [self.parameters_per_class[spec.typename] for spec in self._layer_specs]

    return PipelineModuleCountingByClass


def build_pipeline(config: GPTConfig, topology, parallel, seed: int, partition_method: str = "parameters",
                   device=None):
    """The layer sequence as a DeepSpeed PipelineModule; this rank builds only its stage, on the meta device
    and then layer by layer on `device` (pretrain/parallel/materialize.py), or as DeepSpeed does when None.

    `partition_method` is DeepSpeed's: "parameters" (balance parameter counts,
    here computed rather than built), "uniform", or "type:Block".
    """
    counts = layer_parameter_counts(config, parallel.tensor_model_parallel_size)
    return _pipeline_module_counting_by_class()(
        layer_specs(config, parallel, seed), counts, loss_fn=pipeline_loss, topology=topology,
        partition_method=partition_method,
        materialize_on=None if device is None else (config, parallel, seed, device))
