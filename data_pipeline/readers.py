"""Streaming readers for corpus files: jsonl (plain, .gz, .zst), parquet,
Hugging Face `datasets` directories written by `save_to_disk`, and WARC/WET web
archives (see data_pipeline/warc.py).

A reader never parses JSON: it cuts a file into `Chunk`s of raw records so that
parsing, validation and tokenization run in worker processes, and the reading
process stays cheap. Records are numbered from 0 within their file; for jsonl
the record number is the line number minus one, so every problem can be
reported as `file:line`.

Stream-level damage (a truncated .gz or .zst, a corrupt frame) ends the file
early; the reader reports it as a `Skipped` record at the line where the damage
starts rather than raising, so the run goes on and the loss is counted.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import zstandard

from data_pipeline.warc import WARC_SUFFIXES, WarcDamage, raw_of, warc_items, warc_record

# A parquet / datasets row without the text column. Ellipsis survives pickling
# as the same singleton, so workers can test `value is MISSING_KEY`.
MISSING_KEY = Ellipsis

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".zst")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = JSONL_SUFFIXES + PARQUET_SUFFIXES + WARC_SUFFIXES

# Records handed to a worker at a time. About 1 MB keeps inter-process overhead
# well under 1% of tokenization time while bounding memory per chunk in flight.
DEFAULT_CHUNK_BYTES = 1 << 20


class InputError(Exception):
    """An input path that cannot be used at all (missing, unsupported format, undecodable)."""


def is_format_error(error: BaseException, path: str) -> bool:
    """An error that says the data is not in the format its suffix claims (rather than damaged in it).

    A gzip member cut in its first bytes also reads as "Not a gzipped file": in a file that starts as
    gzip, that is a file cut short, not a file of the wrong format."""
    from data_pipeline.warc import NotAnArchive

    message = str(error)
    if isinstance(error, gzip.BadGzipFile) and "Not a gzipped file" in message:
        try:
            with open(path, "rb") as raw:
                return raw.read(2) != b"\x1f\x8b"
        except OSError:  # gone meanwhile: report the damage as it was found
            return False
    return (isinstance(error, NotAnArchive) or type(error).__name__ == "ArchiveLoadFailed"
            or (isinstance(error, zstandard.ZstdError) and "Unknown frame descriptor" in message))


def refuse_undecodable(path: str, problem: Skipped, records_read: int, format_error: bool) -> None:
    """A file that is not in its suffix's format from its first record on (plain text behind .gz, not
    zstd behind .zst, not a WARC) cannot be read at all: an error naming it, not a count. Damage
    further in, or a file cut short, is counted where it starts."""
    if records_read == 0 and format_error:
        detail = problem.detail.removesuffix("; the rest of the file is lost")
        raise InputError(f"cannot decode {path}: {detail}; check that the file's format matches its name, "
                         "or leave it out of the inputs")


@dataclass
class Skipped:
    """A record that did not become a document, and why.

    `reason` is a short code for counting (malformed_json, invalid_utf8,
    missing_text_key, null_text, not_a_string, not_an_object, empty_document,
    truncated_stream); `detail` says what exactly was wrong.
    """

    file: str
    line: int  # 1-based line (jsonl), row number (parquet, datasets) or document record (warc)
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}: {self.reason}"
        return f"{where}: {self.detail}" if self.detail else where


@dataclass
class Chunk:
    """Consecutive records of one file, not yet parsed.

    `items` holds raw lines (bytes, kind "jsonl"), column values (kind
    "values": a str, None, or MISSING_KEY), whole rows (kind "records") or web
    archive records (kind "warc": WarcItem, whose text is extracted on parsing). `stream_errors` are problems found
    by the reader itself after the last item (a truncated stream).
    """

    file_index: int
    path: str
    first_record: int
    kind: str
    items: list = field(default_factory=list)
    stream_errors: list[Skipped] = field(default_factory=list)
    disk_bytes: int = 0  # bytes of the input file consumed since the previous chunk


def is_datasets_dir(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def resolve_inputs(patterns: list[str]) -> list[str]:
    """Expand paths, globs and directories into an ordered list of inputs.

    Order is the order of the patterns, each glob or directory sorted by name,
    so the output of a run does not depend on the file system's listing order.
    """
    resolved: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches or not os.path.exists(matches[0]):
            raise InputError(f"input not found: {pattern}")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                inside = _expand_directory(path)
                if not inside:
                    raise InputError(f"input directory {path} holds no {', '.join(SUPPORTED)} files")
                resolved.extend(inside)
            elif path.name.endswith(SUPPORTED):
                resolved.append(str(path))
            else:
                raise InputError(
                    f"unsupported input format: {path} (expected {', '.join(SUPPORTED)}, "
                    "or a directory written by datasets' save_to_disk)"
                )
    if any(p.endswith(WARC_SUFFIXES) for p in resolved):
        missing = [m for m in ("warcio", "trafilatura") if importlib.util.find_spec(m) is None]
        if missing:
            raise InputError(f"WARC/WET inputs need {' and '.join(missing)}: pip install -e '.[warc]'")
    seen: set[str] = set()
    duplicates = [p for p in resolved if p in seen or seen.add(p)]
    if duplicates:
        raise InputError(f"input given twice: {duplicates[0]} (each file is read once)")
    return resolved


def _expand_directory(path: Path) -> list[str]:
    """Supported files under `path`, sorted by name at each level; a datasets
    directory counts as one input (its own state.json is not a corpus file)."""
    if is_datasets_dir(path):
        return [str(path)]
    found: list[str] = []
    for child in sorted(path.iterdir()):
        if child.is_dir():
            found += _expand_directory(child)
        elif child.name.endswith(SUPPORTED):
            found.append(str(child))
    return found


def iter_chunks(
    path: str,
    file_index: int,
    text_key: str,
    start_record: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    whole_records: bool = False,
) -> Iterator[Chunk]:
    """Chunks of one input, starting at record `start_record` (for resuming).

    Columnar inputs give the text column's values, or with `whole_records` each
    row as a dict of every column (kind "records"); jsonl always gives raw lines.
    """
    if is_datasets_dir(Path(path)):
        yield from _datasets_chunks(path, file_index, text_key, start_record, chunk_bytes, whole_records)
    elif path.endswith(PARQUET_SUFFIXES):
        yield from _parquet_chunks(path, file_index, text_key, start_record, chunk_bytes, whole_records)
    elif path.endswith(WARC_SUFFIXES):
        yield from _warc_chunks(path, file_index, start_record, chunk_bytes)
    else:
        yield from _jsonl_chunks(path, file_index, start_record, chunk_bytes)


# ---- records -> text ------------------------------------------------------------


def check_text(value, text_key: str, key_setting: str = "--text-key") -> tuple[str, str] | None:
    """(reason, detail) when `value` is not a usable document, else None. `key_setting` is how the
    user of the calling tool chooses the key (a command-line flag, a config entry)."""
    if value is MISSING_KEY:
        return "missing_text_key", f"no {text_key!r} key (choose the key with {key_setting})"
    if value is None:
        return "null_text", f"{text_key!r} is null"
    if not isinstance(value, str):
        return "not_a_string", f"{text_key!r} holds a {type(value).__name__}, not a string"
    if not value.strip():
        return "empty_document", "the text is empty or whitespace only"
    return None


def is_blank(item) -> bool:
    """A blank jsonl line (no record at all, so neither a document nor a bad record), or an item the
    caller took out of the chunk before parsing (None: it accounts for it itself)."""
    return item is None or (isinstance(item, bytes) and not item.strip())


def parse_json_record(raw: bytes):
    """(the record, a dict, None) for a parsable jsonl line, else (None, (reason, detail))."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, ("invalid_utf8", f"invalid UTF-8 at byte {error.start}")
    try:
        # Without its line break: else a string cut short at the end of the line reads as a control character
        # in the string ("Invalid control character") at a column past the text, not as the unterminated string.
        record = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as error:
        where = "column" if error.msg.endswith(" at") else "at column"  # "Unterminated string starting at"
        return None, ("malformed_json", f"{error.msg} {where} {error.colno}")
    if not isinstance(record, dict):
        return None, ("not_an_object", f"a JSON {type(record).__name__}, not an object")
    return record, None


