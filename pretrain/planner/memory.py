"""Per-rank memory of a training step of this trainer, by component.

Every term follows the code that allocates it: our model (pretrain/model/gpt2.py and the chunked
loss head in loss.py) and the DeepSpeed optimizer the engine picks for the settings
(DeepSpeedEngine._do_optimizer_sanity_check, DeepSpeed 0.19):

    ZeRO-0, fp32            torch's AdamW as it is: fp32 weights, gradients, two moments
    ZeRO-0, bf16 or fp16    FP16_UnfusedOptimizer (torch's AdamW is not a fused optimizer): 16-bit
                            weights and gradients, fp32 master weights and moments, whole
    ZeRO-1, bf16 + fp32     BF16_Optimizer: bf16 weights, a gradient buffer for the whole local
      gradients; or ZeRO-0  model (fp32, or bf16 at ZeRO-0), master weights and moments split
      with a pipeline, bf16 over data parallel
    ZeRO-1/2 otherwise      DeepSpeedZeroOptimizer: master weights and moments split; ZeRO-2 also
                            splits the gradients; a reduce bucket of reduce_bucket_size elements
    ZeRO-3                  DeepSpeedZeroOptimizer_Stage3: weights split as well (gathered layer by
                            layer), an fp32 gradient partition, a reduce bucket held from start-up

The peak is taken at two moments, and the larger is reported with its parts:
- backward: the last micro-batch's forward reaching the loss, with its activations, the
  gradients accumulated from the micro-batches before it and the loss head's chunk;
- optimizer step: gradients reduced into the fp32 partition the optimizer reads.
Activations count what autograd saves (no dropout, flash attention: no T x T scores), per
token and hidden unit (Korthikanti et al. 2022, "Reducing activation recomputation", section
4.1, less its dropout masks): layer-norm inputs and outputs stay whole under tensor parallelism
(no sequence parallelism), the rest is split over TP ranks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from pretrain.model.gpt2 import Block, FinalNorm, GPTConfig, WordEmbedding, layer_classes
from pretrain.model.loss import CHUNK_ELEMENTS
from pretrain.parallel.deepspeed_config import OVERLAP_BUCKET_SIZE, deepspeed_overlaps, uses_bf16_optimizer
from pretrain.parallel.layout import ParallelLayout
from pretrain.parallel.pipeline import layer_parameter_counts

GIB = 2**30
# The class DeepSpeed wraps the optimizer in, for each path (checked in tests/pretrain/test_numerics.py).
DEEPSPEED_CLASSES = {"torch": "SkipNonFiniteAdamW", "mixed_whole": "FP16_UnfusedOptimizer",
                     "bf16_optimizer": "BF16_Optimizer", "zero12": "DeepSpeedZeroOptimizer",
                     "zero3": "DeepSpeedZeroOptimizer_Stage3"}
# DeepSpeed's defaults (deepspeed/runtime/zero/config.py), in elements; the trainer keeps them.
REDUCE_BUCKET_SIZE = 500_000_000
STAGE3_PREFETCH_BUCKET_SIZE = 50_000_000


@dataclass(frozen=True)
class RunShape:
    """What the memory and time of a step depend on; the model is padded for the layout's TP."""

    model: GPTConfig
    layout: ParallelLayout
    precision: str = "bf16"
    gradient_dtype: str = "fp32"
    activation_checkpointing: int = 0
    partition_method: str = "parameters"
    reduce_bucket_size: int = REDUCE_BUCKET_SIZE
    overlap: bool = True
    """parallel.overlap_communication: gradients reduced during the last backward, weights gathered
    during the next forward, where the optimizer is BF16_Optimizer (pretrain/parallel/overlap.py)."""
    overlap_bucket_size: int = OVERLAP_BUCKET_SIZE
    """parallel.bucket_size, elements."""

    @property
    def sequence(self) -> int:
        return self.model.n_positions

    @property
    def weight_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def bucket(self) -> int:
        """Elements of DeepSpeed's reduce bucket: parallel.bucket_size where DeepSpeed overlaps."""
        return self.overlap_bucket_size if self.deepspeed_overlap else self.reduce_bucket_size

    @property
    def deepspeed_overlap(self) -> bool:
        """parallel.overlap_communication as DeepSpeed's overlap_comm (ZeRO-1/2 through its ZeRO optimizer)."""
        return self.overlap and deepspeed_overlaps(self.layout, self.precision, self.gradient_dtype)

    @property
    def optimizer(self) -> str:
        """The DeepSpeed optimizer path (see the module docstring)."""
        stage = self.layout.zero_stage
        if uses_bf16_optimizer(self.layout, self.precision, self.gradient_dtype):
            return "bf16_optimizer"
        if stage == 0:
            return "torch" if self.precision == "fp32" else "mixed_whole"
        return "zero3" if stage == 3 else "zero12"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one rank at its peak, by component."""

    stage: int
    moment: str
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    buffers: int
    parts: dict = field(default_factory=dict, compare=False)
    """Finer items behind the components, bytes each (for --json and the docs)."""

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.buffers

    def gib(self) -> dict:
        names = ("parameters", "gradients", "optimizer", "activations", "buffers", "total")
        return {name: getattr(self, name) / GIB for name in names}


def stage_layers(run: RunShape) -> list[list[type]]:
    """The layer classes each pipeline stage holds, cut as DeepSpeed's PipelineModule cuts them."""
    model = run.model
    return _stage_layers(model.n_layer, model.n_embd, model.n_head, model.n_positions, model.padded_vocab_size,
                         run.layout.tensor_parallel_size, run.layout.pipeline_parallel_size, run.partition_method)


