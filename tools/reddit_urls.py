#!/usr/bin/env python
"""The WebText URL list from Pushshift Reddit submission dumps: outbound links with enough karma.

    python tools/reddit_urls.py --input 'reddit/submissions/RS_2019-*.zst' --output urls.jsonl --min-karma 3

Reads the dumps (one submission per line; .zst as Pushshift writes them, with `zstd --long=31`,
or .jsonl / .jsonl.gz), keeps links that leave Reddit (not self posts, not Reddit's own domains,
not Wikipedia unless --keep-wikipedia, not image, video or audio hosts or files unless
--keep-media), normalizes them (data_pipeline/webtext/urls.py), and writes one line per distinct
URL whose highest karma is at least --min-karma, sorted by URL:

    {"url": "https://example.com/story", "score": 57, "submissions": 2, "first_created_utc": 1561939201}

Prints the count of each drop reason, and saves them with examples (file:line) in
OUTPUT.stats.json. Uses about 2 GiB of memory per worker for --long=31 dumps (zstd's window).
Exit codes: 0 done, 2 unusable arguments or input (a missing file, one that cannot be decoded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.readers import InputError  # noqa: E402
from data_pipeline.webtext.reddit import LinkRules, build_url_list, resolve_dumps, summary_table  # noqa: E402
from tools.preprocess_data import default_workers  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB",
                        help="Pushshift submission dumps (RS_*.zst), .jsonl or .jsonl.gz files, globs or directories")
    parser.add_argument("--output", required=True, help="the URL list, a .jsonl file")
    parser.add_argument("--min-karma", type=int, default=3,
                        help="keep a URL when its highest score over its submissions is at least this "
                             "(default 3, GPT-2's)")
    parser.add_argument("--keep-wikipedia", action="store_true", help="keep links to Wikipedia (GPT-2 removed them)")
    parser.add_argument("--keep-media", action="store_true",
                        help="keep links to image, video and audio hosts and files (imgur, youtube, .jpg, ...)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes, one dump file each at a time (default: CPUs available)")
    parser.add_argument("--tmp-dir", help="where the temporary spill goes, about 100 bytes per kept submission "
                                          "(default: the output's directory)")
    parser.add_argument("--partitions", type=int, help=argparse.SUPPRESS)  # tests: the output must not depend on it
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rules = LinkRules(args.min_karma, args.keep_wikipedia, args.keep_media)
    try:
        inputs = resolve_dumps(args.input)
        stats = build_url_list(inputs, args.output, rules, max(args.workers, 1), args.partitions, args.tmp_dir,
                               show_progress=not args.quiet)
    except (InputError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary_table(stats))
    damaged = stats["submissions"]["examples"].get("truncated_stream", [])
    for problem in damaged:
        print(f"warning: {problem}", file=sys.stderr)
    print(f"{stats['urls']['written']:,} URLs from {stats['submissions']['read']:,} submissions "
          f"({stats['bytes_in'] / 1e6:,.1f} MB compressed, {stats['bytes_uncompressed'] / 1e6:,.1f} MB of jsonl) "
          f"in {stats['seconds']['total']:,.1f} s")
    print(f"urls: {args.output}   stats: {args.output}.stats.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
