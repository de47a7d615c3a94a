"""Output files of a curation run, written under a temporary name and renamed into place on `commit`,
so a file under its final name is always complete."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import zstandard

OUTPUT_FORMATS = ("jsonl.zst", "parquet")
PARQUET_ROWS = 8192  # rows per parquet row group and per batch held in memory


class JsonlZstWriter:
    """Records as jsonl.zst. `bytes` counts the uncompressed jsonl."""

    def __init__(self, path: Path):
        self.path, self.partial = path, path.with_name(path.name + ".partial")
        self.file = open(self.partial, "wb")
        self.stream = zstandard.ZstdCompressor(level=3).stream_writer(self.file)
        self.count = 0
        self.bytes = 0

    def write(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        self.stream.write(line)
        self.count += 1
        self.bytes += len(line)

    def commit(self) -> None:
        self.stream.close()  # also closes the file
        os.replace(self.partial, self.path)


class ParquetWriter:
    """Records as parquet (zstd), in row groups of PARQUET_ROWS. `bytes` counts the text column.

    A parquet file has one schema, so the caller passes the schema of all its records
    (`schema_of`): documents differ in which metadata fields they carry, and a field a
    record lacks is stored as null.
    """

    def __init__(self, path: Path, schema, text_key: str):
        import pyarrow.parquet as pq

        self.path, self.partial = path, path.with_name(path.name + ".partial")
        self.schema, self.text_key = schema, text_key
        self.writer = pq.ParquetWriter(self.partial, schema, compression="zstd")
        self.rows: list[dict] = []
        self.count = 0
        self.bytes = 0

    def write(self, record: dict) -> None:
        self.rows.append(record)
        self.count += 1
        self.bytes += len(record[self.text_key].encode())
        if len(self.rows) >= PARQUET_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows.clear()

    def commit(self) -> None:
        self._flush()
        self.writer.close()
        os.replace(self.partial, self.path)


class SchemaConflict(ValueError):
    """Records whose fields cannot share one parquet column type."""


CONFLICT = ("documents disagree on a field's type ({}); write output_format: jsonl.zst, "
            "or make the field one type upstream")


def schema_of(records: Iterable[dict], first: tuple[str, ...]):
    """One arrow schema for all `records`, with the `first` fields leading; nulls give way to any type,
    and integers to floats."""
    import pyarrow as pa

    schemas, batch = [], []
    for record in records:
        batch.append(record)
        if len(batch) >= PARQUET_ROWS:
            schemas.append(_batch_schema(batch))
            batch = []
    schemas.append(_batch_schema(batch) if batch else pa.schema([(f, pa.string()) for f in first]))
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise SchemaConflict(CONFLICT.format(error)) from error
    names = [f for f in first if f in unified.names] + [f for f in unified.names if f not in first]
    return pa.schema([unified.field(name) for name in names])


def _batch_schema(batch: list[dict]):
    """The schema of every field any record of `batch` has (arrow's from_pylist looks at the first row's keys only)."""
    import pyarrow as pa

    names = list(dict.fromkeys(name for record in batch for name in record))
    try:
        return pa.Table.from_pydict({name: pa.array([r.get(name) for r in batch]) for name in names}).schema
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise SchemaConflict(CONFLICT.format(error)) from error


def document_writer(directory: Path, index: int, output_format: str, text_key: str, id_key: str,
                    records: Iterable[dict] | None = None):
    """The writer of kept documents for input file `index`; parquet needs `records` (an iterable that can be
    read ahead of writing) to settle its schema."""
    if output_format == "parquet":
        return ParquetWriter(directory / f"{index:05d}.parquet", schema_of(records, (id_key, text_key)), text_key)
    return JsonlZstWriter(directory / f"{index:05d}.jsonl.zst")
