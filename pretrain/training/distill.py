"""Distillation: the student trains against a frozen teacher that runs beside it, in its layout.

    check_distill          distill.* against the model, layout and tokenizer, before any process
                           group exists (python -m pretrain --check runs it too)
    student_from_teacher   the teacher's weights cut down to the student (distill.init_from_teacher_layers)
    FrozenTeacher          the teacher built in the student's TP x PP layout, in its precision, without
                           gradients or optimizer state; its last hidden states for each micro-batch
    attach                 the head's Distillation settings onto the student (GPT2 or a pipeline)

The teacher is never part of the student's module tree, so DeepSpeed neither trains, partitions nor
saves it: every start reads it again from distill.teacher. The head (pretrain/model/loss.py) computes
the teacher's logits from its last hidden states, a chunk of tokens at a time, beside the student's.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from data_pipeline.tokenizers import Tokenizer, load_tokenizer, padded_vocab_size
from pretrain.checkpoint.sharded import CheckpointError
from pretrain.config import Config, ConfigError, DistillSection
from pretrain.checkpoint.huggingface import HFFormatError
from pretrain.inference.loading import Weights, describe_weights
from pretrain.model.gpt2 import GPT2, TIED_EMBEDDING, GPTConfig
from pretrain.model.loss import Distillation
from pretrain.parallel.layout import LayoutError, ParallelLayout

def check_distill(config: Config, model_config: GPTConfig, layout: ParallelLayout,
                  tokenizer: Tokenizer) -> GPTConfig | None:
    """The teacher's model shape (padded for this layout), or None when not distilling; a setting that
    cannot work raises the ConfigError that names it."""
    section = config.distill
    if not section.teacher:
        if section.init_from_teacher_layers:
            raise ConfigError("distill.init_from_teacher_layers needs distill.teacher (the model to take them from)")
        return None
    if section.temperature <= 0:
        raise ConfigError(f"distill.temperature={section.temperature} must be positive (2 is usual)")
    if not 0 <= section.alpha <= 1:
        raise ConfigError(f"distill.alpha={section.alpha} must be between 0 (no teacher) and 1 (the teacher only)")
    if section.hidden_cosine < 0:
        raise ConfigError(f"distill.hidden_cosine={section.hidden_cosine} must be at least 0 (0: off)")
    try:
        teacher, teacher_tokenizer = describe_weights(section.teacher)
    except (CheckpointError, HFFormatError, OSError) as error:
        raise ConfigError(f"distill.teacher={section.teacher}: {error}") from None
    teacher.padded_vocab_size = padded_vocab_size(teacher.vocab_size, layout.tensor_parallel_size)
    if not _same_tokenizer(teacher_tokenizer, tokenizer, section.teacher):
        raise ConfigError(
            f"distill.teacher={section.teacher} was trained with tokenizer {teacher_tokenizer!r}; this run reads "
            f"data.tokenizer={config.data.tokenizer!r}. Teacher and student must share a tokenizer: the KL "
            "compares their predictions token by token")
    if teacher.vocab_size != model_config.vocab_size:  # the same tokenizer files: the teacher's record disagrees
        raise ConfigError(f"distill.teacher={section.teacher} has a {teacher.vocab_size}-token vocabulary, but its "
                          f"tokenizer {teacher_tokenizer!r}, the student's, has {model_config.vocab_size} tokens; "
                          "distillation needs one vocabulary: give a teacher whose vocabulary is its tokenizer's")
    if teacher.n_positions < model_config.n_positions:
        raise ConfigError(f"distill.teacher has a context of {teacher.n_positions} tokens, shorter than the student's "
                          f"sequences (model.n_positions={model_config.n_positions}); lower model.n_positions")
    try:
        ParallelLayout(layout.world_size, layout.tensor_parallel_size, layout.pipeline_parallel_size,
                       layout.zero_stage, layout.micro_batch_size, layout.global_batch_size).validate(teacher)
    except LayoutError as error:
        raise ConfigError(f"the teacher (distill.teacher) runs in the student's layout, and for it {error}") from None
    if section.hidden_cosine and teacher.n_embd != model_config.n_embd:
        raise ConfigError(f"distill.hidden_cosine compares hidden states of the same width, but the teacher has "
                          f"n_embd={teacher.n_embd} and the student model.n_embd={model_config.n_embd}; set "
                          f"distill.hidden_cosine=0 or model.n_embd={teacher.n_embd}")
    _check_layers(config, model_config, teacher)
    return teacher


def _same_tokenizer(spec: str, tokenizer: Tokenizer, teacher: str) -> bool:
    try:
        return load_tokenizer(spec).has_the_files_of(tokenizer)
    except (ValueError, OSError, RuntimeError) as error:  # recorded on another machine, moved, or damaged
        raise ConfigError(f"distill.teacher={teacher} was trained with tokenizer {spec!r}, which cannot be read "
                          f"here ({error}); put it back, or make the teacher's record name where it is") from None


def _check_layers(config: Config, model_config: GPTConfig, teacher: GPTConfig) -> None:
    layers = config.distill.init_from_teacher_layers
    if not layers:
        return
    if config.model.init_from:
        raise ConfigError("distill.init_from_teacher_layers and model.init_from both say where the student starts; "
                          "keep one")
    if len(layers) != model_config.n_layer:
        raise ConfigError(f"distill.init_from_teacher_layers names {len(layers)} blocks for a student of "
                          f"model.n_layer={model_config.n_layer}; give one teacher block per student block")
    wrong = [layer for layer in layers if type(layer) is not int or not 0 <= layer < teacher.n_layer]
    if wrong:
        raise ConfigError(f"distill.init_from_teacher_layers: {wrong} are not blocks of the teacher, which has "
                          f"{teacher.n_layer} (0 to {teacher.n_layer - 1})")
    different = {key: (getattr(teacher, key), getattr(model_config, key))
                 for key in ("n_embd", "n_head", "layer_norm_epsilon") if getattr(teacher, key) != getattr(model_config, key)}
    if different:
        settable = " ".join(f"model.{key}={value}" for key, (value, _) in different.items() if key != "layer_norm_epsilon")
        raise ConfigError(f"distill.init_from_teacher_layers copies the teacher's blocks, but their shapes differ: "
                          f"{different} (teacher, student); " + (f"set {settable}" if settable else
                                                                 "the LayerNorm epsilon is not a setting: leave out "
                                                                 "distill.init_from_teacher_layers"))


def student_from_teacher(teacher: Weights, layers: list[int], student: GPTConfig) -> Weights:
    """The teacher's embeddings, final LayerNorm and blocks `layers` (in that order) as full-size weights
    of the student, under the student's canonical names (block i of the student is layer i + 2). A
    student with a shorter context takes the first rows of the teacher's position table."""
    final_teacher, final_student = teacher.config.n_layer + 2, student.n_layer + 2
    renamed = {f"{layer + 2}.": f"{index + 2}." for index, layer in enumerate(layers)}
    renamed[f"{final_teacher}."] = f"{final_student}."
    state = {}
    for name, tensor in teacher.state.items():
        prefix = name.split(".", 1)[0] + "."
        if prefix == "0.":
            state[name] = tensor
        elif prefix == "1.":
            state[name] = tensor[:student.n_positions]
        elif prefix in renamed:
            state[renamed[prefix] + name[len(prefix):]] = tensor
    config = GPTConfig(**{**vars(teacher.config), "n_layer": student.n_layer, "n_positions": student.n_positions})
    return Weights(config, state, teacher.tokenizer,
                   f"{teacher.description}, blocks {layers} with its embeddings and final LayerNorm")


