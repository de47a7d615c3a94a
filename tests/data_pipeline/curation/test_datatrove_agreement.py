"""Our Gopher, C4 and FineWeb rules against datatrove 0.10's, document by document.

configs/data/fineweb.yaml is named after FineWeb, which was built with datatrove, so each
rule of ours is run beside datatrove's on the same real documents (gensim's ABC news
articles, and its Wikipedia pages cut at their section headings, about the size of web
pages) and on perturbed copies of some of them (a passage or lines repeated, hashtags,
ellipses, bullet lists, short lines), each rule on its own. Each must keep and drop the
same documents in at least 99% of cases.

Two kinds of difference remain, and each is accounted for:
- Words. datatrove splits them with spaCy ("don't" is "do" + "n't", "end." is "end" + ".",
  an ISBN is one word per number); we split on whitespace, or for the n-gram and newline
  rules with a regex that counts about as spaCy does, because spaCy is an order of
  magnitude slower. Documents near a threshold can fall on different sides of it.
- The Gopher paper (Rae et al. 2021, appendix A), which we follow where datatrove reads it
  otherwise: the hash and ellipsis ratios and the alphabetic-word rule count words, not
  punctuation marks; a line starting with "*" (or another bullet character) is a bullet
  line; duplicated n-grams count every character they cover, where datatrove skips ahead
  after each one. For these rules the 99% is checked against datatrove given the paper's
  reading (`Rule.paper`), and the table shows the agreement with datatrove as it is too.

    .venv/bin/python -m pytest -s tests/data_pipeline/curation/test_datatrove_agreement.py -k table

prints the table of every rule (for docs/benchmarks.md). The whole file takes two to three
minutes on two cores, most of it datatrove's: spaCy tokenizes each document once for all
the rules, and each line once more for C4's sentence count.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, replace
from typing import Callable

import pytest
from datatrove.data import Document as DatatroveDocument  # the test extra installs datatrove and spaCy
from datatrove.pipeline import filters as datatrove_filters
from datatrove.utils.text import PUNCTUATION_SET
from datatrove.utils.word_tokenizers import WordTokenizer, load_word_tokenizer

from data_pipeline.curation.document import Document, Stage
from data_pipeline.curation.filters import (
    BULLETS,
    C4Filter,
    FineWebFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    Normalize,
)

pytestmark = pytest.mark.slow
MIN_AGREEMENT = 0.99
INF = math.inf

# ---------------------------------------------------------------------------------------------
# The documents

_HEADING = re.compile(r"^=+[^=\n]*=+$", re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def normalized(text: str) -> str:
    """As the pipeline's first stage leaves it for the filters."""
    return Normalize().apply(Document(text=text, id="x", source="x")).text


def real_texts(real_documents: list[dict]) -> list[tuple[str, str]]:
    """(kind, text): each news article, and each Wikipedia section of at least 200 characters."""
    out = []
    for document in real_documents:
        text = normalized(document["text"])
        if document["source"] == "wikipedia":
            out += [("wikipedia", s.strip()) for s in _HEADING.split(text) if len(s.strip()) >= 200]
        else:
            out.append(("news", text))
    return out


def head(text: str, chars: int = 3000) -> str:
    """The text up to the last sentence or line end within `chars` characters."""
    if len(text) <= chars:
        return text
    cut = max(text.rfind("\n", 0, chars), text.rfind(". ", 0, chars) + 1)
    return text[:cut if cut > 0 else chars]


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if s]


def repeated_passage(text: str, rng: random.Random) -> str:
    """Up to 30% of the words, a run of them, copied once to another place."""
    words = text.split(" ")
    length = max(2, int(len(words) * rng.uniform(0.0, 0.3)))
    start = rng.randrange(max(1, len(words) - length))
    at = rng.randrange(len(words) + 1)
    return " ".join(words[:at] + words[start:start + length] + words[at:])


def repeated_lines(text: str, rng: random.Random) -> str:
    """Paragraphs (a one-line article cut into paragraphs of 1-4 sentences) with up to 60% more copies of some."""
    if "\n" not in text:
        parts, size = sentences(text), rng.randint(1, 4)
        text = "\n".join(" ".join(parts[i:i + size]) for i in range(0, len(parts), size))
    lines = [line for line in text.split("\n") if line]
    out = list(lines)
    for _ in range(int(len(lines) * rng.uniform(0.0, 0.6))):
        out.insert(rng.randrange(len(out) + 1), rng.choice(lines))
    return ("\n\n" if rng.random() < 0.5 else "\n").join(out)


