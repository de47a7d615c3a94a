"""The README's workflow, command by command, as written, after `make demo`: in a directory that holds
what a checkout holds after the demo (configs/, tools/, slurm/, .venv, demo_out/), so that every relative
path is the README's own. Run in the background after the demo (tests/head_start.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

START, END = "<!-- tour", "<!-- /tour -->"


def tour_commands(readme: Path = REPO / "README.md") -> list[str]:
    """The commands of the README's tour section: its bash blocks, continuation lines joined, comments left out."""
    text = readme.read_text()
    section = text[text.index(START):text.index(END)]
    commands, inside, current = [], False, ""
    for line in section.splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if not inside or not line.strip() or line.lstrip().startswith("#"):
            continue
        current += line.rstrip().removesuffix("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


@dataclass
class Step:
    command: str
    returncode: int
    seconds: float
    stdout: str
    stderr: str


def run_tour(demo, work: Path, environment: dict | None = None) -> tuple[Path, list[Step]]:
    """Each tour command in `work`, in order, until one fails; `demo()` gives (DEMO_OUT, its result)."""
    out, result = demo()
    if result.returncode != 0:
        return work, [Step("make demo", result.returncode, 0.0, result.stdout, result.stderr)]
    for name in ("configs", "tools", "slurm"):
        (work / name).symlink_to(REPO / name)
    (work / ".venv").symlink_to(Path(sys.prefix))  # the interpreter of this session: make test's .venv
    (work / "demo_out").symlink_to(out)
    steps = []
    for command in tour_commands():
        began = time.monotonic()
        done = subprocess.run(["bash", "-c", command], cwd=work, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ if environment is None else environment, PYTHONUNBUFFERED="1"))
        steps.append(Step(command, done.returncode, time.monotonic() - began, done.stdout, done.stderr))
        if done.returncode != 0:
            break
    return work, steps


def test_the_tour_is_the_workflow_in_order():
    commands = tour_commands()
    tools = [command.split()[1] for command in commands]
    assert tools == ["tools/curate.py", "tools/preprocess_data.py", "tools/inspect_data.py", "tools/plan.py", "-m",
                     "-m", "tools/convert_checkpoint.py", "tools/generate.py", "tools/evaluate.py"]
    assert all(command.startswith(".venv/bin/python ") for command in commands)


@pytest.mark.slow
def test_the_readme_workflow_runs_as_written_after_make_demo(readme_tour):
    work, steps = readme_tour
    for step in steps:
        assert step.returncode == 0, f"{step.command}\n{step.stderr[-3000:]}"
        assert "Traceback" not in step.stderr, step.command
    assert [step.command for step in steps] == tour_commands()
    assert json.loads((work / "curated" / "stats.json").read_text())["kept"] > 300
    assert json.loads((work / "data" / "web.json").read_text())["tokens"] > 500_000
    assert "resume: none (starts at step 0)" in steps[4].stdout
    assert (work / "runs" / "tiny" / "checkpoints" / "latest").read_text().strip() == "step_0000020"
    assert (work / "hf" / "tiny" / "config.json").is_file()
    assert steps[7].stdout.startswith("The prime minister said")
    assert "perplexity" in steps[8].stdout
    print("\n" + "\n".join(f"{step.seconds:6.1f} s  {step.command[:90]}" for step in steps))
