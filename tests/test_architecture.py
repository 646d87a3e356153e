"""The shape of the package: the layer rule holds, no module imports itself round a cycle, and the
tracking schema is the only place that spells run kinds, MLflow's tag keys and artifact paths."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from histo_transfer.tracking.schema import RunKind

SRC = Path(__file__).resolve().parents[1] / "src" / "histo_transfer"


def _cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycle_among_project_modules():
    graph = grimp.build_graph("histo_transfer", cache_dir=None)  # function-local imports count too; no cache in the checkout
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for module in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        graph.add_module(module)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.a")
    graph.add_import(importer="pkg.c", imported="pkg.a")
    assert _cycles(graph) == [["pkg.a", "pkg.b"]]


def test_the_layer_contract_holds():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[dev]'")
    result = subprocess.run([lint, "--no-cache"], capture_output=True, text=True, cwd=SRC.parents[1])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 kept, 0 broken" in result.stdout


def _literals(pattern: str, allowed: tuple[str, ...] = ()) -> list[str]:
    """`file:line` of every match of `pattern` in the package's code outside tracking/schema.py and
    the `allowed` files (paths relative to the package)."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if str(path.relative_to(SRC)) in ("tracking/schema.py", *allowed):
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            if re.search(pattern, code) and not code.strip().startswith(('"""', "'")):
                found.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    return found


def test_run_kinds_tag_keys_and_artifact_paths_are_spelled_only_in_the_schema():
    # the outbox's queue records have a `kind` field of their own (metrics, tags, artifacts)
    assert _literals(r"""["']kind["']""", allowed=("tracking/outbox.py",)) == []
    assert _literals(r"""tags\.`?kind""") == []  # search filters: schema.kind_filter
    kinds = "|".join(re.escape(kind.value) for kind in RunKind if kind.value not in ("cv", "eda", "evaluate",
                                                                                       "explain", "predict"))
    assert _literals(rf"""["']({kinds})["']""") == []  # the other kinds are also config names
    assert _literals(r"""["']mlflow\.(parentRunId|note\.content|source\.|experimentKind)""") == []
    assert _literals(r"""["'](model/model\.keras|evaluation/predictions\.csv|cv/\w+\.csv|config/\w+\.yaml)["']""") == []
