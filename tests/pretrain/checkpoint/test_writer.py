"""The background checkpoint writer (pretrain/checkpoint/writer.py): what it stages is a copy training
cannot change, compact, and its failures reach the main thread once, after the save's mark."""

from __future__ import annotations

import collections

import pytest
import torch

from pretrain.checkpoint.resume import CheckpointError
from pretrain.checkpoint.writer import BackgroundWriter, tensor_bytes, to_host


def test_a_staged_state_is_a_compact_copy_that_later_training_does_not_change():
    flat = torch.arange(1000, dtype=torch.float32)
    state = {"weights": collections.OrderedDict(a=flat[:10], b=flat[10:30]), "step": 7, "groups": [{"lr": 0.1}],
             "shape": torch.Size([2, 3])}
    staged = to_host(state)
    flat.add_(1.0)  # the next optimizer step
    state["groups"][0]["lr"] = 0.2
    assert torch.equal(staged["weights"]["a"], torch.arange(10, dtype=torch.float32))
    assert staged["groups"][0]["lr"] == 0.1 and staged["step"] == 7 and staged["shape"] == torch.Size([2, 3])
    assert isinstance(staged["weights"], collections.OrderedDict)
    # A view of a flat buffer is saved as its own elements, not the whole buffer's storage.
    assert staged["weights"]["b"].untyped_storage().nbytes() == 20 * 4
    assert tensor_bytes(staged) == 30 * 4


def test_files_are_written_in_order_and_a_failure_skips_the_rest_of_its_save_and_is_raised_once(tmp_path):
    writer = BackgroundWriter()
    writer.begin()
    writer.save({"x": torch.ones(3)}, str(tmp_path / "one.pt"))
    writer.drain()
    assert torch.equal(torch.load(tmp_path / "one.pt")["x"], torch.ones(3))

    writer.begin()
    seen = []
    writer.submit(lambda: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    writer.save({"x": torch.zeros(2)}, str(tmp_path / "two.pt"))  # after the failure: skipped
    writer.submit(lambda: seen.append(repr(writer.error)), always=True)  # the save's mark still runs
    with pytest.raises(CheckpointError, match="writing a checkpoint failed: .*No space left on device; `latest` still"):
        writer.drain()
    assert not (tmp_path / "two.pt").exists() and "No space left" in seen[0]
    writer.drain()  # raised once
    writer.begin()
    writer.save({"x": torch.zeros(2)}, str(tmp_path / "three.pt"))  # the next save starts clean
    writer.drain()
    assert (tmp_path / "three.pt").is_file()