def hashtags(text: str, rng: random.Random) -> str:
    """Up to 0.3 "#tag" per word, the tags the text's own words, scattered through it."""
    words = text.split(" ")
    vocabulary = [w for w in words if w.isalpha()] or ["news"]
    for _ in range(int(len(words) * rng.uniform(0.0, 0.3))):
        words.insert(rng.randrange(len(words) + 1), "#" + rng.choice(vocabulary))
    return " ".join(words)


def ellipses(text: str, rng: random.Random) -> str:
    """A random share of sentence ends and commas made "..." or "\u2026" (a forum post trailing off),
    one sentence per line or all in one."""
    share, mark = rng.random(), rng.choice(("...", "\u2026"))
    text = re.sub(",", lambda _: mark if rng.random() < share else ",", text)
    parts = [s[:-1] + mark if s.endswith(".") and rng.random() < share else s for s in sentences(text)]
    return ("\n" if rng.random() < 0.5 else " ").join(parts)


def bullets(text: str, rng: random.Random) -> str:
    """One sentence per line, 50-100% of them list items marked "- ", "\u2022 " or "* "."""
    share, marker = rng.uniform(0.5, 1.0), rng.choice(("- ", "\u2022 ", "* "))
    return "\n".join(marker + s if rng.random() < share else s for s in sentences(text.replace("\n", " ")))


def short_lines(text: str, rng: random.Random) -> str:
    """The words in lines of 1 to k words, k from 1 to 12: menus, tables, poems, lists."""
    words, lines, most = text.split(), [], rng.randint(1, 12)
    while words:
        take = rng.randint(1, most)
        lines.append(" ".join(words[:take]))
        words = words[take:]
    return "\n".join(lines)


PERTURBATIONS = (repeated_passage, repeated_lines, hashtags, ellipses, bullets, short_lines)


def agreement_corpus(real_documents: list[dict], per_perturbation: int = 200, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    texts = real_texts(real_documents)
    out = list(texts)
    for perturb in PERTURBATIONS:
        for _, text in rng.sample(texts, per_perturbation):
            out.append((perturb.__name__, normalized(perturb(head(text), rng))))
    return out


# ---------------------------------------------------------------------------------------------
# datatrove, with every text tokenized once for all its rules


class SharedSpacy(WordTokenizer):
    """datatrove's English tokenizer (a blank spaCy pipeline, no model to download), remembering its
    results, so that twenty rules given the same text tokenize it once. datatrove caches only the
    last five texts."""

    def __init__(self):
        super().__init__("en")
        self.spacy = load_word_tokenizer("en")
        self.words: dict[str, list[str]] = {}
        self.spans: dict[str, list[tuple[int, int]]] = {}
        self.paper_words = PaperWords(self)

    def forget(self) -> None:
        """Done with one document: let its words go."""
        self.words.clear()
        self.spans.clear()
        self.paper_words.words.clear()

    def word_tokenize(self, text: str) -> list[str]:
        if text not in self.words:
            self.words[text] = self.spacy.word_tokenize(text)
        return self.words[text]

    def sent_tokenize(self, text: str) -> list[str]:
        return self.spacy.sent_tokenize(text)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        if text not in self.spans:
            self.spans[text] = self.spacy.span_tokenize(text)
        return self.spans[text]


class PaperWords(WordTokenizer):
    """spaCy's words without the tokens made only of punctuation marks: the words the Gopher paper
    counts ("80% of words ... contain at least one alphabetic character"). Given to datatrove's
    quality rule, its ratios then count what ours count, and what is left is the word splitting."""

    def __init__(self, spacy: SharedSpacy):
        super().__init__("en")
        self.spacy = spacy
        self.words: dict[str, list[str]] = {}

    def word_tokenize(self, text: str) -> list[str]:
        if text not in self.words:
            self.words[text] = [w for w in self.spacy.word_tokenize(text) if not PUNCTUATION_SET.issuperset(w)]
        return self.words[text]

    def sent_tokenize(self, text: str) -> list[str]:
        return self.spacy.sent_tokenize(text)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return self.spacy.span_tokenize(text)


_OUR_EXTRA_BULLET = re.compile("^(\\s*)[%s]" % re.escape("".join(set(BULLETS) - {"-", "\u2022"})), re.MULTILINE)


def our_bullets_as_datatrove_bullets(text: str) -> str:
    """Lines that start with a bullet character datatrove does not know ("*", "\u25aa", ...) start with "\u2022"."""
    return _OUR_EXTRA_BULLET.sub(lambda m: m.group(1) + "\u2022", text)


Decision = tuple[str | None, str | None]
"""(None, the text as the stage leaves it) for a document kept; (the reason, None) for one dropped."""


def datatrove_decision(make_filter: Callable, transform: Callable[[str], str] | None = None
                       ) -> Callable[[str], Decision]:
    """A datatrove filter as a function of the text, each call on a fresh datatrove Document."""
    instance = make_filter()

    def decide(text: str) -> Decision:
        document = DatatroveDocument(text=transform(text) if transform else text, id="x")
        result = instance.filter(document)
        if result is True:
            return None, document.text
        return (result[1] if isinstance(result, tuple) else "dropped"), None
    return decide


def paper_duplicated_chars(words: list[str], n: int) -> int:
    """The paper's duplicated n-gram rule written plainly: characters of the words covered by an n-gram
    that occurred before, each word once."""
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i, gram in enumerate(zip(*(words[k:] for k in range(n)))):
        if gram in seen:
            covered[i:i + n] = [True] * n
        seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered) if c)


