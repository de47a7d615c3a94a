#!/usr/bin/env python
"""Tokenize jsonl / jsonl.gz / jsonl.zst / parquet / datasets inputs into Megatron .bin/.idx shards.

    python tools/preprocess_data.py --input 'corpus/*.jsonl.zst' --output-prefix data/web \
        --tokenizer gpt2 --workers 16
    mpiexec -n 4 python tools/preprocess_data.py ... --workers 16   # in a Slurm job too (slurm/preprocess.sbatch)

Writes data/web_00000.bin/.idx, data/web_00001..., and data/web.json (inputs,
tokenizer identity, counts, skipped records with their reasons). Under mpiexec
the ranks share the input files and write the same shards, byte for byte (the
output prefix must be on a file system every node sees). Re-running the same
command after an interruption, with any number of ranks, resumes after the last
finished shard. Exit codes: 0 done, 1 a bad record under --strict, 2 unusable
arguments; a rank stopped by another rank's failure exits 0 and leaves the code
to that rank (mpiexec ORs the ranks' codes).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.curation.distributed import AnotherRankFailed, PeerFailure, world_communicator  # noqa: E402
from data_pipeline.preprocess import DEFAULT_SHARD_SIZE_TOKENS, OutputError, StrictModeError, preprocess  # noqa: E402
from data_pipeline.readers import InputError  # noqa: E402
from data_pipeline.shards import JournalMismatch  # noqa: E402


def default_workers() -> int:
    return int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or len(os.sched_getaffinity(0))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB",
                        help="files, globs or directories (a datasets save_to_disk directory counts as one input)")
    parser.add_argument("--output-prefix", required=True, help="shards are written as PREFIX_00000.bin/.idx, ...")
    parser.add_argument("--tokenizer", default="gpt2",
                        help="'gpt2', a directory with encoder.json+vocab.bpe or vocab.json+merges.txt, "
                             "or a SentencePiece tokenizer.model")
    parser.add_argument("--workers", type=int, default=default_workers(), help="tokenizing processes (default: CPUs available)")
    parser.add_argument("--text-key", default="text", help="the field or column holding the document text")
    parser.add_argument("--shard-size-tokens", type=int, default=DEFAULT_SHARD_SIZE_TOKENS,
                        help="start a new shard once one holds this many tokens")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad record instead of counting it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def fail(error: Exception, exit_code: int, comm) -> int:
    """Say why, in one write (print's two would interleave with other ranks' lines under mpiexec). Ranks
    fail together; each waits until all have said why, as the launcher ends the others as soon as one
    exits with an error."""
    # Under mpiexec the ranks' output is merged as it comes: rank 0's progress bar may be mid-line.
    fresh_line = "\n" if comm is not None else ""
    sys.stderr.write(f"{fresh_line}error: {error}\n")
    sys.stderr.flush()
    if comm is not None:
        comm.Barrier()
    return exit_code


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("data_pipeline").setLevel(logging.INFO)
    comm = None
    try:
        comm = world_communicator()  # several ranks under mpiexec / srun, else None
        summary = preprocess(args.input, args.output_prefix, args.tokenizer, args.workers, args.text_key,
                             args.shard_size_tokens, args.strict, show_progress=not args.quiet, comm=comm)
    except (InputError, OutputError, JournalMismatch, ValueError) as error:
        return fail(error, 2, comm)
    except AnotherRankFailed as error:
        return fail(error, 0, comm)  # the rank that failed sets the job's exit code (AnotherRankFailed)
    except (StrictModeError, PeerFailure) as error:
        return fail(error, 1, comm)
    except Exception:  # a bug or the machine (a worker killed, a full disk): the traceback, and no rank left waiting
        traceback.print_exc()
        sys.stderr.flush()
        if comm is not None:
            comm.Abort(1)  # the others may wait in a collective or a barrier; MPI_Finalize would wait for them
        return 1
    if comm is not None and comm.Get_rank() != 0:
        return 0
    skipped = summary["skipped"]
    print(f"{summary['documents']} documents, {summary['tokens']} tokens in {len(summary['shards'])} shards "
          f"({summary['dtype']}); {skipped['total']} records skipped {skipped['by_reason'] or ''}")
    for record in skipped["records"][:20]:
        print(f"  skipped {record['file']}:{record['line']}: {record['reason']}: {record['detail']}")
    if skipped["total"] > 20:
        print(f"  ... and {skipped['total'] - 20} more, all listed in {args.output_prefix}.json")
    print(f"summary: {args.output_prefix}.json")
    if summary["tokens"] == 0:  # exit 0 (nothing failed), but a training run on this prefix is refused
        print(f"WARNING: no tokens were written: every input record was empty or skipped, so {args.output_prefix} "
              "cannot be trained on; check --input and --text-key, and the curation's stats.json if the text was "
              "curated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
