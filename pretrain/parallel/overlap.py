"""Data-parallel communication hidden behind compute, for DeepSpeed's BF16_Optimizer (bf16 at ZeRO-1,
the shipped recipe, with fp32 or bf16 gradients).

DeepSpeed 0.19 reduces that optimizer's flat gradient buffer in one blocking all-reduce after the
last backward, then all-gathers the updated bf16 weights in one blocking pass inside the optimizer
step: at 8 nodes x 8 GPUs that is a third of the 1.5B model's step (tools/plan.py). Here, instead:

- **Gradients**: the flat gradient buffer is cut into buckets of whole parameters (about
  `parallel.bucket_size` elements each). During the backward of the step's last micro-batch, once
  DeepSpeed's own hook has added every parameter of a bucket into the buffer, an asynchronous
  all-reduce of that bucket starts. Buckets start in one fixed order, the same on every rank (a
  collective must be issued in the same order everywhere), from the model's end to its start, which
  is the order backward finishes them. The engine's reduction after backward (DeepSpeed's
  `buffered_allreduce_fallback`) becomes: start what has not started, wait, and average (sum, then
  1/dp, as DeepSpeed does): the same gradients, reduced while backward still runs.
- **Weights**: after the optimizer step each rank broadcasts the slice of bf16 weights it updated,
  asynchronously, first slices first. The flat buffer follows the model's order, so the embedding
  and first blocks arrive first; a hook before each block's forward waits only for the slices that
  hold its own parameters (and one before the whole model's, for the tied embedding, which a
  pipeline's last stage reads as its head without calling it). The gather thus runs under the next
  step's forward.

Both go over a communicator of their own (the same ranks as the data-parallel group): under NCCL a
communicator runs its work in order, and a blocking collective on the data-parallel group (the loss
average) would otherwise wait for every broadcast in flight.

Anything that reads the weights other than a forward (a checkpoint save, a load) must call
`finish_weights(engine)` first. The pipeline engine reduces its gradients itself after the whole
schedule (its ReduceGrads instruction): there the gradients are reduced in the same buckets without
overlap, and only the weight gather overlaps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.model.gpt2 import Block, WordEmbedding
from pretrain.parallel.deepspeed_config import OVERLAP_BUCKET_SIZE

log = logging.getLogger(__name__)


@dataclass
class Bucket:
    group: int  # the optimizer's parameter group
    start: int  # element range of the group's flat gradient buffer
    end: int
    parameters: int  # how many parameters' gradients it waits for
    first: int  # the model-order position of its earliest parameter: backward finishes it last


class DataParallelOverlap:
    """Installed on one engine whose optimizer is DeepSpeed's BF16_Optimizer (`install`)."""

    def __init__(self, engine, bucket_size: int = OVERLAP_BUCKET_SIZE):
        self.engine, self.optimizer = engine, engine.optimizer
        # The same ranks as the optimizer's data-parallel group, on a communicator of its own: NCCL runs one
        # communicator's work in order, so a blocking collective of the trainer or DeepSpeed on the data-parallel
        # group (the loss average, the pipeline's) would otherwise wait behind every broadcast still in flight.
        own = own_communicator(self.optimizer.real_dp_process_group[0])
        self.groups = [own for _ in self.optimizer.real_dp_process_group]
        self.world = dist.get_world_size(group=own)
        order = {id(p): k for k, p in enumerate(engine.module.parameters())}
        members = [bucket for i, params in enumerate(self.optimizer.bf16_groups)
                   for bucket in self._cut_buckets(i, params, bucket_size, order)]
        # Start order: the bucket holding the model's latest parameters first (backward reaches them first).
        members.sort(key=lambda item: -item[0].first)
        self.buckets = [bucket for bucket, _ in members]
        self._bucket_of = {id(p): index for index, (_, params) in enumerate(members) for p in params}
        self._armed = False
        self.reduced_in_backward = 0  # buckets of the last step whose reduction started during backward
        # Host seconds the step stood still for each, in all (tools/bench_overlap.py). Under NCCL a wait only
        # makes the compute stream wait, so these read near zero there; the device's time is in the step's.
        self.waited = {"gradients": 0.0, "weights": 0.0}
        self._reset_step()
        self._weight_handles: dict[tuple[int, int], object] = {}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_gradient)
                       for params in self.optimizer.bf16_groups for p in params if p.requires_grad]
        self._install_weight_waits()

    # ---- gradients ------------------------------------------------------------------------

    def _cut_buckets(self, group: int, params: list[torch.Tensor], bucket_size: int,
                     order: dict) -> list[tuple[Bucket, list[torch.Tensor]]]:
        """Buckets of whole, consecutive parameters of one group, cut from the group's end, each with its
        parameters; the last bucket also takes the buffer's alignment padding, so they cover the whole buffer."""
        flat = self.optimizer.fp32_groups_gradients_flat[group]
        offsets, offset = [], 0
        for p in params:
            offsets.append(offset)
            offset += p.numel()
        end, members, cut = flat.numel(), [], []
        for j in reversed(range(len(params))):
            members.append(params[j])
            if end - offsets[j] >= bucket_size or j == 0:
                cut.append((Bucket(group, offsets[j], end, len(members), order[id(params[j])]), members))
                end, members = offsets[j], []
        return cut

    def _reset_step(self) -> None:
        self._waiting = [b.parameters for b in self.buckets]
        self._next = 0  # the next bucket to start
        self._early = 0
        self._handles: list = []

    def arm(self) -> None:
        """The next backward is the step's last: start each bucket's reduction as soon as it is whole."""
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("the overlap was armed for a backward that is not the step's last (DeepSpeed's "
                               "gradient accumulation count and the trainer's micro-batches disagree)")
        self._armed = True

    def _on_gradient(self, param: torch.Tensor) -> None:
        # Runs after BF16_Optimizer's own hook (registered earlier), which has added this gradient to the buffer.
        if not self._armed:
            return
        index = self._bucket_of[id(param)]
        self._waiting[index] -= 1
        if self._waiting[index] == 0:
            while self._next < len(self.buckets) and self._waiting[self._next] == 0:
                self._start(self._next)
                self._early += 1

    def _start(self, index: int) -> None:
        bucket = self.buckets[index]
        view = self.optimizer.fp32_groups_gradients_flat[bucket.group][bucket.start:bucket.end]
        self._handles.append(dist.all_reduce(view, group=self.groups[bucket.group], async_op=True))
        self._next = index + 1

    def reduce_gradients(self) -> None:
        """In place of DeepSpeed's blocking reduction: start the buckets not started (all of them when
        the backward was not armed, or a parameter got no gradient), wait for all, average."""
        began = time.perf_counter()
        while self._next < len(self.buckets):
            self._start(self._next)
        for handle in self._handles:
            handle.wait()
        self.waited["gradients"] += time.perf_counter() - began
        for flat in self.optimizer.fp32_groups_gradients_flat:
            flat.mul_(1.0 / self.world)
        self._armed, self.reduced_in_backward = False, self._early
        self._reset_step()

    # ---- weights --------------------------------------------------------------------------

    def gather_weights(self) -> None:
        """In place of BF16_Optimizer.update_lp_params: this rank's updated slice into the bf16 weights,
        then every slice broadcast from its owner without waiting. Owner by owner, each owner's slice of
        every parameter group together: a block's weights and its biases (another group) arrive together."""
        self.finish_weights()  # slices nothing waited for (no forward since): this rank's is about to change
        optimizer = self.optimizer
        for i, (slices, fp32_slice) in enumerate(zip(optimizer.bf16_partitioned_groups,
                                                     optimizer.fp32_groups_flat_partition)):
            slices[dist.get_rank(group=self.groups[i])].data.copy_(fp32_slice.data)
        for owner in range(self.world):
            for i, slices in enumerate(optimizer.bf16_partitioned_groups):
                group = self.groups[i]
                self._weight_handles[(i, owner)] = dist.broadcast(
                    slices[owner], src=dist.get_global_rank(group, owner), group=group, async_op=True)

    def finish_weights(self) -> None:
        for key in list(self._weight_handles):
            self._wait_for_weights(key)

    def _wait_for_weights(self, key: tuple[int, int]) -> None:
        handle = self._weight_handles.pop(key, None)
        if handle is not None:
            began = time.perf_counter()
            handle.wait()
            self.waited["weights"] += time.perf_counter() - began

    def _install_weight_waits(self) -> None:
        """A hook before the forward of each transformer block, and of each other module that holds
        parameters directly (embedding, final norm): wait for the slices its parameters lie in (a
        parameter may straddle two owners). A block is one unit, hooked as a whole, so that a compiled
        block's graph is not cut inside (train.compile)."""
        optimizer = self.optimizer
        place = {}
        for i, params in enumerate(optimizer.bf16_groups):
            size, offset = optimizer.bf16_partitioned_groups[i][0].numel(), 0
            for p in params:
                place[id(p)] = [(i, owner) for owner in range(offset // size, (offset + p.numel() - 1) // size + 1)]
                offset += p.numel()
        root = self.engine.module
        inside_blocks = {id(m) for block in root.modules() if isinstance(block, Block)
                         for m in block.modules() if m is not block}
        for module in root.modules():
            if id(module) in inside_blocks:
                continue
            keys = sorted({key for p in module.parameters(recurse=isinstance(module, Block))
                           for key in place.get(id(p), [])})
            if module is root:  # the tied embedding: a pipeline's last stage reads it as the head, never calling it
                keys = sorted({key for embedding in root.modules() if isinstance(embedding, WordEmbedding)
                               for p in embedding.parameters() for key in place.get(id(p), [])})
            if keys:
                self._hooks.append(module.register_forward_pre_hook(self._waiter(keys)))

    def _waiter(self, keys: list[tuple[int, int]]):
        @torch._dynamo.disable  # a compiled block runs its hooks eagerly, before its graph
        def wait_for_slices(_module, _inputs):
            for key in keys:
                self._wait_for_weights(key)
        return wait_for_slices


def own_communicator(group):
    """A new process group of the ranks of `group` (this rank's), made collectively: every rank learns every
    rank's group and makes them all, in one order, as torch requires of new_group."""
    mine = dist.get_process_group_ranks(group)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    made = None
    for ranks in sorted({tuple(ranks) for ranks in everyone}):
        new = dist.new_group(list(ranks))
        if dist.get_rank() in ranks:
            made = new
    return made


def overlap_refusal(engine) -> str | None:
    """Why the overlap cannot replace this BF16_Optimizer engine's reduction (it then keeps DeepSpeed's), or None."""
    if getattr(engine.optimizer, "has_moe_layers", False):
        return "mixture-of-experts layers"
    if not engine.optimizer.immediate_grad_update:
        # Then the last micro-batch's gradients reach the buffer only after backward, after the buckets started.
        return "deepspeed.bf16.immediate_grad_update=false"
    buffers = {flat.dtype for flat in engine.optimizer.fp32_groups_gradients_flat}
    if engine.communication_data_type not in buffers or len(buffers) != 1:
        return f"gradients are communicated in {engine.communication_data_type}, accumulated in {buffers}"
    if not engine.gradient_average or not engine.postscale_gradients() or engine.gradient_predivide_factor() != 1:
        return "deepspeed gradient averaging options other than the default"
    return None


def install(engine, bucket_size: int = OVERLAP_BUCKET_SIZE) -> DataParallelOverlap | None:
    """Make `engine` reduce gradients and gather weights behind compute; None (and DeepSpeed's own
    path kept) where it does not apply."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if not isinstance(engine.optimizer, BF16_Optimizer):
        return None  # DeepSpeed's own path (its overlap_comm at ZeRO-1/2: pretrain/parallel/deepspeed_config.py)
    refusal = overlap_refusal(engine)
    if refusal is not None:
        log.warning("parallel.overlap_communication is off for this run: %s; DeepSpeed reduces the gradients and "
                    "gathers the weights after backward, blocking", refusal)
        return None
    if dist.get_world_size(engine.optimizer.real_dp_process_group[0]) == 1:
        return None
    overlap = DataParallelOverlap(engine, bucket_size)
    fallback = engine.buffered_allreduce_fallback

    def buffered_allreduce_fallback(grads=None, elements_per_buffer=500000000):
        if grads is not None:  # someone else's gradients: DeepSpeed's own path
            return fallback(grads=grads, elements_per_buffer=elements_per_buffer)
        overlap.reduce_gradients()

    engine.buffered_allreduce_fallback = buffered_allreduce_fallback
    engine.optimizer.update_lp_params = overlap.gather_weights
    engine.data_parallel_overlap = overlap
    return overlap


def arm(engine) -> None:
    """Before the backward of a step's last micro-batch."""
    overlap = getattr(engine, "data_parallel_overlap", None)
    if overlap is not None:
        overlap.arm()


def finish_weights(engine) -> None:
    """Before anything but a forward reads the weights (a save, a load)."""
    overlap = getattr(engine, "data_parallel_overlap", None)
    if overlap is not None:
        overlap.finish_weights()
