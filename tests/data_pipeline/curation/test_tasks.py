"""The curation progress bar moves while a worker is inside one file, and ends at the file's true size."""

from __future__ import annotations

import time

import pytest

from data_pipeline.curation import tasks
from data_pipeline.curation.pipeline import CurationConfig, Layout, ShardTask, filter_shard
from data_pipeline.readers import InputError
from data_pipeline.sample_text import write_jsonl


@pytest.mark.parametrize("workers", [1, 2])
def test_filter_progress_arrives_per_chunk_and_adds_up_to_the_file(tmp_path, monkeypatch, real_documents, workers):
    path = write_jsonl(tmp_path / "big.jsonl", real_documents * 2)  # about 5 MB: several 1 MB chunks
    layout = Layout(tmp_path / "out")
    layout.make()
    config = CurationConfig.from_dict({"stages": ["normalize", {"length": {"min": 50}}]})
    events, bars = [], set()

    def record_add(bar, *event):
        bars.add(bar)
        events.append(("report", *event))
        add(bar, *event)

    add, finish = tasks._Bar.add, tasks._Bar.finish
    monkeypatch.setattr(tasks._Bar, "add", record_add)
    monkeypatch.setattr(tasks._Bar, "finish", lambda bar, i, r: (events.append(("finish", i)), finish(bar, i, r)))
    size = path.stat().st_size
    [result] = tasks.run_tasks(filter_shard, [ShardTask(0, str(path), config, layout)], workers, "filter",
                               show_progress=False, total=size)
    reports = [e for e in events[:events.index(("finish", 0))] if e[0] == "report"]
    assert len(reports) >= 4  # the bar moved during the file, not only at its end
    [bar] = bars
    assert (bar.documents, bar.size) == (result["read"], size) == (len(real_documents) * 2, size)
    if workers == 1:  # in process nothing is in flight: the reports alone add up (bytes on disk: an honest ETA)
        assert (sum(e[2] for e in reports), sum(e[3] for e in reports)) == (result["read"], size)


def test_a_failed_task_stops_the_other_workers_and_raises_its_error(tmp_path, real_documents):
    """One unreadable input fails at once; the worker in the middle of a large file is stopped rather than
    waited for, its output is left unfinished (redone on resume), and the first error is what the caller sees."""
    big = write_jsonl(tmp_path / "big.jsonl", real_documents * 24)  # over 30 s of filtering
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    layout = Layout(tmp_path / "out")
    layout.make()
    config = CurationConfig.from_dict({"stages": ["normalize", "gopher_repetition", "gopher_quality"]})
    tasks_ = [ShardTask(0, str(big), config, layout), ShardTask(1, str(broken), config, layout)]
    began = time.perf_counter()
    with pytest.raises(InputError, match="cannot read parquet"):
        tasks.run_tasks(filter_shard, tasks_, 2, "filter", show_progress=False, total=1)
    assert time.perf_counter() - began < 15
    assert not layout.marker("filter", 0).exists() and not layout.filtered(0).exists()
