"""tools/evaluate.py and pretrain/inference/evaluation.py: every figure against an independent computation with
transformers' GPT2LMHeadModel and GPT2TokenizerFast on the same tiny model, written out here as the
definitions say (lm-evaluation-harness's lambada_openai, hellaswag and mean_stderr; a sliding window
whose windows each score the tokens the previous one did not)."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from collections import defaultdict

import pytest
import torch

from data_pipeline.sample_text import write_jsonl
from tests.conftest import run_tool

WINDOW = 128  # the tiny model's n_positions
EOD = 50256


# ---- the reference: transformers, straightforwardly -------------------------------------------


@pytest.fixture(scope="module")
def hf(tiny_hf_model, tmp_path_factory):
    """transformers' model, and its GPT-2 tokenizer built from vocab.json + merges.txt alone: the
    tokenizer.json saved beside them reads back empty under transformers 5 (len 1)."""
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    model = GPT2LMHeadModel.from_pretrained(tiny_hf_model).eval()
    files = tmp_path_factory.mktemp("gpt2-bpe")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tiny_hf_model / name, files / name)
    tokenizer = GPT2TokenizerFast.from_pretrained(files)
    assert len(tokenizer) == 50257 and tokenizer("Hello world").input_ids == [15496, 995]
    return model, tokenizer


def log_probs(model, ids: list[int], last: int = 0) -> torch.Tensor:
    """(T, V) log p(next token | ids[:t + 1]) in float64, or its last `last` rows only: the full-vocabulary
    softmax of rows nobody reads was most of the reference's time."""
    assert len(ids) <= WINDOW
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]), logits_to_keep=last).logits[0].double(), dim=-1)


