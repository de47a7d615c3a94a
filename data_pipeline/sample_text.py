"""Real English text that ships inside a pip package, for the demo, tests and benchmarks.

The `gensim` wheel carries, as its own test data, 300 ABC news articles
(lee_background.cor, one article per line) and 206 English Wikipedia pages
(a shortened enwiki dump, CC BY-SA). No package ships a web crawl, so these two
stand in for one.
"""

from __future__ import annotations

import bz2
import json
from pathlib import Path
from typing import Iterator


def gensim_test_data() -> Path:
    import gensim

    return Path(gensim.__file__).parent / "test" / "test_data"


def news_articles() -> Iterator[dict]:
    path = gensim_test_data() / "lee_background.cor"
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f):
            text = line.strip()
            if text:
                yield {"id": f"lee-{number}", "source": "abc-news", "text": text}


def wikipedia_pages(min_chars: int = 200) -> Iterator[dict]:
    """Wikipedia pages as plain text (gensim strips the wiki markup); redirects dropped."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = next(gensim_test_data().glob("enwiki-latest-pages-articles*-shortened.bz2"))
    with bz2.open(path) as f:
        for title, markup, page_id in extract_pages(f):
            text = "\n".join(line.strip() for line in filter_wiki(markup).splitlines())
            text = text.strip()
            if len(text) >= min_chars:
                yield {"id": f"enwiki-{page_id}", "source": "wikipedia", "title": title, "text": text}


def real_documents() -> list[dict]:
    """All the real documents: news articles first, then Wikipedia pages."""
    return list(news_articles()) + list(wikipedia_pages())


def write_jsonl(path: str | Path, documents: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for document in documents:
            f.write(json.dumps(document, ensure_ascii=False) + "\n")
    return path
