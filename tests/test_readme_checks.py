"""tests/README.md lists every check the suite proves with the test that holds it: each test it names
must exist, so that merging or renaming tests cannot quietly drop a check from the list's promise."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# `tests/pretrain/training/test_trainer.py::test_name[id]`: the file and the function are checked, not the id.
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)(\[[^\]`]*\])?`")


def functions_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")}


def test_every_test_the_readme_names_exists():
    text = (TESTS / "README.md").read_text()
    references = REFERENCE.findall(text)
    assert len(references) > 250, "tests/README.md should list the suite's checks"
    missing = []
    for file, name, _ in references:
        path = TESTS.parent / file
        if not path.is_file() or name not in functions_in(path):
            missing.append(f"{file}::{name}")
    assert not missing, f"tests/README.md names tests that do not exist: {sorted(set(missing))}"


def test_every_test_module_is_in_the_readme():
    """A new test module gets its line in the list too."""
    text = (TESTS / "README.md").read_text()
    named = {file for file, _, _ in REFERENCE.findall(text)}
    modules = {str(path.relative_to(TESTS.parent)) for path in TESTS.rglob("test_*.py")}
    assert modules - named == set(), "add these modules' checks to tests/README.md"
