"""Tasks in worker processes, with one progress bar that moves as the workers read, not per file.

A task reports what it has done with `report(documents, bytes)` as it goes; the
reports reach the bar through a queue from spawned workers, or directly when
the task runs in this process. One input file can take an hour (a Common Crawl
WARC, a large parquet shard), so a bar that moved per file would say nothing.
"""

from __future__ import annotations

import queue
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Callable

_sink: Callable[[int, int, int], None] | None = None  # (task index, documents, bytes) -> None
_task = -1


def _send_to(channel) -> None:
    global _sink
    # Reports left in the pipe when a worker exits are not worth waiting for (the task's result
    # tops the bar up), and waiting could hang a worker whose reader has stopped reading.
    channel.cancel_join_thread()
    _sink = lambda index, documents, size: channel.put((index, documents, size))  # noqa: E731 - set once per worker


def report(documents: int, size: int) -> None:
    """Called by a task: `documents` more documents and `size` more bytes done since its last report."""
    if _sink is not None:
        _sink(_task, documents, size)


def _run_one(function, index: int, task):
    global _task
    _task = index
    return function(task)


class _Bar:
    """tqdm over `unit` ("B" or "doc"), with the other rate and the files done in its postfix."""

    def __init__(self, total: int, unit: str, label: str, tasks: int, enabled: bool):
        from tqdm import tqdm

        self.unit, self.tasks, self.done_tasks = unit, tasks, 0
        self.documents = self.size = 0
        self.began = time.perf_counter()
        self.reported: dict[int, tuple[int, int]] = {}
        self.finished: set[int] = set()
        self.bar = tqdm(total=total, unit=unit, unit_scale=True, desc=label, disable=not enabled or not tasks,
                        mininterval=0.5 if sys.stderr.isatty() else 30)

    def add(self, index: int, documents: int, size: int) -> None:
        if index in self.finished:  # a report that arrived after its task's result: already counted
            return
        before = self.reported.get(index, (0, 0))
        self.reported[index] = (before[0] + documents, before[1] + size)
        self.documents, self.size = self.documents + documents, self.size + size
        self.bar.update(size if self.unit == "B" else documents)
        elapsed = max(time.perf_counter() - self.began, 1e-9)
        other = f"{self.documents / elapsed:,.0f} docs/s" if self.unit == "B" else f"{self.size / elapsed / 1e6:,.1f} MB/s"
        self.bar.set_postfix_str(f"{other}, {self.done_tasks}/{self.tasks} files", refresh=False)

    def finish(self, index: int, result: dict) -> None:
        """A task ended: count whatever its reports did not cover (estimates, or a task that never reported)."""
        self.done_tasks += 1
        documents, size = self.reported.get(index, (0, 0))
        self.add(index, max(result["documents"] - documents, 0), max(result["bytes"] - size, 0))
        self.finished.add(index)

    def close(self) -> None:
        self.bar.close()


def run_tasks(function, tasks: list, workers: int, label: str, show_progress: bool, total: int,
              unit: str = "B") -> list:
    """`function(task)` for every task, in worker processes (spawned: safe beside threads and MPI) when
    `workers` > 1. Each result is a dict with "documents" and "bytes"; `total` is the bar's length in
    `unit`. Returns the results in task order."""
    global _sink
    bar = _Bar(total, unit, label, len(tasks), show_progress)
    results: dict[int, dict] = {}
    try:
        if workers <= 1:
            _sink = bar.add
            for index, task in enumerate(tasks):
                results[index] = _run_one(function, index, task)
                bar.finish(index, results[index])
        else:
            _run_in_pool(function, tasks, workers, bar, results)
    finally:
        _sink = None
        bar.close()
    return [results[i] for i in range(len(tasks))]


def _run_in_pool(function, tasks: list, workers: int, bar: _Bar, results: dict) -> None:
    context = get_context("spawn")
    channel = context.Queue()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_send_to, initargs=(channel,))
    try:
        pending = {pool.submit(_run_one, function, index, task): index for index, task in enumerate(tasks)}
        while pending:
            finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            _drain(channel, bar)
            for future in finished:
                index = pending.pop(future)
                results[index] = future.result()  # a failed task raises here
                bar.finish(index, results[index])
    except BaseException:
        _stop_workers(pool)  # rather than wait for the other tasks to finish files of any size
        raise
    finally:
        pool.shutdown(cancel_futures=True)
        channel.close()


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's processes; their unfinished files stay .partial and are redone on resume."""
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14+
    if terminate is not None:
        terminate()
        return
    for process in list((pool._processes or {}).values()):  # noqa: SLF001 - no public way before 3.14
        process.terminate()


def _drain(channel, bar: _Bar) -> None:
    while True:
        try:
            bar.add(*channel.get_nowait())
        except queue.Empty:
            return
