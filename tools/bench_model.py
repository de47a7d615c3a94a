#!/usr/bin/env python
"""Training-step throughput of our GPT-2 against Hugging Face's GPT2LMHeadModel, in one run.

    python tools/bench_model.py --preset gpt2-mini --batch 4 --sequence 256          # CPU, fp32
    python tools/bench_model.py --preset gpt2-124m --batch 16 --sequence 1024 --device cuda --dtype bf16
    python tools/bench_model.py --preset gpt2-1.5b --batch 16 --sequence 1024 --device cuda --dtype bf16 \
        --steps 8 --repeats 2 --json runs/bench-1.5b.json

Same dimensions, batch, data and optimizer (torch AdamW) for both; a step is
forward, loss, backward, optimizer step, zero_grad. Ours runs at TP=PP=DP=1
(megatron-core layers in a one-process group: NCCL on a GPU, as in training;
gloo on CPU), without activation checkpointing; attention is torch's
scaled_dot_product_attention in both (flash attention on a GPU). With --dtype
bf16 both models hold bf16 parameters (as under DeepSpeed's bf16 mode, which
keeps the fp32 master copy in its optimizer; here plain AdamW updates the bf16
weights, the same work for both) and compute the loss in fp32. Each repeat
starts with --warmup untimed steps (a fresh optimizer allocates its state,
kernels are chosen); repeats are interleaved and the best kept. On a GPU, MFU
counts 6N + 12 L C T FLOPs per token against the device's bf16 dense peak
(pretrain/training/metrics.py device_peak_tflops), and peak memory is the most a
model's steps held on the device, less the other model's resident weights.
Without transformers installed only ours is measured. --json writes the
figures for scripts (tools/gpu_check.sh builds its summary from it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data_pipeline.peak_memory import peak_rss_bytes  # noqa: E402
from pretrain.training.metrics import device_peak_tflops  # noqa: E402
from pretrain.model.gpt2 import GPT2, language_model_loss  # noqa: E402
from pretrain.parallel.build import apply_compile  # noqa: E402
from pretrain.model.presets import flops_per_token, model_config, parameter_count  # noqa: E402
from pretrain.parallel.distributed import initialize_model_parallel, model_parallel_config  # noqa: E402
from pretrain.parallel.layout import ParallelLayout  # noqa: E402


def build_ours(config, device, layout, dtype):
    return GPT2(config, model_parallel_config(layout, params_dtype=dtype)).to(device)


def build_hf(config, device, dtype):
    """Hugging Face's GPT-2 with our dimensions, initialized on the device itself (a 1.5B model
    initialized on the CPU first would take longer than its benchmark)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head,
                           n_positions=config.n_positions, vocab_size=config.vocab_size,
                           activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_config._attn_implementation = "sdpa"
    with torch.device(device):
        model = GPT2LMHeadModel(hf_config)
    return model.to(device=device, dtype=dtype)


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def ours_loss(model, ids, labels):
    return model(ids, labels)


def ours_full_logits_loss(model, ids, labels):
    """The loss before the chunked head (issue 11): all logits, an fp32 copy, then the cross entropy."""
    return language_model_loss(model(ids), labels)


