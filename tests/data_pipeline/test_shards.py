"""Shard files: Megatron's layout, the dtype rule, and what a crash can leave behind."""

from __future__ import annotations

import struct

import numpy as np

from data_pipeline.shards import ShardWriter, indexed_dataset_module
from data_pipeline.tokenizers import Tokenizer


def test_token_dtype_is_uint16_while_the_vocabulary_fits_else_int32():
    assert Tokenizer(name="small", vocab_size=50257).token_dtype is np.uint16
    assert Tokenizer(name="large", vocab_size=65500).token_dtype is np.int32
    assert Tokenizer(name="large", vocab_size=128_256).token_dtype is np.int32


def test_int32_shard_round_trips_ids_above_uint16(tmp_path):
    documents = [np.array([70_000, 5, 128_000], dtype=np.int32), np.array([1, 100_255], dtype=np.int32)]
    writer = ShardWriter(str(tmp_path / "big"), 0, np.int32)
    for document in documents:
        writer.add_document(document)
    record = writer.finish()
    header = (tmp_path / "big_00000.idx").read_bytes()[:34]
    magic, version, dtype_code, sequences, doc_index = struct.unpack("<9sQBQQ", header)
    assert (magic, version, dtype_code, sequences, doc_index) == (b"MMIDIDX\x00\x00", 1, 4, 2, 3)
    dataset = indexed_dataset_module().IndexedDataset(str(tmp_path / "big_00000"))
    assert [dataset[i].tolist() for i in range(2)] == [d.tolist() for d in documents]
    assert record == {"index": 0, "name": "big_00000", "documents": 2, "tokens": 5, "bin_bytes": 20}


def test_unfinished_shard_has_only_temporary_files(tmp_path):
    writer = ShardWriter(str(tmp_path / "x"), 3, np.uint16)
    writer.add_document(np.arange(10, dtype=np.uint16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_00003.bin.tmp"]
    assert not indexed_dataset_module().IndexedDataset.exists(str(tmp_path / "x_00003"))
    writer.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_00003.bin", "x_00003.idx"]
