"""Zero-shot tasks scored while training (eval.tasks), as llm.c scores HellaSwag: every eval.interval
steps, on the engine as it is (any tensor, pipeline and data-parallel layout, any ZeRO stage),
with the definitions of tools/evaluate.py (pretrain/evaluation.py).

The examples are divided over data-parallel ranks (`score_task`'s parts); each model replica
scores its share through `EngineScorer`, a LogLikelihood whose forward passes are the training
shape, (micro_batch_size, n_positions) with unscored positions labelled IGNORE, so that the
pipeline's activation buffers and compiled blocks see nothing new. The replicas' `Sums` are
all-reduced, so every rank ends with the whole task's figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.evaluation import EncodedTask, EvaluationError, Request, Sums, check_request, encode_task, \
    read_task, score_task
from pretrain.model.loss import IGNORE

TASK_SUFFIXES = (".jsonl.gz", ".jsonl.zst", ".jsonl", ".gz", ".zst")


@dataclass
class TrainingTask:
    name: str
    """The file's name without its suffix: the key under "tasks" in metrics.jsonl and TensorBoard."""
    task: EncodedTask


def task_name(path: str) -> str:
    name = Path(path).name
    return next((name[:-len(suffix)] for suffix in TASK_SUFFIXES if name.endswith(suffix)), name)


def read_training_tasks(paths: list[str], tokenizer, max_examples: int) -> list[TrainingTask]:
    """The task files of eval.tasks, read and tokenized once; a bad file raises EvaluationError naming
    it (and its line), before training starts."""
    tasks, names = [], {}
    for path in paths:
        name = task_name(str(path))
        if name in names:
            raise EvaluationError(f"{names[name]} and {path} would both be logged as {name!r}; "
                                  "rename one of them")
        names[name] = path
        tasks.append(TrainingTask(name, encode_task(read_task(str(path), limit=max_examples or None), tokenizer)))
    return tasks


def request_row(request: Request, window: int) -> tuple[list[int], list[int]]:
    """(token ids, labels), `window` long: the model reads context + continuation[:-1] and is scored
    on the continuation, at the positions that predict it; padding is token 0, labelled IGNORE."""
    context, continuation = request
    ids = list(context) + list(continuation[:-1])
    labels = [IGNORE] * (len(context) - 1) + list(continuation)
    padding = window - len(ids)
    return ids + [0] * padding, labels + [IGNORE] * padding


class EngineScorer:
    """A LogLikelihood on a training engine. Every data-parallel rank must call it once per task,
    even with no requests: the replicas run equally many forward passes, the short ones padded."""

    def __init__(self, engine, micro_batch_size: int, micro_batches_per_call: int, window: int, device):
        self.engine, self.micro_batch_size, self.window = engine, micro_batch_size, window
        self.per_call, self.device = micro_batches_per_call, device
        self.calls = 0

    def __call__(self, requests: list[Request]) -> list[tuple[float, bool]]:
        from megatron.core import parallel_state

        from pretrain.parallel.engine import score_batches

        self.calls += 1
        for context, continuation in requests:
            check_request(context, continuation, self.window)
        rows = [request_row(request, self.window) for request in requests]
        count = torch.tensor([-(-len(rows) // self.micro_batch_size)], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
        empty = ([0] * self.window, [IGNORE] * self.window)
        rows += [empty] * (int(count) * self.micro_batch_size - len(rows))
        ids = torch.tensor([row[0] for row in rows], dtype=torch.long).view(-1, self.micro_batch_size, self.window)
        labels = torch.tensor([row[1] for row in rows], dtype=torch.long).view(ids.shape)
        scores = [score_batches(self.engine, list(zip(ids[start:start + self.per_call],
                                                      labels[start:start + self.per_call])))
                  for start in range(0, len(ids), self.per_call)]
        scores = torch.cat(scores)[:len(requests)].tolist() if scores else []
        return [(logprob, missed == 0) for logprob, missed in scores]


def evaluate_tasks(tasks: list[TrainingTask], scorer: EngineScorer, window: int) -> dict[str, dict]:
    """{task name: figures (tools/evaluate.py's)}, the same on every rank."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    part = (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())
    figures = {}
    for training_task in tasks:
        task = training_task.task
        scorer.calls = 0
        sums = score_task(task, scorer, window, part=part, examples_per_call=max(1, len(task.examples)))
        if scorer.calls == 0:  # fewer examples than data-parallel ranks: this one still takes part
            scorer([])
        totals = torch.tensor(sums.as_list(), dtype=torch.float64, device=scorer.device)
        dist.all_reduce(totals, group=group)
        figures[training_task.name] = {"format": task.format, **Sums.from_list(task.kind, totals.tolist()).metrics()}
    return figures