def paper_dup_ngram_decision(spacy: SharedSpacy, n: int, limit: float) -> Callable[[str], Decision]:
    """The paper's duplicated n-gram rule on datatrove's words, with datatrove's character count (words
    joined without spaces, over the text's length)."""
    def decide(text: str) -> Decision:
        duplicated = paper_duplicated_chars(spacy.word_tokenize(text), n) / len(text) > limit
        return ("duplicated_n_grams" if duplicated else None), None
    return decide


# ---------------------------------------------------------------------------------------------
# The rules, one at a time: ours with every other threshold out of reach, datatrove's likewise

OUR_QUALITY_OFF = dict(min_words=0, max_words=10**12, min_mean_word_length=0, max_mean_word_length=INF,
                       max_symbol_word_ratio=INF, max_bullet_lines=INF, max_ellipsis_lines=INF, min_alpha_words=0,
                       min_stop_words=0)
THEIR_QUALITY_OFF = dict(min_doc_words=None, max_doc_words=None, min_avg_word_length=None, max_avg_word_length=None,
                         max_symbol_word_ratio=None, max_bullet_lines_ratio=None, max_ellipsis_lines_ratio=None,
                         max_non_alpha_words_ratio=None, min_stop_words=None)
OUR_REPETITION_OFF = dict(max_dup_line_fraction=INF, max_dup_line_chars=INF, max_dup_paragraph_fraction=INF,
                          max_dup_paragraph_chars=INF, max_top_ngram_chars={}, max_dup_ngram_chars={})
THEIR_REPETITION_OFF = dict(dup_line_frac=None, dup_para_frac=None, dup_line_char_frac=None, dup_para_char_frac=None,
                            top_n_grams=(), dup_n_grams=())
OUR_FINEWEB_OFF = dict(min_line_punct_ratio=0, max_short_line_ratio=INF, max_char_duplicates_ratio=INF,
                       max_new_line_ratio=INF)
THEIR_FINEWEB_OFF = dict(line_punct_thr=0, short_line_thr=INF, char_duplicates_ratio=INF, new_line_ratio=INF)

