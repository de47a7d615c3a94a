#!/usr/bin/env python
"""Throughput of tools/reddit_urls.py on a synthetic Pushshift month, per core, with peak memory.

    python tools/bench_reddit_urls.py --megabytes 200 --repeats 3

Writes a submissions dump of about `--megabytes` MB of jsonl with Pushshift's 2019 fields
(preview images, flair, awards, ...), compressed as Pushshift does with `zstd --long=31` (the CLI
when it is installed, else python-zstandard with the same 2 GiB window). The links follow a
2019-like mix: a third self posts, a quarter Reddit-hosted images and videos, imgur, YouTube and
other media, some Wikipedia, and outbound articles over a Zipf-distributed set of domains, some
submitted several times with tracking parameters or fragments; scores are heavy-tailed with most
at 1 or 2. Then runs the real command line with one worker, `--repeats` times, and reports the
best run as compressed and uncompressed MB per second, both of wall clock and of CPU time (the
per-core figure on a shared machine), with the run's peak RSS; as ceilings, the CPU time of zstd
decompression alone and of json.loads over every line alone.

    python tools/bench_reddit_urls.py --distinct-urls 2000000 --partitions 1 16

measures instead what bounds memory: peak RSS for that many distinct URLs (minimal submissions,
plain jsonl) with each number of partitions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[1]
SUBREDDITS = ["news", "worldnews", "politics", "technology", "science", "programming", "gaming", "pics", "videos",
              "funny", "AskReddit", "todayilearned", "movies", "music", "sports", "Bitcoin", "europe", "space"]
MEDIA = ["https://i.redd.it/{}.jpg", "https://v.redd.it/{}", "https://i.imgur.com/{}.jpg", "https://imgur.com/a/{}",
         "https://www.youtube.com/watch?v={}", "https://youtu.be/{}", "https://gfycat.com/{}",
         "https://twitter.com/user/status/{}", "https://www.reddit.com/r/pics/comments/{}/x/"]
TRACKING = ["", "", "", "?utm_source=reddit&utm_medium=social", "#comments", "?ref=rd&fbclid=IwAR{}"]


def random_id(rng: random.Random, length: int = 6) -> str:
    return "".join(rng.choices(string.ascii_lowercase + string.digits, k=length))


def link(rng: random.Random, domains: list[str], weights: list[float]) -> tuple[str, bool]:
    """(url, is_self) drawn from a 2019-like mix of submission kinds."""
    kind = rng.random()
    if kind < 0.34:
        return f"https://www.reddit.com/r/{rng.choice(SUBREDDITS)}/comments/{random_id(rng)}/title/", True
    if kind < 0.70:
        return rng.choice(MEDIA).format(random_id(rng, 11)), False
    if kind < 0.71:
        return f"https://en.wikipedia.org/wiki/Article_{rng.randrange(50_000)}", False
    domain = rng.choices(domains, weights)[0]
    article = rng.randrange(40_000) if rng.random() < 0.5 else rng.randrange(10**9)  # half are reposted links
    path = f"/{rng.choice(['news', 'article', '2019/06', 'blog', 'story'])}/{article}-some-words-of-the-headline"
    return f"https://www.{domain}{path}{rng.choice(TRACKING).format(random_id(rng, 20))}", False


def submission(rng: random.Random, domains: list[str], weights: list[float]) -> dict:
    url, is_self = link(rng, domains, weights)
    subreddit, created = rng.choice(SUBREDDITS), 1_559_347_200 + rng.randrange(30 * 86_400)
    post_id = random_id(rng)
    preview = None if is_self else {"enabled": True, "images": [{
        "id": random_id(rng, 43),
        "source": {"url": f"https://external-preview.redd.it/{random_id(rng, 43)}.jpg", "width": 1200, "height": 628},
        "resolutions": [{"url": f"https://external-preview.redd.it/{random_id(rng, 43)}.jpg?width={w}&amp;crop=smart",
                         "width": w, "height": w // 2} for w in (108, 216, 320, 640, 960)]}]}
    words = rng.randrange(0, 400) if is_self and rng.random() < 0.7 else 0
    return {
        "all_awardings": [], "allow_live_comments": False, "author": f"user_{random_id(rng, 8)}",
        "author_created_utc": created - rng.randrange(10**8), "author_flair_css_class": None,
        "author_flair_richtext": [], "author_flair_text": None, "author_flair_type": "text",
        "author_fullname": f"t2_{random_id(rng, 8)}", "author_patreon_flair": False, "can_mod_post": False,
        "contest_mode": False, "created_utc": created, "domain": "self." + subreddit if is_self else url.split("/")[2],
        "full_link": f"https://www.reddit.com/r/{subreddit}/comments/{post_id}/title/", "gildings": {}, "id": post_id,
        "is_crosspostable": True, "is_meta": False, "is_original_content": False,
        "is_reddit_media_domain": "redd.it" in url, "is_robot_indexable": True, "is_self": is_self,
        "is_video": "v.redd.it" in url, "link_flair_background_color": "",
        "link_flair_css_class": None, "link_flair_richtext": [], "link_flair_text_color": "dark",
        "link_flair_type": "text", "locked": False, "media_only": False, "no_follow": rng.random() < 0.6,
        "num_comments": int(rng.paretovariate(1.2)) - 1, "num_crossposts": 0, "over_18": rng.random() < 0.05,
        "parent_whitelist_status": "all_ads", "permalink": f"/r/{subreddit}/comments/{post_id}/title/", "pinned": False,
        "post_hint": "link", "preview": preview, "pwls": 6, "retrieved_on": created + 5,
        "score": int(rng.paretovariate(0.9)),
        "selftext": " ".join(rng.choices(["the", "a", "reddit", "link", "people", "this", "is", "why"], k=words)),
        "send_replies": True, "spoiler": False, "stickied": False, "subreddit": subreddit,
        "subreddit_id": f"t5_{random_id(rng, 5)}", "subreddit_subscribers": rng.randrange(10**7),
        "subreddit_type": "public",
        "thumbnail": "self" if is_self else f"https://b.thumbs.redditmedia.com/{random_id(rng, 43)}.jpg",
        "thumbnail_height": 70, "thumbnail_width": 140,
        "title": f"A headline about {random_id(rng, 10)} and more words",
        "total_awards_received": 0, "url": url, "whitelist_status": "all_ads", "wls": 6,
    }


def write_dump(path: Path, megabytes: float, seed: int = 0) -> tuple[int, int]:
    """(submissions, uncompressed bytes) of a synthetic month written to `path` with a 2 GiB zstd window."""
    rng = random.Random(seed)
    domains = [f"site{k}.{rng.choice(['com', 'org', 'co.uk', 'net', 'de'])}" for k in range(20_000)]
    weights = [1 / (rank + 1) for rank in range(len(domains))]  # Zipf: a few news sites, a long tail
    plain = path.with_suffix(".jsonl")
    count = size = 0
    with open(plain, "w", encoding="utf-8") as out:
        while size < megabytes * 1e6:
            line = json.dumps(submission(rng, domains, weights)) + "\n"
            out.write(line)
            count, size = count + 1, size + len(line)
    if shutil.which("zstd"):  # from a pipe: with no size to fit it to, the frame declares the whole 2 GiB window
        with open(plain, "rb") as source:
            subprocess.run(["zstd", "-q", "-f", "--long=31", "-3", "-o", str(path)], stdin=source, check=True)
    else:
        params = zstandard.ZstdCompressionParameters(window_log=31, enable_ldm=True, compression_level=3)
        with open(plain, "rb") as source, open(path, "wb") as raw:
            zstandard.ZstdCompressor(compression_params=params).copy_stream(source, raw)
    plain.unlink()
    return count, size


def ceilings(path: Path) -> dict:
    """CPU seconds to decompress alone, and to json.loads every line alone (after decompressing in memory)."""
    began = time.process_time()
    with open(path, "rb") as raw:
        data = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(raw).read()
    decompress = time.process_time() - began
    began = time.process_time()
    for line in data.splitlines():
        json.loads(line)
    return {"decompress": decompress, "json_loads": time.process_time() - began}


def run_tool(dump: Path, output: Path, *options: str) -> dict:
    """One run of the command line: wall and CPU seconds, peak RSS (its own, not the zstd CLI's), statistics."""
    began = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(REPO / "tools" / "reddit_urls.py"), "--input", str(dump),
                              "--output", str(output), "--workers", "1", "--quiet", *options],
                             stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - began
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"reddit_urls.py failed with exit code {os.waitstatus_to_exitcode(status)}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_rss": usage.ru_maxrss * 1024,
            "stats": json.loads(Path(f"{output}.stats.json").read_text())}