def parse_item(item, kind: str, text_key: str, id_key: str = "id"):
    """(the record as a dict, None) or (None, (reason, detail)) for one chunk item of any kind; a web
    archive record's text and id go under `text_key` and `id_key`."""
    if kind == "jsonl":
        return parse_json_record(item)
    if kind == "warc":
        return warc_record(item, text_key, id_key)
    if kind == "values":
        return {text_key: item}, None
    return item, None


def chunk_documents(chunk: Chunk, text_key: str) -> tuple[list[str], list[int], list[Skipped]]:
    """Split a chunk into usable texts with their record numbers, and skipped records."""
    texts, records, skipped = [], [], []
    for offset, item in enumerate(chunk.items):
        if is_blank(item):
            continue
        record = chunk.first_record + offset
        parsed, problem = parse_item(item, chunk.kind, text_key)
        value = None if problem else parsed.get(text_key, MISSING_KEY)
        problem = problem or check_text(value, text_key)
        if problem:
            skipped.append(Skipped(chunk.path, record + 1, *problem))
        else:
            texts.append(value)
            records.append(record)
    return texts, records, skipped + chunk.stream_errors


def chunk_records(chunk: Chunk, text_key: str, id_key: str = "id", key_setting: str = "text_key in the config"
                  ) -> tuple[list[dict], list[int], list[tuple[Skipped, str | None]]]:
    """Like `chunk_documents`, keeping each whole record (every field) rather than its text alone.

    Each skipped record comes with its raw content (a jsonl line decoded with
    backslash escapes for invalid bytes, or a row as JSON), so it can be kept.
    """
    records, numbers, skipped = [], [], []
    for offset, item in enumerate(chunk.items):
        if is_blank(item):
            continue
        number = chunk.first_record + offset
        record, problem = parse_item(item, chunk.kind, text_key, id_key)
        problem = problem or check_text(record.get(text_key, MISSING_KEY), text_key, key_setting)
        if problem:
            if isinstance(item, bytes):
                raw = item.decode("utf-8", errors="backslashreplace").removesuffix("\n")
            elif chunk.kind == "warc":
                raw = raw_of(item)
            else:
                raw = json.dumps(item, default=str)
            skipped.append((Skipped(chunk.path, number + 1, *problem), raw))
        else:
            records.append(record)
            numbers.append(number)
    return records, numbers, skipped + [(error, None) for error in chunk.stream_errors]


