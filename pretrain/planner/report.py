"""What tools/plan.py prints: the ranked layouts of a preset, or the check of one run config."""

from __future__ import annotations

import dataclasses

import json
import sys

from pretrain.planner.hardware import Cluster
from pretrain.planner.memory import GIB, RunShape, estimate_memory
from pretrain.planner.search import (
    Candidate, Plan, describe, evaluate, plan_layouts, usable_gib, why_recommended,
)
from pretrain.planner.targets import default_batch_tokens, known_targets, model_settings, target_model

HEADER = (f"{'#':>3} {'TP':>3} {'PP':>3} {'DP':>5} {'ZeRO':>4} {'micro':>5} {'accum':>5} {'AC':>2} "
          f"{'params':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'buffers':>7} {'total':>7} "
          f"{'peak at':>8} {'step s':>8} {'tokens/s':>11} {'MFU':>6}")


def row(index: int, candidate: Candidate) -> str:
    layout, gib = candidate.layout, candidate.memory.gib()
    memory = " ".join(f"{gib[name]:>7.2f}" for name in ("parameters", "gradients", "optimizer", "activations",
                                                        "buffers", "total"))
    return (f"{index:>3} {layout.tensor_parallel_size:>3} {layout.pipeline_parallel_size:>3} "
            f"{layout.data_parallel_size:>5} {layout.zero_stage:>4} {layout.micro_batch_size:>5} "
            f"{layout.gradient_accumulation_steps:>5} {candidate.run.activation_checkpointing:>2} {memory} "
            f"{candidate.memory.moment.split()[-1]:>8} {candidate.time.seconds:>8.3f} {candidate.time.tokens_per_second:>11,.0f} {candidate.time.mfu:>6.1%}")


def cluster_dict(cluster: Cluster) -> dict:
    return {"nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node, "gpu": cluster.gpu.name,
            "gpu_memory_gib": cluster.gpu.memory_gib, "usable_gib": usable_gib(cluster),
            "inter_node_gbits": cluster.inter_node_gbits}


def search(args, cluster: Cluster) -> int:
    if args.preset not in known_targets():
        raise ValueError(f"--preset {args.preset!r} is not one of {', '.join(known_targets())}")
    model = target_model(args.preset, 1, args.sequence)
    batch_tokens = args.global_batch_tokens or default_batch_tokens(args.preset)
    if batch_tokens % model.n_positions:
        raise ValueError(f"--global-batch-tokens {batch_tokens} is not a whole number of {model.n_positions}-token "
                         f"sequences; use a multiple of {model.n_positions}")
    global_batch = batch_tokens // model.n_positions
    plan = plan_layouts(lambda tp: target_model(args.preset, tp, args.sequence), cluster, global_batch,
                        args.precision, args.efficiency, args.gradient_dtype)
    too_big = sum(not c.fits for c in plan.ranked)
    extra = [f"train.precision={args.precision}", *model_settings(args.preset, model)]
    if args.json:
        print(json.dumps({
            "preset": args.preset, "model": {"n_layer": model.n_layer, "n_embd": model.n_embd,
                                             "n_head": model.n_head, "sequence": model.n_positions},
            "cluster": cluster_dict(cluster), "global_batch_size": global_batch,
            "global_batch_tokens": global_batch * model.n_positions, "precision": args.precision,
            "recommended": plan.recommended.to_dict(extra) if plan.recommended else None,
            "reason": why_recommended(plan), "layouts": [c.to_dict(extra) for c in plan.ranked],
            "refused": [{"count": count, "example": plan.examples[kind]} for kind, count in plan.refused.most_common()]
            + ([{"count": too_big, "example": "memory over the device"}] if too_big else []),
        }))
        return 0 if plan.recommended else 1
    own_context = target_model(args.preset, 1).n_positions
    context = "" if model.n_positions == own_context else f" (the preset's context is {own_context})"
    print(f"{args.preset}: {model.n_layer} layers, {model.n_embd} wide, {model.n_head} heads, sequence "
          f"{model.n_positions}{context}; global batch {global_batch} sequences = "
          f"{global_batch * model.n_positions:,} tokens")
    print(f"{cluster.nodes} node(s) x {cluster.gpus_per_node} {gpu_name(cluster)} = {cluster.world_size} GPUs; "
          f"{usable_gib(cluster):.1f} GiB usable per GPU; {args.precision}")
    print_plan(plan, args.top, too_big, extra)
    return 0 if plan.recommended else 1


def gpu_name(cluster: Cluster) -> str:
    from pretrain.planner.hardware import ACCELERATORS

    stock = any(spec == cluster.gpu for spec in ACCELERATORS.values())
    return cluster.gpu.name if stock else f"{cluster.gpu.name} (as {cluster.gpu.memory_gib:g} GiB)"


def print_plan(plan: Plan, top: int, too_big: int, extra: list[str]) -> None:
    fitting = [c for c in plan.ranked if c.fits]
    best = plan.recommended
    if fitting:
        print(f"\n{len(fitting)} layouts fit; the fastest {min(top, len(fitting))} (memory in GiB per GPU at the "
              "peak stage, and when the peak comes):")
        print(HEADER)
        for index, candidate in enumerate(fitting[:top], 1):
            print(row(index, candidate))
        print(f"\nrecommended: {describe(best)}\n  why: {why_recommended(plan)}")
        print(f"  train with: --set {' '.join(best.settings(extra))}")
    else:
        print(f"\n{why_recommended(plan)}")
    if not too_big and not plan.refused:
        print("\nrefused: none")
        return
    print("\nrefused (each line counts a kind of refusal and quotes one of them):")
    if too_big:
        print(f"  {too_big:>6} x memory over the device ({usable_gib(plan.cluster):.1f} GiB usable)")
    for kind, count in plan.refused.most_common():
        print(f"  {count:>6} x e.g. {plan.examples[kind]}")