def throughput(workdir: Path, megabytes: float, repeats: int) -> None:
    dump = workdir / "RS_2019-06.zst"
    submissions, uncompressed = write_dump(dump, megabytes)
    compressed = dump.stat().st_size
    with open(dump, "rb") as raw:
        window = zstandard.get_frame_parameters(raw.read(18)).window_size
    print(f"dump: {submissions:,} submissions, {uncompressed / 1e6:,.1f} MB jsonl, {compressed / 1e6:,.1f} MB "
          f"zstd --long=31 (window {window / 2**20:,.0f} MiB)")
    runs = [run_tool(dump, workdir / "urls.jsonl") for _ in range(repeats)]
    stats = runs[-1]["stats"]
    print(json.dumps({"submissions": stats["submissions"]["read"], "kept": stats["submissions"]["kept"],
                      "urls_written": stats["urls"]["written"], "phase_seconds": stats["seconds"]}))
    for measure in ("wall", "cpu"):
        best = min(run[measure] for run in runs)
        print(f"reddit_urls.py, 1 worker, best of {repeats} by {measure} seconds: {best:.2f} s: "
              f"{compressed / best / 1e6:,.1f} MB/s compressed, {uncompressed / best / 1e6:,.1f} MB/s uncompressed, "
              f"{submissions / best:,.0f} submissions/s")
    print(f"peak RSS {max(run['peak_rss'] for run in runs) / 2**20:,.0f} MiB")
    limits = ceilings(dump)
    print(f"ceilings, CPU seconds in one process: zstd decompression alone "
          f"{uncompressed / limits['decompress'] / 1e6:,.0f} MB/s, "
          f"json.loads alone {uncompressed / limits['json_loads'] / 1e6:,.0f} MB/s")


