"""Perplexity and zero-shot tasks, scored by log-likelihood: p(output | input, task), as the GPT-2
paper evaluates, with lm-evaluation-harness's definitions so that figures compare with published ones.

Everything here is scored through one function, a `LogLikelihood`:

    loglikelihood([(context_ids, continuation_ids), ...]) -> [(sum_logprob, is_greedy), ...]

sum_logprob is sum_j log p(continuation[j] | context + continuation[:j]); is_greedy says whether
the argmax at every continuation position is the continuation's token. The model's input is
context + continuation[:-1], which must fit the window (`fit_to_window` makes it so). `ModelScorer`
builds such a function on any `logits(ids (B, T)) -> (B, T, V)`; a caller with a model split over
tensor or pipeline ranks supplies its own, and the rest of this module is the same for it.

Results are `Sums`: counts and sums over examples (or documents), so that the sums of disjoint
subsets add up to those of the whole. Data-parallel ranks each score `part=(rank, world)` and
all-reduce `Sums.as_list()`; the figures (`Sums.metrics()`) come from the combined sums.

Three evaluations:
  - perplexity over documents (`score_documents`), each read after the end-of-document token and
    every one of its tokens predicted once, with a sliding window over long ones (`rolling_requests`);
    an end-of-document token after it (as shards store documents) is not part of it;
  - last-word prediction in LAMBADA's format (lm-evaluation-harness's `lambada_openai`);
  - multiple choice by log-likelihood: HellaSwag's own format (with the harness's preprocessing)
    and a plain {"context", "choices", "label"} format.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Iterator, Sequence

import torch

Request = tuple[Sequence[int], Sequence[int]]
"""(context ids, continuation ids)."""
LogLikelihood = Callable[[list[Request]], list[tuple[float, bool]]]

KINDS = ("perplexity", "lambada", "multiple_choice")
FORMATS = {"lambada": "lambada", "hellaswag": "multiple_choice", "choice": "multiple_choice"}
"""Task file format -> how its examples are scored."""


class EvaluationError(ValueError):
    """Inputs or settings that cannot be evaluated; the message names the file, line or setting."""


# ---- scoring with a model ----------------------------------------------------------------------


def check_request(context: Sequence[int], continuation: Sequence[int], window: int) -> None:
    if not context or not continuation:
        raise EvaluationError(f"a request needs at least one context and one continuation token, got "
                              f"{len(context)} and {len(continuation)} (an empty context is scored after "
                              "the end-of-document token)")
    if len(context) + len(continuation) - 1 > window:
        raise EvaluationError(f"context ({len(context)} tokens) + continuation ({len(continuation)}) - 1 exceeds the "
                              f"{window}-token window; left-truncate the context first (fit_to_window)")


class ModelScorer:
    """A LogLikelihood on `logits(ids (B, T)) -> (B, T, V)`, any model whose position t sees tokens 0..t.

    Requests are scored longest first, `batch_size` at a time, padded on the right: a causal model's
    outputs at real positions do not depend on the padding after them. Longest first also makes an
    out-of-memory show at the first batch rather than at the end of a long run.
    """

    def __init__(self, logits: Callable[[torch.Tensor], torch.Tensor], window: int, batch_size: int = 8,
                 device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None):
        if batch_size < 1:
            raise EvaluationError(f"batch size must be >= 1, got {batch_size}")
        self.logits, self.window, self.batch_size = logits, window, batch_size
        self.device, self.progress = torch.device(device), progress

    def __call__(self, requests: list[Request]) -> list[tuple[float, bool]]:
        for context, continuation in requests:
            check_request(context, continuation, self.window)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            for index, result in zip(batch, self._score_batch([requests[i] for i in batch])):
                results[index] = result
            if self.progress is not None:
                self.progress(len(batch))
        return results

    @torch.no_grad()
    def _score_batch(self, requests: list[Request]) -> list[tuple[float, bool]]:
        inputs = [list(context) + list(continuation[:-1]) for context, continuation in requests]
        ids = torch.zeros(len(inputs), max(map(len, inputs)), dtype=torch.long)  # (B, T), 0 pads on the right
        for row, tokens in enumerate(inputs):
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        logits = self.logits(ids.to(self.device))  # (B, T, V)
        sums, greedy = [], []
        for row, (context, continuation) in enumerate(requests):
            first = len(context) - 1  # the position that predicts continuation[0]
            log_probs = torch.log_softmax(logits[row, first:first + len(continuation)].float(), dim=-1)  # (n, V)
            targets = torch.tensor(list(continuation), dtype=torch.long, device=log_probs.device)
            sums.append(log_probs.gather(1, targets[:, None]).double().sum())
            greedy.append((log_probs.argmax(dim=-1) == targets).all())
        return list(zip(torch.stack(sums).tolist(), torch.stack(greedy).tolist()))  # one device sync per batch


def fit_to_window(context: Sequence[int], continuation: Sequence[int], window: int) -> Request:
    """Left-truncate the context so that context + continuation[:-1] fits in `window` tokens, as the
    harness does; the continuation is never cut (one longer than the window is an error)."""
    if len(continuation) > window:
        raise EvaluationError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                              f"{window}-token window with even one token of context")
    keep = window + 1 - len(continuation)
    return list(context[-keep:]), list(continuation)


# ---- sums and figures ------------------------------------------------------------------------


def binary_mean_stderr(successes: float, count: float) -> float | None:
    """Standard error of the mean of `count` 0/1 scores, `successes` of them 1: the sample standard
    deviation (n - 1 in the denominator) over sqrt(n), lm-evaluation-harness's `mean_stderr`. For 0/1
    scores sum (x - p)^2 = n p (1 - p), so it is sqrt(p (1 - p) / (n - 1)). None below two scores."""
    if count < 2:
        return None
    p = successes / count
    return math.sqrt(p * (1.0 - p) / (count - 1))


def _exp(value: float) -> float:
    return math.exp(value) if value < 700 else math.inf


@dataclass
class Sums:
    """Counts and sums over the examples (documents) scored: those of disjoint subsets add up to those
    of the whole, so partial results combine exactly (`a + b`, or an all-reduce of `as_list()`;
    float sums may differ in the last bits with the order of addition)."""

    kind: str
    """perplexity, lambada or multiple_choice."""
    examples: int = 0
    """Documents (perplexity) or examples."""
    correct: int = 0
    """Examples right: greedy continuation (lambada), argmax of the log-likelihoods (multiple choice)."""
    correct_norm: int = 0
    """Multiple choice: argmax of log-likelihood / characters of the choice."""
    nll: float = 0.0
    """Sum of -log p: over predicted tokens (perplexity), over examples' targets (lambada)."""
    tokens: int = 0
    """Perplexity: tokens predicted."""
    bytes: int = 0
    """Perplexity: UTF-8 bytes of the documents' text (0 when unknown)."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise EvaluationError(f"unknown kind {self.kind!r}; one of {', '.join(KINDS)}")

    def __add__(self, other: "Sums") -> "Sums":
        if other.kind != self.kind:
            raise EvaluationError(f"cannot add {other.kind} sums to {self.kind} sums")
        return Sums.from_list(self.kind, [a + b for a, b in zip(self.as_list(), other.as_list())])

    def as_list(self) -> list[float]:
        return [getattr(self, f.name) for f in fields(self) if f.name != "kind"]

    @classmethod
    def from_list(cls, kind: str, values: Sequence[float]) -> "Sums":
        """The inverse of as_list, e.g. after an all-reduce in float64 (exact for counts below 2**53)."""
        names = [f.name for f in fields(cls) if f.name != "kind"]
        return cls(kind, **{name: (float(v) if name == "nll" else int(round(v))) for name, v in zip(names, values)})

    def metrics(self) -> dict:
        n = self.examples
        if self.kind == "perplexity":
            loss = self.nll / self.tokens if self.tokens else None
            return {"documents": n, "tokens": self.tokens, "loss": loss,
                    "perplexity": None if loss is None else _exp(loss),
                    "bits_per_byte": self.nll / (self.bytes * math.log(2)) if self.bytes else None}
        figures = {"examples": n, "acc": self.correct / n if n else None,
                   "acc_stderr": binary_mean_stderr(self.correct, n)}
        if self.kind == "lambada":
            # the harness's `perplexity` aggregation: exp(-mean of the per-example log-likelihoods)
            figures["perplexity"] = _exp(self.nll / n) if n else None
        else:
            figures.update(acc_norm=self.correct_norm / n if n else None,
                           acc_norm_stderr=binary_mean_stderr(self.correct_norm, n))
        return figures


# ---- perplexity --------------------------------------------------------------------------------


def rolling_requests(tokens: Sequence[int], eod_id: int, window: int, stride: int) -> list[Request]:
    """The windows that score every token of one document once.

    The document is read after the end-of-document token, so its first token is predicted too (as
    the harness's rolling log-likelihood does, and as a document follows the previous one's
    end-of-document in training). The first window predicts tokens 0..window-1. Each next window
    predicts the `stride` tokens after those already scored, seeing up to `window` tokens of input
    that end at its last prediction: each token after the first window has at least window - stride
    tokens before it (HF's perplexity guide). The last window predicts what remains with a full
    window of input rather than a short one. stride == window: disjoint windows, the harness's.
    """
    if not 1 <= stride <= window:
        raise EvaluationError(f"stride must be between 1 and the window ({window}), got {stride}")
    sequence = [eod_id] + list(tokens)  # sequence[i + 1] is tokens[i]
    requests, scored = [], 0  # tokens[:scored] are scored
    while scored < len(tokens):
        end = min(len(tokens), scored + (window if scored == 0 else stride))  # this window scores tokens[scored:end]
        start = max(0, end - window)  # its input is sequence[start:end]
        requests.append((sequence[start:scored + 1], sequence[scored + 1:end + 1]))
        scored = end
    return requests


@dataclass
class Document:
    tokens: Sequence[int]
    """Its token ids, without an end-of-document token."""
    text_bytes: int = 0
    """UTF-8 bytes of its text, for bits per byte (0: unknown)."""


def score_documents(documents: Iterable[Document], loglikelihood: LogLikelihood, window: int, eod_id: int,
                    stride: int | None = None, requests_per_call: int = 256) -> Sums:
    """Perplexity sums over documents, each scored apart with `rolling_requests` (stride defaults to
    the window: no overlap). Empty documents are skipped. Requests of several documents go to
    `loglikelihood` together, about `requests_per_call` at a time, so that they batch."""
    stride = window if stride is None else stride
    sums, pending = Sums("perplexity"), []
    for document in documents:
        if len(document.tokens) == 0:
            continue
        pending += rolling_requests(document.tokens, eod_id, window, stride)
        sums.examples += 1
        sums.tokens += len(document.tokens)
        sums.bytes += document.text_bytes
        if len(pending) >= requests_per_call:
            sums.nll -= math.fsum(logprob for logprob, _ in loglikelihood(pending))
            pending = []
    if pending:
        sums.nll -= math.fsum(logprob for logprob, _ in loglikelihood(pending))
    return sums


# ---- task files: records -> examples ---------------------------------------------------------


@dataclass
class TaskExample:
    line: int
    """Line of the task file, for messages."""
    context: str
    continuations: list[str]
    """As scored: LAMBADA's target, or " " + each choice."""
    label: int = 0
    """Index of the right continuation."""
    lengths: list[int] = field(default_factory=list)
    """Characters of each choice without the leading space: acc_norm divides by them (the harness's
    `completion_len` counts the choice, not the delimiter before it)."""


def lambada_example(record: dict, line: int) -> TaskExample:
    """OpenAI's LAMBADA (lambada_test.jsonl): the text without its last space-separated word, and
    " " + that word (the harness's lambada_openai `doc_to_text` / `doc_to_target`)."""
    text = _field(record, "text", str)
    if not text.strip():
        raise EvaluationError("'text' is empty")
    words = text.split(" ")
    return TaskExample(line, " ".join(words[:-1]), [" " + words[-1]])


def hellaswag_preprocess(text: str) -> str:
    """The harness's HellaSwag text cleaning; brackets are WikiHow artifacts. Each replacement runs
    once, in this order (a triple space leaves a double one, as there)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_example(record: dict, line: int) -> TaskExample:
    """HellaSwag's own records: query = activity_label + ": " + ctx_a + " " + ctx_b.capitalize()
    (Python's capitalize: the rest lower-cased), cleaned as the whole, choices the cleaned endings."""
    context = _field(record, "ctx_a", str) + " " + _field(record, "ctx_b", str).capitalize()
    query = hellaswag_preprocess(_field(record, "activity_label", str) + ": " + context)
    endings = _field(record, "endings", list)
    return _choice_example(query, [hellaswag_preprocess(_text(e, "an ending")) for e in endings],
                           _label(record, len(endings)), line)


def choice_example(record: dict, line: int) -> TaskExample:
    """{"context": str, "choices": [str, ...], "label": int}, scored as " " + choice after the context."""
    choices = _field(record, "choices", list)
    return _choice_example(_field(record, "context", str), [_text(c, "a choice") for c in choices],
                           _label(record, len(choices)), line)


def _choice_example(context: str, choices: list[str], label: int, line: int) -> TaskExample:
    if len(choices) < 2:
        raise EvaluationError(f"{len(choices)} choices; give at least two")
    empty = [i for i, choice in enumerate(choices) if not choice]
    if empty:
        raise EvaluationError(f"choice {empty[0]} is empty (after preprocessing); acc_norm divides by its length")
    return TaskExample(line, context, [" " + choice for choice in choices], label, [len(c) for c in choices])


def _field(record: dict, key: str, kind: type):
    if key not in record:
        raise EvaluationError(f"no {key!r} key (keys: {', '.join(map(repr, record)) or 'none'})")
    if not isinstance(record[key], kind):
        raise EvaluationError(f"{key!r} holds a {type(record[key]).__name__}, not a {kind.__name__}")
    return record[key]


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise EvaluationError(f"{what} is a {type(value).__name__}, not a string")
    return value


def _label(record: dict, choices: int) -> int:
    """HellaSwag's files hold the label as a string ("2"); the plain format as an int."""
    label = record.get("label")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < choices:
        raise EvaluationError(f"'label' is {label!r}; it must be the index of the right choice, 0 to {choices - 1}"
                              " (test splits without labels cannot be scored)")
    return label


PARSERS = {"lambada": lambada_example, "hellaswag": hellaswag_example, "choice": choice_example}


def detect_format(record: dict) -> str | None:
    """A task format from a record's keys, or None."""
    keys = set(record)
    if {"ctx_a", "ctx_b", "endings", "activity_label", "label"} <= keys:
        return "hellaswag"
    if {"context", "choices", "label"} <= keys:
        return "choice"
    if "text" in keys:
        return "lambada"
    return None


@dataclass
class Task:
    path: str
    format: str
    """lambada, hellaswag or choice."""
    examples: list[TaskExample]

    @property
    def kind(self) -> str:
        return FORMATS[self.format]


def read_task(path, task_format: str = "auto", limit: int | None = None) -> Task:
    """The examples of a task file (jsonl, plain, .gz or .zst), in order, the first `limit` of them.
    With "auto" the format comes from the first record's keys. A record that does not parse, or
    lacks what its format needs, is an error naming the file and line: a task scored on the
    records that happened to parse would not compare with anything."""
    from data_pipeline.readers import JSONL_SUFFIXES

    path = str(path)
    if task_format != "auto" and task_format not in PARSERS:
        raise EvaluationError(f"unknown task format {task_format!r}; one of auto, {', '.join(PARSERS)}")
    if not os.path.isfile(path):
        raise EvaluationError(f"task file not found: {path}")
    if not path.endswith(JSONL_SUFFIXES):
        raise EvaluationError(f"{path}: a task file is jsonl ({', '.join(JSONL_SUFFIXES)}), one example per line")
    examples: list[TaskExample] = []
    for line, record in _task_records(path):
        if task_format == "auto":
            task_format = detect_format(record)
            if task_format is None:
                raise EvaluationError(f"{path}:{line}: {unknown_format_message(record)}")
        try:
            examples.append(PARSERS[task_format](record, line))
        except EvaluationError as error:
            raise EvaluationError(f"{path}:{line}: {error} (a {task_format} record)") from None
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise EvaluationError(f"{path} holds no examples")
    return Task(path, task_format, examples)


def unknown_format_message(record: dict) -> str:
    return (f"cannot tell the task format from the keys {sorted(record)}: expected 'text' (lambada), 'ctx_a', "
            "'ctx_b', 'endings', 'activity_label', 'label' (hellaswag) or 'context', 'choices', 'label' (choice); "
            "or give the format (--task-format)")


def _task_records(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line."""
    from data_pipeline.readers import InputError, is_blank, iter_chunks, parse_json_record

    try:
        for chunk in iter_chunks(path, 0, "text"):
            for offset, item in enumerate(chunk.items):
                if is_blank(item):
                    continue
                line = chunk.first_record + offset + 1
                record, problem = parse_json_record(item)
                if problem:
                    raise EvaluationError(f"{path}:{line}: {problem[1]} ({problem[0]})")
                yield line, record
            if chunk.stream_errors:
                raise EvaluationError(str(chunk.stream_errors[0]))
    except InputError as error:
        raise EvaluationError(str(error)) from None


# ---- tasks: examples -> token ids -> sums --------------------------------------------------


@dataclass
class EncodedExample:
    line: int
    context: list[int]
    continuations: list[list[int]]
    label: int
    lengths: list[int]


@dataclass
class EncodedTask:
    path: str
    format: str
    kind: str
    examples: list[EncodedExample]


def encode_pair(encode: Callable[[str], list[int]], eod_id: int, context: str, continuation: str
                ) -> tuple[list[int], list[int]]:
    """The harness's tokenization of (context, continuation): trailing whitespace of the context moves
    to the continuation; the continuation's ids are those of context + continuation after the
    context's own ids (so a token that would merge across the boundary is the whole text's); an
    empty context is the end-of-document token."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [eod_id], encode(continuation)
    context_ids = encode(context)
    return context_ids, encode(context + continuation)[len(context_ids):]


def encode_task(task: Task, tokenizer) -> EncodedTask:
    """Token ids of every example; `tokenizer` has .encode(str) -> ids and .eod_id."""
    encoded = []
    for example in task.examples:
        pairs = [encode_pair(tokenizer.encode, tokenizer.eod_id, example.context, continuation)
                 for continuation in example.continuations]
        if any(not continuation for _, continuation in pairs):
            raise EvaluationError(f"{task.path}:{example.line}: a continuation has no tokens")
        encoded.append(EncodedExample(example.line, pairs[0][0], [c for _, c in pairs], example.label,
                                      example.lengths))
    return EncodedTask(task.path, task.format, task.kind, encoded)


def score_task(task: EncodedTask, loglikelihood: LogLikelihood, window: int, part: tuple[int, int] = (0, 1),
               examples_per_call: int = 1024) -> Sums:
    """Sums over examples part[0], part[0] + part[1], part[0] + 2 part[1], ... (all by default): rank r
    of R data-parallel ranks scores part=(r, R), and the ranks' sums add up to the whole task's.
    Contexts longer than the window are left-truncated (fit_to_window)."""
    rank, parts = part
    if not 0 <= rank < parts:
        raise EvaluationError(f"part {part} must be (index, count) with 0 <= index < count")
    mine = task.examples[rank::parts]
    sums = Sums(task.kind)
    for start in range(0, len(mine), examples_per_call):
        group = mine[start:start + examples_per_call]
        requests = [_fitted(task.path, example, continuation, window)
                    for example in group for continuation in example.continuations]
        results = iter(loglikelihood(requests))
        for example in group:
            _add_example(sums, example, [next(results) for _ in example.continuations])
    return sums


def check_fits(task: EncodedTask, window: int) -> None:
    """The error (file:line) of the first continuation longer than the window, before any scoring."""
    for example in task.examples:
        for continuation in example.continuations:
            _fitted(task.path, example, continuation, window)


def _fitted(path: str, example: EncodedExample, continuation: list[int], window: int) -> Request:
    try:
        return fit_to_window(example.context, continuation, window)
    except EvaluationError as error:
        raise EvaluationError(f"{path}:{example.line}: {error}") from None


def _add_example(sums: Sums, example: EncodedExample, scored: list[tuple[float, bool]]) -> None:
    sums.examples += 1
    if sums.kind == "lambada":
        logprob, greedy = scored[0]
        sums.correct += int(greedy)
        sums.nll -= logprob
        return
    logprobs = [logprob for logprob, _ in scored]
    # max() keeps the first of equal values: numpy's argmax, which the harness uses
    chosen = max(range(len(logprobs)), key=lambda i: logprobs[i])
    chosen_norm = max(range(len(logprobs)), key=lambda i: logprobs[i] / example.lengths[i])
    sums.correct += int(chosen == example.label)
    sums.correct_norm += int(chosen_norm == example.label)
