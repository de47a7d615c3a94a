"""Input files as users have them: Pushshift's long-window zstd, blank lines, files that are not what
their suffix says (an error naming the file), and files cut short (counted where they end)."""

from __future__ import annotations

import gzip
import io
import json

import pytest
import zstandard

from data_pipeline.readers import InputError, chunk_documents, chunk_records, iter_chunks


def long_window_zstd(data: bytes) -> bytes:
    """Compressed as `zstd --long=31` does for a stream: the frame declares a 2 GiB window."""
    params = zstandard.ZstdCompressionParameters(window_log=31, enable_ldm=True, compression_level=3)
    out = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(out, closefd=False) as writer:
        writer.write(data)
    return out.getvalue()


def read_all(path, reader=chunk_records):
    kept, numbers, skipped = [], [], []
    for chunk in iter_chunks(str(path), 0, "text", chunk_bytes=4096):
        records, where, bad = reader(chunk, "text")
        kept, numbers, skipped = kept + records, numbers + where, skipped + bad
    return kept, numbers, skipped


def test_pushshift_long_window_dumps_are_read(tmp_path, real_documents):
    lines = b"".join(json.dumps({"text": d["text"]}).encode() + b"\n" for d in real_documents[:50])
    data = long_window_zstd(lines)
    with pytest.raises(zstandard.ZstdError, match="too much memory"):  # what the reader used to refuse
        zstandard.ZstdDecompressor().decompressobj().decompress(data)
    path = tmp_path / "RS_2019-01.zst"
    path.write_bytes(data)
    kept, _, skipped = read_all(path)
    assert [r["text"] for r in kept] == [d["text"] for d in real_documents[:50]] and skipped == []


def test_blank_lines_are_skipped_not_counted_and_later_lines_keep_their_numbers(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n\n   \n{"text": "two"}\n{"text": \n\n')
    kept, numbers, skipped = read_all(path)
    assert [r["text"] for r in kept] == ["one", "two"] and numbers == [0, 3]
    assert [(s.line, s.reason) for s, _ in skipped] == [(5, "malformed_json")]
    texts, numbers, problems = read_all(path, chunk_documents)
    assert texts == ["one", "two"] and [(p.line, p.reason) for p in problems] == [(5, "malformed_json")]


def test_the_missing_text_hint_names_each_tools_own_setting(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "wrong key"}\n')
    [(curation, _)] = read_all(path)[2]
    [preprocessing] = read_all(path, chunk_documents)[2]
    assert "text_key in the config" in curation.detail and "--text-key" not in curation.detail
    assert "--text-key" in preprocessing.detail


@pytest.mark.parametrize("name, data", [
    ("plain.jsonl.gz", b'{"text": "not compressed at all"}\n' * 10),
    ("garbage.jsonl.zst", b"\x00\x01not a zstd frame" * 10),
    ("text.warc.gz", gzip.compress(b"this is not a web archive\r\n" * 10)),
])
def test_a_file_that_cannot_be_decoded_is_an_error_naming_it(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputError, match=rf"^cannot decode {path}: "):
        read_all(path)


def test_a_file_cut_short_is_counted_where_it_ends_even_before_its_first_line(tmp_path, real_documents):
    lines = b"".join(json.dumps({"text": d["text"]}).encode() + b"\n" for d in real_documents[:20])
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(lines)[:40])
    kept, _, skipped = read_all(path)
    assert kept == [] and [(s.line, s.reason) for s, _ in skipped] == [(1, "truncated_stream")]


@pytest.mark.parametrize("offset", [30, 120, 200, 1500])
def test_damage_inside_the_first_records_is_counted_not_refused(tmp_path, offset):
    """A flipped byte in compressed data is damage, not another format: counted, and the run goes on."""
    from data_pipeline.sample_text import html_page, news_articles, write_web_archive

    pages = [(f"https://news.example.com/{a['id']}", "text/html", html_page(a).encode())
             for a in list(news_articles())[:10]]
    data = bytearray(write_web_archive(tmp_path / "whole.warc.gz", pages).read_bytes())
    data[offset] ^= 0xFF
    damaged = tmp_path / "damaged.warc.gz"
    damaged.write_bytes(bytes(data))
    _, _, skipped = read_all(damaged)
    assert [s.reason for s, _ in skipped][-1:] == ["truncated_stream"]