# datatrove's reasons, as ours name them
SAME_REASON = {
    "gopher_short_doc": "gopher_quality:too_few_words", "gopher_long_doc": "gopher_quality:too_many_words",
    "gopher_below_avg_threshold": "gopher_quality:mean_word_length",
    "gopher_above_avg_threshold": "gopher_quality:mean_word_length",
    "gopher_too_many_hashes": "gopher_quality:hash_word_ratio",
    "gopher_too_many_ellipsis": "gopher_quality:ellipsis_word_ratio",
    "gopher_too_many_bullets": "gopher_quality:bullet_lines",
    "gopher_too_many_end_ellipsis": "gopher_quality:ellipsis_lines",
    "gopher_below_alpha_threshold": "gopher_quality:alpha_words",
    "gopher_enough_stop_words": "gopher_quality:stop_words",
    "dup_para_frac": "gopher_repetition:dup_paragraph_fraction",
    "dup_para_char_frac": "gopher_repetition:dup_paragraph_chars",
    "dup_line_frac": "gopher_repetition:dup_line_fraction", "dup_line_char_frac": "gopher_repetition:dup_line_chars",
    **{f"top_{n}_gram": f"gopher_repetition:top_{n}gram" for n in (2, 3, 4)},
    **{f"duplicated_{n}_n_grams": f"gopher_repetition:dup_{n}gram" for n in range(5, 11)},
    "lorem_ipsum": "c4:lorem_ipsum", "curly_bracket": "c4:curly_bracket", "too_few_sentences": "c4:too_few_sentences",
    "line_punct_ratio": "fineweb:line_punct_ratio", "short_line_ratio": "fineweb:short_line_ratio",
    "char_dup_ratio": "fineweb:char_duplicates_ratio", "list_ratio": "fineweb:new_line_ratio", "empty": "fineweb:empty",
}
# Ours names an empty page apart; datatrove counts its zero sentences.
OUR_SYNONYMS = {"c4:no_lines_left": "c4:too_few_sentences"}


@dataclass
class Rule:
    name: str
    ours: Callable[[], Stage]
    theirs: Callable[[SharedSpacy], Callable[[str], Decision]]
    paper: Callable[[SharedSpacy], Callable[[str], Decision]] | None = None
    """datatrove given the Gopher paper's reading, where ours follows the paper instead of datatrove."""
    differences: str = "spaCy's word splitting"
    """What can still make the two decide differently: for the table."""


def quality_rule(name: str, ours: dict, theirs: dict, paper: bool = False, transform: Callable | None = None,
                 differences: str | None = None) -> Rule:
    def stock(spacy):
        return datatrove_decision(lambda: datatrove_filters.GopherQualityFilter(
            **{**THEIR_QUALITY_OFF, **theirs}, language=spacy))

    def as_the_paper(spacy):
        return datatrove_decision(lambda: datatrove_filters.GopherQualityFilter(
            **{**THEIR_QUALITY_OFF, **theirs}, language=spacy.paper_words), transform)
    return Rule(f"gopher_quality:{name}", lambda: GopherQualityFilter(**{**OUR_QUALITY_OFF, **ours}), stock,
                as_the_paper if paper else None, differences or "spaCy's word splitting")


def repetition_rule(name: str, ours: dict, theirs: dict, paper: Callable | None = None,
                    differences: str | None = None) -> Rule:
    return Rule(f"gopher_repetition:{name}", lambda: GopherRepetitionFilter(**{**OUR_REPETITION_OFF, **ours}),
                lambda spacy: datatrove_decision(lambda: datatrove_filters.GopherRepetitionFilter(
                    **{**THEIR_REPETITION_OFF, **theirs}, language=spacy)),
                paper, differences or "none expected: the same lines and paragraphs")


def fineweb_rule(name: str, ours: dict, theirs: dict, differences: str) -> Rule:
    return Rule(f"fineweb:{name}", lambda: FineWebFilter(**{**OUR_FINEWEB_OFF, **ours}),
                lambda spacy: datatrove_decision(lambda: datatrove_filters.FineWebQualityFilter(
                    **{**THEIR_FINEWEB_OFF, **theirs}, language=spacy)), None, differences)


def whole_stage(name: str, ours: Callable, theirs: Callable, paper: Callable | None = None,
                differences: str = "") -> Rule:
    return Rule(name, ours, lambda spacy: datatrove_decision(lambda: theirs(spacy)), paper, differences)


