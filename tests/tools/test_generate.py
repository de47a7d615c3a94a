"""Generation (pretrain/inference/generation.py, the KV cache in pretrain/model/gpt2.py) and tools/generate.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pretrain.inference.generation import SamplingOptions, generate, top_k_filter, top_p_filter
from tests.conftest import run_tool


@pytest.fixture(scope="module")
def loaded(tiny_hf_model):
    from pretrain.inference.loading import load_model

    return load_model(tiny_hf_model, device="cpu")


@pytest.fixture(scope="module")
def lively_hf_model(tiny_hf_model, tmp_path_factory):
    """The tiny model with its weight matrices x10. The fixture's random weights are small enough
    that greedy decoding repeats one token forever; these give a different token almost every step,
    so that equal outputs say something about positions and attention."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_hf_model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("weight") and "ln_" not in name:
                parameter.mul_(10)
    directory = tmp_path_factory.mktemp("lively-hf")
    model.save_pretrained(directory)
    for tokenizer_file in ("vocab.json", "merges.txt"):
        shutil.copy(tiny_hf_model / tokenizer_file, directory / tokenizer_file)
    return directory


@pytest.fixture(scope="module")
def lively(lively_hf_model):
    from pretrain.inference.loading import load_model

    return load_model(lively_hf_model, device="cpu")


PROMPTS = ["Hello world, this is", "The quick brown fox jumps over the lazy dog. Then"]


def hf_greedy(directory, prompt_ids: list[int], new_tokens: int):
    """transformers' own greedy generation: (new token ids, per-step logits (1, V))."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(directory).eval()
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                         pad_token_id=50256, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt_ids):].tolist(), out.logits


# ---- the KV cache -----------------------------------------------------------------------------


def test_kv_cache_chunks_equal_the_full_forward_including_a_chunk_after_cached_tokens(lively):
    from pretrain.model.gpt2 import KVCache

    model, V = lively.model, lively.config.vocab_size
    ids = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)[..., :V]  # (2, 30, V)
        cache = KVCache.for_model(model, batch_size=2, max_length=30)
        # A 10-token prompt, single tokens, then a 6-token chunk after cached ones (needs the explicit
        # mask: is_causal would align its triangle to the first cached key), then single tokens again.
        chunks = [(0, 10), (10, 11), (11, 12), (12, 18)] + [(t, t + 1) for t in range(18, 30)]
        pieces = [model(ids[:, start:end], cache=cache)[..., :V] for start, end in chunks]
    assert cache.length == 30
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-5
    with pytest.raises(ValueError, match="KV cache holds 30 positions"):
        model(ids[:, :1], cache=cache)


# ---- agreement with transformers, and cached with uncached ------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("which", ["tiny", "lively"])
def test_greedy_equals_transformers_generate_token_for_token(request, which, prompt):
    directory = request.getfixturevalue({"tiny": "tiny_hf_model", "lively": "lively_hf_model"}[which])
    model = request.getfixturevalue({"tiny": "loaded", "lively": "lively"}[which])
    prompt_ids = model.tokenizer.encode(prompt)
    ours = generate(model, prompt_ids, SamplingOptions(max_new_tokens=30, greedy=True), keep_logits=True)
    theirs, their_logits = hf_greedy(directory, prompt_ids, 30)
    assert ours.samples[0].token_ids == theirs and len(theirs) == 30
    for step, (mine, hf) in enumerate(zip(ours.step_logits, their_logits)):
        assert (mine - hf.float()).abs().max() < 1e-4, f"step {step}"
    if which == "lively":
        assert len(set(theirs)) > 10, "the lively model should not repeat itself"


def test_cached_and_uncached_generation_agree_at_every_step(lively):
    prompt_ids = lively.tokenizer.encode(PROMPTS[1])
    runs = {}
    for use_cache in (True, False):
        options = SamplingOptions(max_new_tokens=32, greedy=True, use_cache=use_cache)
        runs[use_cache] = generate(lively, prompt_ids, options, keep_logits=True)
    assert runs[True].samples == runs[False].samples
    assert len(runs[True].step_logits) == len(runs[False].step_logits) == 32
    for step, (cached, recomputed) in enumerate(zip(runs[True].step_logits, runs[False].step_logits)):
        assert (cached - recomputed).abs().max() < 1e-5, f"step {step}"
    sampled = [generate(lively, prompt_ids, SamplingOptions(max_new_tokens=12, num_samples=3, seed=5,
                                                            use_cache=use_cache)) for use_cache in (True, False)]
    assert sampled[0].samples == sampled[1].samples


# ---- sampling ---------------------------------------------------------------------------------


def test_seeded_sampling_repeats_and_top_k_1_or_a_tiny_top_p_equals_greedy(lively):
    prompt_ids = lively.tokenizer.encode(PROMPTS[0])

    def tokens(**options):
        run = generate(lively, prompt_ids, SamplingOptions(max_new_tokens=12, num_samples=3, **options))
        return [sample.token_ids for sample in run.samples]

    first = tokens(seed=7)
    assert first == tokens(seed=7)
    assert first != tokens(seed=8)
    assert len({tuple(sample) for sample in first}) == 3, "the samples of one batch should differ"
    greedy = tokens(greedy=True)
    assert greedy[0] == greedy[1] == greedy[2]
    assert tokens(top_k=1, seed=3) == greedy
    assert tokens(top_p=1e-6, seed=3) == greedy


def test_top_p_keeps_the_smallest_set_whose_probability_reaches_p():
    probabilities = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # most likely first: 1, 3, 2, 0
    logits = probabilities.log()

    def kept(p):
        return set(torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist())

    assert kept(0.3) == {1}  # 0.5 already reaches 0.3
    assert kept(0.75) == {1, 3}  # 0.5 < 0.75 <= 0.8
    assert kept(0.85) == {1, 3, 2}  # 0.8 < 0.85 <= 0.95
    assert kept(0.97) == {0, 1, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}
    assert kept(1e-9) == {1}  # always at least one token
    assert set(torch.isfinite(top_k_filter(logits, 2))[0].nonzero().flatten().tolist()) == {1, 3}


def test_top_p_keeps_the_same_tokens_as_transformers():
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0)) * 3
    for p in (0.1, 0.5, 0.9, 0.99):
        theirs = TopPLogitsWarper(top_p=p)(None, logits.clone())
        assert torch.equal(torch.isfinite(top_p_filter(logits, p)), torch.isfinite(theirs)), f"top_p={p}"


# ---- stopping, padding, the context -----------------------------------------------------------


def scripted_next_tokens(model, next_token):
    """Make the model put all probability on next_token(last input token), padding columns included
    when next_token points there; returns the hook's handle."""

    def hook(_module, args, output):  # output (B, T, V_padded) for token ids args[0] (B, T)
        scripted = torch.full_like(output, -1e4)
        return scripted.scatter(-1, next_token(args[0])[..., None], 0.0)

    return model.register_forward_hook(hook)


