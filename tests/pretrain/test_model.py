"""GPT-2 in one process: the same function as Hugging Face's GPT2LMHeadModel on the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.model.gpt2 import GPT2, GPTConfig
from pretrain.model.hf_mapping import canonical_name, hf_to_ours, module_name, ours_to_hf
from pretrain.parallel.distributed import model_parallel_config


def hf_model(config: GPTConfig, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf_config = GPT2Config(
        n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head, n_positions=config.n_positions,
        vocab_size=config.vocab_size, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=config.layer_norm_epsilon,
    )
    return GPT2LMHeadModel(hf_config).eval()


def ours_from_hf(hf, config: GPTConfig, layout) -> GPT2:
    model = GPT2(config, model_parallel_config(layout)).eval()
    weights = hf_to_ours(hf.state_dict(), config)
    missing = model.load_state_dict({module_name(name): tensor for name, tensor in weights.items()}, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    return model


# 768 wide with GPT-2's real 50,257-token vocabulary (padded to 50,304): the padding is exercised.
GPT2_SHAPED = GPTConfig(n_layer=2, n_embd=768, n_head=12, n_positions=128, vocab_size=50257, padded_vocab_size=50304)


def test_forward_equals_huggingface_gpt2_on_the_same_weights(single_process_group):
    hf = hf_model(GPT2_SHAPED)
    ours = ours_from_hf(hf, GPT2_SHAPED, single_process_group)
    ids = torch.randint(0, GPT2_SHAPED.vocab_size, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        logits = ours(ids)
    assert logits.shape == (2, 96, 50304)
    assert torch.allclose(logits[..., :50257], expected, atol=1e-4, rtol=0), (logits[..., :50257] - expected).abs().max()
    labels = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        loss = ours(ids, labels)
    assert torch.allclose(loss, F.cross_entropy(expected.flatten(0, 1), labels.flatten()), rtol=1e-5)


def test_padded_vocabulary_rows_take_no_part_in_the_loss(single_process_group):
    config = GPTConfig(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=1000, padded_vocab_size=1024)
    model = GPT2(config, model_parallel_config(single_process_group))
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(2))
    labels = torch.roll(ids, -1, dims=1)
    loss = model(ids, labels)
    logits = model(ids).detach()
    assert torch.all(logits[..., 1000:] == float("-inf"))  # never sampled either
    assert torch.allclose(loss, F.cross_entropy(logits[..., :1000].flatten(0, 1), labels.flatten()), rtol=1e-6)
    with torch.no_grad():
        model.embedding.word.weight[1000:] += 100.0  # would dominate the softmax if it took part
    assert torch.allclose(model(ids, labels), loss, rtol=1e-6)
    model(ids, labels).backward()
    assert model.embedding.word.weight.grad[1000:].abs().max() == 0


def test_weight_mapping_round_trips():
    config = GPTConfig(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=1000, padded_vocab_size=1024)
    state = {k: v for k, v in hf_model(config).state_dict().items() if not k.endswith(".attn.bias")}
    back = ours_to_hf(hf_to_ours(state, config), config)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_parameter_count_and_initialization_match_gpt2(single_process_group):
    config = GPTConfig()  # GPT-2 124M
    model = GPT2(config, model_parallel_config(single_process_group), seed=7)
    padding = (config.padded_vocab_size - config.vocab_size) * config.n_embd
    assert sum(p.numel() for p in model.parameters()) - padding == 124_439_808  # HF gpt2's count
    params = {canonical_name(n): p for n, p in model.named_parameters()}
    assert params["2.attn.qkv.weight"].std().item() == pytest.approx(0.02, rel=0.02)
    assert params["2.mlp.proj.weight"].std().item() == pytest.approx(0.02 / (2 * 12) ** 0.5, rel=0.02)
    assert params["2.attn.proj.weight"].std().item() == pytest.approx(0.02 / (2 * 12) ** 0.5, rel=0.02)
    assert params["1.position.weight"].std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.all(params["2.attn.qkv.bias"] == 0) and torch.all(params["2.ln_1.weight"] == 1)
    again = GPT2(config, model_parallel_config(single_process_group), seed=7)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_bf16_parameters_give_the_fp32_loss_within_bf16_precision(single_process_group):
    config = GPTConfig(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=1000, padded_vocab_size=1024)
    full = GPT2(config, model_parallel_config(single_process_group), seed=3)
    half = GPT2(config, model_parallel_config(single_process_group, params_dtype=torch.bfloat16), seed=3)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert all(torch.equal(a.to(torch.bfloat16), b) for a, b in zip(full.parameters(), half.parameters()))
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(4))
    labels = torch.roll(ids, -1, dims=1)
    loss = half(ids, labels)
    assert loss.dtype == torch.float32  # the loss is computed in fp32
    assert loss.item() == pytest.approx(full(ids, labels).item(), rel=1e-2)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in half.parameters())


@pytest.mark.parametrize("chunk_tokens", [7, 64, None], ids=["ragged-chunks", "one-chunk-each", "default"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_chunked_head_loss_equals_the_full_logits_loss(single_process_group, chunk_tokens, dtype):
    """Loss and gradients of head_loss (training) against lm_head + vocab_parallel_cross_entropy;
    fp16 under DeepSpeed's first loss scale, 2^16, which only backward sees."""
    from pretrain.model.gpt2 import language_model_loss, lm_head
    from pretrain.model.loss import head_loss

    config = GPTConfig(n_layer=1, n_embd=64, n_head=4, n_positions=32, vocab_size=1000, padded_vocab_size=1024)
    embedding = GPT2(config, model_parallel_config(single_process_group), seed=5).to(dtype).embedding
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(3, 32, 64, generator=generator).to(dtype).requires_grad_()
    labels = torch.randint(0, 1000, (3, 32), generator=generator)
    gradients = []
    for loss_of in (lambda: language_model_loss(lm_head(embedding, x), labels),
                    lambda: head_loss(x, embedding, labels, chunk_tokens)):
        x.grad = embedding.word.weight.grad = None
        loss = loss_of()
        (loss * (2.0**16 if dtype == torch.float16 else 2.0)).backward()  # a scaled loss scales the gradients
        gradients.append((loss.detach(), x.grad.float(), embedding.word.weight.grad.float()))
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in gradients[1][1:])
    (reference, x_grad, weight_grad), (loss, chunked_x_grad, chunked_weight_grad) = gradients
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(reference.item(), rel=1e-6, abs=1e-6)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16, fp16: one rounding of the matmul outputs
    assert torch.allclose(chunked_x_grad, x_grad, rtol=0, atol=tolerance * x_grad.abs().max().item())
    assert torch.allclose(chunked_weight_grad, weight_grad, rtol=0, atol=tolerance * weight_grad.abs().max().item())
    assert torch.all(chunked_weight_grad[1000:] == 0)  # vocabulary padding gets no gradient
    with torch.no_grad():
        assert head_loss(x, embedding, labels, chunk_tokens).item() == pytest.approx(reference.item(), rel=1e-6)
