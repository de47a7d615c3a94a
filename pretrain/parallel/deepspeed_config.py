"""The DeepSpeed config a layout and precision generate, and the refusals that name the setting. No torch
or DeepSpeed import: `python -m pretrain --check` and the planner run these without either."""

from __future__ import annotations

from pretrain.parallel.layout import ParallelLayout

PRECISIONS = ("fp32", "bf16", "fp16")
# Elements per gradient bucket of the overlapped reduction (pretrain/parallel/overlap.py; parallel.bucket_size):
# Megatron-LM's default DDP bucket, 160 MB in fp32.
OVERLAP_BUCKET_SIZE = 40_000_000
GRADIENT_DTYPES = ("fp32", "bf16")


def gradient_dtype_refusal(precision: str, gradient_dtype: str, zero_stage: int) -> str | None:
    """Why this precision / gradient dtype / ZeRO stage cannot run, or None."""
    if gradient_dtype not in GRADIENT_DTYPES:
        return f"train.gradient_dtype={gradient_dtype!r} must be one of {', '.join(GRADIENT_DTYPES)}"
    if precision == "bf16" and gradient_dtype == "fp32" and zero_stage == 0:
        # DeepSpeed accumulates in fp32 only inside its ZeRO optimizers (BF16_Optimizer at stage 1).
        return ("train.precision=bf16 with train.gradient_dtype=fp32 needs parallel.zero_stage >= 1 (DeepSpeed has "
                "no fp32 gradient accumulation at ZeRO-0); set parallel.zero_stage=1, or train.gradient_dtype=bf16 "
                "to accumulate and all-reduce gradients in bf16")
    return None


def uses_bf16_optimizer(layout: ParallelLayout, precision: str, gradient_dtype: str) -> bool:
    """Whether DeepSpeed 0.19 wraps the optimizer in its BF16_Optimizer (pretrain/planner/memory.py has
    every path): bf16 with fp32 gradients at ZeRO-1, or bf16 at ZeRO-0 with a pipeline."""
    return precision == "bf16" and (layout.zero_stage == 1 and gradient_dtype == "fp32"
                                    or layout.zero_stage == 0 and layout.pipeline_parallel_size > 1)


def deepspeed_overlaps(layout: ParallelLayout, precision: str, gradient_dtype: str) -> bool:
    """Whether parallel.overlap_communication is DeepSpeed's own overlap_comm here: ZeRO-1/2 through
    its DeepSpeedZeroOptimizer (fp32, fp16, or bf16 with bf16 gradients; ZeRO-2 in any precision),
    with data parallelism and without a pipeline (whose engine turns overlap_comm off)."""
    return (layout.zero_stage in (1, 2) and not uses_bf16_optimizer(layout, precision, gradient_dtype)
            and layout.data_parallel_size > 1 and layout.pipeline_parallel_size == 1)


def deepspeed_config(layout: ParallelLayout, precision: str = "fp32", gradient_clipping: float = 0.0,
                     extra: dict | None = None, gradient_dtype: str = "fp32", overlap_communication: bool = False,
                     bucket_size: int = OVERLAP_BUCKET_SIZE) -> dict:
    """The DeepSpeed JSON for a layout; `extra` keys are passed through on top.

    In bf16, gradients are accumulated over micro-batches and reduced over data-parallel
    ranks in `gradient_dtype`: fp32 by default (DeepSpeed's own default is the model's
    dtype, whose 8-bit mantissa loses small contributions over many micro-batches).
    With `overlap_communication` where DeepSpeed's ZeRO-1/2 optimizer runs (deepspeed_overlaps),
    its overlap_comm reduces `bucket_size`-element buckets on a side stream during the last
    backward (ZeRO-1) or every backward (ZeRO-2); under BF16_Optimizer the trainer overlaps
    itself (pretrain/parallel/overlap.py).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r} must be one of {', '.join(PRECISIONS)}")
    refusal = gradient_dtype_refusal(precision, gradient_dtype, layout.zero_stage)
    if refusal:
        raise ValueError(refusal)
    config = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.gradient_accumulation_steps,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": {"stage": layout.zero_stage, **(
            {"overlap_comm": True, "reduce_bucket_size": bucket_size}
            if overlap_communication and deepspeed_overlaps(layout, precision, gradient_dtype) else {})},
        # ZeRO accepts only optimizer classes it lists; ours is torch's AdamW plus a
        # skip on non-finite gradients (pretrain/training/optim.py), the same update otherwise.
        "zero_allow_untested_optimizer": True,
        # immediate_grad_update: BF16_Optimizer folds each gradient into its fp32 buffer as
        # backward produces it. Without it, the fp32 buffer takes the bf16 gradient after each
        # micro-batch and relies on the engine's backward prologue to clear it; DeepSpeed 0.19's
        # PipelineEngine skips that prologue on the last stage, which then counts earlier
        # micro-batches again (measured: a TP2 x PP2 bf16 run off the fp32 curve by 5e-3 at step 3).
        "bf16": {"enabled": precision == "bf16", "immediate_grad_update": True},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0},
        "steps_per_print": 10**9,  # our own logging reports progress
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["data_types"] = {"grad_accum_dtype": gradient_dtype}
        config["communication_data_type"] = gradient_dtype
    for key, value in (extra or {}).items():  # a section given under deepspeed.* refines ours, key by key
        config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) \
            else value
    if precision == "bf16" and layout.pipeline_parallel_size > 1 and not config["bf16"].get("immediate_grad_update"):
        raise ValueError("deepspeed.bf16.immediate_grad_update=false with a pipeline would count the last stage's "
                         "gradients more than once (DeepSpeed 0.19 skips the last stage's backward prologue); "
                         "leave it unset")
    return config
