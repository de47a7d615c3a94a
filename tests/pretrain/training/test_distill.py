"""Distillation in the trainer (pretrain/training/distill.py), end to end on real text: the logged objective
equals a direct single-process computation (full logits, torch's cross entropy and KL) on every
layout and after an update; alpha = 0 trains exactly the ordinary run; a resumed run continues the
same curve; the student can start from the teacher's blocks; impossible settings are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ConfigError, load_config
from pretrain.model.presets import parameter_count
from tests.conftest import SHORT, SMALL_VOCABULARY
from tests.training import SAME, SAME_KL, TINY, data_settings, metrics, train

STUDENT = [*SHORT, "model.n_layer=2", "schedule.warmup=0", "schedule.decay=constant", "optim.lr=1e-3",
           "logging.interval=1"]
TEMPERATURE, ALPHA = 2.0, 0.6


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, shards) -> Path:
    """A 4-layer teacher (the tiny preset) trained for 3 steps: its predictions are no longer uniform.
    64-token windows, as the students have. Saved under ZeRO-0, so every run and test that reads it takes
    the weights from the module file: under ZeRO-1 each read would merge optimizer partitions in a
    DeepSpeed converter process, ~4.5 s of CPU (the students' ZeRO-1 checkpoints still go that way)."""
    run_dir = tmp_path_factory.mktemp("teacher")
    result = train(run_dir, shards, *SHORT, "train.max_steps=3", "optim.lr=1e-2", "schedule.warmup=0",
                   "parallel.zero_stage=0")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def distill(run_dir: Path, shards: str, teacher: Path, *settings: str, nproc: int = 1):
    return train(run_dir, shards, *STUDENT, f"distill.teacher={teacher}", f"distill.temperature={TEMPERATURE}",
                 f"distill.alpha={ALPHA}", *settings, nproc=nproc)


def student_shape():
    """The student's model shape on one process (the `shards` fixture's vocabulary)."""
    return load_config(TINY, [*STUDENT, f"model.vocab_size={SMALL_VOCABULARY}"]).model.gpt_config(1)


TWO_STEPS = ("train.max_steps=2", "checkpoint.interval=1")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, shards, teacher) -> Path:
    """Two steps of distillation on one process, a checkpoint after each."""
    run_dir = tmp_path_factory.mktemp("distilled") / "run"
    result = distill(run_dir, shards, teacher, *TWO_STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distilling from" in result.stderr and "lm loss" in result.stderr
    return run_dir


def global_batch(shards: str, step: int, work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) of global batch `step`, as the trainer reads it on any layout."""
    from data_pipeline.tokenizers import load_tokenizer
    from pretrain.training.blend import resolve_blend
    from pretrain.training.data import build_datasets, micro_batches
    from pretrain.parallel.layout import ParallelLayout

    config = load_config(TINY, [*SHORT, *data_settings(shards), "eval.interval=0", "train.max_steps=4"])
    tokenizer = load_tokenizer(config.data.tokenizer)
    train_data, _ = build_datasets(config, tokenizer, resolve_blend(config.data.prefixes, tokenizer), work, 1)
    [(tokens, labels)] = micro_batches(train_data, step, ParallelLayout(world_size=1, micro_batch_size=8,
                                                                              global_batch_size=8), 0)
    return tokens, labels


def direct_objective(student, teacher, tokens: torch.Tensor, labels: torch.Tensor) -> dict:
    """(1 - alpha) x CE + alpha x T^2 x KL(teacher || student) on the full logits, in fp64."""
    vocabulary = SMALL_VOCABULARY
    with torch.no_grad():
        s = student(tokens).double()[..., :vocabulary].flatten(0, 1)
        t = teacher(tokens).double()[..., :vocabulary].flatten(0, 1)
    cross_entropy = F.cross_entropy(s, labels.flatten())
    divergence = F.kl_div(F.log_softmax(s / TEMPERATURE, dim=-1), F.log_softmax(t / TEMPERATURE, dim=-1),
                          log_target=True, reduction="batchmean")
    return {"loss": ((1 - ALPHA) * cross_entropy + ALPHA * TEMPERATURE**2 * divergence).item(),
            "lm_loss": cross_entropy.item(), "kl_loss": divergence.item()}


def initial_student():
    """The student as the trainer builds it from train.seed, on one process."""
    from pretrain.model.gpt2 import GPT2
    from pretrain.parallel.distributed import model_parallel_config
    from pretrain.parallel.layout import ParallelLayout

    config = student_shape()
    return GPT2(config, model_parallel_config(ParallelLayout(world_size=1)), seed=1234).eval()


@pytest.fixture(scope="module")
def direct(single_process_group, tmp_path_factory, shards, teacher) -> dict:
    """What every layout's run is held to: the teacher as read from disk, global batches 0 and 1, and step
    1's objective, computed from the initial student (the same on every layout)."""
    from pretrain.inference.loading import load_model

    work = tmp_path_factory.mktemp("direct")
    teacher_model = load_model(teacher, device="cpu", work_dir=str(work)).model
    batches = [global_batch(shards, step, work / "data") for step in (0, 1)]
    return {"teacher": teacher_model, "batches": batches,
            "step 1": direct_objective(initial_student(), teacher_model, *batches[0])}


@pytest.mark.slow
@pytest.mark.parametrize("nproc,layout", [(1, []), (2, ["parallel.tensor_parallel_size=2"]),
                                          (2, ["parallel.pipeline_parallel_size=2", "parallel.zero_stage=0"])],
                         ids=["one-process", "tp2", "pp2"])
def test_logged_objective_equals_the_direct_computation_before_and_after_an_update(
        tmp_path, shards, teacher, straight_run, direct, nproc, layout):
    """Step 1 from the initial weights; step 2 from the step-1 checkpoint's, with the teacher as it was
    read from disk: had the teacher been trained or changed, step 2 would differ."""
    from pretrain.inference.loading import load_model

    run_dir = straight_run
    if layout:
        run_dir = tmp_path / "run"
        result = distill(run_dir, shards, teacher, *TWO_STEPS, *layout, nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2]
    student = load_model(run_dir / "checkpoints" / "step_0000001", device="cpu", work_dir=str(tmp_path)).model
    expected = [direct["step 1"], direct_objective(student, direct["teacher"], *direct["batches"][1])]
    for step, (row, objective) in enumerate(zip(rows, expected)):
        assert row["lm_loss"] == pytest.approx(objective["lm_loss"], rel=1e-5), step
        for key in ("loss", "kl_loss"):  # a difference of fp32 sums near 10.8 (SAME_KL), against fp64
            assert row[key] == pytest.approx(objective[key], rel=1e-5, abs=SAME_KL), (step, key)
        assert objective["kl_loss"] > 1e-3  # the two models differ: the term is not trivially zero


@pytest.mark.slow
def test_alpha_zero_trains_exactly_the_ordinary_run(tmp_path, shards, teacher):
    """With dropout: building and running the teacher must not move the random stream either."""
    ordinary = train(tmp_path / "plain", shards, *STUDENT, "train.max_steps=3", "model.dropout=0.1")
    assert ordinary.returncode == 0, ordinary.stderr[-3000:]
    distilled = distill(tmp_path / "alpha0", shards, teacher, "train.max_steps=3", "distill.alpha=0",
                        "model.dropout=0.1")
    assert distilled.returncode == 0, distilled.stderr[-3000:]
    plain, zero = metrics(tmp_path / "plain"), metrics(tmp_path / "alpha0")
    for key in ("loss", "grad_norm"):
        assert [row[key] for row in zero] == pytest.approx([row[key] for row in plain], rel=SAME), key
    assert [row["lm_loss"] for row in zero] == pytest.approx([row["loss"] for row in plain], rel=SAME)
    assert all(row["kl_loss"] > 0 for row in zero)  # the teacher ran: only its weight was 0


@pytest.mark.slow
def test_a_distillation_stopped_and_resumed_continues_the_same_curve(tmp_path, shards, teacher, straight_run):
    """The teacher is not in the checkpoint: the resumed start reads it again and the curve goes on
    (within SAME, and SAME_KL for the KL: tests/training.py)."""
    stopped = distill(tmp_path / "resumed", shards, teacher, *TWO_STEPS, "train.exit_after_minutes=0.001")
    assert stopped.returncode == 0 and "stopped at step 1" in stopped.stderr, stopped.stderr[-3000:]
    module = torch.load(tmp_path / "resumed" / "checkpoints" / "step_0000001" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    student = student_shape()
    padding = (student.padded_vocab_size - student.vocab_size) * student.n_embd  # the embedding's padding rows
    assert sum(tensor.numel() for tensor in module.values() if tensor is not None) == parameter_count(student) + padding
    resumed = distill(tmp_path / "resumed", shards, teacher, *TWO_STEPS)
    assert resumed.returncode == 0 and "resumed from step_0000001" in resumed.stderr, resumed.stderr[-3000:]
    resumed_rows, straight_rows = metrics(tmp_path / "resumed"), metrics(straight_run)
    assert [row["step"] for row in resumed_rows] == [row["step"] for row in straight_rows] == [1, 2]
    for key, tolerance in (("lm_loss", dict(rel=SAME)), ("grad_norm", dict(rel=SAME)),
                           ("loss", dict(abs=SAME_KL)), ("kl_loss", dict(abs=SAME_KL))):
        assert [row[key] for row in resumed_rows] == pytest.approx([row[key] for row in straight_rows], **tolerance), key


@pytest.mark.slow
def test_the_student_starts_from_the_named_teacher_blocks_on_a_pipeline(tmp_path, shards, teacher):
    """distill.init_from_teacher_layers=[3, 1]: student block 0 is teacher block 3, block 1 is block 1;
    the embeddings and the final LayerNorm are the teacher's, the position table cut to the student's
    shorter context (64 -> 32). Checked on the step-0 checkpoint of a two-stage pipeline, by name."""
    from pretrain.inference.loading import load_weights

    result = distill(tmp_path / "run", shards, teacher, "train.max_steps=0", "distill.init_from_teacher_layers=[3,1]",
                     "model.n_positions=32", "parallel.pipeline_parallel_size=2", "parallel.zero_stage=0", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "run" / ".teacher-weights.pt").exists()  # the consolidated teacher is cleaned up
    student = load_weights(tmp_path / "run", str(tmp_path)).state
    source = load_weights(teacher, str(tmp_path)).state
    expected = {"0.": "0.", "1.": "1.", "2.": "5.", "3.": "3.", "4.": "6."}  # final norm: layer 4 <- layer 6
    assert len(student) == 2 + 2 * 12 + 2  # word and position embeddings, two blocks, the final LayerNorm
    for name, tensor in student.items():
        prefix = name.split(".", 1)[0] + "."
        origin = source[expected[prefix] + name[len(prefix):]]
        assert torch.equal(tensor, origin[:32] if name == "1.position.weight" else origin), name


def check(shards: str, *settings: str, world_size: int = 1):
    from pretrain.training.run_check import plan_run

    return plan_run(load_config(TINY, [*SHORT, *data_settings(shards), *settings]), world_size)


def test_a_teacher_with_another_tokenizer_is_refused_naming_both(tmp_path, shards, teacher, real_documents):
    """Another SentencePiece model of the same size, trained on part of the same text: the same vocabulary
    size, other tokens."""
    from data_pipeline.tokenizers import train_sentencepiece
    from pretrain.inference.loading import load_weights, save_consolidated

    other = train_sentencepiece((document["text"] for document in real_documents[:150]), tmp_path / "other",
                                SMALL_VOCABULARY, threads=1).files["model"]
    ours = dict(setting.split("=", 1) for setting in data_settings(shards))["data.tokenizer"]
    weights = load_weights(teacher, str(tmp_path))
    weights.tokenizer = other
    save_consolidated(weights, tmp_path / "teacher.pt")
    with pytest.raises(ConfigError) as refusal:
        check(shards, "model.n_layer=2", f"distill.teacher={tmp_path / 'teacher.pt'}")
    message = str(refusal.value)
    assert f"tokenizer {other!r}" in message and f"data.tokenizer={ours!r}" in message
    assert "must share a tokenizer" in message
    weights.tokenizer = str(tmp_path / "moved-away")
    save_consolidated(weights, tmp_path / "teacher.pt")
    with pytest.raises(ConfigError, match="moved-away'. which cannot be read here"):
        check(shards, "model.n_layer=2", f"distill.teacher={tmp_path / 'teacher.pt'}")
    weights.tokenizer, weights.config.vocab_size = ours, 2176  # the student's tokenizer, a record that disagrees
    save_consolidated(weights, tmp_path / "teacher.pt")
    with pytest.raises(ConfigError, match=re.escape(f"has a 2176-token vocabulary, but its tokenizer '{ours}', the "
                                                    f"student's, has {SMALL_VOCABULARY} tokens")):
        check(shards, "model.n_layer=2", f"distill.teacher={tmp_path / 'teacher.pt'}")
    assert check(shards, "model.n_layer=2", f"distill.teacher={teacher}").teacher_config.n_layer == 4


@pytest.mark.parametrize("settings,says", [
    (["distill.temperature=0"], "distill.temperature=0.0 must be positive"),
    (["distill.alpha=1.5"], "distill.alpha=1.5 must be between 0"),
    (["distill.hidden_cosine=1", "model.n_embd=64", "model.n_head=4"], "distill.hidden_cosine compares hidden states"),
    (["distill.init_from_teacher_layers=[0,1,2]"], "names 3 blocks for a student of model.n_layer=2"),
    (["distill.init_from_teacher_layers=[0,4]"], "[4] are not blocks of the teacher, which has 4"),
    (["distill.init_from_teacher_layers=[0,1]", "model.n_embd=64"], "set model.n_embd=128"),
    (["parallel.tensor_parallel_size=8", "model.n_head=8"], "the teacher (distill.teacher) runs in the student's "
     "layout, and for it parallel.tensor_parallel_size=8 does not divide the model's 4 attention heads"),
    (["model.n_positions=512"], "shorter than the student's sequences (model.n_positions=512)"),
], ids=["temperature", "alpha", "cosine-width", "layer-count", "layer-range", "layer-width", "teacher-tp",
        "context"])
def test_impossible_distillation_settings_are_refused_naming_the_setting(shards, teacher, settings, says):
    world = 8 if "parallel.tensor_parallel_size=8" in settings else 1
    with pytest.raises(ConfigError) as refusal:
        check(shards, "model.n_layer=2", f"distill.teacher={teacher}", *settings, world_size=world)
    assert says in str(refusal.value)


def test_a_missing_teacher_or_layers_without_one_are_refused(tmp_path, shards):
    with pytest.raises(ConfigError, match="distill.teacher=.*does not exist"):
        check(shards, f"distill.teacher={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="needs distill.teacher"):
        check(shards, "distill.init_from_teacher_layers=[0]")


def test_the_planner_says_what_the_teacher_adds_to_each_gpu(teacher, capsys):
    from tools.plan import main

    import json

    arguments = ["--config", TINY, "--set", *SHORT, "model.n_layer=2", f"distill.teacher={teacher}",
                 f"model.vocab_size={SMALL_VOCABULARY}",
                 "parallel.tensor_parallel_size=2", "train.precision=bf16", "--nodes", "1", "--gpus-per-node", "2"]
    code = main(arguments)
    out = capsys.readouterr().out
    assert code == 0, out
    # 4 blocks of 128 (793,088), 64 positions (8,192), 2,100 tokens (268,800) and the final LayerNorm (256):
    # 1,070,336 parameters, in bf16 (2 bytes), halved by TP 2: 1.02 MiB (fp32 would be 2, no TP split 2, both 4)
    note = "the frozen teacher (distill.teacher, 1.1M parameters) is not counted above: add about 1 MiB per GPU"
    assert note in out
    assert main([*arguments, "--json"]) == 0
    assert note in json.loads(capsys.readouterr().out)["teacher_note"]