SYMBOL_RULES = "hash_word_ratio or ellipsis_word_ratio"
TOP_NGRAM_LIMITS = {2: 0.20, 3: 0.18, 4: 0.16}
DUP_NGRAM_LIMITS = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
C4_DIFFERENCES = ("sentences counted with a regex, with spaCy's sentencizer in datatrove; words in a line "
                  "counted once citation markers are out, as C4's code does (datatrove counts them before); "
                  "\"\u201d\" ends a line too (the C4 paper's end quotation mark)")
PAPER_WORDS = ("the paper counts words, datatrove also punctuation marks; then spaCy's word splitting "
               "(it cuts hyphenated numbers such as ISBNs into one word per number)")

RULES = [
    quality_rule("too_few_words", dict(min_words=50), dict(min_doc_words=50),
                 differences="spaCy's word splitting: \"don't\", \"e-mail\" and \"$5\" are two or three words there"),
    quality_rule("too_many_words", dict(max_words=100_000), dict(max_doc_words=100_000),
                 differences="none: no document here has 100,000 words"),
    quality_rule("mean_word_length", dict(min_mean_word_length=3, max_mean_word_length=10),
                 dict(min_avg_word_length=3, max_avg_word_length=10),
                 differences="spaCy's word splitting: punctuation attached to a word counts in its length here"),
    # One threshold for both symbols, in datatrove as in ours: the hash is checked first, then the ellipsis
    # (`symbol_rows` tells them apart).
    quality_rule(SYMBOL_RULES, dict(max_symbol_word_ratio=0.1),
                 dict(max_symbol_word_ratio=0.1), paper=True, differences=PAPER_WORDS),
    quality_rule("bullet_lines", dict(max_bullet_lines=0.9), dict(max_bullet_lines_ratio=0.9), paper=True,
                 transform=our_bullets_as_datatrove_bullets,
                 differences="the paper says bullet point; datatrove knows only \"-\" and \"\u2022\", not "
                             "\"*\" (Wikipedia's and Markdown's lists) or \"\u25aa\", \"\u25cf\", ..."),
    quality_rule("ellipsis_lines", dict(max_ellipsis_lines=0.3), dict(max_ellipsis_lines_ratio=0.3),
                 differences="none expected: the same lines"),
    quality_rule("alpha_words", dict(min_alpha_words=0.8), dict(max_non_alpha_words_ratio=0.8), paper=True,
                 differences=PAPER_WORDS),
    quality_rule("stop_words", dict(min_stop_words=2), dict(min_stop_words=2),
                 differences="none expected: two different ones, as whole words in lower case"),
    whole_stage("gopher_quality (all rules)", GopherQualityFilter,
                lambda spacy: datatrove_filters.GopherQualityFilter(language=spacy),
                lambda spacy: datatrove_decision(lambda: datatrove_filters.GopherQualityFilter(
                    language=spacy.paper_words), our_bullets_as_datatrove_bullets),
                "as for each rule"),
    repetition_rule("dup_paragraph_fraction", dict(max_dup_paragraph_fraction=0.3), dict(dup_para_frac=0.3)),
    repetition_rule("dup_paragraph_chars", dict(max_dup_paragraph_chars=0.2), dict(dup_para_char_frac=0.2)),
    repetition_rule("dup_line_fraction", dict(max_dup_line_fraction=0.3), dict(dup_line_frac=0.3)),
    repetition_rule("dup_line_chars", dict(max_dup_line_chars=0.2), dict(dup_line_char_frac=0.2)),
    *(repetition_rule(f"top_{n}gram", dict(max_top_ngram_chars={n: limit}), dict(top_n_grams=((n, limit),)),
                      differences="spaCy's word splitting (ours splits words and marks about as spaCy does)")
      for n, limit in TOP_NGRAM_LIMITS.items()),
    *(repetition_rule(f"dup_{n}gram", dict(max_dup_ngram_chars={n: limit}), dict(dup_n_grams=((n, limit),)),
                      paper=lambda spacy, n=n, limit=limit: paper_dup_ngram_decision(spacy, n, limit),
                      differences="the paper counts all characters of duplicate n-grams; datatrove steps n "
                                  "words past each one, leaving out up to n-1 words at the end of each "
                                  "repeated passage; then spaCy's word splitting")
      for n, limit in DUP_NGRAM_LIMITS.items()),
    whole_stage("gopher_repetition (all rules)", GopherRepetitionFilter,
                lambda spacy: datatrove_filters.GopherRepetitionFilter(language=spacy),
                differences="as for each rule"),
    whole_stage("c4, fineweb.yaml's settings", lambda: C4Filter(min_words_per_line=3, min_sentences=5,
                                                                require_terminal_punctuation=False),
                lambda spacy: datatrove_filters.C4QualityFilter(filter_no_terminal_punct=False, language=spacy),
                differences=C4_DIFFERENCES),
    whole_stage("c4, C4's own settings", C4Filter,
                lambda spacy: datatrove_filters.C4QualityFilter(min_num_sentences=3, min_words_per_line=5,
                                                                language=spacy),
                differences=C4_DIFFERENCES),
    fineweb_rule("line_punct_ratio", dict(min_line_punct_ratio=0.12), dict(line_punct_thr=0.12),
                 "none expected: Unicode's sentence terminals, datatrove's list of them"),
    fineweb_rule("short_line_ratio", dict(max_short_line_ratio=0.67), dict(short_line_thr=0.67), "none expected"),
    fineweb_rule("char_duplicates_ratio", dict(max_char_duplicates_ratio=0.01), dict(char_duplicates_ratio=0.01),
                 "none expected"),
    fineweb_rule("new_line_ratio", dict(max_new_line_ratio=0.3), dict(new_line_ratio=0.3),
                 "spaCy's word splitting (ours counts words and marks about as spaCy does)"),
    whole_stage("fineweb (all rules)", FineWebFilter, lambda spacy: datatrove_filters.FineWebQualityFilter(
        language=spacy), differences="as for each rule"),
]


