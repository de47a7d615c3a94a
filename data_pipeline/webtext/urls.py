"""URL normalization and link classification for the WebText URL list.

`normalize_url` gives every spelling of a link one form, so that duplicate submissions merge and
crawled pages can be joined to the list (data_pipeline/curation/url_join.py applies it to page
URLs). The rules, in order:

- leading and trailing whitespace is stripped (also where a dropped fragment or tracking parameter
  leaves the URL's end); a URL with a control character inside, a lone surrogate, an unparsable
  authority (`http://[bad/`, a port that is not a number in 0-65535) or an empty or invalid host
  (a space, `%`, an empty label) is malformed (None);
- only http and https are kept (other schemes, and URLs without one, give None); the scheme is
  lower-cased, and http and https stay distinct: they are different resources (RFC 3986), a site
  may serve different pages on each, and the list is fetched as written, so merging them would
  have to invent a URL the submitter never linked;
- the host is lower-cased, and an internationalized host is written in its ASCII (punycode) form,
  as a crawler sends it and records it in WARC-Target-URI (Python's IDNA 2003 codec); IPv6
  literals keep their brackets;
- the default port (:80 for http, :443 for https) and an empty port are dropped;
- user information, the path and the query are kept character for character: percent-encoding,
  case, dot segments and non-ASCII characters are left as they are; an empty path becomes `/`;
- tracking parameters (`utm_*`, `fbclid`, `gclid` and the others in TRACKING_PARAMETERS, names
  compared case-insensitively) and empty `&&` pieces are removed from the query; the other
  parameters keep their order and spelling; a query left empty loses its `?`;
- the fragment is dropped: it never reaches the server, so it names the same page.

The rules are idempotent: normalize_url(normalize_url(u)) == normalize_url(u).
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import urlsplit

# Query parameters that only tell the target site where a click came from.
TRACKING_PARAMETERS = frozenset({
    "fbclid", "gclid", "gclsrc", "dclid", "msclkid", "yclid", "igshid", "mc_cid", "mc_eid",
    "_hsenc", "_hsmi", "mkt_tok",
})
TRACKING_PREFIXES = ("utm_",)

# Reddit's own domains: submissions that link back into Reddit or to its image and video hosting.
REDDIT_DOMAINS = frozenset({
    "reddit.com", "redd.it", "redditmedia.com", "reddituploads.com", "redditstatic.com",
    "redditblog.com", "redditinc.com",
})
WIKIPEDIA_DOMAINS = frozenset({"wikipedia.org"})
# Image, video and audio hosts: pages with little or no text. Subdomains match too (i.imgur.com).
MEDIA_DOMAINS = frozenset({
    # images
    "imgur.com", "gfycat.com", "giphy.com", "flickr.com", "flic.kr", "staticflickr.com", "instagram.com",
    "cdninstagram.com", "tinypic.com", "photobucket.com", "imgflip.com", "gyazo.com", "puu.sh", "prnt.sc",
    "prntscr.com", "imageshack.us", "imgbox.com", "postimg.cc", "ibb.co", "twimg.com", "media.tumblr.com",
    "redgifs.com", "pinterest.com", "pinimg.com",
    # video
    "youtube.com", "youtu.be", "youtube-nocookie.com", "ytimg.com", "vimeo.com", "dailymotion.com", "dai.ly",
    "streamable.com", "twitch.tv", "liveleak.com", "vid.me", "vine.co", "tiktok.com", "streamja.com",
    # audio
    "soundcloud.com", "spotify.com", "mixcloud.com",
})
MEDIA_EXTENSIONS = frozenset({
    "jpg", "jpeg", "png", "gif", "gifv", "webp", "bmp", "tif", "tiff", "svg", "heic", "avif",
    "mp4", "webm", "mov", "avi", "mkv", "m4v", "wmv", "flv", "mpg", "mpeg", "3gp",
    "mp3", "ogg", "wav", "m4a", "flac",
})

# Drop reasons of `classify_link`, in the order they are tested.
MALFORMED_URL, NOT_HTTP, REDDIT, WIKIPEDIA, MEDIA = "malformed_url", "not_http", "reddit", "wikipedia", "media"

_DEFAULT_PORTS = {"http": 80, "https": 443}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# scheme://authority path ?query, the fragment already cut off (RFC 3986, appendix B, for http(s) only)
_HTTP_URL = re.compile(r"(?i:(https?)://)([^/?]*)([^?]*)(?:\?(.*))?", re.DOTALL)
_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:")
# An ASCII host name: labels of letters, digits, '-' and '_' (seen in real subdomains), an optional final dot.
_HOST = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?")


class Link(NamedTuple):
    url: str  # normalized
    host: str  # lower-case ASCII, IPv6 literals in brackets
    path: str


def split_link(url: str) -> tuple[Link | None, str | None]:
    """(the normalized link, None), or (None, MALFORMED_URL or NOT_HTTP).

    Parsed with one regular expression rather than urllib's urlsplit, which alone costs as much as
    all of this (it runs on every submission of a year of Reddit); the authority is checked as
    urlsplit checks it (brackets, port range), IPv6 literals by urlsplit itself."""
    url = url.strip()
    if not url.isprintable() and _CONTROL.search(url):  # isprintable: a fast test that clears most URLs
        return None, MALFORMED_URL
    if not url.isascii():
        try:
            url.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, which json.loads lets through
            return None, MALFORMED_URL
    match = _HTTP_URL.fullmatch(url.partition("#")[0].rstrip())  # what precedes a fragment may end in spaces
    if match is None:
        scheme = _SCHEME.match(url)
        return None, MALFORMED_URL if scheme and scheme.group()[:-1].lower() in _DEFAULT_PORTS else NOT_HTTP
    scheme, authority, path, query = match.groups()
    scheme = scheme.lower()
    userinfo, at, hostport = authority.rpartition("@")
    host, port = _split_hostport(hostport, url)
    if host is None:
        return None, MALFORMED_URL
    port_text = f":{port}" if port is not None and port != _DEFAULT_PORTS[scheme] else ""
    query = _strip_tracking(query) if query else ""
    if not query:  # the URL now ends with the path: no whitespace left at its end (the URL was stripped)
        path = path.rstrip()
    path = path or "/"
    normalized = f"{scheme}://{userinfo}{at}{host}{port_text}{path}{'?' if query else ''}{query}"
    return Link(normalized, host, path), None


def normalize_url(url: str) -> str | None:
    """The normalized form of an http(s) URL (see the module's docstring), or None when it is
    malformed or not http/https."""
    link, _ = split_link(url)
    return link.url if link else None


def _split_hostport(hostport: str, url: str) -> tuple[str | None, int | None]:
    """(normalized host, port or None) of `host[:port]`; (None, None) when either is invalid."""
    if hostport.startswith("["):  # an IPv6 literal (or IPvFuture): let urlsplit check it
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return None, None
        literal, _, after = hostport[1:].partition("]")
        if not literal or not (after == "" or after.startswith(":")):  # nothing but a port may follow
            return None, None
        return f"[{literal.lower()}]", port
    host, _, port_text = hostport.partition(":")
    port = None
    if port_text:
        if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
            return None, None
        port = int(port_text)
    return _normalize_host(host), port


def _normalize_host(host: str) -> str | None:
    """The host lower-case and ASCII, or None when it is empty or invalid."""
    host = host.lower()
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:  # a label too long, empty, or not allowed by IDNA
            return None
    return host if _HOST.fullmatch(host) else None


def _strip_tracking(query: str) -> str:
    if not query:
        return query
    kept = []
    for piece in query.split("&"):
        name = piece.partition("=")[0].lower()
        if piece.strip() and name not in TRACKING_PARAMETERS and not name.startswith(TRACKING_PREFIXES):
            kept.append(piece)
    return "&".join(kept).rstrip()  # it ends the URL, which was stripped


# Each domain of the lists above -> its drop reason; a host matches itself or its nearest listed parent.
_DOMAIN_KINDS = {**dict.fromkeys(MEDIA_DOMAINS, MEDIA), **dict.fromkeys(WIKIPEDIA_DOMAINS, WIKIPEDIA),
                 **dict.fromkeys(REDDIT_DOMAINS, REDDIT)}


def _domain_kind(host: str) -> str | None:
    """REDDIT, WIKIPEDIA or MEDIA when the lower-case `host` is a listed domain or a subdomain of one."""
    suffix = host.rstrip(".")
    while True:
        kind = _DOMAIN_KINDS.get(suffix)
        if kind or "." not in suffix:
            return kind
        suffix = suffix.partition(".")[2]


def is_wikipedia_host(host: str) -> bool:
    """Whether a host name (no port) is Wikipedia's: wikipedia.org or any subdomain (en.m.wikipedia.org)."""
    return _domain_kind(host.lower()) == WIKIPEDIA


def is_reddit_host(host: str) -> bool:
    return _domain_kind(host.lower()) == REDDIT


def _has_media_extension(path: str) -> bool:
    _, dot, extension = path.rpartition("/")[2].rpartition(".")
    return dot == "." and extension.lower() in MEDIA_EXTENSIONS


def is_media_link(host: str, path: str) -> bool:
    """An image, video or audio host, or a path ending in such a file's extension (.jpg, .mp4, ...)."""
    return _domain_kind(host.lower()) == MEDIA or _has_media_extension(path)


def classify_link(url: str, keep_wikipedia: bool = False, keep_media: bool = False) -> tuple[str | None, str | None]:
    """(the normalized URL, None) for an outbound link WebText keeps, else (None, the drop reason):
    malformed_url, not_http, reddit, wikipedia (unless `keep_wikipedia`) or media (unless `keep_media`)."""
    link, reason = split_link(url)
    if reason:
        return None, reason
    kind = _domain_kind(link.host)
    if kind == REDDIT:
        return None, REDDIT
    if kind == WIKIPEDIA and not keep_wikipedia:
        return None, WIKIPEDIA
    if not keep_media and (kind == MEDIA or _has_media_extension(link.path)):
        return None, MEDIA
    return link.url, None