@functools.lru_cache(maxsize=4096)
def _stage_layers(n_layer: int, n_embd: int, n_head: int, n_positions: int, padded_vocab_size: int,
                  tensor_parallel_size: int, stages: int, partition_method: str) -> list[list[type]]:
    from deepspeed.runtime import utils as ds_utils

    model = GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                      padded_vocab_size=padded_vocab_size)
    classes = layer_classes(model) + [WordEmbedding]  # the tied head closes the sequence
    if stages == 1:
        return [classes[:-1]]  # one stage holds the tied embedding once
    method = partition_method.lower()
    if method == "uniform":
        bounds = ds_utils.partition_uniform(num_items=len(classes), num_parts=stages)
    elif method.startswith("type:"):
        wanted = method.split(":", 1)[1]
        bounds = ds_utils.partition_balanced(weights=[int(cls.__name__.lower() == wanted) for cls in classes],
                                             num_parts=stages)
    else:
        counts = layer_parameter_counts(model, tensor_parallel_size)
        bounds = ds_utils.partition_balanced(weights=[counts[cls] for cls in classes], num_parts=stages)
    return [classes[int(bounds[s]):int(bounds[s + 1])] for s in range(stages)]


def stage_parameters(run: RunShape, layers: list[type]) -> int:
    counts = layer_parameter_counts(run.model, run.layout.tensor_parallel_size)
    return sum(counts[cls] for cls in layers)


def in_flight_micro_batches(run: RunShape, stage: int) -> int:
    """Micro-batches whose activations a stage holds at once: DeepSpeed's 1F1B TrainSchedule keeps
    min(stages - stage, micro-batches) (schedule.py num_pipe_buffers); one without a pipeline."""
    layout = run.layout
    if layout.pipeline_parallel_size == 1:
        return 1
    return min(layout.pipeline_parallel_size - stage, layout.gradient_accumulation_steps)


