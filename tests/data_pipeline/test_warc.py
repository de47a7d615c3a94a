"""WARC and WET inputs: real news articles served as web pages, extracted back to their text,
with every record that yields no text reported by file and record number."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.curation.pipeline import CurationConfig, curate
from data_pipeline.readers import chunk_documents, chunk_records, iter_chunks, read_jsonl, resolve_inputs
from data_pipeline.sample_text import html_page, news_articles, write_web_archive

BOILERPLATE = ("Subscribe now", "Related stories", "All rights reserved", "Privacy policy", "Example News")
EMPTY_PAGE = b"<html><head><script>var x = 1;</script></head><body></body></html>"


def page(document: dict) -> tuple[str, str, bytes]:
    return f"https://news.example.com/{document['id']}", "text/html; charset=utf-8", html_page(document).encode()


@pytest.fixture(scope="module")
def articles() -> list[dict]:
    return list(news_articles())[:60]


@pytest.fixture(scope="module")
def crawl(tmp_path_factory, articles) -> Path:
    """60 article pages, with an image at document record 11 and a page without text at record 31."""
    pages = [page(d) for d in articles]
    pages.insert(10, ("https://news.example.com/logo.png", "image/png", b"\x89PNG\r\n\x1a\n" + bytes(64)))
    pages.insert(30, ("https://news.example.com/blank", "text/html", EMPTY_PAGE))
    return write_web_archive(tmp_path_factory.mktemp("warc") / "crawl.warc.gz", pages)


def all_records(path: Path, start_record: int = 0):
    records, numbers, skipped = [], [], []
    for chunk in iter_chunks(str(path), 0, "text", start_record=start_record, chunk_bytes=20_000, whole_records=True):
        r, n, s = chunk_records(chunk, "text")
        records, numbers, skipped = records + r, numbers + n, skipped + s
    return records, numbers, skipped


def test_pages_in_a_warc_become_their_article_text_without_the_site_around_it(crawl, articles):
    records, numbers, _ = all_records(crawl)
    assert len(records) == len(articles)
    for record, article in zip(records, articles):
        title, *body = record["text"].split("\n")
        assert " ".join(body).split() == article["text"].split()  # every word of the article, in order
        assert not any(junk in record["text"] for junk in BOILERPLATE)
        assert record["url"] == f"https://news.example.com/{article['id']}"
        assert record["id"].startswith("<urn:uuid:") and record["date"]
    assert len({r["id"] for r in records}) == len(records)
    # request and warcinfo records are not documents: numbering counts responses only
    assert numbers == [n for n in range(len(articles) + 2) if n not in (10, 30)]


def test_records_without_text_are_reported_by_file_and_record_with_what_they_held(crawl):
    _, _, skipped = all_records(crawl)
    assert [(s.file, s.line, s.reason) for s, _ in skipped] == [
        (str(crawl), 11, "not_html"), (str(crawl), 31, "no_extractable_text")]
    (image, image_raw), (blank, blank_raw) = skipped
    assert "image/png" in image.detail and image_raw is None  # a binary payload is not kept as text
    assert "https://news.example.com/blank" in blank.detail and blank_raw == EMPTY_PAGE.decode()


def test_reading_resumes_at_a_record_number(crawl):
    records, numbers, _ = all_records(crawl)
    later, later_numbers, skipped = all_records(crawl, start_record=20)
    assert later_numbers == [n for n in numbers if n >= 20]
    assert [r["text"] for r in later] == [r["text"] for r, n in zip(records, numbers) if n >= 20]
    assert [s.line for s, _ in skipped] == [31]


def test_wet_conversion_records_are_taken_as_they_are(tmp_path, articles):
    wet = write_web_archive(tmp_path / "crawl.warc.wet.gz",
                            [(u, "text/plain", d["text"].encode()) for d, (u, _, _) in zip(articles, map(page, articles))],
                            wet=True)
    assert resolve_inputs([str(tmp_path)]) == [str(wet)]
    texts, numbers, skipped = [], [], []
    for chunk in iter_chunks(str(wet), 0, "text"):
        t, n, s = chunk_documents(chunk, "text")
        texts, numbers, skipped = texts + t, numbers + n, skipped + s
    assert texts == [d["text"] for d in articles] and numbers == list(range(len(articles))) and not skipped


def test_curating_a_crawl_keeps_or_removes_every_document_record(tmp_path, crawl, articles):
    """The crawl, a WET holding the text of 5 of its pages again, and a Wikipedia page: the WET copies
    are exact duplicates of the extracted pages, and every document record is kept or removed."""
    extracted, _, _ = all_records(crawl)
    wet = write_web_archive(tmp_path / "copies.warc.wet.gz",
                            [(r["url"], "text/plain", r["text"].encode()) for r in extracted[:5]], wet=True)
    wiki = {"id": "wiki", "title": "Hill Top", "text": articles[0]["text"]}
    warc = write_web_archive(tmp_path / "wiki.warc", [("https://en.wikipedia.org/wiki/Hill_Top", "text/html",
                                                        html_page(wiki).encode())])
    config = CurationConfig.from_dict({"stages": ["normalize", {"url": {"remove_wikipedia": True}}, "exact_dedup"]})
    stats = curate([str(crawl), str(wet), str(warc)], tmp_path / "out", config, show_progress=False)
    assert stats["read"] == len(articles) + 2 + 5 + 1 == stats["kept"] + stats["removed"]
    kept = [r for p in sorted((tmp_path / "out" / "documents").glob("*.jsonl.zst")) for r in read_jsonl(p)]
    removed = [r for p in sorted((tmp_path / "out" / "removed").glob("*.jsonl.zst")) for r in read_jsonl(p)]
    assert [r["url"] for r in kept] == [page(d)[0] for d in articles]
    assert sorted(r["reason"] for r in removed) == sorted(
        ["input:not_html", "input:no_extractable_text", "url:wikipedia"] + ["exact_dedup:duplicate"] * 5)
    copies = [r for r in removed if r["reason"] == "exact_dedup:duplicate"]
    assert [c["duplicate_of"] for c in copies] == [r["id"] for r in extracted[:5]]
    renamed = CurationConfig.from_dict({"id_key": "doc_id", "stages": ["normalize"]})
    curate([str(crawl)], tmp_path / "renamed", renamed, show_progress=False)
    assert [r["doc_id"] for r in read_jsonl(tmp_path / "renamed" / "documents" / "00000.jsonl.zst")] == [
        r["id"] for r in extracted]  # the WARC record id under the configured id_key
    assert [r["source"] for r in removed if r["reason"].startswith("input:")] == [f"{crawl}:11", f"{crawl}:31"]


@pytest.mark.parametrize("compressed", [True, False])
def test_a_cut_or_corrupt_archive_reports_where_it_breaks_and_keeps_what_came_before(tmp_path, articles, compressed):
    """Cuts at many points: each gives the pages before it intact, and either a truncated_stream record or,
    where the cut falls between records (a valid shorter archive), nothing to report."""
    import gzip

    suffix = ".warc.gz" if compressed else ".warc"
    whole = write_web_archive(tmp_path / f"whole{suffix}", [page(d) for d in articles[:20]])
    data = whole.read_bytes()
    expected, _, _ = all_records(whole)
    reported = 0
    for cut in range(200, len(data), len(data) // 40):
        damaged = tmp_path / f"cut{suffix}"
        damaged.write_bytes(data[:cut])
        records, _, skipped = all_records(damaged)
        assert [r["text"] for r in records] == [r["text"] for r in expected[:len(records)]]
        if skipped:
            [(problem, _)] = skipped
            assert (problem.reason, problem.line) == ("truncated_stream", len(records) + 1), problem
            reported += 1
        else:  # only a shorter but valid archive may end without a report
            body = gzip.decompress(data[:cut]) if compressed else data[:cut]
            assert body.endswith((b"</html>\n", b"\r\n")), body[-40:]
    assert reported >= 30
    corrupt = tmp_path / f"corrupt{suffix}"
    corrupt.write_bytes(data[:len(data) // 2] + b"\x00garbage" * 50 + data[len(data) // 2:])
    records, _, skipped = all_records(corrupt)
    assert 0 < len(records) < len(expected) and [s.reason for s, _ in skipped] == ["truncated_stream"]


def test_an_archive_cut_in_the_first_bytes_of_a_gzip_member_is_counted_as_cut_not_refused(tmp_path, articles):
    """One or two bytes of a member's header read as "Not a gzipped file"; after whole members that is a
    file cut short (counted), not a file in the wrong format (refused). Every member boundary is tried."""
    import zlib

    whole = write_web_archive(tmp_path / "whole.warc.gz", [page(d) for d in articles[:3]])
    data, boundaries = whole.read_bytes(), []
    rest = data
    while rest:
        member = zlib.decompressobj(wbits=31)
        member.decompress(rest)
        rest = member.unused_data
        boundaries.append(len(data) - len(rest))
    assert len(boundaries) == 7  # warcinfo, then a request and a response per page
    for boundary in boundaries[:-1]:
        for extra in (1, 2):
            damaged = tmp_path / "cut.warc.gz"
            damaged.write_bytes(data[:boundary + extra])
            records, _, skipped = all_records(damaged)
            assert [(s.reason, s.line) for s, _ in skipped] == [("truncated_stream", len(records) + 1)]


def test_http_transfer_and_content_encodings_are_undone_before_extraction(tmp_path, articles):
    """Crawlers that keep the raw HTTP body store chunked and gzipped pages; trailers after the last chunk
    are not damage."""
    import gzip
    from io import BytesIO

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    html = html_page(articles[0]).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(html[i:i + 700]), html[i:i + 700]) for i in range(0, len(html), 700))
    bodies = [([("Transfer-Encoding", "chunked")], chunked + b"0\r\n\r\n\r\n"),
              ([("Content-Encoding", "gzip")], gzip.compress(html))]
    path = tmp_path / "raw-http.warc.gz"
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for headers, body in bodies:
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html"), *headers], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record("https://news.example.com/a", "response",
                                                          payload=BytesIO(body), http_headers=http))
    records, _, skipped = all_records(path)
    expected, _, _ = all_records(write_web_archive(tmp_path / "plain.warc", [page(articles[0])]))
    assert not skipped and [r["text"] for r in records] == [expected[0]["text"]] * 2


def test_http_errors_are_removed_plain_text_is_kept_and_redirects_are_followed(tmp_path, articles):
    """A 404 page is not a document; a text/plain response is; a page reached through redirects knows
    the URLs that led to it, nearest first."""
    plain = articles[2]["text"]
    crawl = write_web_archive(tmp_path / "crawl.warc.gz", [
        page(articles[0])[:2] + (b"<html><body>Not found</body></html>", "404 Not Found"),
        ("http://short.example/a", "text/html", b"", "301 Moved Permanently", [("Location", "http://short.example/b")]),
        ("http://short.example/b", "text/html", b"", "302 Found", [("Location", "/final")]),
        page(articles[1])[:1] + ("text/html",) + page(articles[1])[2:],
        ("http://short.example/final",) + page(articles[3])[1:],
        ("https://plain.example/notes.txt", "text/plain; charset=utf-8", plain.encode()),
    ])
    records, numbers, skipped = all_records(crawl)
    assert [(s.line, s.reason) for s, _ in skipped] == [(1, "http_status"), (2, "http_status"), (3, "http_status")]
    assert "answered HTTP 404" in skipped[0][0].detail
    assert skipped[1][0].detail.endswith("answered HTTP 301; a redirect to http://short.example/b")
    assert [r["url"] for r in records] == [page(articles[1])[0], "http://short.example/final",
                                           "https://plain.example/notes.txt"]
    assert "redirected_from" not in records[0]
    assert records[1]["redirected_from"] == ["http://short.example/b", "http://short.example/a"]
    assert records[2]["text"] == plain and articles[3]["text"][:200] in records[1]["text"]


def test_several_redirects_to_one_page_are_all_remembered(tmp_path, articles):
    crawl = write_web_archive(tmp_path / "crawl.warc.gz", [
        ("http://a.example/x", "text/html", b"", "301 Moved Permanently", [("Location", "https://news.example.com/c")]),
        ("http://b.example/y", "text/html", b"", "302 Found", [("Location", "https://news.example.com/c")]),
        ("https://news.example.com/c",) + page(articles[0])[1:],
    ])
    [record], _, _ = all_records(crawl)
    assert record["redirected_from"] == ["http://a.example/x", "http://b.example/y"]
