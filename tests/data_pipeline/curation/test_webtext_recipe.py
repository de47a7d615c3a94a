"""GPT-2's WebText recipe end to end on real text: a Pushshift dump (long-window zstd) -> the URL list
(tools/reddit_urls.py) -> a crawl of it (a WARC with a redirect, a 404, a PDF, a low-karma link, a
page nobody linked and a mirror) -> tools/curate.py with configs/data/webtext.yaml and --url-metadata.
Every page is kept or removed, and for the reason the recipe gives."""

from __future__ import annotations

import json

import pytest

from data_pipeline.readers import read_jsonl
from data_pipeline.sample_text import html_page, news_articles, write_web_archive
from tests.conftest import REPO, run_tool
from tests.data_pipeline.test_readers import long_window_zstd

pytestmark = pytest.mark.slow


def submission(url: str, score: int, created: int, **fields) -> dict:
    return {"url": url, "score": score, "is_self": False, "over_18": False, "subreddit": "news",
            "created_utc": created, "domain": url.split("/")[2], **fields}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("webtext")
    articles = [a for a in news_articles() if len(a["text"].split()) > 250][:6]
    html = [html_page(a).encode() for a in articles]
    dump = [
        submission("https://news.example.com/a?utm_source=reddit", 12, 1_500_000_100),
        submission("https://NEWS.example.com:443/a", 40, 1_500_000_000),  # the same link, spelled otherwise
        submission("http://short.example/x", 5, 1_500_000_200),  # redirects to /c in the crawl
        submission("https://news.example.com/gone", 7, 1_500_000_300),  # 404 in the crawl
        submission("https://files.example.com/report.pdf", 9, 1_500_000_400),
        submission("https://news.example.com/meh", 2, 1_500_000_500),  # under 3 karma
        submission("https://mirror.example.org/a-copy", 4, 1_500_000_600),  # the text of /a again
        submission("https://news.example.com/d", 3, 1_500_000_700),
        {"title": "a self post", "is_self": True, "url": "https://www.reddit.com/r/news/comments/1", "score": 99,
         "created_utc": 1_500_000_800},
    ]
    (root / "RS_2017-07.zst").write_bytes(long_window_zstd("".join(json.dumps(s) + "\n" for s in dump).encode()))
    crawl = write_web_archive(root / "crawl" / "part-000.warc.gz", [
        ("https://news.example.com/a", "text/html", html[0]),
        ("http://short.example/x", "text/html", b"", "301 Moved Permanently",
         [("Location", "https://news.example.com/c")]),
        ("https://news.example.com/c", "text/html", html[1]),
        ("https://news.example.com/gone", "text/html", b"<html><body>Not found</body></html>", "404 Not Found"),
        ("https://files.example.com/report.pdf", "application/pdf", b"%PDF-1.4 " + bytes(100)),
        ("https://news.example.com/meh", "text/html", html[2]),
        ("https://unlinked.example.net/", "text/html", html[3]),
        ("https://mirror.example.org/a-copy", "text/html", html[0]),
        ("https://news.example.com/d#comments", "text/html", html[4]),
    ])
    urls = run_tool("reddit_urls.py", "--input", str(root / "RS_*.zst"), "--output", str(root / "urls.jsonl"),
                    "--quiet")
    assert urls.returncode == 0, urls.stderr
    curated = run_tool("curate.py", "--config", str(REPO / "configs" / "data" / "webtext.yaml"), "--input",
                       str(crawl), "--url-metadata", str(root / "urls.jsonl"), "--output", str(root / "out"),
                       "--workers", "1", "--quiet")
    assert curated.returncode == 0, curated.stderr
    return root


def test_the_url_list_holds_each_outbound_link_once_with_its_best_karma(recipe):
    listed = {r["url"]: r for r in read_jsonl(recipe / "urls.jsonl")}
    assert listed["https://news.example.com/a"] == {"url": "https://news.example.com/a", "score": 40,
                                                     "submissions": 2, "first_created_utc": 1_500_000_000}
    assert "https://news.example.com/meh" not in listed and not any("reddit.com" in u for u in listed)


def test_pages_are_kept_or_removed_for_the_recipes_reasons(recipe):
    out = recipe / "out"
    kept = {r["url"]: r for r in read_jsonl(out / "documents" / "00000.jsonl.zst")}
    removed = {r.get("url") or r["source"]: r for p in sorted((out / "removed").glob("*.jsonl.zst"))
               for r in read_jsonl(p)}
    assert sorted(kept) == ["https://news.example.com/a", "https://news.example.com/c",
                            "https://news.example.com/d#comments"]
    assert kept["https://news.example.com/a"]["score"] == 40
    assert kept["https://news.example.com/c"]["score"] == 5  # joined through the redirect
    assert kept["https://news.example.com/c"]["redirected_from"] == ["http://short.example/x"]
    reasons = {url: r["reason"] for url, r in removed.items()}
    crawl = str(recipe / "crawl" / "part-000.warc.gz")
    assert reasons == {
        f"{crawl}:2": "input:http_status",  # the redirect itself
        f"{crawl}:4": "input:http_status",
        f"{crawl}:5": "input:not_html",
        "https://news.example.com/meh": "metadata:not_in_url_list",
        "https://unlinked.example.net/": "metadata:not_in_url_list",
        "https://mirror.example.org/a-copy": "exact_dedup:duplicate",
    }
    assert removed["https://mirror.example.org/a-copy"]["duplicate_of"] == kept["https://news.example.com/a"]["id"]
    # looked up before extraction: an unlisted page is removed with its URL, its HTML never extracted
    assert "text" not in removed["https://unlinked.example.net/"] and removed["https://unlinked.example.net/"]["id"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["stages"]["url_metadata"]["dropped"] == {"metadata:not_in_url_list": 2}
    assert stats["stages"]["input"]["dropped"] == {"input:http_status": 2, "input:not_html": 1}
    assert stats["read"] == 9 and stats["kept"] == 3