class FrozenTeacher:
    """The teacher in the student's layout: one GPT2, or this rank's pipeline stage of it."""

    def __init__(self, weights: Weights, config: GPTConfig, settings: DistillSection, layout: ParallelLayout,
                 topology, parallel, precision: str, partition_method: str):
        from pretrain.parallel.build import build_model
        from pretrain.parallel.distributed import collective_device
        from pretrain.checkpoint.weights import load_into

        self.config, self.pipeline = config, layout.pipeline_parallel_size > 1
        self.device = collective_device()
        # Built aside from the global random state, so that a run with a teacher draws the same dropout.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            model = build_model(config, layout, topology, parallel, seed=0, partition_method=partition_method)
        load_into(model, weights.state, config)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        from megatron.core import parallel_state

        holds_the_head = not self.pipeline or parallel_state.is_pipeline_last_stage()
        self.head = Distillation(self.model.tied_modules[TIED_EMBEDDING], settings.temperature, settings.alpha,
                                 settings.hidden_cosine) if holds_the_head else None
        """The output head's distillation settings, with the teacher's tied word embedding, on the rank
        that holds the output head (else None)."""

    @torch.no_grad()
    def hidden_states(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, C_teacher): the last hidden states (after the final LayerNorm), one stage."""
        return self.model.hidden_states(token_ids)

    @torch.no_grad()
    def pipeline_hidden_states(self, micro_batches: list) -> list[torch.Tensor | None]:
        """The last hidden states of every micro-batch on the last stage (None elsewhere), the activations
        passed stage to stage as the student's are. Forward only, so each stage just works through the
        micro-batches in order, sending as it goes: the stages overlap as in a pipeline's forward."""
        from megatron.core import parallel_state

        first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
        outputs, sends = [], []
        for token_ids, _ in micro_batches:
            if first:
                x = token_ids.to(self.device)
            else:
                x = torch.empty(*token_ids.shape, self.config.n_embd, dtype=self.dtype, device=self.device)
                dist.recv(x, parallel_state.get_pipeline_model_parallel_prev_rank())
            y = self.model(x)
            if last:
                outputs.append(y[0])  # the stage's head_inputs: (hidden states, embedding)
            else:
                sends.append((dist.isend(y.contiguous(), parallel_state.get_pipeline_model_parallel_next_rank()), y))
        for request, _ in sends:
            request.wait()
        return outputs if last else [None] * len(micro_batches)


def attach(module, distillation: Distillation | None) -> None:
    """Give the student's loss the teacher: GPT2 holds it; a pipeline's last stage gets it in its loss_fn."""
    from pretrain.parallel.pipeline import pipeline_loss

    if isinstance(module, GPT2):
        module.distillation = distillation
    elif distillation is not None:
        module.loss_fn = functools.partial(pipeline_loss, distillation=distillation)
