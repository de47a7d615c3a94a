"""Estimated step time of a layout on a cluster, by part.

Compute counts the trainer's own FLOPs (pretrain/model/presets.py flops_per_token: 6N plus
12 L C T for attention), at an assumed fraction of the GPU's dense bf16 peak. Nothing here is
measured on a GPU yet: the fraction is set from published end-to-end figures (llm.c's GPT-2
1.5B: about 48% MFU on H100; Megatron-LM's 1.7B: 41%), and every communication term states its
formula. Tensor-parallel communication does not overlap compute (Megatron-style tensor parallelism
without sequence parallelism waits for each all-reduce), nor does data-parallel communication
under DeepSpeed's own paths (ZeRO-1/2 default overlap_comm=false).

Where the trainer overlaps (parallel.overlap_communication under BF16_Optimizer,
pretrain/parallel/overlap.py), K gradient buckets become ready one after another during the last
micro-batch's backward (duration W) and are reduced one after another; the reduction of R seconds
in all then shows

    exposed = max(R / K, R - W (K - 1) / K)

(the last bucket alone when the network keeps up; otherwise what the window after the first bucket
cannot hold). The weights are broadcast slice by slice from their dp owners under the next forward,
whose modules wait for their own slice: the same formula with K = dp and the first micro-batch's
forward as the window. NCCL runs the broadcasts one after another, each a ring moving its slice
over every link: W / bandwidth in all, dp / (dp - 1) times an all-gather (1.6% more at 64 ranks,
twice at 2). gloo may run two side by side, which only makes it faster than costed. Pipelines reduce
after their schedule, so only the gather is hidden there. Where DeepSpeed's ZeRO-1/2 optimizer runs,
parallel.overlap_communication is its overlap_comm: the same formula for the reduction (every
micro-batch's at ZeRO-2), and a blocking gather of the weights.

Collective times on the ring algorithm (Patarasuk and Yuan 2009; NCCL's "bus bandwidth"):
    all-reduce of B bytes over n ranks        2 (n - 1) / n x B / bandwidth
    reduce-scatter or all-gather              (n - 1) / n x B / bandwidth
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.model.gpt2 import Block, WordEmbedding
from pretrain.model.presets import flops_per_token
from pretrain.parallel.pipeline import layer_parameter_counts
from pretrain.planner.hardware import Cluster
from pretrain.planner.memory import RunShape, stage_layers, stage_parameters

# Fraction of dense bf16 peak the matmuls reach (assumption; see the module docstring).
COMPUTE_EFFICIENCY = 0.5
# Eager PyTorch launches about 60 kernels per block for a forward and backward, at ~5 us
# each: a fixed cost per block and micro-batch that small micro-batches pay many times.
LAUNCH_SECONDS_PER_BLOCK = 60 * 5e-6


def all_reduce_seconds(size_bytes: float, ranks: int, bandwidth_gbytes: float) -> float:
    return 0.0 if ranks <= 1 else 2 * (ranks - 1) / ranks * size_bytes / (bandwidth_gbytes * 1e9)


def gather_seconds(size_bytes: float, ranks: int, bandwidth_gbytes: float) -> float:
    """A reduce-scatter or an all-gather."""
    return 0.0 if ranks <= 1 else (ranks - 1) / ranks * size_bytes / (bandwidth_gbytes * 1e9)


@dataclass(frozen=True)
class StepTime:
    compute: float
    """Forward, backward and recomputation of the slowest stage, all micro-batches."""
    pipeline_bubble: float
    """Idle time of the 1F1B schedule: (stages - 1) micro-batch slots."""
    tensor_parallel: float
    pipeline_transfers: float
    data_parallel: float
    """Data-parallel communication the step waits for (all of it, unless overlapped)."""
    optimizer: float
    tokens_per_step: int
    flops_per_token: int
    world_size: int
    peak_tflops: float
    """The precision's peak (dense bf16, or fp32 for fp32 runs): MFU is measured against it."""
    data_parallel_hidden: float = 0.0
    """Data-parallel communication that runs under compute (not part of the step's time)."""

    @property
    def seconds(self) -> float:
        return (self.compute + self.pipeline_bubble + self.tensor_parallel + self.pipeline_transfers
                + self.data_parallel + self.optimizer)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.seconds

    @property
    def mfu(self) -> float:
        return self.tokens_per_second * self.flops_per_token / (self.world_size * self.peak_tflops * 1e12)

    def parts(self) -> dict:
        names = ("compute", "pipeline_bubble", "tensor_parallel", "pipeline_transfers", "data_parallel", "optimizer")
        return {name: getattr(self, name) for name in names}


