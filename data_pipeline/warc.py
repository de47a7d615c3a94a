"""WARC and WET inputs: web crawl archives (Common Crawl's format) as documents.

The reader (in the reading process) only cuts the archive into records; the text
is made in `warc_record`, which runs wherever records are parsed (the workers),
because HTML extraction is the expensive part.

Which records are documents:
  response    an HTTP response; HTML pages become text with trafilatura, anything
              else (images, PDFs, ...) is counted and reported as `not_html`
  resource    a stored file (wget and browsers write these); treated like a response
  conversion  text already extracted from a page (WET files); used as it is
Other records (warcinfo, request, metadata, revisit) describe the crawl rather
than hold a page, and are not counted. Documents are numbered from 0 in archive
order, so `file:N` in a report names the Nth document record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

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

    @property
    def media_type(self) -> str:
        return self.content_type.split(";")[0].strip().lower()

    @property
    def is_text(self) -> bool:
        """Extracted text, an HTML page or other text: worth keeping if removed (an image or PDF is not)."""
        return self.record_type == "conversion" or self.media_type in HTML_TYPES or self.media_type.startswith("text/")


@dataclass
class WarcDamage:
    """The archive cannot be read from document record `number` (0-based) on: that record and the rest are lost."""

    number: int
    detail: str


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

    number, damage = 0, None
    with open(path, "rb") as raw:
        compressed = path.endswith(".gz")
        records = ArchiveIterator(_Strict(gzip.GzipFile(fileobj=raw)) if compressed else raw)
        end = 0
        try:
            for record in records:
                payload = record.content_stream().read()
                record.raw_stream.read()  # what decoding left, such as a chunked body's trailers
                short = getattr(record.raw_stream, "limit", 0)  # bytes the file lacks for this record
                if record.rec_headers.get_header("Content-Length") is None or short:
                    raise TruncatedArchive(f"a {record.rec_type} record is cut short")
                records.read_to_end()
                end = records.get_record_offset() + records.get_record_length()
                if record.rec_type not in DOCUMENT_RECORDS:
                    continue
                if number >= start_record:
                    yield _item(record, payload), raw.tell()
                number += 1
            if not compressed and _has_more_than_blank_lines(raw, end):
                raise TruncatedArchive("the file ends inside a record's header")
        except Exception as error:  # noqa: BLE001 - any failure to parse damaged input is reported, not raised
            damage = WarcDamage(number, f"truncated or corrupt archive ({type(error).__name__}: {error}); "
                                        "the rest of the file is lost")
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


def _item(record, payload: bytes) -> WarcItem:
    headers = record.rec_headers
    content_type = (record.http_headers.get_header("Content-Type") if record.http_headers
                    else headers.get_header("Content-Type")) or ""
    item = WarcItem(record.rec_type, headers.get_header("WARC-Target-URI"), headers.get_header("WARC-Record-ID"),
                    headers.get_header("WARC-Date"), content_type, payload)
    if not item.is_text:
        item.payload = b""  # reported as not_html and not kept: no need to ship it to a worker
    return item


def warc_record(item: WarcItem, text_key: str, id_key: str = "id") -> tuple[dict | None, tuple[str, str] | None]:
    """(record with text, url, WARC record id and date, None), or (None, (reason, detail)) when no text comes out."""
    media_type = item.media_type
    if item.record_type == "conversion":
        text = item.payload.decode("utf-8", errors="replace")
    elif media_type in HTML_TYPES:
        text = extract_html(item.payload, item.url)
        if not text:
            return None, ("no_extractable_text", f"trafilatura found no main text in the page of {item.url}")
    else:
        return None, ("not_html", f"{item.url} is {media_type or 'of unknown type'}, not an HTML page")
    return {id_key: item.record_id, "url": item.url, "date": item.date, text_key: text}, None


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
