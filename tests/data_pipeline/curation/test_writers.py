"""Parquet output: one schema for documents that carry different metadata, or a clear refusal."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.curation.writers import PARQUET_ROWS, SchemaConflict, document_writer, schema_of


def test_documents_with_different_fields_share_one_schema_with_nulls_for_what_they_lack(tmp_path, real_documents):
    # news articles have no title; the Wikipedia pages, which come after a whole row group, do
    documents = [{**d, "score": 3 if i % 2 else 2.5} for i, d in enumerate(real_documents * (PARQUET_ROWS // 400 + 1))]
    assert "title" not in documents[0] and "title" in documents[-1]
    writer = document_writer(tmp_path, 7, "parquet", "text", "id", documents)
    for d in documents:
        writer.write(d)
    writer.commit()
    table = pq.read_table(tmp_path / "00007.parquet")
    assert table.schema.names[:2] == ["id", "text"] and table.schema.field("score").type == pa.float64()
    rows = table.to_pylist()
    assert [{k: v for k, v in r.items() if v is not None} for r in rows] == documents
    assert writer.count == len(documents) and not list(tmp_path.glob("*.partial"))


def test_a_field_of_two_incompatible_types_is_refused_with_the_way_out():
    with pytest.raises(SchemaConflict, match="output_format: jsonl.zst"):
        schema_of([{"id": "a", "text": "x", "score": 3}] * PARQUET_ROWS + [{"id": "b", "text": "y", "score": "high"}],
                  ("id", "text"))


def test_a_file_without_kept_documents_still_gets_a_readable_shard(tmp_path):
    writer = document_writer(tmp_path, 0, "parquet", "text", "id", [])
    writer.commit()
    assert pq.read_table(tmp_path / "00000.parquet").num_rows == 0