def iter_texts(inputs: list[str], text_key: str = "text", skipped: list[Skipped] | None = None) -> Iterator[str]:
    """Every usable document text of the inputs, in order, read in this process.

    Bad records are appended to `skipped` (when given) instead of being yielded.
    """
    for file_index, path in enumerate(inputs):
        for chunk in iter_chunks(path, file_index, text_key):
            texts, _, bad = chunk_documents(chunk, text_key)
            yield from texts
            if skipped is not None:
                skipped.extend(bad)


# ---- jsonl family -----------------------------------------------------------


ZSTD_MAX_WINDOW = 1 << 31  # zstd's largest window (--long=31)


class _ZstdLineReader:
    """Lines of a (possibly multi-frame) .zst file, noticing truncation.

    python-zstandard's stream reader ends quietly on a truncated file; the
    decompression object exposes `eof`, which tells a clean end from a cut one.
    """

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        # Pushshift's Reddit dumps are written with `zstd --long=31`: a 2 GiB window, which the
        # library refuses by default (it would allocate that much for a hostile file). Allow it.
        self._new = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).decompressobj
        self.truncated = False

    def __iter__(self) -> Iterator[bytes]:
        decompressor, pending, frame_open = self._new(), b"", False
        while block := self._raw.read(1 << 20):
            while block:
                pending += decompressor.decompress(block)
                frame_open = not decompressor.eof
                block = decompressor.unused_data if decompressor.eof else b""
                if decompressor.eof:
                    decompressor = self._new()
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line + b"\n"
        if frame_open:
            self.truncated = True
        elif pending:
            yield pending


def _open_lines(path: str, raw: BinaryIO):
    """(iterable of lines, stream name) for a plain, gzip or zstd jsonl file."""
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw), "gzip"
    if path.endswith(".zst"):
        return _ZstdLineReader(raw), "zstd"
    return raw, "plain"


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """The records of a jsonl, jsonl.gz or jsonl.zst file we wrote ourselves (nothing to skip)."""
    with open(path, "rb") as raw:
        lines, _ = _open_lines(str(path), raw)
        for line in lines:
            yield json.loads(line)
        if getattr(lines, "truncated", False):
            raise InputError(f"{path} ends in the middle of a zstd frame: truncated")