@dataclass
class Outcome:
    rule: Rule
    ours: list
    theirs: list
    paper: list | None
    kinds: list[str]
    same_text: tuple[int, int] | None = None
    """For a stage that changes the text (C4): (documents both keep with the same text, both keep)."""

    def agreement(self, reference: list | None = None) -> float:
        reference = self.theirs if reference is None else reference
        return sum((a is None) == (b is None) for a, b in zip(self.ours, reference)) / len(self.ours)

    def differing(self, reference: list | None = None) -> list[int]:
        reference = self.theirs if reference is None else reference
        return [i for i, (a, b) in enumerate(zip(self.ours, reference)) if (a is None) != (b is None)]

    def same_reason(self, family: bool = False) -> tuple[int, int]:
        """(documents both drop for the same rule, documents both drop), against datatrove read as the
        paper where there is such a reading. With `family`, dup_5gram and dup_8gram are one rule."""
        reference = self.theirs if self.paper is None else self.paper
        both = [(a, b) for a, b in zip(self.ours, reference) if a is not None and b is not None]

        def name(reason: str) -> str:
            return re.sub(r"\d+gram", "ngram", reason) if family else reason
        same = sum(name(OUR_SYNONYMS.get(a, a)) == name(SAME_REASON.get(b, b)) for a, b in both)
        return same, len(both)


def symbol_rows(both: Outcome) -> list[Outcome]:
    """The hash rule and the ellipsis rule apart. Both filters check the hash first, with the same
    threshold, so the hash rule decides alone on every document; the ellipsis rule is seen on the
    documents that neither drops for hashes."""
    ours, theirs = "gopher_quality:hash_word_ratio", "gopher_too_many_hashes"

    def only(reasons: list, reason: str) -> list:
        return [r if r == reason else None for r in reasons]
    hashes = Outcome(replace(both.rule, name=ours), only(both.ours, ours), only(both.theirs, theirs),
                     only(both.paper, theirs), both.kinds)
    rest = [i for i, reasons in enumerate(zip(both.ours, both.theirs, both.paper)) if ours not in reasons
            and theirs not in reasons]

    def pick(values: list) -> list:
        return [values[i] for i in rest]
    ellipses = Outcome(replace(both.rule, name="gopher_quality:ellipsis_word_ratio"), pick(both.ours),
                       pick(both.theirs), pick(both.paper), pick(both.kinds))
    return [hashes, ellipses]


ROWS = [name for rule in RULES for name in (
    [rule.name] if rule.name != f"gopher_quality:{SYMBOL_RULES}" else
    [rule.name, "gopher_quality:hash_word_ratio", "gopher_quality:ellipsis_word_ratio"])]


