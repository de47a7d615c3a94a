"""Four long runs started when the session starts, one after the other in a background thread, while
the rest of the suite runs: datatrove's decisions on the agreement corpus
(tests/data_pipeline/curation/test_datatrove_agreement.py), the planner's measured memory
(tests/pretrain/planner/test_planner.py), the demo (tests/tools/test_tools.py) and the README's workflow
on the demo's outputs (tests/test_readme_commands.py). The tests that check them
run last (`last`, used by tests/conftest.py to order the session), so they find them finished.

Why: most of the suite runs one process at a time (one intra-op thread each), which leaves a core idle
for about a third of the session, while these three runs are a third of its CPU. Run in the foreground,
each keeps both cores busy while everything else waits; in the background they fill the idle core.
Nothing in them depends on timing: datatrove's and our decisions are computed, the planner's figure is
a peak of resident memory, and the demo acts on the steps it reads from metrics.jsonl.

One at a time (the planner's cases too), so that the background adds little to what a test of the
suite asks for itself (the demo's 8 ranks take turns on the cores as in `make demo`).
`background_runs` (tests/conftest.py) is the session's table, name -> Future, holding the runs whose
fixtures (FIXTURES) a selected test uses; a fixture whose run was not started computes it itself
(`finished`).
"""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

# name -> the fixture through which its tests take the run's result
FIXTURES = {"datatrove": "outcomes", "planner": "measured", "demo": "demo_run", "tour": "readme_tour"}


def last(item) -> bool:
    """Whether the test checks a background run (it then runs at the session's end)."""
    return any(fixture in item.fixturenames for fixture in FIXTURES.values())


SECONDS: dict[str, tuple[float, float]] = {}  # name -> (began, ended), seconds since the session's start


def timed(name: str, began: float, function, *args):
    """function(*args), its start and end recorded in SECONDS (for the summary: tests/conftest.py)."""
    start = time.monotonic() - began
    try:
        return function(*args)
    finally:
        SECONDS[name] = (start, time.monotonic() - began)


def summary() -> str:
    """One line for the end of the session: when each background run ran."""
    runs = ", ".join(f"{name} {end - start:.0f} s (from {start:.0f} s to {end:.0f} s)"
                     for name, (start, end) in SECONDS.items())
    return f"runs started with the session (tests/head_start.py): {runs}" if runs else ""


def run_demo(out: Path, environment: dict | None = None) -> tuple[Path, subprocess.CompletedProcess]:
    """tools/demo.py as `make demo` runs it, its output in `out` (DEMO_OUT)."""
    from tests.conftest import run_tool

    return out, run_tool("demo.py", env=dict(os.environ if environment is None else environment, DEMO_OUT=str(out)))


def start(request, tmp_path_factory) -> tuple[dict[str, Future], ThreadPoolExecutor]:
    """Submit the runs whose tests are selected. Each starts its processes with the environment of this
    moment: tests on the main thread change os.environ for a while (a launcher's RANK and MASTER_ADDR, ...),
    and a command started meanwhile would inherit them. A shared input that fails to build starts nothing:
    the tests that need it then report the failure themselves."""
    wanted = {name for name, fixture in FIXTURES.items()
              if any(fixture in item.fixturenames for item in request.session.items)}
    runs: dict[str, Future] = {}
    pool, began, environment = ThreadPoolExecutor(1, thread_name_prefix="head-start"), time.monotonic(), dict(os.environ)
    try:
        if "datatrove" in wanted:
            from tests.data_pipeline.curation.test_datatrove_agreement import compare_rules

            documents = request.getfixturevalue("real_documents")
            runs["datatrove"] = pool.submit(timed, "datatrove", began, compare_rules, documents)
        if "planner" in wanted:
            from tests.pretrain.planner.measured_memory import measure_all

            shards, work = request.getfixturevalue("gpt2_shards"), tmp_path_factory.mktemp("plan")
            runs["planner"] = pool.submit(timed, "planner", began, measure_all, shards, work, 1, environment)
    except Exception:  # noqa: BLE001  (reported by the tests that use the fixture)
        pass
    if wanted & {"demo", "tour"}:  # the README's tour starts from the demo's outputs
        runs["demo"] = pool.submit(timed, "demo", began, run_demo, tmp_path_factory.mktemp("demo"), environment)
    if "tour" in wanted:  # after the demo: the pool runs one at a time, in order
        from tests.test_readme_commands import run_tour

        runs["tour"] = pool.submit(timed, "tour", began, run_tour, runs["demo"].result, tmp_path_factory.mktemp("tour"),
                                   environment)
    return runs, pool


def finished(runs: dict[str, Future], name: str, compute):
    """The background run's result if it was started, else `compute()` now."""
    return runs[name].result() if name in runs else compute()
