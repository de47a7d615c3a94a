"""The config tree: YAML, dotted overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from pretrain.config import Config, ConfigError, load_config, parse_override


def test_defaults_file_and_overrides_layer_in_that_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n  betas: [0.9, 0.99]\ntrain:\n  max_steps: 50\n")
    config = load_config(path, ["optim.lr=3e-4", "parallel.tensor_parallel_size=2", "data.prefixes=[1.0, a, 2, b]"])
    assert config.optim.lr == 3e-4  # CLI beats file
    assert config.optim.betas == [0.9, 0.99]  # file beats default
    assert config.train.max_steps == 50
    assert config.parallel.tensor_parallel_size == 2
    assert config.data.prefixes == [1.0, "a", 2, "b"]
    assert config.optim.weight_decay == Config().optim.weight_decay  # untouched default


def test_every_key_the_scripts_rely_on_exists():
    keys = ["parallel.tensor_parallel_size=2", "parallel.pipeline_parallel_size=2", "parallel.zero_stage=1",
            "parallel.micro_batch_size=2", "parallel.global_batch_size=16", "train.max_steps=3", "train.seed=7",
            "train.precision=fp32", "data.prefixes=[x]", "data.tokenizer=gpt2", "checkpoint.dir=/tmp/c",
            "checkpoint.interval=5", "run.dir=/tmp/r"]
    config = load_config(None, keys)
    assert (config.parallel.global_batch_size, config.train.precision, config.run.dir) == (16, "fp32", "/tmp/r")


def test_deepspeed_passthrough_merges_keys():
    config = load_config(None, ["deepspeed.wall_clock_breakdown=true", "deepspeed.zero_optimization={stage: 1}"])
    assert config.deepspeed == {"wall_clock_breakdown": True, "zero_optimization": {"stage": 1}}


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown setting 'optim.lrr'; known under optim.: lr, betas"),
    ("modle.n_layer=2", "unknown setting 'modle'"),
    ("train.max_steps=ten", "train.max_steps must be an int, got 'ten'"),
    ("train.precision=fp8", "train.precision='fp8' must be one of bf16, fp16, fp32"),
    ("optim=3", "optim is a section"),
    ("optim.lr", "must look like section.key=value"),
])
def test_bad_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_a_list_given_as_a_string_and_a_missing_config_file_are_named(tmp_path):
    with pytest.raises(ConfigError) as refused:
        load_config(None, ["eval.tasks=hellaswag.jsonl"])
    assert str(refused.value) == "eval.tasks must be a list, got 'hellaswag.jsonl' (a list is written [a, b])"
    with pytest.raises(ConfigError) as refused:
        load_config(tmp_path / "nope.yaml")
    assert str(refused.value) == f"the config file {tmp_path / 'nope.yaml'} cannot be read: No such file or directory"


def test_override_values_are_yaml():
    assert parse_override("a.b=1.0e-3") == {"a": {"b": 1e-3}}
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3  # YAML leaves 1e-3 a string; floats accept it
    assert parse_override("a.b=true") == {"a": {"b": True}}
    assert parse_override("a=x=y") == {"a": "x=y"}


def test_a_config_file_that_is_not_yaml_is_named_with_its_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  n_layer: [1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load_config(broken)
    assert str(refused.value).startswith(f"the config file {broken} is not valid YAML at line 3")


@pytest.mark.parametrize("key", ["checkpoint.interval", "logging.interval"])
def test_an_interval_of_zero_steps_is_refused_at_start_up_naming_it(key):
    """Both are "every N steps"; 0 used to pass --check and then divide by zero after the first step."""
    from pretrain.training.run_check import plan_run

    with pytest.raises(ConfigError, match=f"^{key}=0 must be at least 1$"):
        plan_run(load_config(None, [f"{key}=0"]), world_size=1)