def block_activation_bytes(run: RunShape, tokens: int) -> int:
    """What autograd keeps for one block's backward, per micro-batch of `tokens` tokens.

    Whole (C per token): the inputs of ln_1 and ln_2 and their outputs (the qkv and fc inputs).
    Split over TP (C / tp per token): q, k, v (3), the attention output and its transposed copy
    for proj (2), the fc output gelu reads (4) and the gelu output proj reads (4): 13. Flash
    attention also keeps a log-sum-exp per head and token, in fp32.
    """
    C, tp, w = run.model.n_embd, run.layout.tensor_parallel_size, run.weight_bytes
    return tokens * (4 * C * w + 13 * C // tp * w + run.model.n_head // tp * 4)


def loss_head_bytes(run: RunShape, tokens: int, resident: bool = False) -> tuple[int, int]:
    """(kept until backward, peak while a chunk is computed) for the loss head of loss.py.

    Kept: the gradient for the hidden states (model dtype) and an fp32 gradient for this rank's
    embedding slice, both computed in forward. The chunk: its logits in the model dtype, then
    their fp32 copy, worked on in place into the softmax, which is cast back to the model dtype
    as the logits' gradient (fp32 + model dtype at once), and the product grad_logits.T @ chunk
    before it is added to the fp32 gradient. On a CPU (`resident`), oneDNN computes that bf16
    product into an fp32 buffer from a contiguous copy of the transposed gradient (measured: 110
    MiB at the peak for a 37 MiB (50304, 384) bf16 result).
    """
    C, w = run.model.n_embd, run.weight_bytes
    vocab = run.model.padded_vocab_size // run.layout.tensor_parallel_size
    kept = tokens * C * w + vocab * C * 4
    chunk = min(tokens, max(1, CHUNK_ELEMENTS // vocab))
    per_logit = 4 if w == 4 else 4 + w
    product = vocab * C * w
    if resident and w == 2:
        product += vocab * C * 4 + chunk * vocab * w
    return kept, chunk * vocab * per_logit + product


def activation_bytes(run: RunShape, layers: list[type], stage: int, resident: bool = False) -> dict:
    """What a stage's forward and backward hold besides weights and gradients, in bytes:
    `saved` for every in-flight micro-batch, the loss head's `loss_chunk` (last stage, at the
    loss), and a `recomputed_block`'s full set in backward under activation checkpointing."""
    layout, model, w = run.layout, run.model, run.weight_bytes
    tokens = layout.micro_batch_size * run.sequence
    blocks = sum(cls is Block for cls in layers)
    full_block = block_activation_bytes(run, tokens)
    checkpointed = 0
    if run.activation_checkpointing > 0:  # blocks count globally: block k is recomputed when k % every == 0
        first = _first_block_index(run, stage)
        checkpointed = sum((first + k) % run.activation_checkpointing == 0 for k in range(blocks))
    per_micro = (blocks - checkpointed) * full_block + checkpointed * tokens * model.n_embd * w
    if WordEmbedding in layers[:1]:
        per_micro += tokens * 8  # token ids, int64
    kept, chunk = loss_head_bytes(run, tokens, resident) if FinalNorm in layers else (0, 0)
    if FinalNorm in layers:
        per_micro += tokens * model.n_embd * w + kept  # final norm input, loss head
    if layout.pipeline_parallel_size > 1:
        per_micro += 2 * tokens * model.n_embd * w  # the stage's output and received gradient buffers
    in_flight = in_flight_micro_batches(run, stage)
    return {"saved": in_flight * per_micro, "saved_per_micro_batch": per_micro, "micro_batches_in_flight": in_flight,
            "loss_chunk": chunk, "recomputed_block": full_block if checkpointed else 0}


def _first_block_index(run: RunShape, stage: int) -> int:
    """How many blocks the stages before `stage` hold."""
    return sum(sum(cls is Block for cls in layers) for layers in stage_layers(run)[:stage])


def optimizer_bytes(run: RunShape, P: int, bucket: int, biggest_layer: int) -> dict:
    """Bytes of the optimizer path for P local parameters (see the module docstring):
    `weights`; `optimizer` (fp32 master weights and Adam's two moments); `held_gradients`, kept
    from start-up on; `accumulated` gradients, there from the second micro-batch of a step;
    the reduce `bucket`; and `step` working memory: the fp32 gradients the optimizer reads and
    the one temporary per tensor of torch's foreach Adam (the square root of the second moment)."""
    dp, w, stage = run.layout.data_parallel_size, run.weight_bytes, run.layout.zero_stage
    kind = run.optimizer
    if kind == "torch":  # (the flat copy the gradients are all-reduced in is freed before the step)
        return dict(weights=4 * P, optimizer=8 * P, held_gradients=0, accumulated=4 * P, bucket=0, step=4 * P)
    if kind == "mixed_whole":
        return dict(weights=2 * P, optimizer=12 * P, held_gradients=0, accumulated=2 * P, bucket=0, step=8 * P)
    if kind == "bf16_optimizer":  # the step reads an fp32 copy of a bf16 gradient partition
        gradients = 4 if run.gradient_dtype == "fp32" else 2
        return dict(weights=2 * P, optimizer=12 * P // dp, held_gradients=gradients * P, accumulated=0, bucket=0,
                    step=4 * P // dp if gradients == 4 else 8 * P // dp)
    if kind == "zero12":
        # ZeRO-1 keeps the gradients whole in param.grad (model dtype: bf16 accumulation reaches this
        # path only with bf16 gradients); ZeRO-2 reduces them into its partition, in fp32 when
        # train.gradient_dtype is. The bucket stages gradients in the model dtype.
        # The bucket is reduced in place (average_tensor), through an fp32 copy when the reduction is
        # in fp32 and the gradients are not (engine.py sets communication_data_type = gradient_dtype).
        accumulation = 4 if run.gradient_dtype == "fp32" else w
        flat = min(bucket, P) * 4 if w < 4 and run.gradient_dtype == "fp32" else 0
        buffers = 2 if run.deepspeed_overlap else 1  # overlap_comm double-buffers the bucket
        return dict(weights=w * P, optimizer=12 * P // dp, held_gradients=0,
                    accumulated=accumulation * P // dp if stage == 2 else w * P,
                    bucket=buffers * bucket * w + flat, step=8 * P // dp)
    # ZeRO-3: weights split too, gathered for each layer's forward and backward while the next
    # prefetch bucket's worth arrives; an fp32 gradient partition and the reduce bucket from start-up on.
    gathered = w * min(P, biggest_layer + STAGE3_PREFETCH_BUCKET_SIZE) if dp > 1 else 0
    return dict(weights=w * P // dp + gathered, optimizer=12 * P // dp, held_gradients=4 * P // dp + bucket * 4,
                accumulated=0, bucket=0, step=4 * P // dp)


def estimate_stage(run: RunShape, stage: int, resident: bool = False) -> MemoryEstimate:
    """The peak of one pipeline stage (one rank of it; TP ranks are alike), the largest of:

        forward      at the loss of the last micro-batch: its saved activations (and those of
                     the micro-batches in flight), the loss chunk, earlier micro-batches' gradients
        backward     the reduce bucket filled while the activations are still held (on a CPU
                     they are being freed as it fills: its pages become resident one by one)
        step         the optimizer's working memory

    `resident=True` counts a CPU run's resident set: DeepSpeed allocates its buckets with
    torch.empty at full size, and only the pages gradients are written to become resident;
    on a GPU the whole bucket is allocated memory.
    """
    layers = stage_layers(run)[stage]
    P = stage_parameters(run, layers)
    bucket = min(run.bucket, P) if resident else run.bucket
    counts = layer_parameter_counts(run.model, run.layout.tensor_parallel_size)
    path = optimizer_bytes(run, P, bucket, max(counts[cls] for cls in layers))
    act = activation_bytes(run, layers, stage, resident)
    several = run.layout.gradient_accumulation_steps > 1
    accumulated = path["accumulated"] if several else 0
    backward_activations = act["recomputed_block"] + (0 if resident else act["saved"])
    moved = run.optimizer == "zero12" and run.layout.pipeline_parallel_size == 1
    moments = {
        "forward": (accumulated, act["saved"] + act["loss_chunk"]),
        "backward": (accumulated, path["bucket"] + backward_activations),
        # ZeRO-1/2 have moved the gradients into the bucket and their partition by then, except under
        # a pipeline, whose engine reduces them after backward (reduce_gradients(pipeline_parallel=True))
        # and leaves param.grad until the step. On a CPU the bucket's pages stay resident.
        "optimizer step": ((0 if moved else path["accumulated"]) + path["step"], path["bucket"] if resident else 0),
    }
    moment = max(moments, key=lambda name: sum(moments[name]))
    gradients, transient = moments[moment]
    activations = transient if moment == "forward" else (backward_activations if moment == "backward" else 0)
    buffers = transient - activations
    parts = {**act, **{f"optimizer_{key}": value for key, value in path.items()}, "local_parameters": P,
             "optimizer_path": run.optimizer}
    return MemoryEstimate(stage, moment, path["weights"], path["held_gradients"] + gradients, path["optimizer"],
                          activations, buffers, parts)


def estimate_memory(run: RunShape, resident: bool = False) -> list[MemoryEstimate]:
    """One estimate per pipeline stage."""
    return [estimate_stage(run, stage, resident) for stage in range(run.layout.pipeline_parallel_size)]


def peak_memory(run: RunShape, resident: bool = False) -> MemoryEstimate:
    """The stage with the largest peak: the one that decides whether a layout fits."""
    return max(estimate_memory(run, resident), key=lambda estimate: estimate.total)
