#!/usr/bin/env python
"""Training-step throughput of our GPT-2 against Hugging Face's GPT2LMHeadModel, in one run.

    python tools/bench_model.py --preset gpt2-mini --batch 4 --sequence 256          # CPU, fp32
    python tools/bench_model.py --preset gpt2-124m --batch 16 --sequence 1024 --device cuda --dtype bf16

Same dimensions, batch, data and optimizer (torch AdamW) for both; a step is
forward, loss, backward, optimizer step, zero_grad. Ours runs at TP=PP=DP=1
(megatron-core layers in a one-process group); attention is torch's
scaled_dot_product_attention in both (flash attention on a GPU). With --dtype
bf16 both models hold bf16 parameters (as under DeepSpeed's bf16 mode, which
keeps the fp32 master copy in its optimizer; here plain AdamW updates the bf16
weights, the same work for both) and compute the loss in fp32. Repeats are
interleaved and the best kept. On a GPU, MFU counts 6N + 12 L C T FLOPs per
token against the device's bf16 dense peak.
"""

from __future__ import annotations

import argparse
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

from pretrain.model.gpt2 import GPT2  # noqa: E402
from pretrain.metrics import device_peak_tflops  # noqa: E402
from pretrain.model.presets import flops_per_token, model_config, parameter_count  # noqa: E402
from pretrain.parallel.distributed import initialize_model_parallel, model_parallel_config  # noqa: E402
from pretrain.parallel.layout import ParallelLayout  # noqa: E402

def build_ours(config, device, layout, dtype):
    return GPT2(config, model_parallel_config(layout, params_dtype=dtype)).to(device)


def build_hf(config, device, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head,
                           n_positions=config.n_positions, vocab_size=config.vocab_size,
                           activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(hf_config).to(device=device, dtype=dtype)


def ours_loss(model, ids, labels):
    return model(ids, labels)


def hf_loss(model, ids, labels):
    logits = model(ids).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def time_steps(model, loss_fn, batches, device, dtype, warmup: int) -> float:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-mini")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sequence", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    store = Path(tempfile.mkdtemp()) / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    layout = ParallelLayout(world_size=1)
    initialize_model_parallel(layout)
    config = model_config(args.preset)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (args.batch, args.sequence + 1), generator=generator)
               for _ in range(args.warmup + args.steps)]
    batches = [(b[:, :-1].to(device), b[:, 1:].to(device)) for b in batches]

    torch.manual_seed(0)
    models = {"ours": (build_ours(config, device, layout, dtype), ours_loss),
              "huggingface": (build_hf(config, device, dtype), hf_loss)}
    best = {name: float("inf") for name in models}
    for _ in range(args.repeats):
        for name, (model, loss_fn) in models.items():
            best[name] = min(best[name], time_steps(model, loss_fn, batches, device, dtype, args.warmup))

    tokens = args.batch * args.sequence
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"{args.preset} ({parameter_count(config) / 1e6:.1f}M parameters), batch {args.batch} x {args.sequence}, "
          f"{args.dtype}, AdamW; device {name}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    peak = device_peak_tflops() if device.type == "cuda" else None
    flops = flops_per_token(config, args.sequence)
    print("\n| model | s/step | tokens/s | vs Hugging Face |" + (" MFU |" if peak else ""))
    print("|---|---:|---:|---:|" + ("---:|" if peak else ""))
    for model_name, seconds in best.items():
        row = f"| {model_name} | {seconds:.3f} | {tokens / seconds:,.0f} | {best['huggingface'] / seconds:.2f}x |"
        if peak:
            row += f" {tokens / seconds * flops / (peak * 1e12):.1%} |"
        print(row)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