def test_generation_stops_at_the_end_of_document_token(loaded):
    eod, V = loaded.tokenizer.eod_id, loaded.config.vocab_size
    counting = scripted_next_tokens(loaded.model, lambda ids: torch.where(ids == 503, eod, (ids + 1) % V))
    try:
        stopped = generate(loaded, [500], SamplingOptions(max_new_tokens=10, num_samples=2, seed=1))
        went_on = generate(loaded, [500], SamplingOptions(max_new_tokens=6, greedy=True, stop_at_eod=False))
    finally:
        counting.remove()
    for sample in stopped.samples:
        assert (sample.token_ids, sample.finish_reason) == ([501, 502, 503], "end_of_document")
    assert stopped.new_tokens == 2 * 4  # three tokens and the end-of-document, per sample
    assert went_on.samples[0].token_ids == [501, 502, 503, eod, 0, 1]
    assert went_on.samples[0].finish_reason == "max_new_tokens"


def test_padded_vocabulary_rows_are_never_sampled(loaded):
    V = loaded.config.vocab_size
    assert loaded.config.padded_vocab_size > V
    with torch.no_grad():
        assert torch.isneginf(loaded.model(torch.tensor([[1, 2, 3]]))[..., V:]).all()
    # Even a model that puts all its probability on the padding rows gets real tokens only.
    to_padding = scripted_next_tokens(loaded.model, lambda ids: torch.full_like(ids, V + 3))
    try:
        run = generate(loaded, [1, 2, 3], SamplingOptions(max_new_tokens=30, num_samples=4, temperature=2.0,
                                                          stop_at_eod=False), keep_logits=True)
    finally:
        to_padding.remove()
    assert all(logits.shape == (4, V) for logits in run.step_logits)
    assert all(0 <= token < V for sample in run.samples for token in sample.token_ids)
    assert sum(len(sample.token_ids) for sample in run.samples) == 4 * 30


def test_length_is_capped_at_the_context_and_a_prompt_that_fills_it_is_refused(loaded):
    n_positions = loaded.config.n_positions  # 128
    capped = generate(loaded, [11] * (n_positions - 8), SamplingOptions(max_new_tokens=30, greedy=True,
                                                                         stop_at_eod=False))
    assert len(capped.samples[0].token_ids) == 8 and capped.samples[0].finish_reason == "context_full"
    assert capped.notes and "capped at 8" in capped.notes[0] and f"n_positions={n_positions}" in capped.notes[0]
    with pytest.raises(ValueError, match="shorten the prompt"):
        generate(loaded, [11] * n_positions, SamplingOptions(greedy=True))
    unconditional = generate(loaded, [], SamplingOptions(max_new_tokens=3, greedy=True, stop_at_eod=False))
    assert unconditional.prompt_ids == [loaded.tokenizer.eod_id]


