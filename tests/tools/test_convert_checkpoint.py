"""tools/convert_checkpoint.py: Hugging Face -> a sharded checkpoint of ours -> Hugging Face, and its refusals."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from tests import cli
from tests.conftest import REPO
from tests.training import metrics, train
from tests.tools.conftest import TINY_HF

TINY_SHAPE = [f"model.{key}={value}" for key, value in TINY_HF.items()]


@pytest.fixture(scope="module")
def tp2_pp2_checkpoint(tiny_hf_model, tmp_path_factory):
    """Converted by the command line (its own process, tests/cli.py), with paths relative to the user's
    directory (the trainer it starts runs elsewhere)."""
    output = tmp_path_factory.mktemp("converted") / "ckpt"
    shutil.copytree(tiny_hf_model, output.parent / "hf")
    result = cli.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "--from", "hf", "--input", "hf",
                      "--output", "ckpt", "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"],
                     cwd=output.parent, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.mark.slow
def test_hf_to_a_tp2_pp2_checkpoint_and_back_gives_the_same_tensors(tiny_hf_model, tp2_pp2_checkpoint, tmp_path,
                                                                    capsys):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from data_pipeline.tokenizers import load_tokenizer

    manifest = json.loads((tp2_pp2_checkpoint / "step_0000000" / "manifest.json").read_text())
    assert manifest["step"] == 0 and manifest["layout"]["tensor_parallel_size"] == 2
    assert manifest["layout"]["pipeline_parallel_size"] == 2 and manifest["model"]["n_layer"] == 2
    back = tmp_path / "back"
    code, stderr = convert(capsys, "--to", "hf", "--checkpoint", str(tp2_pp2_checkpoint), "--output", str(back))
    assert code == 0, stderr[-3000:]
    umask = os.umask(0)
    os.umask(umask)  # published for others to read, as far as the user's umask allows
    assert [path.stat().st_mode & 0o777 for path in (back, back / "model.safetensors")] == [0o777 & ~umask,
                                                                                        0o666 & ~umask]
    original, returned = load_file(tiny_hf_model / "model.safetensors"), load_file(back / "model.safetensors")
    assert returned.keys() == original.keys()
    assert all(torch.equal(returned[name], original[name]) for name in original)
    text = "Tokenizers agree: naïve café, 1,234 tokens!"
    assert AutoTokenizer.from_pretrained(back)(text).input_ids == load_tokenizer("gpt2").encode(text)


@pytest.mark.slow
def test_training_continues_from_the_converted_checkpoint_on_its_layout_and_on_one_process(
        tp2_pp2_checkpoint, gpt2_shards, tmp_path):
    """On its own layout DeepSpeed loads each rank's slices; on one process (another layout, at step 0)
    the trainer loads its weights. Both must train the same model: a slice cut wrongly on the way in
    would show here even if the way out undid it."""
    losses = {}
    for name, nproc, layout in (("tp2-pp2", 4, ["parallel.tensor_parallel_size=2",
                                                  "parallel.pipeline_parallel_size=2"]), ("one", 1, [])):
        checkpoints = tmp_path / name / "checkpoints"
        shutil.copytree(tp2_pp2_checkpoint, checkpoints)
        result = train(tmp_path / name, gpt2_shards, *TINY_SHAPE, *layout, "train.max_steps=2", nproc=nproc, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("started from the weights of step_0000000" in result.stderr) == (nproc == 1)
        assert "other tokens" not in result.stderr  # the HF directory's tokenizer files are GPT-2's own
        losses[name] = [row["loss"] for row in metrics(tmp_path / name) if "loss" in row]
    assert len(losses["one"]) == 2
    assert losses["tp2-pp2"] == pytest.approx(losses["one"], rel=1e-5)


def test_to_fp32_writes_one_file_of_full_weights(tiny_hf_model, tmp_path, capsys):
    from pretrain.inference.loading import load_weights

    output = tmp_path / "weights.pt"
    code, stderr = convert(capsys, "--to", "fp32", "--checkpoint", str(tiny_hf_model), "--output", str(output))
    assert code == 0, stderr[-3000:]
    record = torch.load(output, weights_only=True)
    assert record["model"]["n_layer"] == 2 and record["state_dict"]["0.word.weight"].shape == (50257, 64)
    direct, again = load_weights(tiny_hf_model), load_weights(output)
    assert all(torch.equal(again.state[name], tensor) for name, tensor in direct.state.items())


@pytest.mark.parametrize("arguments,message", [
    (["--to", "hf", "--output", "{tmp}/out"], "--to hf needs --checkpoint"),
    (["--to", "hf", "--checkpoint", "{tmp}/absent", "--output", "{tmp}/out"], "checkpoint {tmp}/absent does not exist"),
    (["--to", "hf", "--checkpoint", "{tmp}", "--output", "{tmp}/out"], "is not a checkpoint"),
    (["--from", "hf", "--input", "{relu}", "--output", "{tmp}/out"], "activation_function='relu'"),
    (["--from", "hf", "--input", "{hf}", "--output", "{tmp}/out", "--tensor-parallel-size", "3"],
     "parallel.tensor_parallel_size"),
    (["--from", "hf", "--input", "{hf}", "--output", "{tmp}"], "already exists"),
    (["--to", "fp32", "--checkpoint", "{incomplete}", "--output", "{tmp}/w.pt"],
     "lack or mis-shape 1 tensor(s) of its config.json: transformer.h.1.mlp.c_fc.weight"),
    (["--from", "hf", "--input", "{hf}", "--output", "{tmp}/out", "--tensor-parallel-size"], "expected one argument"),
    (["--to", "fp32", "--checkpoint", "{cut}", "--output", "{tmp}/w.pt"], "the weights in {cut} cannot be loaded: "),
], ids=["no-checkpoint", "missing-checkpoint", "not-a-checkpoint", "not-gpt2-activation", "heads-not-divisible",
        "output-exists", "hf-weights-missing-a-tensor", "argument-without-value", "hf-weights-cut-short"])
def test_unusable_arguments_exit_2_with_one_line(tiny_hf_model, tmp_path, capsys, arguments, message):
    from safetensors.torch import load_file, save_file

    relu, incomplete = tmp_path / "relu", tmp_path / "incomplete"
    shutil.copytree(tiny_hf_model, relu)
    config = json.loads((relu / "config.json").read_text())
    (relu / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    shutil.copytree(tiny_hf_model, incomplete)
    weights = load_file(incomplete / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, incomplete / "model.safetensors", metadata={"format": "pt"})
    cut = tmp_path / "cut"
    shutil.copytree(tiny_hf_model, cut)
    (cut / "model.safetensors").write_bytes((tiny_hf_model / "model.safetensors").read_bytes()[:100_000])
    names = {"tmp": tmp_path, "relu": relu, "hf": tiny_hf_model, "incomplete": incomplete, "cut": cut}
    code, stderr = convert(capsys, *[argument.format(**names) for argument in arguments])
    assert code == 2, stderr[-2000:]
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert message.format(**names) in stderr


def convert(capsys, *arguments: str) -> tuple[int, str]:
    """tools/convert_checkpoint.py's main() in this process, its exit code and stderr (the command line
    itself runs in tp2_pp2_checkpoint)."""
    from tools import convert_checkpoint

    capsys.readouterr()
    try:
        code = convert_checkpoint.main(list(arguments))
    except SystemExit as exit:  # argparse
        code = exit.code
    return code, capsys.readouterr().err
