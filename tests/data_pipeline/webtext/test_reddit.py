"""Pushshift dumps -> the WebText URL list: real zstd files written with a 2 GiB window, as Pushshift's are."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import zstandard

from data_pipeline.readers import InputError
from data_pipeline.webtext.reddit import LinkRules, build_url_list, resolve_dumps, submission_link
from tests.conftest import run_tool

LONG_WINDOW = zstandard.ZstdCompressionParameters(window_log=31, enable_ldm=True, compression_level=3)


def write_long_window_zst(path: Path, blocks: list[list[bytes]]) -> Path:
    """A zstd file as `zstd --long=31` writes it: streamed, so the frame header declares the 2 GiB
    window (a known content size would let zstd shrink it). Each block of lines ends a zstd block."""
    with open(path, "wb") as raw, zstandard.ZstdCompressor(compression_params=LONG_WINDOW).stream_writer(raw) as out:
        for lines in blocks:
            out.write(b"".join(lines))
            out.flush(zstandard.FLUSH_BLOCK)
    return path


def submission(url, score=10, created=1_560_000_000, is_self=False, **fields) -> bytes:
    record = {"id": "c0ffee", "author": "someone", "subreddit": "technology", "title": "A link", "selftext": "",
              "domain": "example.com", "permalink": "/r/technology/comments/c0ffee/a_link/", "num_comments": 4,
              "over_18": False, "is_self": is_self, "url": url, "score": score, "created_utc": created, **fields}
    if url is None:
        del record["url"]
    return (json.dumps(record, ensure_ascii=False) + "\n").encode()


# Every case of the issue, in one Pushshift month (zstd, 2 GiB window) and one plain jsonl month.
JUNE = [
    submission("http://www.example.com/news/story?id=7&utm_source=reddit", score=10, created=1_560_000_300),
    submission("HTTP://WWW.Example.com:80/news/story?id=7#comments", score=2, created=1_560_000_100),
    submission("https://blog.example.org", score=3, created=1_560_000_200),  # exactly the minimum karma
    submission("https://low.example.net/a", score=2),
    submission("https://www.reddit.com/r/python/comments/abc/hello/", is_self=True),
    submission("https://i.redd.it/abc.jpg"),
    submission("https://old.reddit.com/r/python/comments/abc/"),
    submission("https://en.wikipedia.org/wiki/GPT-2"),
    submission("https://imgur.com/gallery/abc"),
    submission("http://[bad/"),
    submission("ftp://files.example.com/x"),
    submission(None),
    b'{"url": "https://example.com/cut\n',
    b"\n",
    b"   \n",
    # '&' escaped as Reddit's API does, created_utc a string as in some Pushshift months
    submission("https://www.example.com/watch?a=1&amp;b=2", score=5, created="1560000400"),
    submission("https://MÜNCHEN.example/Straße?fbclid=x", score=4),
    b"[1, 2]\n",
    b'{"url": "https://example.com/\xff"}\n',
    submission("https://example.com/x", score=None),
    submission("https://example.com/y", created="yesterday"),
]
JULY = [
    submission("http://www.example.com/news/story?id=7", score=1, created=1_559_999_999),
    submission("https://low.example.net/a#top", score=1),
    submission("https://youtu.be/xyz"),
]
EXPECTED_LINES = [
    {"url": "http://www.example.com/news/story?id=7", "score": 10, "submissions": 3,
     "first_created_utc": 1_559_999_999},
    {"url": "https://blog.example.org/", "score": 3, "submissions": 1, "first_created_utc": 1_560_000_200},
    {"url": "https://www.example.com/watch?a=1&b=2", "score": 5, "submissions": 1, "first_created_utc": 1_560_000_400},
    {"url": "https://xn--mnchen-3ya.example/Straße", "score": 4, "submissions": 1, "first_created_utc": 1_560_000_000},
]
EXPECTED_DROPPED = {
    "malformed_json": 1, "invalid_utf8": 1, "not_an_object": 1, "truncated_stream": 0, "missing_url": 1,
    "self_post": 1, "malformed_url": 1, "not_http": 1, "reddit": 2, "wikipedia": 1, "media": 2, "bad_score": 1,
    "bad_created_utc": 1,
}


@pytest.fixture
def dumps(tmp_path) -> list[str]:
    june = write_long_window_zst(tmp_path / "RS_2019-06.zst", [JUNE[:8], JUNE[8:]])
    july = tmp_path / "RS_2019-07.jsonl"
    july.write_bytes(b"".join(JULY))
    return [str(june), str(july)]


def test_the_test_dump_needs_a_long_window(dumps):
    data = Path(dumps[0]).read_bytes()
    assert zstandard.get_frame_parameters(data).window_size == 1 << 31
    with pytest.raises(zstandard.ZstdError, match="too much memory"):
        zstandard.ZstdDecompressor().decompressobj().decompress(data)


def test_url_list_of_pushshift_dumps(dumps, tmp_path):
    output = tmp_path / "out" / "urls.jsonl"
    stats = build_url_list(dumps, str(output), partitions=1)
    lines = output.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == EXPECTED_LINES
    assert lines[0] == json.dumps(EXPECTED_LINES[0])  # the line format the curation join reads
    assert stats["submissions"]["dropped"] == EXPECTED_DROPPED
    assert stats["submissions"]["read"] == 22 and stats["submissions"]["kept"] == 8
    assert stats["urls"] == {"distinct": 5, "written": 4, "dropped": {"low_karma": 1}}
    assert stats["submissions"]["examples"]["malformed_url"] == [f"{dumps[0]}:10: malformed_url: 'http://[bad/'"]
    assert stats["submissions"]["examples"]["malformed_json"][0].startswith(f"{dumps[0]}:13: malformed_json: ")
    assert [f["read"] for f in stats["inputs"]] == [19, 3]
    assert json.loads((tmp_path / "out" / "urls.jsonl.stats.json").read_text()) == stats
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["urls.jsonl", "urls.jsonl.stats.json"]


def test_min_karma_and_keep_options(dumps, tmp_path):
    output = tmp_path / "urls.jsonl"
    stats = build_url_list(dumps, str(output), LinkRules(min_karma=1, keep_wikipedia=True, keep_media=True))
    urls = [json.loads(line)["url"] for line in output.read_text(encoding="utf-8").splitlines()]
    assert "https://low.example.net/a" in urls and "https://en.wikipedia.org/wiki/GPT-2" in urls
    assert "https://imgur.com/gallery/abc" in urls and "https://youtu.be/xyz" in urls
    assert stats["submissions"]["dropped"]["media"] == stats["submissions"]["dropped"]["wikipedia"] == 0
    assert stats["submissions"]["dropped"]["reddit"] == 2  # Reddit's own links are never outbound


def many_submissions(count: int, seed: int = 0) -> list[bytes]:
    """Submissions of a few hundred URLs, each written several ways (case, port, tracking, fragment)."""
    rng = random.Random(seed)
    spellings = ["https://site{}.example.com/post/{}", "https://SITE{}.Example.com:443/post/{}?utm_source=rd",
                 "https://site{}.example.com/post/{}#comments", "http://site{}.example.com/post/{}"]
    return [submission(rng.choice(spellings).format(rng.randrange(40), rng.randrange(10)),
                       score=rng.randrange(-2, 30), created=1_500_000_000 + rng.randrange(10**6))
            for _ in range(count)]


def test_output_bytes_do_not_depend_on_partitions(tmp_path):
    lines = many_submissions(3000)
    dumps = [str(write_long_window_zst(tmp_path / "RS_a.zst", [lines[:1500]])), str(tmp_path / "RS_b.jsonl")]
    Path(dumps[1]).write_bytes(b"".join(lines[1500:]))
    outputs = []
    for partitions in (1, 3, 16):
        stats = build_url_list(dumps, str(tmp_path / f"urls{partitions}.jsonl"), partitions=partitions)
        assert stats["settings"]["partitions"] == partitions
        outputs.append((tmp_path / f"urls{partitions}.jsonl").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    records = [json.loads(line) for line in outputs[0].splitlines()]
    assert [r["url"] for r in records] == sorted(r["url"] for r in records)
    assert 300 < len(records) < 800 and sum(r["submissions"] for r in records) < 3000  # merged, low karma gone
    assert min(r["score"] for r in records) == 3


def test_truncated_dump_is_counted_at_its_line(tmp_path):
    lines = many_submissions(200)
    path = write_long_window_zst(tmp_path / "RS_cut.zst", [lines[:120], lines[120:]])
    path.write_bytes(path.read_bytes()[:-20])  # cut inside the last zstd block
    stats = build_url_list([str(path)], str(tmp_path / "urls.jsonl"))
    assert stats["submissions"]["dropped"]["truncated_stream"] == 1
    assert stats["submissions"]["read"] == 121  # 120 lines, then the damage
    [damage] = stats["submissions"]["examples"]["truncated_stream"]
    assert damage.startswith(f"{path}:121: truncated_stream: ")


def test_undecodable_dump_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "RS_2019-08.zst"
    bad.write_bytes(b"this is not zstd at all\n" * 100)
    with pytest.raises(InputError, match=f"cannot decode {bad}"):
        build_url_list([str(bad)], str(tmp_path / "urls.jsonl"))
    compressed_as_jsonl = tmp_path / "RS_2019-09.jsonl"
    compressed_as_jsonl.write_bytes(zstandard.ZstdCompressor().compress(b"".join(many_submissions(50))))
    with pytest.raises(InputError, match=f"cannot decode {compressed_as_jsonl}: none of its"):
        build_url_list([str(compressed_as_jsonl)], str(tmp_path / "urls.jsonl"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RS_2019-08.zst", "RS_2019-09.jsonl"]  # no output, no spill


def test_resolve_dumps_refuses_other_formats(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(InputError, match="unsupported input for a Reddit dump"):
        resolve_dumps([str(tmp_path / "x.parquet")])
    with pytest.raises(InputError, match="input not found"):
        resolve_dumps([str(tmp_path / "RS_*.zst")])


def test_submission_link_fields():
    assert submission_link({"url": "https://a.example/", "score": 3.0, "created_utc": "1134365188"}) == (
        ("https://a.example/", 3, 1134365188), None)
    assert submission_link({"url": "https://a.example/", "score": True, "created_utc": 1}) == (None, "bad_score")
    assert submission_link({"url": "  ", "score": 3, "created_utc": 1}) == (None, "missing_url")
    assert submission_link({"url": 7, "score": 3, "created_utc": 1}) == (None, "missing_url")
    assert submission_link({"url": "https://a.example/?x=1&amp;copy=2", "score": 3, "created_utc": 1}) == (
        ("https://a.example/?x=1&copy=2", 3, 1), None)


# ---- the command line -------------------------------------------------------------


@pytest.mark.slow
def test_command_line_matches_the_library_with_workers_and_partitions(dumps, tmp_path):
    build_url_list(dumps, str(tmp_path / "reference.jsonl"), partitions=1)
    output = tmp_path / "cli" / "urls.jsonl"
    result = run_tool("reddit_urls.py", "--input", str(Path(dumps[0]).parent / "RS_2019-*"), "--output", str(output),
                      "--workers", "2", "--partitions", "5", "--quiet")
    assert result.returncode == 0, result.stderr
    assert output.read_bytes() == (tmp_path / "reference.jsonl").read_bytes()
    table = result.stdout
    assert "  self_post" in table and "  low_karma (< 3)" in table and "4 URLs from 22 submissions" in table
    stats = json.loads((tmp_path / "cli" / "urls.jsonl.stats.json").read_text())
    assert stats["submissions"]["dropped"] == EXPECTED_DROPPED and stats["settings"]["workers"] == 2


def test_command_line_reports_a_truncated_dump_and_goes_on(tmp_path):
    lines = many_submissions(200)
    path = write_long_window_zst(tmp_path / "RS_cut.zst", [lines[:120], lines[120:]])
    path.write_bytes(path.read_bytes()[:-20])
    result = run_tool("reddit_urls.py", "--input", str(path), "--output", str(tmp_path / "urls.jsonl"),
                      "--workers", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"warning: {path}:121: truncated_stream: " in result.stderr
    assert "  truncated_stream" in result.stdout


def test_command_line_refuses_missing_and_undecodable_inputs(tmp_path):
    result = run_tool("reddit_urls.py", "--input", str(tmp_path / "RS_*.zst"), "--output", str(tmp_path / "urls.jsonl"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: input not found: {tmp_path / 'RS_*.zst'}"
    bad = tmp_path / "RS_2019-08.zst"
    bad.write_bytes(b"not zstd\n")
    result = run_tool("reddit_urls.py", "--input", str(bad), "--output", str(tmp_path / "urls.jsonl"), "--quiet")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: cannot decode {bad}: ")
    assert not (tmp_path / "urls.jsonl").exists()