def reference_document_nll(model, tokens: list[int], stride: int) -> float:
    """-sum log p of a document's tokens, each read after [EOD] + the tokens before it. Token j is scored
    by window k = 0 when j < WINDOW, else 1 + (j - WINDOW) // stride; window k's input is the WINDOW
    tokens of [EOD] + tokens that end just before token min(n, WINDOW + k * stride) - 1 is predicted."""
    sequence, n = [EOD] + tokens, len(tokens)
    by_window = defaultdict(list)
    for j in range(n):
        by_window[0 if j < WINDOW else 1 + (j - WINDOW) // stride].append(j)
    total = 0.0
    for k, scored in by_window.items():
        end = min(n, WINDOW + k * stride)
        begin = max(0, end - WINDOW)
        # position p predicts sequence[begin + p + 1]; the scored tokens are the window's last ones
        assert scored == list(range(end - len(scored), end))
        lp = log_probs(model, sequence[begin:end], last=len(scored))
        total -= sum(float(lp[j - end, tokens[j]]) for j in scored)
    return total


def reference_perplexity(hf, texts: list[str], stride: int) -> dict:
    model, tokenizer = hf
    documents = [tokenizer(text).input_ids for text in texts]
    nll = sum(reference_document_nll(model, tokens, stride) for tokens in documents)
    tokens = sum(map(len, documents))
    return {"documents": len(texts), "tokens": tokens, "loss": nll / tokens, "perplexity": math.exp(nll / tokens),
            "bits_per_byte": nll / math.log(2) / sum(len(text.encode("utf-8")) for text in texts)}


def harness_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's _encode_pair (no trailing spaces in these contexts)."""
    context_ids = tokenizer(context).input_ids
    return context_ids, tokenizer(context + continuation).input_ids[len(context_ids):]


def reference_loglikelihood(model, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    """The harness's _loglikelihood_tokens: the last WINDOW + 1 tokens, the last one not fed in."""
    ids = (context_ids + continuation_ids)[-(WINDOW + 1):][:-1]
    lp = log_probs(model, ids, last=len(continuation_ids))
    targets = torch.tensor(continuation_ids)
    return float(lp.gather(1, targets[:, None]).sum()), bool((lp.argmax(-1) == targets).all())


def stderr_of(scores: list[float]) -> float:
    return statistics.stdev(scores) / math.sqrt(len(scores))


def reference_lambada(hf, texts: list[str]) -> dict:
    model, tokenizer = hf
    logprobs, greedy = [], []
    for text in texts:
        words = text.split(" ")
        logprob, is_greedy = reference_loglikelihood(model, *harness_pair(tokenizer, " ".join(words[:-1]),
                                                                          " " + words[-1]))
        logprobs.append(logprob)
        greedy.append(float(is_greedy))
    return {"examples": len(texts), "acc": statistics.mean(greedy), "acc_stderr": stderr_of(greedy),
            "perplexity": math.exp(-statistics.mean(logprobs))}


def choice_predictions(hf, context: str, choices: list[str]) -> tuple[int, int]:
    """(argmax of the log-likelihoods, argmax of log-likelihood / len(choice)) of " " + each choice."""
    model, tokenizer = hf
    lls = [reference_loglikelihood(model, *harness_pair(tokenizer, context, " " + choice))[0] for choice in choices]
    return (max(range(len(lls)), key=lambda i: lls[i]),
            max(range(len(lls)), key=lambda i: lls[i] / len(choices[i])))


def reference_choice(examples: list[tuple[int, int, int]]) -> dict:
    """Figures of (prediction, normalized prediction, label) triples."""
    acc = [float(pred == label) for pred, _, label in examples]
    norm = [float(pred_norm == label) for _, pred_norm, label in examples]
    return {"examples": len(examples), "acc": statistics.mean(acc), "acc_stderr": stderr_of(acc),
            "acc_norm": statistics.mean(norm), "acc_norm_stderr": stderr_of(norm)}


class Letters:
    """A tokenizer of one id per character, for scoring with fixed log-likelihoods."""

    eod_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def assert_figures(ours: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


# ---- task files written from real text ---------------------------------------------------------


def words_of(document: dict) -> list[str]:
    return document["text"].split()


@pytest.fixture(scope="module")
def texts(real_documents) -> list[str]:
    """Five news articles: two over twice the window (in GPT-2 tokens), one under it."""
    return [real_documents[i]["text"] for i in (0, 1, 2, 3, 4)]


@pytest.fixture(scope="module")
def expected_perplexity(hf, texts):
    """reference_perplexity of the first `count` texts, computed once for the tests that compare with it."""
    figures = {}

    def expected(stride: int, count: int = len(texts)) -> dict:
        if (stride, count) not in figures:
            figures[stride, count] = reference_perplexity(hf, texts[:count], stride)
        return figures[stride, count]

    return expected


@pytest.fixture(scope="module")
def lambada_texts(real_documents) -> list[str]:
    """Sentences of real text, and one whose context is far longer than the window."""
    texts = [" ".join(words_of(real_documents[i])[:12 + i]) for i in range(10, 22)]
    return texts + [" ".join(words_of(real_documents[25]))]  # ~300 tokens of context


def hellaswag_records() -> list[dict]:
    """HellaSwag's own records where the harness's preprocessing matters."""
    return [
        {"ind": 4, "activity_label": "Baking cookies",
         "ctx_a": "[header] How to bake cookies [title] Preheat the oven.",
         "ctx_b": "then  you", "endings": ["mix the flour [step] and sugar.", "eat the  dough right away.",
                                          "go outside.", "put the tray in [substeps] the oven."], "label": "3"},
        {"ind": 9, "activity_label": "Running a marathon", "ctx_a": "A man in a red shirt runs along a road.",
         "ctx_b": "HE waves at the crowd", "endings": ["and stops.", "then falls down hard on the road.",
                                                      "while smiling.", "and flies away."], "label": 2},
        {"ind": 11, "activity_label": "Washing face", "ctx_a": "A woman stands at a sink.",
         "ctx_b": "she", "endings": ["splashes water on her face.", "sings.", "leaves the room  quickly.",
                                     "[title] Dries her hands."], "label": "0"},
    ]


HELLASWAG_QUERIES = [  # written out by hand from the harness's preprocess
    "Baking cookies: How to bake cookies. Preheat the oven. Then you",
    "Running a marathon: A man in a red shirt runs along a road. He waves at the crowd",
    "Washing face: A woman stands at a sink. She",
]
HELLASWAG_CHOICES = [
    ["mix the flour and sugar.", "eat the dough right away.", "go outside.", "put the tray in the oven."],
    ["and stops.", "then falls down hard on the road.", "while smiling.", "and flies away."],
    ["splashes water on her face.", "sings.", "leaves the room quickly.", " Dries her hands."],  # stripped first
]


@pytest.fixture(scope="module")
def choice_task(hf, real_documents) -> tuple[list[dict], list[tuple[int, int, int]]]:
    """Plain multiple-choice records from real text, and each one's (prediction, normalized prediction,
    label) by the reference. Choices of 2 to 14 words, so that length normalization changes answers;
    labels picked after scoring so that acc and acc_norm are neither 0 nor 1 and differ. The last
    context is longer than the window."""
    records, triples = [], []
    for e in range(12):
        context = " ".join(words_of(real_documents[48])) if e == 11 else " ".join(words_of(real_documents[40 + e])[:15])
        choices = [" ".join(words_of(real_documents[60 + e + 7 * c])[20:20 + n]) for c, n in enumerate((2, 5, 9, 14))]
        pred, pred_norm = choice_predictions(hf, context, choices)
        label = (pred, pred_norm, (pred + 1) % 4)[e % 3]
        records.append({"context": context, "choices": choices, "label": label})
        triples.append((pred, pred_norm, label))
    assert any(pred != pred_norm for pred, pred_norm, _ in triples), "normalization must change some answer"
    return records, triples


@pytest.fixture(scope="module")
def task_files(tmp_path_factory, lambada_texts, choice_task) -> dict:
    directory = tmp_path_factory.mktemp("tasks")
    files = {"lambada": directory / "lambada.jsonl", "hellaswag": directory / "hellaswag.jsonl",
             "choice": directory / "choice.jsonl"}
    write_jsonl(files["lambada"], [{"text": text} for text in lambada_texts])
    write_jsonl(files["hellaswag"], hellaswag_records())
    write_jsonl(files["choice"], choice_task[0])
    return {name: str(path) for name, path in files.items()}


@pytest.fixture(scope="module")
def expected_tasks(hf, lambada_texts, choice_task) -> dict:
    hellaswag = [(*choice_predictions(hf, query, choices), int(record["label"]))
                 for query, choices, record in zip(HELLASWAG_QUERIES, HELLASWAG_CHOICES, hellaswag_records())]
    return {"lambada": reference_lambada(hf, lambada_texts), "hellaswag": reference_choice(hellaswag),
            "choice": reference_choice(choice_task[1])}


@pytest.fixture(scope="module")
def loaded(tiny_hf_model):
    from pretrain.inference.loading import load_model

    return load_model(tiny_hf_model, device="cpu")


def evaluate_in_process(capsys, *argv: str) -> tuple[int, str, str]:
    """tools/evaluate.py's main() in this process (torch and megatron-core load once per session)."""
    from tools.evaluate import main

    code = main(["--quiet", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# ---- perplexity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [WINDOW, 48])
def test_perplexity_equals_transformers_sliding_window(hf, loaded, texts, expected_perplexity, stride):
    from pretrain.inference.evaluation import Document, ModelScorer, score_documents

    lengths = [len(hf[1](text).input_ids) for text in texts]
    assert max(lengths) > 2 * WINDOW and min(lengths) < WINDOW, lengths
    documents = [Document(loaded.tokenizer.encode(text), len(text.encode("utf-8"))) for text in texts]
    sums = score_documents(documents, ModelScorer(loaded.logits, WINDOW, batch_size=3), WINDOW, EOD, stride=stride)
    assert_figures(sums.metrics(), expected_perplexity(stride))


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory, texts) -> tuple[str, str]:
    """The texts as a jsonl file, and as shards made as tools/preprocess_data.py makes them (several of them)."""
    from data_pipeline.preprocess import preprocess

    directory = tmp_path_factory.mktemp("corpus")
    jsonl = write_jsonl(directory / "news.jsonl", [{"text": text} for text in texts])
    prefix = str(directory / "news")
    preprocess([str(jsonl)], prefix, "gpt2", workers=1, shard_size_tokens=600, show_progress=False)
    assert len(json.loads(open(prefix + ".json").read())["shards"]) >= 2
    return str(jsonl), prefix


@pytest.mark.parametrize("stride", [WINDOW, 48])
def test_perplexity_of_jsonl_and_shard_prefix_equals_transformers(capsys, tiny_hf_model, expected_perplexity,
                                                                  corpus_files, stride):
    jsonl, prefix = corpus_files
    code, out, err = evaluate_in_process(capsys, "--checkpoint", str(tiny_hf_model), "--input", jsonl, prefix,
                                         "--stride", str(stride), "--json")
    assert code == 0, err
    report, expected = last_json(out), expected_perplexity(stride)
    assert report["stride"] == stride and report["window"] == WINDOW
    assert_figures(report["perplexity"][jsonl], expected)
    assert_figures(report["perplexity"][prefix], expected)  # the end-of-document preprocessing appended is not scored


def test_perplexity_of_text_files_scores_each_file_as_one_document(capsys, tmp_path, tiny_hf_model, texts,
                                                                   expected_perplexity):
    import zstandard

    plain, compressed = tmp_path / "article.txt", tmp_path / "article.txt.zst"
    plain.write_text(texts[0], encoding="utf-8")
    compressed.write_bytes(zstandard.ZstdCompressor().compress(texts[0].encode("utf-8")))
    code, out, err = evaluate_in_process(capsys, "--checkpoint", str(tiny_hf_model), "--input", str(plain),
                                         str(compressed), "--json")
    assert code == 0, err
    for path in (plain, compressed):
        assert_figures(last_json(out)["perplexity"][str(path)], expected_perplexity(WINDOW, count=1))


def test_cli_refuses_a_malformed_input_record_naming_file_and_line(capsys, tmp_path, tiny_hf_model, texts):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": texts[2]}) + "\n" + '{"text": 3}\n')
    code, _, err = evaluate_in_process(capsys, "--checkpoint", str(tiny_hf_model), "--input", str(path))
    assert code == 2
    assert err.count("\n") == 1 and f"error: {path}:2: not_a_string" in err, err


def test_rolling_windows_predict_every_token_once_with_at_least_window_minus_stride_context():
    from pretrain.inference.evaluation import rolling_requests

    tokens = list(range(1, 301))
    for stride in (1, 7, 50, WINDOW):
        predicted = []
        for context, continuation in rolling_requests(tokens, EOD, WINDOW, stride):
            assert len(context) + len(continuation) - 1 <= WINDOW
            assert len(context) >= min(WINDOW - stride + 1, 1 + (continuation[0] - 1))
            predicted += continuation
        assert predicted == tokens


# ---- LAMBADA -------------------------------------------------------------------------------------


def test_lambada_accuracy_and_perplexity_equal_the_harness_definition(hf, loaded, task_files, expected_tasks):
    from pretrain.inference.evaluation import ModelScorer, encode_task, read_task, score_task

    task = read_task(task_files["lambada"])
    assert task.format == "lambada"
    assert task.examples[0].continuations[0].startswith(" ") and " " not in task.examples[0].continuations[0][1:]
    sums = score_task(encode_task(task, loaded.tokenizer), ModelScorer(loaded.logits, WINDOW, 4), WINDOW)
    assert_figures(sums.metrics(), expected_tasks["lambada"])


def test_greedy_is_true_only_when_every_continuation_token_is_the_argmax(hf, loaded, texts):
    """The random tiny model never predicts a real word (acc is 0 on real text), so the greedy flag
    that LAMBADA's acc counts is checked on the model's own greedy continuation, and on it altered."""
    from pretrain.inference.evaluation import ModelScorer

    model, tokenizer = hf
    context = tokenizer(texts[1]).input_ids[:40]
    greedy = []
    for _ in range(3):
        greedy.append(int(log_probs(model, context + greedy, last=1)[-1].argmax()))
    altered_last, altered_first = greedy[:2] + [greedy[2] + 1], [greedy[0] + 1] + greedy[1:]
    requests = [(context, greedy), (context, altered_last), (context, altered_first), (context, greedy[:1])]
    ours = ModelScorer(loaded.logits, WINDOW, batch_size=3)(requests)
    assert [flag for _, flag in ours] == [True, False, False, True]
    for (logprob, _), (request_context, continuation) in zip(ours, requests):
        assert logprob == pytest.approx(reference_loglikelihood(model, request_context, continuation)[0], rel=1e-5)


def test_lambada_sums_count_greedy_examples_and_average_the_log_likelihoods(tmp_path):
    from pretrain.inference.evaluation import encode_task, read_task, score_task

    path = write_jsonl(tmp_path / "lambada.jsonl", [{"text": "a b c"}, {"text": "d e"}, {"text": "f g h i"}])
    fixed = {"a b": (-1.0, True), "d": (-2.0, False), "f g h": (-6.0, True)}

    def loglikelihood(requests):
        return [fixed["".join(map(chr, context))] for context, _ in requests]

    figures = score_task(encode_task(read_task(path), Letters()), loglikelihood, WINDOW).metrics()
    assert figures["acc"] == pytest.approx(2 / 3) and figures["perplexity"] == pytest.approx(math.exp(3.0))
    assert figures["acc_stderr"] == pytest.approx(stderr_of([1, 0, 1]))


def test_long_contexts_lose_their_beginning_never_the_continuation(hf, loaded, lambada_texts):
    from pretrain.inference.evaluation import EvaluationError, ModelScorer, fit_to_window

    context, continuation = list(range(300)), [7, 8, 9]
    kept, whole = fit_to_window(context, continuation, WINDOW)
    assert whole == continuation and kept == context[-(WINDOW - 2):]
    with pytest.raises(EvaluationError, match="does not fit"):
        fit_to_window(context, list(range(WINDOW + 1)), WINDOW)
    # the long LAMBADA example alone, scored through our model, against the harness's truncation
    model, tokenizer = hf
    words = lambada_texts[-1].split(" ")
    context_ids, target_ids = harness_pair(tokenizer, " ".join(words[:-1]), " " + words[-1])
    assert len(context_ids) > 2 * WINDOW
    [(ours, ours_greedy)] = ModelScorer(loaded.logits, WINDOW)([fit_to_window(context_ids, target_ids, WINDOW)])
    expected, greedy = reference_loglikelihood(model, context_ids, target_ids)
    assert ours == pytest.approx(expected, rel=1e-5) and ours_greedy == greedy


# ---- multiple choice -----------------------------------------------------------------------------


def test_hellaswag_records_are_preprocessed_as_the_harness_does(task_files):
    from pretrain.inference.evaluation import read_task

    task = read_task(task_files["hellaswag"])
    assert task.format == "hellaswag"
    assert [example.context for example in task.examples] == HELLASWAG_QUERIES
    assert [[c[1:] for c in example.continuations] for example in task.examples] == HELLASWAG_CHOICES
    assert all(all(c.startswith(" ") for c in example.continuations) for example in task.examples)
    assert [example.label for example in task.examples] == [3, 2, 0]


@pytest.mark.parametrize("name", ["hellaswag", "choice"])
def test_multiple_choice_acc_and_acc_norm_equal_the_harness_definition(loaded, task_files, expected_tasks, name):
    from pretrain.inference.evaluation import ModelScorer, encode_task, read_task, score_task

    sums = score_task(encode_task(read_task(task_files[name]), loaded.tokenizer),
                      ModelScorer(loaded.logits, WINDOW, 5), WINDOW)
    expected = expected_tasks[name]
    if name == "choice":
        assert 0 < expected["acc"] < 1 and 0 < expected["acc_norm"] < 1 and expected["acc"] != expected["acc_norm"]
    assert_figures(sums.metrics(), expected)


def test_acc_norm_divides_by_the_choice_length_without_its_leading_space(tmp_path):
    from pretrain.inference.evaluation import encode_task, read_task, score_task

    # sums -2.2 over "ab" and -4.2 over "abcd": per character -1.1 < -1.05, so "abcd" wins; with the
    # space counted (3 and 5 characters) -0.733 > -0.84 and "ab" would win.
    path = write_jsonl(tmp_path / "t.jsonl", [{"context": "x", "choices": ["ab", "abcd"], "label": 1}])
    fixed = {" ab": -2.2, " abcd": -4.2}

    def loglikelihood(requests):
        return [(fixed["".join(map(chr, continuation))], False) for _, continuation in requests]

    sums = score_task(encode_task(read_task(path), Letters()), loglikelihood, WINDOW)
    assert (sums.correct, sums.correct_norm) == (0, 1)


def test_stderr_is_the_sample_stderr_of_the_mean_of_0_1_scores():
    from pretrain.inference.evaluation import binary_mean_stderr

    for scores in ([1, 0, 0, 1, 1], [0, 0, 0, 1], [1] * 9 + [0] * 3, [0, 0]):
        assert binary_mean_stderr(sum(scores), len(scores)) == pytest.approx(stderr_of(scores), rel=1e-12)
    assert binary_mean_stderr(1, 1) is None


def test_parts_of_a_task_add_up_to_the_whole(loaded, task_files):
    """What data-parallel ranks do: each scores part (rank, world), and the sums are all-reduced."""
    from pretrain.inference.evaluation import ModelScorer, Sums, encode_task, read_task, score_task

    task = encode_task(read_task(task_files["choice"]), loaded.tokenizer)
    scorer = ModelScorer(loaded.logits, WINDOW, 8)
    whole = score_task(task, scorer, WINDOW)
    parts = [score_task(task, scorer, WINDOW, part=(rank, 3)) for rank in range(3)]
    assert [p.examples for p in parts] == [4, 4, 4]
    combined = Sums.from_list("multiple_choice", [sum(v) for v in zip(*(p.as_list() for p in parts))])
    assert combined.metrics() == whole.metrics() == (parts[0] + parts[1] + parts[2]).metrics()


# ---- the command line ----------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_json_reports_every_figure(tiny_hf_model, expected_perplexity, corpus_files, task_files,
                                       expected_tasks):
    jsonl, prefix = corpus_files
    result = run_tool("evaluate.py", "--checkpoint", str(tiny_hf_model), "--input", jsonl, prefix, "--task",
                      task_files["lambada"], task_files["hellaswag"], task_files["choice"], "--stride", "48",
                      "--batch-size", "4", "--json")
    assert result.returncode == 0, result.stderr
    report = last_json(result.stdout)
    assert "perplexity (stride 48)" in result.stdout and "acc_norm" in result.stdout  # the table, above
    expected = expected_perplexity(48)
    for path in (jsonl, prefix):
        assert_figures(report["perplexity"][path], expected)
    for name, path in task_files.items():
        assert report["tasks"][path]["format"] == name
        assert_figures(report["tasks"][path], expected_tasks[name])


def test_cli_max_examples_scores_the_first_n(capsys, tiny_hf_model, task_files, hf, lambada_texts):
    code, out, err = evaluate_in_process(capsys, "--checkpoint", str(tiny_hf_model), "--task", task_files["lambada"],
                                         "--max-examples", "5", "--json")
    assert code == 0, err
    assert_figures(last_json(out)["tasks"][task_files["lambada"]], reference_lambada(hf, lambada_texts[:5]))


def test_cli_refuses_a_malformed_task_record_naming_file_and_line(tmp_path, tiny_hf_model):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "one two three"}\n\n{"text": "four five" \n')
    result = run_tool("evaluate.py", "--checkpoint", str(tiny_hf_model), "--task", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"{path}:3:" in lines[0], result.stderr


@pytest.mark.parametrize("records, task_format, message", [
    ([{"text": "a b"}, {"txt": "c d"}], "auto", ":2: no 'text' key"),
    ([{"question": "?"}], "auto", ":1: cannot tell the task format from the keys ['question']"),
    ([{"context": "c", "choices": ["a", "b"], "label": 2}], "auto", ":1: 'label' is 2"),
    ([{"context": "c", "choices": ["a", "b"], "label": 0}], "hellaswag", ":1: no 'ctx_a' key"),
    ([{"activity_label": "A", "ctx_a": "b", "ctx_b": "c", "endings": ["[step]", "x"], "label": "0"}], "auto",
     ":1: choice 0 is empty"),
])
def test_cli_refuses_task_records_that_do_not_fit_their_format(capsys, tmp_path, tiny_hf_model, records,
                                                               task_format, message):
    path = write_jsonl(tmp_path / "task.jsonl", records)
    code, _, err = evaluate_in_process(capsys, "--checkpoint", str(tiny_hf_model), "--task", str(path),
                                       "--task-format", task_format)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and f"{path}{message}" in err, err


@pytest.mark.parametrize("argv, message", [
    (["--task", "missing.jsonl"], "task file not found: missing.jsonl"),
    (["--input", "missing.jsonl"], "--input missing.jsonl does not exist"),
    (["--input", "data/nothing_here"], "neither data/nothing_here.bin/.idx nor data/nothing_here.json exists"),
    (["--task", "x.jsonl", "--task-format", "squad"], "argument --task-format: invalid choice: 'squad'"),
    ([], "give --input (perplexity) or --task"),
])
def test_cli_refuses_bad_arguments_in_one_line(capsys, tiny_hf_model, argv, message):
    try:
        code, _, err = evaluate_in_process(capsys, "--checkpoint", str(tiny_hf_model), *argv)
    except SystemExit as exit:  # argparse's own errors
        code, err = exit.code, capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
