"""URL normalization and link classification for the WebText URL list."""

from __future__ import annotations

import random

import pytest

from data_pipeline.webtext.urls import classify_link, is_media_link, is_reddit_host, is_wikipedia_host, normalize_url


@pytest.mark.parametrize("url, normalized", [
    # scheme and host lower-case; the path keeps its case
    ("HTTP://WWW.Example.COM/News/Story", "http://www.example.com/News/Story"),
    # default ports dropped, other ports kept; an empty port is no port
    ("http://example.com:80/a", "http://example.com/a"),
    ("https://example.com:443/a", "https://example.com/a"),
    ("http://example.com:443/a", "http://example.com:443/a"),
    ("https://example.com:80/a", "https://example.com:80/a"),
    ("http://example.com:8080/a", "http://example.com:8080/a"),
    ("http://example.com:/a", "http://example.com/a"),
    # an empty path becomes /
    ("https://example.com", "https://example.com/"),
    ("https://example.com?q=1", "https://example.com/?q=1"),
    # fragments dropped
    ("https://example.com/a#section-2", "https://example.com/a"),
    ("https://example.com/#!/status/1", "https://example.com/"),
    # tracking parameters removed, the others kept in their order and spelling
    ("https://example.com/a?utm_source=reddit&id=7&UTM_Medium=social&b=x%20y&fbclid=AbC&gclid=1&c=",
     "https://example.com/a?id=7&b=x%20y&c="),
    ("https://example.com/a?z=1&utm_campaign=x&a=2", "https://example.com/a?z=1&a=2"),
    ("https://example.com/a?utm_source=reddit", "https://example.com/a"),
    ("https://example.com/a?", "https://example.com/a"),
    ("https://example.com/a?&&x=1&&", "https://example.com/a?x=1"),
    ("https://example.com/a?utm=1&myutm_source=2", "https://example.com/a?utm=1&myutm_source=2"),
    # internationalized and upper-case hosts: lower-case ASCII (punycode); the path is left as is
    ("https://MÜNCHEN.example/Straße", "https://xn--mnchen-3ya.example/Straße"),
    ("https://XN--MNCHEN-3YA.example/", "https://xn--mnchen-3ya.example/"),
    ("http://例え.テスト/", "http://xn--r8jz45g.xn--zckzah/"),
    # percent-encoding, dot segments and user information left as they are
    ("https://example.com/%7Euser/../a%2fb", "https://example.com/%7Euser/../a%2fb"),
    ("https://User:Pass@Example.com/", "https://User:Pass@example.com/"),
    # IPv6 literals keep their brackets
    ("http://[2001:DB8::1]:80/x", "http://[2001:db8::1]/x"),
    ("http://[2001:db8::1]:8080", "http://[2001:db8::1]:8080/"),
    # surrounding whitespace ignored; http and https stay distinct
    ("  https://example.com/a \n", "https://example.com/a"),
    ("https://example.com/a #top", "https://example.com/a"),
    ("https://example.com/a ?utm_source=x", "https://example.com/a"),
    ("https://example.com/?a=1 &utm_source=x", "https://example.com/?a=1"),
    ("http://example.com/a", "http://example.com/a"),
])
def test_normalize_url(url, normalized):
    assert normalize_url(url) == normalized
    assert normalize_url(normalized) == normalized  # idempotent: the curation join normalizes our output again


@pytest.mark.parametrize("url", [
    "http://[bad/", "http://[::1/", "http://example.com:99999/", "http://example.com:port/", "http://",
    "http:///path", "http://exa mple.com/", "http://a..b/", "http://example.com/a\tb", "http://example.com/\x00",
    "https://example.com/\ud800", "http://%65xample.com/",
])
def test_malformed_urls_are_none(url):
    assert normalize_url(url) is None
    assert classify_link(url) == (None, "malformed_url")


@pytest.mark.parametrize("url", ["ftp://example.com/file", "mailto:someone@example.com", "javascript:alert(1)",
                                 "www.example.com/page", "/r/python", "data:text/plain,hi"])
def test_other_schemes_are_none(url):
    assert normalize_url(url) is None
    assert classify_link(url) == (None, "not_http")


def test_wikipedia_hosts():
    assert is_wikipedia_host("en.wikipedia.org") and is_wikipedia_host("en.m.wikipedia.org")
    assert is_wikipedia_host("wikipedia.org") and is_wikipedia_host("DE.Wikipedia.ORG.")
    assert not is_wikipedia_host("wikipedia.org.example.com") and not is_wikipedia_host("notwikipedia.org")
    assert not is_wikipedia_host("en.wiktionary.org")


def test_reddit_hosts():
    for host in ("reddit.com", "www.reddit.com", "old.reddit.com", "np.reddit.com", "redd.it", "i.redd.it",
                 "v.redd.it", "i.reddituploads.com", "a.thumbs.redditmedia.com"):
        assert is_reddit_host(host), host
    assert not is_reddit_host("notreddit.com") and not is_reddit_host("reddit.com.example.net")


def test_media_links():
    assert is_media_link("i.imgur.com", "/abc") and is_media_link("youtu.be", "/x")
    assert is_media_link("clips.twitch.tv", "/c") and is_media_link("I.IMGUR.COM", "/abc")
    assert is_media_link("example.com", "/cat.JPG") and is_media_link("example.com", "/v/clip.mp4")
    assert not is_media_link("example.com", "/story.html") and not is_media_link("example.com", "/jpg")
    assert not is_media_link("example.com", "/a.jpg/page")


@pytest.mark.parametrize("url, keep_wikipedia, keep_media, expected", [
    ("https://Example.com/story?utm_source=x", False, False, ("https://example.com/story", None)),
    ("https://www.reddit.com/r/python/comments/abc/x/", False, False, (None, "reddit")),
    ("https://i.redd.it/abc.jpg", True, True, (None, "reddit")),
    ("https://en.wikipedia.org/wiki/GPT-2", False, False, (None, "wikipedia")),
    ("https://en.wikipedia.org/wiki/GPT-2", True, False, ("https://en.wikipedia.org/wiki/GPT-2", None)),
    ("https://upload.wikimedia.org/x.png", True, False, (None, "media")),
    ("https://imgur.com/gallery/abc", False, False, (None, "media")),
    ("https://imgur.com/gallery/abc", False, True, ("https://imgur.com/gallery/abc", None)),
    ("https://www.youtube.com/watch?v=abc&feature=share", False, False, (None, "media")),
    ("https://example.com/photo.png", False, False, (None, "media")),
])
def test_classify_link(url, keep_wikipedia, keep_media, expected):
    assert classify_link(url, keep_wikipedia, keep_media) == expected


def test_normalization_is_idempotent_on_random_urls():
    """The curation join normalizes the list's URLs again: a second pass must change nothing."""
    rng = random.Random(0)
    pieces = ["http", "://", ":", "/", "//", "?", "#", "&", "=", "@", "[", "]", ".", "..", "%2F", "utm_source",
              "fbclid", "Example", "COM", "münchen", "ß", "443", "80", " ", "\u00a0", "a", "b", "-", "_", "~", "::1"]
    checked = 0
    for _ in range(50_000):
        url = rng.choice(["http://", "HTTPS://", "https://x"]) + "".join(rng.choices(pieces, k=rng.randrange(1, 12)))
        normalized = normalize_url(url)
        if normalized is not None:
            checked += 1
            assert normalize_url(normalized) == normalized, url
    assert checked > 500
