"""The curation executor: stages over input files in worker processes, around a global dedup.

Three phases, each resumable (the modules named hold each):
  1. filter   filter_phase.py   one task per input file: read -> stages (normalize, filters,
                                dedup_keys) -> survivors and their dedup keys in work/; every
                                dropped or unreadable record to removed/ with its reason.
  2. dedup    dedup_phase.py    global: buckets -> verified pairs -> clusters -> work/duplicates.npy.
  3. write    write_phase.py    one task per input file: the survivors pass exact_dedup and
                                minhash_dedup; kept documents to documents/, duplicates to removed/.
A task writes under temporary names and leaves a `.done` marker last, so a re-run
skips finished work and produces the same bytes as an uninterrupted run; stats.json,
written last, marks the run finished. Stages never know about workers, files or MPI
ranks; this module owns those (layout.py says where files go).
"""

from __future__ import annotations

import json
import time

from data_pipeline.atomic import write_text_atomically
from data_pipeline.curation.config import CurationConfig, CurationConfigError, load_curation_config  # noqa: F401
from data_pipeline.curation.dedup_phase import deduplicate
from data_pipeline.curation.distributed import Coordinator
from data_pipeline.curation.filter_phase import ShardTask, filter_shard, input_size
from data_pipeline.curation.layout import Layout, OutputMismatchError, claim_output  # noqa: F401
from data_pipeline.curation.stats import build_stats, summary_table  # noqa: F401
from data_pipeline.curation.tasks import run_tasks
from data_pipeline.curation.write_phase import WriteTask, write_shard


def curate(inputs: list[str], output, config: CurationConfig, workers: int = 1, show_progress: bool = True,
           comm=None, keep_work: bool = False) -> dict:
    """Curate `inputs` into `output`; resumes a run left unfinished there. Returns the stats.

    With an MPI communicator, ranks take input files round-robin and the dedup is
    global across all of them; every rank returns the same stats. Unless `keep_work`,
    a finished run leaves of work/ only its markers and run.json.
    """
    co, layout, began = Coordinator(comm), Layout(output), time.perf_counter()
    indices = list(range(len(inputs)))
    mine = [i for i in indices if co.owns(i)]
    label = f"rank {co.rank} " if co.world > 1 else ""

    def phase(work):
        """Run `work` on every rank; if any rank fails, all stop."""
        error, result = None, None
        try:
            result = work()
        except BaseException as failure:  # noqa: BLE001 - re-raised below, on every rank
            error = failure
        co.agree(error)
        return result

    def prepare_output():
        if co.rank == 0:
            layout.make()
            claim_output(layout, inputs, config)
            return json.loads(layout.stats.read_text()) if layout.stats.is_file() else None
        return None

    finished = co.broadcast(phase(prepare_output))
    if finished is not None:  # a re-run of a finished run: nothing to do but what a crash may have left
        phase(lambda: co.rank == 0 and not keep_work and layout.remove_work())
        return finished
    phase(lambda: co.rank == 0 and config.prepared(layout.work))  # indexes a stage needs, built once
    prepared = phase(lambda: config.prepared(layout.work, build=False))  # and found by every rank
    todo = [i for i in mine if not layout.marker("filter", i).is_file()]
    phase(lambda: run_tasks(filter_shard, [ShardTask(i, inputs[i], prepared, layout) for i in todo], workers,
                            label + "filter", show_progress, total=sum(input_size(inputs[i]) for i in todo)))
    dedup_began = time.perf_counter()
    written = all(layout.marker("write", i).is_file() for i in indices)  # e.g. stats.json deleted after the end
    if config.deduplicates and not written:
        phase(lambda: deduplicate(layout, indices, config, co))
    dedup_seconds = time.perf_counter() - dedup_began
    writes = [WriteTask(i, layout, config, keep_work) for i in mine if not layout.marker("write", i).is_file()]
    phase(lambda: run_tasks(write_shard, writes, workers, label + "write", show_progress, unit="doc",
                            total=sum(json.loads(layout.marker("filter", t.index).read_text())["kept"] for t in writes)))

    def finish():
        if co.rank != 0:
            return None
        filtered = [json.loads(layout.marker("filter", i).read_text()) for i in indices]
        written = [json.loads(layout.marker("write", i).read_text()) for i in indices]
        stats = build_stats(inputs, filtered, written, dedup_seconds, time.perf_counter() - began)
        write_text_atomically(layout.stats, json.dumps(stats, indent=1))
        if not keep_work:
            layout.remove_work()
        return stats

    return co.broadcast(phase(finish))