def hf_loss(model, ids, labels):
    logits = model(ids).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def time_steps(model, loss_fn, batches, device, warmup: int) -> float:
    """Seconds per step after `warmup` steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step(ids, labels):
        loss = loss_fn(model, ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for ids, labels in batches[:warmup]:
        step(ids, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for ids, labels in batches[warmup:]:
        step(ids, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - began) / (len(batches) - warmup)


def measure(models: dict, batches, device, warmup: int, repeats: int) -> tuple[dict, dict]:
    """Best seconds per step and peak device memory (GiB, CUDA only) of each model, repeats interleaved."""
    best = {name: float("inf") for name in models}
    peak = {name: 0.0 for name in models}
    resident = {name: parameter_bytes(model) for name, (model, _) in models.items()}
    for _ in range(repeats):
        for name, (model, loss_fn) in models.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            best[name] = min(best[name], time_steps(model, loss_fn, batches, device, warmup))
            if device.type == "cuda":
                others = sum(size for other, size in resident.items() if other != name)
                peak[name] = max(peak[name], (torch.cuda.max_memory_allocated(device) - others) / 2**30)
    if device.type == "cuda":
        return best, peak
    # On a CPU only the process's peak resident memory is known: a figure for a model measured alone.
    alone = peak_rss_bytes() / 2**30 if len(models) == 1 else None
    return best, {name: alone for name in models}


def init_process_group(device: torch.device) -> None:
    """A one-process group: NCCL on a GPU (what training uses; megatron-core's cross entropy
    all-reduces on it even at TP=1), gloo on CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    store = Path(tempfile.mkdtemp()) / "store"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-mini", help="a configs/*.yaml name (gpt2-tiny ... gpt2-1.5b)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--sequence", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each repeat's timed ones")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument("--models", default="ours,huggingface",
                        help="comma-separated: ours, ours-full-logits (our model with the loss over all logits at "
                             "once, as before the chunked head), ours-compiled (train.compile: torch.compile per "
                             "block), huggingface. On a CPU, peak memory (the process's peak RSS) is reported "
                             "only when one model is measured")
    args = parser.parse_args(argv)
    unknown = set(args.models.split(",")) - {"ours", "ours-full-logits", "ours-compiled", "huggingface"}
    if unknown:
        parser.error(f"--models: unknown {', '.join(sorted(unknown))}; "
                     "choose from ours, ours-full-logits, ours-compiled, huggingface")
    if "ours-compiled" in args.models.split(",") and args.warmup < 1:
        parser.error("--models ours-compiled needs --warmup 1 or more: the first step compiles")
    if min(args.batch, args.sequence, args.steps, args.repeats) < 1 or args.warmup < 0:
        parser.error("--batch, --sequence, --steps and --repeats must be at least 1, --warmup at least 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    init_process_group(device)
    layout = ParallelLayout(world_size=1)
    initialize_model_parallel(layout)
    config = model_config(args.preset)
    if args.sequence > config.n_positions:
        print(f"error: --sequence {args.sequence} exceeds {args.preset}'s context of {config.n_positions}",
              file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (args.batch, args.sequence + 1), generator=generator)
               for _ in range(args.warmup + args.steps)]
    batches = [(b[:, :-1].to(device), b[:, 1:].to(device)) for b in batches]

    torch.manual_seed(0)
    wanted = args.models.split(",")
    models = {}
    for name, loss in (("ours", ours_loss), ("ours-full-logits", ours_full_logits_loss),
                       ("ours-compiled", ours_loss)):
        if name in wanted:
            model = build_ours(config, device, layout, dtype)
            apply_compile(model, enabled=name == "ours-compiled")  # compiles during the warm-up steps
            models[name] = (model, loss)
    if "huggingface" in wanted and transformers_available():
        models["huggingface"] = (build_hf(config, device, dtype), hf_loss)
    elif "huggingface" in wanted:
        print("transformers is not installed: Hugging Face's model is not measured", file=sys.stderr)
    best, peak_gib = measure(models, batches, device, args.warmup, args.repeats)

    report = summarize(args, config, device, best, peak_gib)
    print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    dist.destroy_process_group()
    return 0


def summarize(args, config, device, best: dict, peak_gib: dict) -> dict:
    tokens = args.batch * args.sequence
    peak_tflops = device_peak_tflops() if device.type == "cuda" else None
    flops = flops_per_token(config, args.sequence)
    results = {}
    for name, seconds in best.items():
        tokens_per_second = tokens / seconds
        results[name] = {
            "seconds_per_step": seconds, "tokens_per_second": tokens_per_second,
            "mfu": tokens_per_second * flops / (peak_tflops * 1e12) if peak_tflops else None,
            "peak_memory_gib": peak_gib[name],
        }
    hf = results.get("huggingface")
    return {
        "preset": args.preset, "parameters": parameter_count(config), "batch": args.batch,
        "sequence": args.sequence, "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "device": device_name(device), "device_type": device.type,
        "device_peak_tflops": peak_tflops,
        "flops_per_token": flops, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "results": results,
        "ours_vs_huggingface": hf["seconds_per_step"] / results["ours"]["seconds_per_step"]
        if hf and "ours" in results else None,
    }


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())


def print_table(report: dict) -> None:
    print(f"{report['preset']} ({report['parameters'] / 1e6:.1f}M parameters), batch {report['batch']} x "
          f"{report['sequence']}, {report['dtype']}, AdamW; device {report['device']}, {report['threads']} threads, "
          f"torch {report['torch']}")
    on_gpu = report["device_type"] == "cuda"
    reference = report["results"].get("huggingface")
    memory = on_gpu or any(f["peak_memory_gib"] is not None for f in report["results"].values())
    print("\n| model | s/step | tokens/s | vs Hugging Face |" + (" MFU |" if on_gpu else "")
          + (" peak memory |" if memory else ""))
    print("|---|---:|---:|---:|" + ("---:|" if on_gpu else "") + ("---:|" if memory else ""))
    for name, figures in report["results"].items():
        ratio = f"{reference['seconds_per_step'] / figures['seconds_per_step']:.2f}x" if reference else "-"
        row = f"| {name} | {figures['seconds_per_step']:.3f} | {figures['tokens_per_second']:,.0f} | {ratio} |"
        if on_gpu:
            row += f" {figures['mfu']:.1%} |" if figures["mfu"] is not None else " - (peak unknown) |"
        if memory:
            row += f" {figures['peak_memory_gib']:.2f} GiB |"
        print(row)


if __name__ == "__main__":
    sys.exit(main())
