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
    record lacks is stored as null. Fields listed in the schema's `json_fields`
    metadata hold each value's JSON text.
    """

    def __init__(self, path: Path, schema, text_key: str):
        import pyarrow.parquet as pq

        self.path, self.partial = path, path.with_name(path.name + ".partial")
        self.schema, self.text_key = schema, text_key
        self.json_fields = json.loads(schema.metadata[b"json_fields"])
        self.writer = pq.ParquetWriter(self.partial, schema, compression="zstd")
        self.rows: list[dict] = []
        self.count = 0
        self.bytes = 0

    def write(self, record: dict) -> None:
        for name in self.json_fields:
            if record.get(name) is not None:
                record = {**record, name: json.dumps(record[name], ensure_ascii=False)}
        self.rows.append(record)
        self.count += 1
        self.bytes += len(record[self.text_key].encode())
        if len(self.rows) >= PARQUET_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            try:
                table = pa.Table.from_pylist(self.rows, schema=self.schema)
            except (pa.ArrowException, OverflowError, TypeError, ValueError) as error:
                raise SchemaConflict(f"{self.path}: a document does not fit the file's parquet schema ({error}); "
                                     "write output_format: jsonl.zst") from error
            self.writer.write_table(table)
            self.rows.clear()

    def commit(self) -> None:
        self._flush()
        self.writer.close()
        os.replace(self.partial, self.path)


class SchemaConflict(ValueError):
    """A document that cannot be written into its file's parquet schema."""


def schema_of(records: Iterable[dict], first: tuple[str, ...]):
    """One arrow schema for all `records`, with the `first` fields leading.

    Each field gets the type arrow infers for its values, widened across batches
    (nulls give way to any type, integers to floats). A field with no one type that
    parquet stores (mixed kinds, empty objects, integers beyond 64 bits) is kept as
    JSON text instead, named in the schema's `json_fields` metadata: nothing is lost.
    """
    import pyarrow as pa

    types: dict[str, object] = {}  # field -> arrow type, or None for JSON text
    batch: list[dict] = []
    for record in [*records, None]:
        if record is not None:
            batch.append(record)
        if batch and (record is None or len(batch) >= PARQUET_ROWS):
            for name in dict.fromkeys(n for r in batch for n in r):
                if name not in types or types[name] is not None:
                    found = _arrow_type([r.get(name) for r in batch])
                    types[name] = found if name not in types or found is None else _wider(types[name], found)
            batch = []
    types = types or {name: pa.string() for name in first}
    names = [f for f in first if f in types] + [f for f in types if f not in first]
    json_fields = [name for name in names if types[name] is None]
    return pa.schema([(name, types[name] or pa.string()) for name in names],
                     metadata={"json_fields": json.dumps(json_fields)})


def _arrow_type(values: list):
    import pyarrow as pa

    try:
        found = pa.array(values).type
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        return None
    return found if _storable(found) else None


def _storable(kind) -> bool:
    """Parquet cannot store a struct without fields (from `{}`), however deep."""
    import pyarrow as pa

    if pa.types.is_struct(kind):
        return kind.num_fields > 0 and all(_storable(kind.field(i).type) for i in range(kind.num_fields))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _storable(kind.value_type)
    return True


def _wider(first, second):
    """The type both `first` and `second` values fit, or None when there is none."""
    import pyarrow as pa

    try:
        return pa.unify_schemas([pa.schema([("f", first)]), pa.schema([("f", second)])],
                                promote_options="permissive").field("f").type
    except (pa.ArrowException, TypeError, ValueError):
        return None


def document_writer(directory: Path, index: int, output_format: str, text_key: str, id_key: str,
                    records: Iterable[dict] | None = None):
    """The writer of kept documents for input file `index`; parquet needs `records` (an iterable that can be
    read ahead of writing) to settle its schema."""
    if output_format == "parquet":
        return ParquetWriter(directory / f"{index:05d}.parquet", schema_of(records, (id_key, text_key)), text_key)
    return JsonlZstWriter(directory / f"{index:05d}.jsonl.zst")