def _jsonl_chunks(path: str, file_index: int, start_record: int, chunk_bytes: int) -> Iterator[Chunk]:
    with open(path, "rb") as raw:
        lines, stream = _open_lines(path, raw)
        chunk = Chunk(file_index, path, start_record, "jsonl")
        size, disk_seen, record = 0, 0, 0
        try:
            for line in lines:
                record += 1
                if record <= start_record:
                    continue
                chunk.items.append(line)
                size += len(line)
                if size >= chunk_bytes:
                    chunk.disk_bytes, disk_seen = raw.tell() - disk_seen, raw.tell()
                    yield chunk
                    chunk, size = Chunk(file_index, path, record, "jsonl"), 0
        except (EOFError, OSError, zlib.error, zstandard.ZstdError) as error:
            problem = Skipped(path, record + 1, "truncated_stream",
                              f"truncated or corrupt {stream} stream ({error}); the rest of the file is lost")
            refuse_undecodable(path, problem, record, is_format_error(error, path))
            chunk.stream_errors.append(problem)
        if stream == "zstd" and lines.truncated:
            chunk.stream_errors.append(
                Skipped(path, record + 1, "truncated_stream", "the zstd stream ends inside a frame; the rest of the file is lost")
            )
        chunk.disk_bytes = os.path.getsize(path) - disk_seen
        yield chunk


def _warc_chunks(path: str, file_index: int, start_record: int, chunk_bytes: int) -> Iterator[Chunk]:
    """Document records of a WARC/WET file, about `chunk_bytes` of payload per chunk."""
    chunk, size, disk_seen = Chunk(file_index, path, start_record, "warc"), 0, 0
    for item, position in warc_items(path, start_record):
        if isinstance(item, WarcDamage):
            # counted as one unreadable record, as a cut jsonl stream is
            problem = Skipped(path, max(item.number, start_record) + 1, "truncated_stream", item.detail)
            refuse_undecodable(path, problem, item.records_read, item.format_error)
            chunk.stream_errors.append(problem)
            break
        chunk.items.append(item)
        size += len(item.payload)
        if size >= chunk_bytes:
            chunk.disk_bytes, disk_seen = position - disk_seen, position
            yield chunk
            chunk, size = Chunk(file_index, path, chunk.first_record + len(chunk.items), "warc"), 0
    chunk.disk_bytes = os.path.getsize(path) - disk_seen
    yield chunk


# ---- columnar inputs: parquet and datasets directories --------------------------


def _column_chunks(tables: Iterator, path: str, file_index: int, text_key: str, start_record: int,
                   total_bytes: int, total_rows: int, whole_records: bool = False) -> Iterator[Chunk]:
    """Arrow tables or record batches -> value chunks, skipping `start_record` rows.

    A file without the text column yields MISSING_KEY for every row, so each row
    is still counted and reported rather than the file vanishing silently.
    """
    record, skip = start_record, start_record
    for table in tables:
        if skip >= table.num_rows:
            skip -= table.num_rows
            continue
        table, skip = table.slice(skip), 0
        if whole_records:
            values = table.to_pylist()
        elif text_key in table.schema.names:
            values = table.column(text_key).to_pylist()
        else:
            values = [MISSING_KEY] * table.num_rows
        disk = total_bytes * len(values) // max(total_rows, 1)
        yield Chunk(file_index, path, record, "records" if whole_records else "values", values, disk_bytes=disk)
        record += len(values)


def _rows_per_chunk(total_bytes: int, total_rows: int, chunk_bytes: int) -> int:
    average_row_bytes = max(total_bytes // max(total_rows, 1), 1)
    return max(1, chunk_bytes // average_row_bytes)


def _parquet_chunks(path: str, file_index: int, text_key: str, start_record: int, chunk_bytes: int,
                    whole_records: bool = False) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:
        raise InputError(f"cannot read parquet file {path}: {error}") from error
    rows, size = parquet.metadata.num_rows, os.path.getsize(path)
    columns = None if whole_records else [text_key] if text_key in parquet.schema_arrow.names else []
    batches = parquet.iter_batches(batch_size=_rows_per_chunk(size, rows, chunk_bytes), columns=columns)
    yield from _column_chunks(batches, path, file_index, text_key, start_record, size, rows, whole_records)


def _datasets_chunks(path: str, file_index: int, text_key: str, start_record: int, chunk_bytes: int,
                     whole_records: bool = False) -> Iterator[Chunk]:
    import datasets

    try:
        dataset = datasets.load_from_disk(path)
    except Exception as error:
        raise InputError(f"cannot load datasets directory {path}: {error}") from error
    if isinstance(dataset, datasets.DatasetDict):
        raise InputError(f"{path} is a DatasetDict; pass one split's directory, e.g. {path}/train")
    size = sum(os.path.getsize(p) for p in Path(path).glob("*.arrow"))
    rows = len(dataset)
    if text_key in dataset.column_names and not whole_records:
        dataset = dataset.select_columns([text_key])
    tables = dataset.with_format("arrow").iter(batch_size=_rows_per_chunk(size, rows, chunk_bytes))
    yield from _column_chunks(tables, path, file_index, text_key, start_record, size, rows, whole_records)