def run_from_config(config, cluster: Cluster) -> RunShape:
    """The run a config describes on `cluster`, after the trainer's own checks of its settings
    (pretrain.training.run_check.check_settings, for GPUs); a ConfigError or LayoutError names the setting."""
    from pretrain.planner.memory import REDUCE_BUCKET_SIZE
    from pretrain.training.run_check import check_settings

    model, layout = check_settings(config, cluster.world_size, on_gpu=True)
    run = RunShape(model, layout, config.train.precision, config.train.gradient_dtype,
                   config.model.activation_checkpointing, config.model.partition_method, REDUCE_BUCKET_SIZE,
                   config.parallel.overlap_communication, config.parallel.bucket_size)
    # deepspeed.zero_optimization.reduce_bucket_size, where given, overrides the one the trainer generates.
    given = config.deepspeed.get("zero_optimization", {}).get("reduce_bucket_size")
    if given is None:
        return run
    return dataclasses.replace(run, reduce_bucket_size=int(given),
                               overlap_bucket_size=int(given) if run.deepspeed_overlap else run.overlap_bucket_size)


def check_config(args, cluster: Cluster) -> int:
    from pretrain.config import load_config
    from pretrain.parallel.layout import LayoutError
    from pretrain.planner.timing import spans_nodes

    config = load_config(args.config, args.set)
    try:
        run = run_from_config(config, cluster)
    except (ValueError, LayoutError) as error:  # ConfigError is a ValueError
        print(f"error: the trainer would refuse this run on {cluster.world_size} GPUs: {error}", file=sys.stderr)
        return 2
    candidate = evaluate(run, cluster, args.efficiency)
    stages = estimate_memory(run)
    if args.json:
        note = {"teacher_note": teacher_note(config.distill.teacher, run)} if config.distill.teacher else {}
        print(json.dumps({"config": args.config, "overrides": args.set, "cluster": cluster_dict(cluster),
                          **candidate.to_dict(), "stages": [{"stage": s.stage, "moment": s.moment, **s.gib()}
                                                            for s in stages], **note}))
        return 0 if candidate.fits else 1
    print(f"{args.config}: {describe(candidate)}, on {cluster.world_size} x {cluster.gpu.name}")
    if spans_nodes(run.layout.tensor_parallel_size, cluster.gpus_per_node):
        print(f"note: tensor-parallel groups of {run.layout.tensor_parallel_size} cross the nodes of "
              f"{cluster.gpus_per_node} GPUs; their all-reduces, every layer, go over the network")
    print(f"memory per GPU, GiB (usable {usable_gib(cluster):.1f}):")
    for stage in stages:
        gib = stage.gib()
        print(f"  stage {stage.stage}: parameters {gib['parameters']:.2f}, gradients {gib['gradients']:.2f}, "
              f"optimizer {gib['optimizer']:.2f}, activations {gib['activations']:.2f}, buffers "
              f"{gib['buffers']:.2f}: total {gib['total']:.2f} (peak at the {stage.moment})")
    time = candidate.time
    parts = ", ".join(f"{name.replace('_', ' ')} {seconds:.3f}" for name, seconds in time.parts().items() if seconds)
    if time.data_parallel_hidden:
        parts += f"; {time.data_parallel_hidden:.3f} more of data-parallel traffic hidden behind compute"
    print(f"step {time.seconds:.3f} s ({parts}); {time.tokens_per_second:,.0f} tokens/s, MFU {time.mfu:.1%} "
          f"(at --efficiency {args.efficiency})")
    verdict = "fits" if candidate.fits else "does NOT fit"
    print(f"{verdict}: peak {candidate.memory.total / GIB:.2f} GiB of {usable_gib(cluster):.1f} usable")
    if config.distill.teacher:
        print(teacher_note(config.distill.teacher, run))
    return 0 if candidate.fits else 1


def amount(size: float) -> str:
    """Bytes as GiB with two decimals, or as whole MiB below a tenth of a GiB (where 0.00 GiB would say nothing)."""
    return f"{size / GIB:.2f} GiB" if size >= GIB / 10 else f"{size / 2**20:.0f} MiB"


def teacher_note(teacher: str, run: RunShape) -> str:
    """What the memory model leaves out of a distillation run: the frozen teacher's weights, in the
    run's precision, cut as the student's layers are (its activations are those of one block)."""
    from pretrain.inference.loading import describe_weights
    from pretrain.model.loss import CHUNK_ELEMENTS
    from pretrain.model.presets import parameter_count

    try:
        config, _ = describe_weights(teacher)
    except Exception as error:  # the trainer refuses it at start-up with its own message
        return f"note: distill.teacher is not counted above, and cannot be read here ({error})"
    parameters = parameter_count(config)
    share = parameters * (4 if run.precision == "fp32" else 2) / (run.layout.tensor_parallel_size
                                                                  * run.layout.pipeline_parallel_size)
    head = 5 * CHUNK_ELEMENTS * 4  # the teacher's logits, both soft distributions and their difference, fp32
    return (f"note: the frozen teacher (distill.teacher, {parameters / 1e6:,.1f}M parameters) is not counted "
            f"above: add about {amount(share)} per GPU for its {run.precision} weights, and up to "
            f"{head / GIB:.2f} GiB on the last stage for its logits in the output head's chunk")
