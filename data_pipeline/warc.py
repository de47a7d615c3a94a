"""WARC and WET inputs: web crawl archives (Common Crawl's format) as documents.

The reader (in the reading process) only cuts the archive into records; the text
is made in `warc_record`, which runs wherever records are parsed (the workers),
because HTML extraction is the expensive part.

Which records are documents:
  response    an HTTP response; a status other than 2xx is reported as `http_status`
              (a 404 page is not a document; a redirect names its target); HTML pages
              become text with trafilatura, text/plain is taken as it is, anything
              else (images, PDFs, ...) is counted and reported as `not_html`
  resource    a stored file (wget and browsers write these); treated like a response
  conversion  text already extracted from a page (WET files); used as it is
Other records (warcinfo, request, metadata, revisit) describe the crawl rather
than hold a page, and are not counted. Documents are numbered from 0 in archive
order, so `file:N` in a report names the Nth document record.

Redirects recorded in the archive (a crawler such as wget writes the 3xx response,
then the page it led to) are followed: the page's record lists, in `redirected_from`,
the URLs that led to it, so a page can be matched to the link that was submitted.
Only redirects recorded before their target, in the same file, are followed (as a
crawler that follows them writes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import urljoin

WARC_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz")
DOCUMENT_RECORDS = ("response", "resource", "conversion")
HTML_TYPES = ("text/html", "application/xhtml+xml")


@dataclass
class WarcItem:
    """One document record, not yet extracted."""

    record_type: str
    url: str | None
    record_id: str | None
    date: str | None
    content_type: str  # of the payload: the HTTP Content-Type for responses, the WARC one otherwise
    payload: bytes
    status: int | None = None
    """The HTTP status of a response (None for other records)."""
    location: str | None = None
    """Where a redirect leads, resolved against the record's URL."""
    redirected_from: list[str] = field(default_factory=list)
    """URLs whose redirects, earlier in the archive, led here: the nearest first."""

    @property
    def media_type(self) -> str:
        return self.content_type.split(";")[0].strip().lower()

    @property
    def is_text(self) -> bool:
        """Extracted text, an HTML page or other text: worth keeping if removed (an image or PDF is not)."""
        return self.record_type == "conversion" or self.media_type in HTML_TYPES or self.media_type.startswith("text/")

    @property
    def charset(self) -> str:
        found = [p.split("=", 1)[1].strip().strip('"') for p in self.content_type.split(";")[1:]
                 if p.strip().lower().startswith("charset=")]
        return found[0] if found else "utf-8"


@dataclass
class WarcDamage:
    """The archive cannot be read from document record `number` (0-based) on: that record and the rest are lost."""

    number: int
    detail: str
    records_read: int = 0
    """WARC records of any type read before the damage."""
    format_error: bool = False
    """What failed is not a WARC (or not gzip) at all, rather than damaged or cut short."""


def warc_items(path: str, start_record: int = 0) -> Iterator[tuple[WarcItem | WarcDamage, int]]:
    """(item, bytes of the file read so far) for each document record from `start_record` on, and a
    WarcDamage last if the file is truncated or corrupt.

    warcio reads damaged archives leniently: it ends quietly at a truncated gzip
    member or a record header cut short, and fails with assorted errors elsewhere.
    So Python's gzip decompresses (it raises at a truncated member), each record's
    content must be as long as its Content-Length says, an uncompressed file must
    end where its last record ends, and any error while reading counts as damage.
    """
    import gzip

    from warcio.archiveiterator import ArchiveIterator

    from data_pipeline.readers import is_format_error

    number, records_read, damage = 0, 0, None
    redirects: dict[str, list[str]] = {}  # target URL -> the URLs that led to it, nearest first
    with open(path, "rb") as raw:
        compressed = path.endswith(".gz")
        records = ArchiveIterator(_Strict(gzip.GzipFile(fileobj=raw)) if compressed else raw)
        end = 0
        try:
            for record in records:
                payload = record.content_stream().read()
                record.raw_stream.read()  # what decoding left, such as a chunked body's trailers
                short = getattr(record.raw_stream, "limit", 0)  # bytes the file lacks for this record
                if not any(record.rec_headers.get_header(h) for h in ("WARC-Type", "WARC-Record-ID")):
                    raise NotAnArchive("a record without WARC-Type or WARC-Record-ID: not a WARC record")
                if not record.rec_headers.get_header("Content-Length") or short:
                    raise TruncatedArchive(f"a {record.rec_type} record is cut short")
                records.read_to_end()
                records_read += 1
                end = records.get_record_offset() + records.get_record_length()
                if record.rec_type not in DOCUMENT_RECORDS:
                    continue
                item = _item(record, payload)
                follow_redirects(item, redirects)
                if number >= start_record:
                    yield item, raw.tell()
                number += 1
            if not compressed and _has_more_than_blank_lines(raw, end):
                raise TruncatedArchive("the file ends inside a record's header")
        except Exception as error:  # noqa: BLE001 - any failure to parse damaged input is reported, not raised
            damage = WarcDamage(number, f"truncated or corrupt archive ({type(error).__name__}: {error}); "
                                        "the rest of the file is lost", records_read, is_format_error(error, path))
        if damage is not None:
            yield damage, raw.tell()