def _stage_flops_per_token(run: RunShape, index: int, all_stages: list[list[type]]) -> float:
    """Training FLOPs per token of one stage, whole (before TP splits it): the trainer's own count
    (flops_per_token) shared out in proportion to 6 x the stage's parameters plus 12 C T per block,
    plus a forward again (a third of a block's training FLOPs) for each recomputed block."""
    model, T = run.model, run.sequence
    C = model.n_embd
    attention = 12 * C * T

    whole = layer_parameter_counts(model, 1)  # one layer of each class, before TP splits it
    block = 6 * whole[Block] + attention
    head = 6 * whole[WordEmbedding]  # the tied embedding's matmul; its lookup on stage 0 costs none

    def raw(index: int) -> float:
        return sum(cls is Block for cls in all_stages[index]) * block + (head if index == len(all_stages) - 1 else 0)

    share = flops_per_token(model, T) * raw(index) / sum(raw(i) for i in range(len(all_stages)))
    return share + recomputed_blocks(run, all_stages[index]) * block / 3


def recomputed_blocks(run: RunShape, layers: list[type]) -> int:
    """Blocks of a stage that activation checkpointing runs forward twice (every k-th, counted from 0)."""
    blocks, every = sum(cls is Block for cls in layers), run.activation_checkpointing
    return blocks if every == 1 else (-(-blocks // every) if every > 1 else 0)


def spans_nodes(extent: int, gpus_per_node: int) -> bool:
    """Whether a group whose ranks fill blocks of `extent` consecutive ranks crosses a node boundary."""
    return extent > gpus_per_node or gpus_per_node % extent != 0


def step_time(run: RunShape, cluster: Cluster, efficiency: float = COMPUTE_EFFICIENCY) -> StepTime:
    layout, model = run.layout, run.model
    tp, pp, dp = layout.tensor_parallel_size, layout.pipeline_parallel_size, layout.data_parallel_size
    micro_batches, gpn = layout.gradient_accumulation_steps, cluster.gpus_per_node
    tokens_micro = layout.micro_batch_size * run.sequence
    stages = stage_layers(run)
    gpu = cluster.gpu
    peak = gpu.fp32_tflops if run.precision == "fp32" else gpu.bf16_tflops
    flops_second = peak * 1e12 * efficiency
    index = max(range(pp), key=lambda i: _stage_flops_per_token(run, i, stages))
    slowest = stages[index]
    blocks = sum(cls is Block for cls in slowest)
    per_micro = (_stage_flops_per_token(run, index, stages) * tokens_micro / tp / flops_second
                 + blocks * LAUNCH_SECONDS_PER_BLOCK)
    # Tensor parallel: 2 all-reduces of the (tokens, C) activations in forward and 2 in backward per
    # block (Shoeybi et al. 2019, figure 3), 2 more for a recomputed forward; 2 for embedding and head.
    tp_bandwidth = cluster.bandwidth_gbytes(tp, spans_nodes=spans_nodes(tp, gpn))
    recomputed = recomputed_blocks(run, slowest)
    tp_per_micro = (4 * blocks + 2 * recomputed + 2) * all_reduce_seconds(
        tokens_micro * model.n_embd * run.weight_bytes, tp, tp_bandwidth)
    # Pipeline: each micro-batch sends its activations forward and their gradient back per boundary.
    pp_bandwidth = cluster.bandwidth_gbytes(pp, spans_nodes=spans_nodes(tp * dp * pp, gpn))
    pp_per_micro = 2 * tokens_micro * model.n_embd * run.weight_bytes / (pp_bandwidth * 1e9) if pp > 1 else 0.0
    slots = micro_batches + pp - 1  # 1F1B: the last micro-batch leaves the first stage pp - 1 slots late
    # Data parallel: ranks tp apart (megatron-core's order: tensor, then data, then pipeline).
    dp_bandwidth = cluster.bandwidth_gbytes(dp, spans_nodes=spans_nodes(tp * dp, gpn))
    parameters = max(stage_parameters(run, layers) for layers in stages)
    forward = per_micro / 3 if not recomputed else per_micro * blocks / (3 * blocks + recomputed)
    exposed, hidden = data_parallel_exposed(run, parameters, dp, dp_bandwidth, forward, per_micro - forward)
    return StepTime(
        compute=micro_batches * per_micro, pipeline_bubble=(pp - 1) * (per_micro + tp_per_micro),
        tensor_parallel=micro_batches * tp_per_micro, pipeline_transfers=slots * pp_per_micro,
        data_parallel=exposed, data_parallel_hidden=hidden,
        # Adam reads and writes fp32 master weights, two moments and the gradient, and writes the
        # model-dtype weights: about 36 bytes per parameter it owns, at HBM bandwidth.
        optimizer=36 * parameters / (dp if layout.zero_stage else 1) / (gpu.memory_gbytes * 1e9),
        tokens_per_step=layout.global_batch_size * run.sequence,
        flops_per_token=flops_per_token(model, run.sequence), world_size=layout.world_size,
        peak_tflops=peak)


def overlapped(total: float, window: float, pieces: int) -> float:
    """What shows of `total` seconds of communication in `pieces` equal parts, each ready to go
    when its share of a `window` of compute has run (see the module docstring)."""
    return max(total / pieces, total - window * (pieces - 1) / pieces)


def data_parallel_exposed(run: RunShape, parameters: int, dp: int, bandwidth: float, forward: float,
                          backward: float) -> tuple[float, float]:
    """(exposed, hidden) data-parallel seconds per step; `forward` and `backward` are one micro-batch's."""
    if run.deepspeed_overlap:  # DeepSpeed's overlap_comm: the reduction behind backward, a blocking gather
        whole = data_parallel_seconds(run, parameters, dp, bandwidth)
        grad_bytes = 4 if run.precision == "fp32" or run.gradient_dtype == "fp32" else 2
        reduce = all_reduce_seconds(parameters * grad_bytes, dp, bandwidth)
        reductions = run.layout.gradient_accumulation_steps if run.layout.zero_stage == 2 else 1
        buckets = max(1, -(-parameters // run.bucket))
        exposed = whole - reductions * (reduce - overlapped(reduce, backward, buckets))
        return exposed, whole - exposed
    if not (run.overlap and run.optimizer == "bf16_optimizer" and dp > 1):
        return data_parallel_seconds(run, parameters, dp, bandwidth), 0.0
    grad_bytes = 4 if run.gradient_dtype == "fp32" else 2
    reduce = all_reduce_seconds(parameters * grad_bytes, dp, bandwidth)
    if run.layout.pipeline_parallel_size == 1:
        buckets = max(1, -(-parameters // run.overlap_bucket_size))
        reduce_shows = overlapped(reduce, backward, buckets)
    else:
        reduce_shows = reduce  # the pipeline engine reduces after its schedule
    broadcasts = parameters * run.weight_bytes / (bandwidth * 1e9)  # dp ring broadcasts, one after another
    gather_shows = overlapped(broadcasts, forward, dp)
    return reduce_shows + gather_shows, reduce + broadcasts - reduce_shows - gather_shows


def data_parallel_seconds(run: RunShape, parameters: int, dp: int, bandwidth: float) -> float:
    """Gradient reduction and weight gathering per optimizer step. The ZeRO paper (Rajbhandari et al.
    2020, section 7) has ZeRO-1/2 reduce-scatter the gradients; DeepSpeed 0.19 all-reduces each
    bucket instead (use_multi_rank_bucket_allreduce, on by default), then all-gathers the updated
    weights. ZeRO-3 gathers the weights for forward and for backward and reduce-scatters the gradients."""
    grad_bytes = 4 if run.precision == "fp32" or run.gradient_dtype == "fp32" else 2
    weights = parameters * run.weight_bytes
    micro_batches = run.layout.gradient_accumulation_steps
    kind, stage = run.optimizer, run.layout.zero_stage
    if stage == 0 or kind == "bf16_optimizer":  # all-reduce the gradients (then gather the updated slices)
        # BF16_Optimizer splits the master weights over data parallel even at ZeRO-0 (with a pipeline).
        gather = gather_seconds(weights, dp, bandwidth) if stage or kind == "bf16_optimizer" else 0.0
        return all_reduce_seconds(parameters * grad_bytes, dp, bandwidth) + gather
    if stage == 1:
        return all_reduce_seconds(parameters * grad_bytes, dp, bandwidth) + gather_seconds(weights, dp, bandwidth)
    if stage == 2:  # gradients are reduced as backward produces them, every micro-batch
        return micro_batches * all_reduce_seconds(parameters * grad_bytes, dp, bandwidth) + gather_seconds(
            weights, dp, bandwidth)
    # ZeRO-3: weights gathered for forward and again for backward, gradients reduce-scattered, per micro-batch.
    return micro_batches * (2 * gather_seconds(weights, dp, bandwidth)
                            + gather_seconds(parameters * grad_bytes, dp, bandwidth))