def run_ours(rule: Rule, texts: list[str]) -> tuple[list, list]:
    stage = rule.ours()
    decisions, kept_texts = [], []
    for text in texts:
        result = stage(Document(text=text, id="x", source="x"))
        decisions.append(result if isinstance(result, str) else None)
        kept_texts.append(None if isinstance(result, str) else result.text)
    return decisions, kept_texts


def datatrove_decisions(texts: list[str]) -> tuple[dict[str, list[Decision]], dict[str, list[str | None]]]:
    """datatrove's decision on each text for every rule, and the paper's reason where a rule has one."""
    spacy = SharedSpacy()
    theirs = {rule.name: rule.theirs(spacy) for rule in RULES}
    paper = {rule.name: rule.paper(spacy) for rule in RULES if rule.paper}
    their_results = {name: [] for name in theirs}
    paper_results = {name: [] for name in paper}
    for text in texts:  # document by document: spaCy splits each text (and each line, for C4) once for all rules
        for name, decide in theirs.items():
            their_results[name].append(decide(text))
        for name, decide in paper.items():
            paper_results[name].append(decide(text)[0])
        spacy.forget()
    return their_results, paper_results


def in_halves(texts: list[str]) -> tuple[dict, dict]:
    """`datatrove_decisions` in two processes (spaCy is most of this module's time, on one core), each
    given the texts of one half of the characters, merged back in order."""
    from concurrent.futures import ProcessPoolExecutor

    from tests.forkserver import context

    total, running, middle = sum(map(len, texts)), 0, len(texts)
    for i, text in enumerate(texts):
        running += len(text)
        if running >= total / 2:
            middle = i + 1
            break
    with ProcessPoolExecutor(2, mp_context=context()) as pool:
        (theirs_a, paper_a), (theirs_b, paper_b) = pool.map(datatrove_decisions, [texts[:middle], texts[middle:]])
    return ({name: theirs_a[name] + theirs_b[name] for name in theirs_a},
            {name: paper_a[name] + paper_b[name] for name in paper_a})


@pytest.fixture(scope="session")
def outcomes(background_runs, real_documents) -> dict[str, Outcome]:
    """rule name -> Outcome (started when the session started, where the session runs this module:
    tests/head_start.py)."""
    from tests.head_start import finished

    return finished(background_runs, "datatrove", lambda: compare_rules(real_documents))


def compare_rules(real_documents: list[dict]) -> dict[str, Outcome]:
    """Ours and datatrove's decision on every document of the agreement corpus, rule by rule."""
    corpus = agreement_corpus(real_documents)
    texts, kinds = [t for _, t in corpus], [k for k, _ in corpus]
    their_results, paper_results = in_halves(texts)
    out = {}
    for rule in RULES:
        ours, our_texts = run_ours(rule, texts)
        their_decisions = [reason for reason, _ in their_results[rule.name]]
        outcome = Outcome(rule, ours, their_decisions, paper_results.get(rule.name), kinds)
        if rule.name.startswith("c4"):
            both = [(a, b) for a, (_, b) in zip(our_texts, their_results[rule.name]) if a is not None and b is not None]
            outcome.same_text = (sum(a == b for a, b in both), len(both))
        out[rule.name] = outcome
    for outcome in symbol_rows(out[f"gopher_quality:{SYMBOL_RULES}"]):
        out[outcome.rule.name] = outcome
    return out


def describe(outcome: Outcome, reference: list) -> str:
    differing = outcome.differing(reference)
    by_kind: dict[str, int] = {}
    for i in differing:
        by_kind[outcome.kinds[i]] = by_kind.get(outcome.kinds[i], 0) + 1
    examples = [(outcome.kinds[i], outcome.ours[i], reference[i]) for i in differing[:5]]
    return f"{outcome.rule.name}: {len(differing)} of {len(outcome.ours)} differ, by kind {by_kind}; e.g. {examples}"


# How often a rule must fire here for its agreement to mean something: most fire on hundreds of documents.
RARELY_FIRES = {"gopher_quality:too_many_words": 0,  # no document of 100,000 words
                "gopher_quality:mean_word_length": 2}  # English words are 3-10 letters long


