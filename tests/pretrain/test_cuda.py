"""Our GPT-2 on a CUDA GPU: bf16 against fp32, flash attention against the math backend, GPU against CPU.

Every test here needs a CUDA device and is skipped, saying so, where torch sees none (the
development machines and CI). `tools/gpu_check.sh` (`make gpu-check`) runs them on a GPU machine.
The models are built as in test_model.py: one process, megatron-core's parallel state on the
session's one-rank gloo group (`single_process_group`), CPU initialization, then moved to the GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.model.gpt2 import GPT2, GPTConfig
from pretrain.parallel.distributed import model_parallel_config

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (torch.cuda.is_available() is False here); tools/gpu_check.sh runs these on one",
)

# GPT-2's width, heads and context with its real vocabulary (padded to 50,304), two blocks deep.
GPT2_SHAPED = GPTConfig(n_layer=2, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257, padded_vocab_size=50304)
VOCAB = GPT2_SHAPED.vocab_size


@pytest.fixture
def exact_fp32():
    """fp32 matmuls in full fp32 (no TF32) for the tests that compare against the CPU or fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def build(layout, dtype=torch.float32, seed: int = 5) -> GPT2:
    return GPT2(GPT2_SHAPED, model_parallel_config(layout, params_dtype=dtype), seed=seed).eval()


def token_ids(batch: int = 2, length: int = 1024, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.float(), reference.float()
    return ((value - reference).norm() / reference.norm()).item()


def test_bf16_logits_on_cuda_match_fp32_within_bf16_precision(single_process_group, exact_fp32):
    full = build(single_process_group).cuda()
    half = build(single_process_group, torch.bfloat16).cuda()
    assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in half.parameters())
    ids = token_ids().cuda()
    with torch.no_grad():
        expected = full(ids)[..., :VOCAB]
        logits = half(ids)[..., :VOCAB].float()
    assert torch.isfinite(logits).all()
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per operation); on the CPU this model's
    # bf16 logits sit at 0.8% relative (norm) and 0.025 absolute (max) from fp32, logits of std 0.55.
    assert relative_error(logits, expected) < 0.03
    assert (logits - expected).abs().max().item() < 0.1
    agree = (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agree > 0.5, f"only {agree:.0%} of next-token argmaxes agree between bf16 and fp32"


@pytest.mark.parametrize("heads", [12, 25], ids=["gpt2-124m", "gpt2-1.5b"])
def test_flash_attention_runs_on_our_shapes_and_equals_the_math_backend(heads):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # (B, h, T, hd) as CausalSelfAttention hands them over: views of one qkv projection, head dim 64.
    generator = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(4, 1024, heads, 3, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    q, k, v = (t.detach().requires_grad_() for t in qkv.permute(3, 0, 2, 1, 4))
    upstream = torch.randn(4, heads, 1024, 64, device="cuda", dtype=torch.bfloat16, generator=generator)

    def attention(backend, *inputs):
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(*inputs, is_causal=True)
            grads = torch.autograd.grad(out, inputs, upstream.to(out.dtype))
        return out, grads

    flash, flash_grads = attention(SDPBackend.FLASH_ATTENTION, q, k, v)  # raises if flash cannot run
    math, math_grads = attention(SDPBackend.MATH, q, k, v)
    reference, reference_grads = attention(SDPBackend.MATH, *(t.float() for t in (q, k, v)))  # fp32
    assert relative_error(flash, math) < 2e-2
    assert relative_error(flash, reference) < 2e-2
    for got, bf16_math, fp32 in zip(flash_grads, math_grads, reference_grads):
        assert relative_error(got, bf16_math) < 3e-2
        assert relative_error(got, fp32) < 3e-2


def test_our_model_trains_under_the_flash_backend_alone(single_process_group):
    """Our attention's q, k, v (strided views of the qkv projection) qualify for flash attention:
    with every other backend disabled, a bf16 forward and backward still run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build(single_process_group, torch.bfloat16).cuda().train()
    ids = token_ids().cuda()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        logits = model(ids)[..., :VOCAB]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), torch.roll(ids, -1, dims=1).flatten())
        loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in model.parameters())


def same_model_on_cpu_and_gpu(layout) -> tuple[GPT2, GPT2]:
    """Two builds with one seed: initialization depends only on (seed, parameter name)."""
    on_cpu, on_gpu = build(layout), build(layout).cuda()
    assert all(torch.equal(a, b.cpu()) for a, b in zip(on_cpu.parameters(), on_gpu.parameters()))
    return on_cpu, on_gpu


def test_cuda_fp32_forward_equals_the_cpu_forward_of_the_same_weights(single_process_group, exact_fp32):
    on_cpu, on_gpu = same_model_on_cpu_and_gpu(single_process_group)
    ids = token_ids()
    with torch.no_grad():
        expected = on_cpu(ids)[..., :VOCAB]
        logits = on_gpu(ids.cuda())[..., :VOCAB].cpu()
    difference = (logits - expected).abs().max().item()
    assert difference < 1e-4, f"CUDA and CPU logits differ by up to {difference:.2e}"


def test_cuda_loss_equals_the_cpu_loss(single_process_group, exact_fp32):
    """Our loss (the tied head and the cross entropy, in chunks: pretrain/model/loss.py) on CUDA tensors."""
    on_cpu, on_gpu = same_model_on_cpu_and_gpu(single_process_group)
    ids = token_ids(length=512)
    labels = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        expected = on_cpu(ids, labels)
        loss = on_gpu(ids.cuda(), labels.cuda()).cpu()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
