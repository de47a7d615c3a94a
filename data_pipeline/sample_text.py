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


def html_page(document: dict) -> str:
    """A document as a news site would serve it: its text in <article> paragraphs among
    navigation, related links and a footer, which extraction must leave out."""
    import re
    from html import escape

    sentences = [s for s in re.split(r"(?<=[.!?])\s+", document["text"].replace("\n", " ")) if s.strip()]
    paragraphs = [" ".join(sentences[i:i + 3]) for i in range(0, len(sentences), 3)]
    title = escape(document.get("title") or sentences[0][:60])
    body = "\n".join(f"<p>{escape(p)}</p>" for p in paragraphs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title} | Example News</title></head>
<body>
<header><nav><ul><li><a href="/">Home</a></li><li><a href="/world">World</a></li>
<li><a href="/sport">Sport</a></li><li><a href="/subscribe">Subscribe now</a></li></ul></nav></header>
<main><article><h1>{title}</h1>
{body}
</article></main>
<aside><h2>Related stories</h2><ul><li><a href="/a">Markets close higher</a></li>
<li><a href="/b">Weather warning issued</a></li></ul></aside>
<footer><p>Copyright Example News Network. All rights reserved.</p><a href="/privacy">Privacy policy</a></footer>
</body></html>
"""


def write_web_archive(path: str | Path, pages: list[tuple], wet: bool = False) -> Path:
    """A gzipped WARC of HTTP responses (url, content type, body[, status line[, more headers]]), as a
    crawler writes it (status "200 OK" by default), or with `wet` a WET file of conversion records (the
    body is the page's text)."""
    from io import BytesIO

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=str(path).endswith(".gz"))
        writer.write_record(writer.create_warcinfo_record(path.name, {"software": "gpt2-slurm sample_text"}))
        for url, content_type, body, *answer in pages:
            if wet:
                record = writer.create_warc_record(url, "conversion", payload=BytesIO(body),
                                                   warc_content_type="text/plain")
            else:
                status, headers = (answer + ["200 OK"])[0], (answer[1:] or [[]])[0]
                http = StatusAndHeaders(status, [("Content-Type", content_type), *headers], protocol="HTTP/1.1")
                writer.write_record(writer.create_warc_record(url, "request", payload=BytesIO(b"GET / HTTP/1.1\r\n\r\n"),
                                                              warc_content_type="application/http; msgtype=request"))
                record = writer.create_warc_record(url, "response", payload=BytesIO(body), http_headers=http)
            writer.write_record(record)
    return path