@pytest.mark.parametrize("options, setting", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=0.0), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(num_samples=0), "num_samples"),
])
def test_sampling_options_refuse_bad_values_naming_them(options, setting):
    with pytest.raises(ValueError, match=f"^{setting}="):
        SamplingOptions(**options).validate()


# ---- the command line -------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_generates_and_its_json_line_matches_the_library(tiny_hf_model, loaded):
    result = run_tool("generate.py", "--checkpoint", str(tiny_hf_model), "--prompt", "Hello world",
                      "--max-new-tokens", "8", "--greedy", "--num-samples", "2", "--device", "cpu", "--json",
                      timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    expected = generate(loaded, loaded.tokenizer.encode("Hello world"), SamplingOptions(max_new_tokens=8, greedy=True))
    assert record["prompt"] == "Hello world"
    assert [sample["token_ids"] for sample in record["samples"]] == [expected.samples[0].token_ids] * 2
    assert record["samples"][0]["text"] == expected.samples[0].text
    assert record["tokens_per_second"] > 0 and "tokens/s" in result.stderr


def test_cli_prints_each_sample_in_process(tiny_hf_model, loaded, capsys):
    from tools.generate import main

    assert main(["--checkpoint", str(tiny_hf_model), "--prompt", "Once", "--max-new-tokens", "4",
                 "--num-samples", "2", "--seed", "3", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    blocks = out.split("--- sample ")[1:]  # "1/2 (max_new_tokens) ---\nOnce..."
    assert len(blocks) == 2 and all(block.split("\n", 1)[1].startswith("Once") for block in blocks)
    assert "tokens/s" in err


@pytest.mark.parametrize("arguments, message", [
    (["--prompt", "hi"], "error: the following arguments are required: --checkpoint"),
    (["--checkpoint", "{model}", "--prompt", "a", "--prompt-file", "b"], "error: argument --prompt-file: not allowed"),
    (["--checkpoint", "{model}", "--prompt", "a", "--max-new-tokens", "-5"], "error: argument --max-new-tokens: -5"),
    (["--checkpoint", "{model}", "--prompt", "a", "--num-samples", "0"], "error: argument --num-samples: 0"),
    (["--checkpoint", "{model}", "--prompt", "a", "--temperature", "inf"], "error: argument --temperature: inf must"),
    (["--checkpoint", "{model}", "--prompt", "a", "--top-p", "1.5"], "error: argument --top-p: 1.5 must be in"),
    (["--checkpoint", "{model}", "--prompt", "a", "--top-p", "0"], "error: argument --top-p: 0.0 must be in"),
    (["--checkpoint", "{missing}", "--prompt", "a"], "error: --checkpoint {missing} does not exist"),
    (["--checkpoint", "{model}", "--prompt-file", "{missing}"], "error: --prompt-file {missing}:"),
])
def test_cli_refuses_bad_arguments_in_one_line(tiny_hf_model, tmp_path, arguments, message):
    paths = dict(model=str(tiny_hf_model), missing=str(tmp_path / "absent"))
    result = run_tool("generate.py", *[argument.format(**paths) for argument in arguments], timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(message.format(**paths))


@pytest.mark.parametrize("damage", ["garbage .pt file", "unreadable config.json", "directory without a model"])
def test_cli_names_a_damaged_checkpoint(tmp_path, capsys, damage):
    from tools.generate import main

    if damage == "garbage .pt file":
        path = tmp_path / "model.pt"
        path.write_bytes(b"not a torch file")
    else:
        path = tmp_path / "run"
        path.mkdir()
        if damage == "unreadable config.json":
            (path / "config.json").write_text("{")
    assert main(["--checkpoint", str(path), "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content", ["a pickled module", "a plain dict", "text"])
def test_a_file_that_is_not_a_model_of_ours_is_named_with_what_to_give_instead(tmp_path, content):
    """Not torch's advice to load with weights_only=False (which would run the file's code): what the file
    is not, and what the tools take."""
    from pretrain.checkpoint.sharded import CheckpointError
    from pretrain.inference.loading import load_weights

    path = tmp_path / "model.pt"
    if content == "a pickled module":
        torch.save(torch.nn.Linear(2, 2), path)
    elif content == "a plain dict":
        torch.save({"weight": torch.ones(2)}, path)
    else:
        path.write_text("not a model\n")
    with pytest.raises(CheckpointError) as refused:
        load_weights(path)
    message = str(refused.value)
    assert message.startswith(f"{path} is not a ") and "tools/convert_checkpoint.py --to fp32" in message
    assert "weights_only" not in message and "\n" not in message
