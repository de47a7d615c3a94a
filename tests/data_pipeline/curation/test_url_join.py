"""The WebText join on its own: a page finds its URL's record however the URL is spelled, or through
the redirects that led to it; the best karma wins; a bad URL list is refused naming the line."""

from __future__ import annotations

import json

import pytest

from data_pipeline.curation.config import CurationConfig, CurationConfigError
from data_pipeline.curation.document import Document
from data_pipeline.curation.url_join import UrlMetadata
from data_pipeline.readers import InputError


def url_list(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def page(url: str, **metadata) -> Document:
    return Document("text", "id", "crawl.warc.gz:1", {"url": url, **metadata})


@pytest.fixture
def listed(tmp_path) -> str:
    return url_list(tmp_path / "urls.jsonl", [
        {"url": "https://news.example.com/a", "score": 40, "submissions": 2, "first_created_utc": 100},
        {"url": "http://short.example/x", "score": 5, "submissions": 1, "first_created_utc": 300},
        {"url": "https://news.example.com/c", "score": 3, "submissions": 1, "first_created_utc": 200},
    ])


@pytest.mark.parametrize("prepared", [False, True])
def test_pages_are_joined_by_normalized_url_and_through_redirects(tmp_path, listed, prepared):
    settings = {"urls_file": listed}
    if prepared:  # as the executor runs it: the index built once, memory-mapped by each worker
        settings = UrlMetadata.prepare(settings, tmp_path)
    join = UrlMetadata(**settings)
    joined = join(page("HTTPS://News.Example.com:443/a?utm_source=x#top"))
    assert {k: joined.metadata[k] for k in ("score", "submissions", "first_created_utc")} == {
        "score": 40, "submissions": 2, "first_created_utc": 100}
    through = join(page("https://news.example.com/c", redirected_from=["http://short.example/x"]))
    assert through.metadata["score"] == 5  # the redirect's link has more karma than the page's own
    assert join(page("https://elsewhere.example/")) == "metadata:not_in_url_list"
    assert join(page("http://[bad/")) == "metadata:not_in_url_list"
    assert join.stats.dropped == {"metadata:not_in_url_list": 2}


def test_an_empty_url_list_keeps_nothing(tmp_path):
    join = UrlMetadata(url_list(tmp_path / "urls.jsonl", []))
    assert join(page("https://news.example.com/a")) == "metadata:not_in_url_list"


def test_a_bad_url_list_or_a_missing_one_is_refused_naming_it(tmp_path, listed):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(listed).read() + '{"url": "https://x.example/", "score": "many"}\n')
    with pytest.raises(InputError, match=rf"{bad}:4: not a URL-list record"):
        UrlMetadata(str(bad))(page("https://x.example/"))
    config = CurationConfig.from_dict({"stages": ["normalize", {"metadata": {"field": "score", "min": 3}}]})
    with pytest.raises(CurationConfigError, match="url_metadata.urls_file: .*absent.jsonl does not exist"):
        config.with_url_metadata(str(tmp_path / "absent.jsonl"))
    joined = config.with_url_metadata(listed)
    assert [name for name, _ in joined.stages] == ["url_metadata", "normalize", "metadata"]
