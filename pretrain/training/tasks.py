"""Zero-shot tasks scored while training (eval.tasks), as llm.c scores HellaSwag: every eval.interval
steps, on the engine as it is (any tensor, pipeline and data-parallel layout, any ZeRO stage),
with the definitions of tools/evaluate.py (pretrain/inference/evaluation.py).

The examples are divided over data-parallel ranks (`score_task`'s parts); each model replica
scores its share through `EngineScorer`, a LogLikelihood whose forward passes are micro-batches
of the training's micro_batch_size, with unscored positions labelled IGNORE. The replicas' `Sums`
are all-reduced, so every rank ends with the whole task's figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.inference.evaluation import EncodedTask, EvaluationError, Request, Sums, check_fits, check_request, \
    encode_task, read_task, score_task
from pretrain.model.loss import IGNORE

@dataclass
class TrainingTask:
    name: str
    """The file's name without its suffix: the key under "tasks" in metrics.jsonl and TensorBoard."""
    task: EncodedTask


def task_name(path: str) -> str:
    """The name without the jsonl suffix that read_task requires (the longest that matches)."""
    from data_pipeline.readers import JSONL_SUFFIXES

    name = Path(path).name
    suffixes = sorted(JSONL_SUFFIXES, key=len, reverse=True)
    return next((name[:-len(suffix)] for suffix in suffixes if name.endswith(suffix)), name)


def read_training_tasks(paths: list[str], tokenizer, max_examples: int, window: int) -> list[TrainingTask]:
    """The task files of eval.tasks, read and tokenized once; a bad file, or a continuation longer
    than the window, raises EvaluationError naming it (and its line), before training starts."""
    tasks, names = [], {}
    for path in paths:
        name = task_name(str(path))
        if name in names:
            raise EvaluationError(f"{names[name]} and {path} would both be logged as {name!r}; "
                                  "rename one of them")
        names[name] = path
        task = encode_task(read_task(str(path), limit=max_examples or None), tokenizer)
        check_fits(task, window)
        tasks.append(TrainingTask(name, task))
    return tasks


def fill_row(ids: torch.Tensor, labels: torch.Tensor, request: Request) -> None:
    """One request into a row of token ids and labels (IGNORE already): the model reads context +
    continuation[:-1] and is scored on the continuation, at the positions that predict it."""
    context, continuation = request
    tokens = list(context) + list(continuation[:-1])
    ids[:len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    labels[len(context) - 1:len(tokens)] = torch.tensor(continuation, dtype=torch.long)


class EngineScorer:
    """A LogLikelihood on a training engine. Every data-parallel rank must call it once per task,
    even with no requests: the replicas run equally many forward passes, the short ones padded.

    Requests go longest first, `micro_batches_per_call` micro-batches per engine call. Rows are
    `window` long where the shape must not change (`fixed_length`: a pipeline's activation buffers,
    compiled blocks), else as long as the call's longest request, rounded up to a multiple of 64."""

    def __init__(self, engine, micro_batch_size: int, micro_batches_per_call: int, window: int, device,
                 fixed_length: bool):
        self.engine, self.micro_batch_size, self.window = engine, micro_batch_size, window
        self.per_call, self.device, self.fixed_length = micro_batches_per_call, device, fixed_length
        self.calls = 0

    def __call__(self, requests: list[Request]) -> list[tuple[float, bool]]:
        from megatron.core import parallel_state

        from pretrain.parallel.engine import score_batches

        self.calls += 1
        for context, continuation in requests:
            check_request(context, continuation, self.window)
        lengths = [len(context) + len(continuation) - 1 for context, continuation in requests]
        order = sorted(range(len(requests)), key=lambda i: -lengths[i])
        count = torch.tensor([-(-len(requests) // self.micro_batch_size)], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for first in range(0, int(count), self.per_call):
            batches = min(self.per_call, int(count) - first)
            chosen = order[first * self.micro_batch_size:(first + batches) * self.micro_batch_size]
            longest = max((lengths[i] for i in chosen), default=1)
            length = self.window if self.fixed_length else min(self.window, -(-longest // 64) * 64)
            ids = torch.zeros(batches * self.micro_batch_size, length, dtype=torch.long)
            labels = torch.full_like(ids, IGNORE)
            for row, index in enumerate(chosen):
                fill_row(ids[row], labels[row], requests[index])
            shape = (batches, self.micro_batch_size, length)
            scores = score_batches(self.engine, list(zip(ids.view(shape), labels.view(shape)))).tolist()
            for row, index in enumerate(chosen):
                results[index] = (scores[row][0], scores[row][1] == 0)
        return results


def evaluate_tasks(tasks: list[TrainingTask], scorer: EngineScorer) -> dict[str, dict]:
    """{task name: figures (tools/evaluate.py's)}, the same on every rank."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    part = (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())
    figures = {}
    for training_task in tasks:
        task = training_task.task
        scorer.calls = 0
        sums = score_task(task, scorer, scorer.window, part=part, examples_per_call=max(1, len(task.examples)))
        if scorer.calls == 0:  # fewer examples than data-parallel ranks: this one still takes part
            scorer([])
        totals = torch.tensor(sums.as_list(), dtype=torch.float64, device=scorer.device)
        dist.all_reduce(totals, group=group)
        figures[training_task.name] = {"format": task.format, **Sums.from_list(task.kind, totals.tolist()).metrics()}
    return figures
