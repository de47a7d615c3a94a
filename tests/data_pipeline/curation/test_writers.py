"""Parquet output: one schema for documents that carry different metadata; what fits no one type is kept as JSON."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.curation.writers import PARQUET_ROWS, document_writer


def write_parquet(directory, documents):
    writer = document_writer(directory, 7, "parquet", "text", "id", documents)
    for d in documents:
        writer.write(d)
    writer.commit()
    assert writer.count == len(documents) and not list(directory.glob("*.partial"))
    return pq.read_table(directory / "00007.parquet")


def test_fields_first_seen_in_a_later_row_group_are_kept_and_integers_widen_to_floats(tmp_path, real_documents):
    news = [d for d in real_documents if d["source"] == "abc-news"]
    wiki = [d for d in real_documents if d["source"] == "wikipedia"]
    documents = [{**d, "score": 3} for d in news * (PARQUET_ROWS // len(news) + 1)] + [{**d, "score": 2.5} for d in wiki]
    assert "title" not in documents[PARQUET_ROWS - 1] and "title" in documents[-1]  # titles only after a whole batch
    table = write_parquet(tmp_path, documents)
    assert table.schema.names[:2] == ["id", "text"] and table.schema.field("score").type == pa.float64()
    assert [{k: v for k, v in r.items() if v is not None} for r in table.to_pylist()] == documents
    assert json.loads(table.schema.metadata[b"json_fields"]) == []


def test_fields_without_one_parquet_type_are_kept_as_their_json_text(tmp_path):
    # per batch: an empty object (no parquet type), an integer beyond 64 bits, then a number turned string
    documents = ([{"id": "a", "text": "x", "tags": {}, "score": 3, "big": 2 ** 70}] * PARQUET_ROWS
                 + [{"id": "b", "text": "y", "tags": {"k": [1]}, "score": "high", "big": 1}] * PARQUET_ROWS)
    documents.append({"id": "c", "text": "z", "tags": None, "score": 1})
    table = write_parquet(tmp_path, documents)
    fields = json.loads(table.schema.metadata[b"json_fields"])
    assert fields == ["tags", "score", "big"]
    rows = table.to_pylist()
    restored = [{k: json.loads(v) if k in fields and v is not None else v for k, v in r.items()} for r in rows]
    assert [{k: v for k, v in r.items() if v is not None} for r in restored] == [
        {k: v for k, v in d.items() if v is not None} for d in documents]


def test_a_file_without_kept_documents_still_gets_a_readable_shard(tmp_path):
    writer = document_writer(tmp_path, 0, "parquet", "text", "id", [])
    writer.commit()
    assert pq.read_table(tmp_path / "00000.parquet").num_rows == 0