def memory_bound(workdir: Path, distinct_urls: int, partitions: list[int]) -> None:
    """Peak RSS for `distinct_urls` URLs (each submitted once, plain jsonl) as the partitions grow."""
    dump = workdir / "RS_distinct.jsonl"
    with open(dump, "w", encoding="utf-8") as out:
        for k in range(distinct_urls):
            out.write(json.dumps({"url": f"https://www.site{k % 50_000}.com/article/{k}-some-words-of-the-headline",
                                  "score": 3 + k % 100, "created_utc": 1_559_347_200 + k, "is_self": False}) + "\n")
    print(f"{distinct_urls:,} distinct URLs, {dump.stat().st_size / 1e6:,.0f} MB jsonl")
    for count in partitions:
        run = run_tool(dump, workdir / "distinct.jsonl", "--partitions", str(count))
        print(f"  --partitions {count}: peak RSS {run['peak_rss'] / 2**20:,.0f} MiB, {run['wall']:.1f} s wall, "
              f"phases {run['stats']['seconds']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=200, help="uncompressed size of the synthetic dump")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the command line; the best is reported")
    parser.add_argument("--distinct-urls", type=int, default=0,
                        help="instead: peak memory for this many distinct URLs at each of --partitions")
    parser.add_argument("--partitions", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--workdir", help="where the dump and outputs go (default: a temporary directory)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_reddit_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.distinct_urls:
        memory_bound(workdir, args.distinct_urls, args.partitions)
    else:
        throughput(workdir, args.megabytes, args.repeats)
    if not args.workdir:
        shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