@pytest.mark.parametrize("row", ROWS)
def test_each_rule_keeps_and_drops_the_documents_datatroves_does(outcomes, row):
    outcome = outcomes[row]
    reference = outcome.theirs if outcome.paper is None else outcome.paper
    assert outcome.agreement(reference) >= MIN_AGREEMENT, describe(outcome, reference)
    dropped = sum(reason is not None for reason in outcome.ours)  # agreeing by never firing would prove nothing
    assert RARELY_FIRES.get(row, 15) <= dropped <= len(outcome.ours) - 15, (row, dropped)


@pytest.mark.parametrize("stage", [rule.name for rule in RULES if "(" in rule.name or rule.name.startswith("c4")])
def test_where_both_drop_they_name_the_same_rule(outcomes, stage):
    """The same rule in at least 90% of them, the duplicated n-gram rules taken as one: a repeated passage
    is over the thresholds of several, and which comes first depends on how each counts. The lowest is
    Gopher quality's 95%: short lists under 50 words as we count them and over as spaCy does, where ours
    names too_few_words and datatrove goes on to bullet_lines."""
    same, both = outcomes[stage].same_reason(family=True)
    assert both > 100 and same / both >= 0.9, (stage, same, both)


@pytest.mark.parametrize("stage", ["c4, fineweb.yaml's settings", "c4, C4's own settings"])
def test_c4_leaves_the_same_text_where_both_keep_a_page(outcomes, stage):
    same, both = outcomes[stage].same_text
    assert both > 500 and same / both >= MIN_AGREEMENT, (stage, same, both)


def test_articles_with_8_percent_of_their_words_repeated_once_are_kept_by_both(real_documents):
    """The paper counts duplicates, not their originals: 8% of the words repeated once is 8% duplicated,
    under every threshold (10-15%). Counting the originals too, it was 16%, and nearly all were dropped."""
    spacy = SharedSpacy()
    ours = GopherRepetitionFilter()
    theirs = datatrove_decision(lambda: datatrove_filters.GopherRepetitionFilter(language=spacy))
    news = [normalized(d["text"]) for d in real_documents if d["source"] == "abc-news"]
    ours_kept = theirs_kept = 0
    for text in news:
        words = text.split(" ")
        length = round(len(words) * 0.08)
        repeated = " ".join(words + words[len(words) // 3:len(words) // 3 + length])
        ours_kept += isinstance(ours(Document(text=repeated, id="x", source="x")), Document)
        theirs_kept += theirs(repeated)[0] is None
    assert ours_kept >= 0.95 * len(news) and theirs_kept >= 0.95 * len(news), (ours_kept, theirs_kept, len(news))


def test_table(outcomes):
    """The agreement of every rule, as a markdown table (run with -s to see it)."""
    lines = ["| rule | documents | dropped: ours / datatrove | agreement with datatrove | "
             "with datatrove read as the paper | both drop: same rule | differences |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in ROWS:
        outcome, rule = outcomes[row], outcomes[row].rule
        ours_dropped = sum(r is not None for r in outcome.ours)
        theirs_dropped = sum(r is not None for r in outcome.theirs)
        paper = f"{100 * outcome.agreement(outcome.paper):.2f}%" if outcome.paper is not None else ""
        same_rule = ""
        if "(" in rule.name or rule.name.startswith("c4"):
            (same, both), (same_family, _) = outcome.same_reason(), outcome.same_reason(family=True)
            same_rule = f"{same}/{both}" + (f" ({same_family} as n-gram rules)" if same_family != same else "")
        if outcome.same_text is not None:
            same_rule += f"; same text kept {outcome.same_text[0]}/{outcome.same_text[1]}"
        lines.append(f"| {rule.name} | {len(outcome.ours)} | {ours_dropped} / {theirs_dropped} | "
                     f"{100 * outcome.agreement():.2f}% | {paper} | {same_rule} | {rule.differences} |")
    kinds: dict[str, int] = {}
    for kind in next(iter(outcomes.values())).kinds:
        kinds[kind] = kinds.get(kind, 0) + 1
    print("\n\ndocuments:", ", ".join(f"{count} {kind}" for kind, count in kinds.items()))
    print("\n".join(lines))
