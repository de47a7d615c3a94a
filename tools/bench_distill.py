#!/usr/bin/env python3
"""The distillation head: ours against the usual way, time and peak memory of one micro-batch.

    .venv/bin/python tools/bench_distill.py                 # GPT-2 124M widths, 1 x 1024 tokens, CPU
    .venv/bin/python tools/bench_distill.py --tokens 8192   # on a GPU: 8 x 1024

"ours": pretrain/model/loss.py's head_loss with a teacher: the student's and the teacher's logits a
chunk of tokens at a time, the cross entropy, the KL and their gradients computed in one pass, never
the whole vocabulary x tokens at once. "usual": what Hugging Face's distillation examples do (and
DistilGPT2 was trained with): the full logits of both models, log_softmax / softmax at temperature T,
KLDivLoss(batchmean) x T^2 plus cross entropy, autograd for the gradients. Both compute the same
objective on the same numbers (loss and gradient norm checked here); each variant runs in a fresh
process, and its figure is the process's peak memory (resident set on CPU, max_memory_allocated on a
GPU) less what it held just before the head ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(variant: str, args) -> dict:
    """One variant in this process: seconds per micro-batch (best of --repeats), peak memory, loss."""
    import torch
    import torch.nn.functional as F

    from data_pipeline.peak_memory import peak_rss_bytes, resident_bytes
    from pretrain.inference.loading import single_process_group
    from pretrain.model.loss import Distillation, head_loss

    single_process_group()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    vocabulary, padded = 50257, 50304

    def normal(*shape):
        return (0.02 * torch.randn(*shape, generator=generator)).to(device, dtype)

    weight, teacher_weight = normal(padded, args.width).requires_grad_(True), normal(padded, args.teacher_width)
    hidden = (50 * normal(1, args.tokens, args.width)).requires_grad_(True)
    teacher_hidden = 50 * normal(1, args.tokens, args.teacher_width)
    labels = torch.randint(0, vocabulary, (1, args.tokens), generator=generator).to(device)
    T, alpha = 2.0, 0.5

    def ours():
        embedding = type("E", (), {"word": type("W", (), {"weight": weight}), "padding_start": vocabulary})
        teacher = type("E", (), {"word": type("W", (), {"weight": teacher_weight})})
        return head_loss(hidden, embedding, labels, distillation=Distillation(teacher, T, alpha, 0.0),
                         teacher_hidden=teacher_hidden)

    def usual():
        student = (hidden @ weight.t())[..., :vocabulary].float().flatten(0, 1)
        with torch.no_grad():
            teacher = (teacher_hidden @ teacher_weight.t())[..., :vocabulary].float().flatten(0, 1)
        kl = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(student / T, dim=-1), F.softmax(teacher / T, dim=-1))
        return alpha * T**2 * kl + (1 - alpha) * F.cross_entropy(student, labels.flatten())

    step = {"ours": ours, "usual": usual}[variant]
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:  # what is resident now, not the peak so far: setting up left a transient behind
        before = resident_bytes()
    best, loss = float("inf"), None
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        synchronize()
        began = time.perf_counter()
        loss = step()
        loss.backward()
        synchronize()
        best = min(best, time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    return {"variant": variant, "seconds": best, "peak_gib": (peak - before) / 2**30, "loss": loss.item(),
            "grad_norm": float(torch.cat([hidden.grad.flatten(), weight.grad.flatten()]).float().norm()),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens in the micro-batch (default 1024)")
    parser.add_argument("--width", type=int, default=768, help="the student's n_embd (default 768: GPT-2 124M)")
    parser.add_argument("--teacher-width", type=int, default=768, help="the teacher's n_embd (default 768)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=("ours", "usual"), help=argparse.SUPPRESS)  # one child's run
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return
    results = []
    for variant in ("usual", "ours"):
        child = subprocess.run([sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens),
                                "--width", str(args.width), "--teacher-width", str(args.teacher_width),
                                "--repeats", str(args.repeats)], capture_output=True, text=True,
                               # freed memory goes back to the system, so the peak is the tensors' (as bench_plan)
                               env=dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
                                        MALLOC_MMAP_THRESHOLD_="65536"))
        if child.returncode != 0:
            raise SystemExit(f"the {variant} run failed:\n{child.stderr[-3000:]}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    usual, ours = results
    for figure in ("loss", "grad_norm"):
        if abs(usual[figure] - ours[figure]) > 1e-3 * abs(usual[figure]):
            raise SystemExit(f"the two variants disagree: {figure} {usual[figure]} against {ours[figure]}")
    print(f"{args.tokens} tokens, student width {args.width}, teacher width {args.teacher_width}, "
          f"vocabulary 50257, on {ours['device']}")
    print("| variant | seconds per micro-batch | peak memory of the head, GiB | loss | gradient norm |")
    print("|---|---|---|---|---|")
    for result in results:
        print(f"| {result['variant']} | {result['seconds']:.3f} | {result['peak_gib']:.2f} | {result['loss']:.5f} | "
              f"{result['grad_norm']:.5f} |")


if __name__ == "__main__":
    main()