def _has_more_than_blank_lines(raw, offset: int) -> bool:
    raw.seek(offset)
    while block := raw.read(1 << 16):
        if block.strip():
            return True
    return False


class TruncatedArchive(Exception):
    """An archive that ends inside a gzip member or a record."""


class NotAnArchive(Exception):
    """Data that warcio reads leniently as a record but that holds none of a WARC record's headers."""


class _Strict:
    """A gzip stream whose truncation warcio cannot mistake for the end: it catches EOFError and stops quietly."""

    def __init__(self, stream):
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        try:
            return self.stream.read(size)
        except EOFError as error:
            raise TruncatedArchive(str(error)) from error

    def tell(self) -> int:
        return self.stream.tell()


def follow_redirects(item: WarcItem, redirects: dict[str, list[str]]) -> None:
    """Record a redirect's target, and give a page the URLs that redirected to it (a chain, in order)."""
    if item.url is None:
        return
    item.redirected_from = redirects.pop(_url_key(item.url), [])
    if item.location and _url_key(item.location) != _url_key(item.url):
        chain = redirects.setdefault(_url_key(item.location), [])  # several URLs may lead to one page
        chain.extend(url for url in [item.url, *item.redirected_from] if url not in chain)


def _url_key(url: str) -> str:
    """The same page whichever way the redirect and the crawler's record spell its URL."""
    from data_pipeline.webtext.urls import normalize_url

    return normalize_url(url) or url


def _item(record, payload: bytes) -> WarcItem:
    headers = record.rec_headers
    content_type = (record.http_headers.get_header("Content-Type") if record.http_headers
                    else headers.get_header("Content-Type")) or ""
    item = WarcItem(record.rec_type, headers.get_header("WARC-Target-URI"), headers.get_header("WARC-Record-ID"),
                    headers.get_header("WARC-Date"), content_type, payload)
    if record.rec_type == "response" and record.http_headers:
        status = record.http_headers.get_statuscode()
        item.status = int(status) if status and status.isdigit() else 0  # 0: unreadable, not a success
        location = record.http_headers.get_header("Location")
        if location and 300 <= item.status < 400:
            item.location = urljoin(item.url or "", location.strip())
    if not item.is_text or (item.status is not None and not 200 <= item.status < 300):
        item.payload = b""  # reported and not kept (not_html, http_status): no need to ship it to a worker
    return item


def warc_record(item: WarcItem, text_key: str, id_key: str = "id") -> tuple[dict | None, tuple[str, str] | None]:
    """(record with text, url, WARC record id and date, None), or (None, (reason, detail)) when no text comes out."""
    media_type = item.media_type
    if item.status is not None and not 200 <= item.status < 300:
        where = f"; a redirect to {item.location}" if item.location else ""
        return None, ("http_status", f"{item.url} answered HTTP {item.status}{where}")
    if item.record_type == "conversion":
        text = item.payload.decode("utf-8", errors="replace")
    elif media_type == "text/plain":
        text = decode_text(item.payload, item.charset)
    elif media_type in HTML_TYPES:
        text = extract_html(item.payload, item.url)
        if not text:
            return None, ("no_extractable_text", f"trafilatura found no main text in the page of {item.url}")
    else:
        return None, ("not_html", f"{item.url} is {media_type or 'of unknown type'}, not an HTML page")
    record = {id_key: item.record_id, "url": item.url, "date": item.date, text_key: text}
    if item.redirected_from:
        record["redirected_from"] = item.redirected_from
    return record, None


def decode_text(payload: bytes, charset: str) -> str:
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # a charset Python does not know: the bytes are most likely UTF-8 or ASCII
        return payload.decode("utf-8", errors="replace")


def extract_html(html: bytes, url: str | None) -> str | None:
    """The main text of a page, without navigation, comments and boilerplate.

    Settings follow FineWeb's extraction (precision over recall, no comments),
    except trafilatura's `deduplicate`: it remembers text across pages in a
    process-wide cache, so the output would depend on which pages a worker saw
    first, and the same input must give the same output on any number of workers.
    """
    import trafilatura

    return trafilatura.extract(html, url=url, favor_precision=True, include_comments=False, include_tables=True,
                               deduplicate=False)


def raw_of(item: WarcItem) -> str | None:
    """What a removed record keeps of itself: the page as text, or nothing for binary payloads."""
    return item.payload.decode("utf-8", errors="replace") if item.is_text else None
