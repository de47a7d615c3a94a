#!/usr/bin/env python
"""Curate raw text: normalize, quality-filter, and deduplicate (exact and MinHash), as WebText and FineWeb were built.

    python tools/curate.py --config configs/data/webtext.yaml --input 'raw/*.jsonl.zst' --output curated/ --workers 16
    mpiexec -n 4 python tools/curate.py ... --workers 4      # ranks split the files, dedup is global

Reads jsonl (.gz, .zst), parquet, datasets directories, and WARC/WET archives
(HTML pages become their main text). Writes curated/documents/NNNNN.jsonl.zst
(or .parquet with `output_format: parquet`; one per input file, kept documents in
input order), curated/removed/ (every dropped document with its reason; a
duplicate also names the document it duplicates), and curated/stats.json
(counts per stage and reason, bytes in and out, time per stage), and prints a
summary table. With --url-metadata (the WebText recipe), each page is joined to its
URL's Reddit record first, so the karma filter sees the karma. Re-running the same command after an interruption skips the
files already done. Exit codes: 0 done, 2 unusable arguments or config.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.curation.distributed import AnotherRankFailed, PeerFailure, world_communicator  # noqa: E402
from data_pipeline.curation.pipeline import (  # noqa: E402
    CurationConfigError,
    OutputMismatchError,
    curate,
    load_curation_config,
    summary_table,
)
from data_pipeline.curation.writers import SchemaConflict  # noqa: E402
from data_pipeline.readers import InputError, resolve_inputs  # noqa: E402
from tools.preprocess_data import default_workers  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="stages and thresholds: configs/data/webtext.yaml, fineweb.yaml")
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB",
                        help="jsonl / jsonl.gz / jsonl.zst / parquet / WARC / WET files, globs, or datasets directories")
    parser.add_argument("--output", required=True, help="the output directory")
    parser.add_argument("--url-metadata", metavar="URLS_JSONL",
                        help="join every page to its record in this URL list (tools/reddit_urls.py's output): "
                             "score, submissions, first date; pages not in it are removed")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep work/ (survivors, dedup keys, duplicates) after the run; by default a finished "
                             "run leaves only its markers there")
    parser.add_argument("--workers", type=int, default=default_workers(), help="processes (default: CPUs available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def say_error(error: Exception, exit_code: int, comm) -> int:
    """One write, on a line of its own: under mpiexec the ranks' output is merged as it comes, and
    rank 0's progress bar may be mid-line."""
    fresh_line = "\n" if comm is not None else ""
    sys.stderr.write(f"{fresh_line}error: {error}\n")
    sys.stderr.flush()
    return exit_code


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("curate").setLevel(logging.INFO)
    comm = None
    try:
        comm = world_communicator()  # several ranks under mpiexec / srun, else None
        config = load_curation_config(args.config)
        if args.url_metadata:
            config = config.with_url_metadata(args.url_metadata)
        inputs = resolve_inputs(args.input)
        stats = curate(inputs, args.output, config, args.workers, show_progress=not args.quiet, comm=comm,
                       keep_work=args.keep_work)
    except (InputError, CurationConfigError, OutputMismatchError, SchemaConflict, OSError) as error:
        return say_error(error, 2, comm)
    except AnotherRankFailed as error:
        return say_error(error, 0, comm)  # the rank that failed sets the job's exit code (AnotherRankFailed)
    except PeerFailure as error:
        return say_error(error, 1, comm)
    if comm is not None and comm.Get_rank() != 0:
        return 0
    print(summary_table(stats))
    print(f"{stats['read']:,} read = {stats['kept']:,} kept + {stats['removed']:,} removed; "
          f"{stats['bytes_in'] / 1e6:,.1f} MB in, {stats['bytes_out'] / 1e6:,.1f} MB out")
    print(f"documents: {Path(args.output) / 'documents'}   removed: {Path(args.output) / 'removed'}   "
          f"stats: {Path(args.output) / 'stats.json'}")
    if stats["read"] and not stats["kept"]:
        print(f"WARNING: every document was removed ({most_removing_stage(stats)}); "
              "nothing is left to tokenize: check the input's fields and the config's thresholds", file=sys.stderr)
    return 0


def most_removing_stage(stats: dict) -> str:
    """'most by STAGE: REASON (N)': the reason that removed the most documents, for a curation that kept none."""
    reasons = [(count, reason) for row in stats["stages"].values() for reason, count in row["dropped"].items()]
    if not reasons:
        return "no stage recorded a reason"
    count, reason = max(reasons)
    return f"most by {reason}: {count:,}"


if __name__ == "__main__":
    sys.exit(main())
