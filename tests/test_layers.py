"""The layer order, read from every import in the source (module- and function-level):

    core < envs < policies < algos < verifiers < experiments;   analysis imports only core.

A package may import its own layer and the layers below it, never above. ``experiments.cli`` is
the application's entry point and the one module that may also import ``analysis`` (the
report command).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("core", "envs", "policies", "algos", "verifiers", "experiments")
ENTRY_POINTS = {"experiments/cli.py": {"analysis"}}


def allowed(package: str) -> set[str]:
    if package == "analysis":
        return {"core", "analysis"}
    return set(ORDER[: ORDER.index(package) + 1])


def steerlab_imports(source: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every import of a steerlab package in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n.split(".")[0]) for n in names
                  if n.split(".")[0] in (*ORDER, "analysis")]
    return found


def violations(root: Path) -> list[str]:
    out = []
    for package in (*ORDER, "analysis"):
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            ok = allowed(package) | ENTRY_POINTS.get(rel, set())
            out += [f"{rel}:{line} imports {target}"
                    for line, target in steerlab_imports(path.read_text())
                    if target not in ok]
    return out


def test_no_import_runs_against_the_layer_order():
    assert violations(ROOT) == []


@pytest.mark.parametrize("package, target", [("core", "envs"), ("envs", "policies"),
                                              ("algos", "verifiers"), ("analysis", "experiments"),
                                              ("policies", "algos")])
def test_a_violating_import_is_caught(tmp_path, package, target):
    (tmp_path / package).mkdir()
    (tmp_path / package / "m.py").write_text(f"def f():\n    import {target}.x\n")
    assert violations(tmp_path) == [f"{package}/m.py:2 imports {target}"]
