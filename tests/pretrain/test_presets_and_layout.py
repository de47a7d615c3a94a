"""Presets match GPT-2's published sizes; impossible layouts are refused naming the setting."""

from __future__ import annotations

import pytest

from pretrain.model.gpt2 import GPT2, Block
from pretrain.model.presets import model_config, parameter_count
from pretrain.parallel.build import apply_activation_checkpointing
from pretrain.parallel.distributed import model_parallel_config
from pretrain.parallel.layout import LayoutError, ParallelLayout


@pytest.mark.parametrize("preset,layers,hidden,heads,millions", [
    ("gpt2-124m", 12, 768, 12, 124.4),
    ("gpt2-355m", 24, 1024, 16, 354.8),
    ("gpt2-774m", 36, 1280, 20, 774.0),
    ("gpt2-1.5b", 48, 1600, 25, 1557.6),
])
def test_presets_are_the_gpt2_family(preset, layers, hidden, heads, millions):
    config = model_config(preset)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_positions) == (layers, hidden, heads, 1024)
    assert config.vocab_size == 50257 and config.padded_vocab_size == 50304
    assert parameter_count(config) / 1e6 == pytest.approx(millions, abs=0.1)


def test_parameter_count_formula_matches_a_built_model(single_process_group):
    config = model_config("gpt2-tiny")
    model = GPT2(config, model_parallel_config(single_process_group))
    assert sum(p.numel() for p in model.parameters()) == parameter_count(config, include_padding=True)


def test_vocabulary_is_padded_for_the_tensor_parallel_size():
    assert model_config("gpt2-1.5b", tensor_parallel_size=5).padded_vocab_size == 50560  # multiple of 640
    assert model_config("gpt2-124m", tensor_parallel_size=2).padded_vocab_size == 50432


def test_unknown_preset_and_setting_are_named():
    with pytest.raises(ValueError, match="gpt2-124m"):
        model_config("gpt2-7b")
    with pytest.raises(ValueError, match="n_layers"):
        model_config("gpt2-tiny", n_layers=3)


XL = model_config("gpt2-1.5b")


def layout(**kwargs) -> ParallelLayout:
    return ParallelLayout(**{"world_size": 8, "micro_batch_size": 1, "global_batch_size": 8, **kwargs})


def test_valid_layouts_and_derived_sizes():
    small = model_config("gpt2-124m", tensor_parallel_size=2)
    checked = layout(tensor_parallel_size=2, pipeline_parallel_size=2, global_batch_size=16).validate(small)
    assert checked.data_parallel_size == 2 and checked.gradient_accumulation_steps == 8
    for tp in (1, 5, 25):  # GPT-2 XL's 25 heads
        xl = model_config("gpt2-1.5b", tensor_parallel_size=tp)
        ParallelLayout(world_size=tp * 2, tensor_parallel_size=tp, global_batch_size=4).validate(xl)


@pytest.mark.parametrize("settings,message", [
    (dict(tensor_parallel_size=3, world_size=6, global_batch_size=2), "parallel.tensor_parallel_size=3 .* choose one of 1, 5, 25"),
    (dict(tensor_parallel_size=2), "parallel.tensor_parallel_size=2 does not divide the model's 25 attention heads"),
    (dict(world_size=6, tensor_parallel_size=5), "world size 6 is not a multiple of"),
    (dict(world_size=64, pipeline_parallel_size=64), "parallel.pipeline_parallel_size=64 exceeds the model's 48 layers"),
    (dict(pipeline_parallel_size=2, zero_stage=2), "DeepSpeed supports only ZeRO-0/1 with pipelines"),
    (dict(pipeline_parallel_size=2, zero_stage=3), "Set parallel.zero_stage=1"),
    (dict(global_batch_size=12), "parallel.global_batch_size=12 is not a multiple of .* = 8"),
    (dict(micro_batch_size=0), "parallel.micro_batch_size=0 must be at least 1"),
    (dict(world_size=10, tensor_parallel_size=5), "model.padded_vocab_size=50304 is not a multiple of 128 x"),
])
def test_impossible_layouts_name_the_setting(settings, message):
    with pytest.raises(LayoutError, match=message):
        layout(**settings).validate(XL)


def test_activation_checkpointing_every_kth_block(single_process_group):
    model = GPT2(model_config("gpt2-mini"), model_parallel_config(single_process_group))  # 6 blocks
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert apply_activation_checkpointing(model, 2) == 3
    assert [b.checkpoint_activations for b in blocks] == [True, False, True, False, True, False]
    assert apply_activation_checkpointing(model, 1) == 6
    assert apply_activation_checkpointing(model, 0) == 0
