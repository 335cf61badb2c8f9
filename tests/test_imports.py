"""The import graph, read from the source with `ast` (nothing is imported): the stage boundaries hold.

Every import counts, the ones inside functions too: a lazy import still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gato_ros", "sim")

# The data flow, earliest first: a module may import only modules listed before it (and unlisted helpers).
STAGES = ("contract", "spec", "commands", "tokenizer", "data", "model", "sequences", "train", "export", "runtime",
          "control", "node", "bench", "cli")
TORCH_FREE = ("gato_ros.contract", "gato_ros.spec", "gato_ros.commands", "gato_ros.tokenizer", "gato_ros.runtime",
              "gato_ros.control", "gato_ros.node")
ROS_FREE = ("gato_ros.contract", "gato_ros.spec", "gato_ros.commands", "gato_ros.tokenizer", "gato_ros.runtime",
            "gato_ros.control", "gato_ros.model", "gato_ros.export", "gato_ros.train")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.AST, package: str) -> set[str]:
    """Every module named by an import anywhere in `tree` (relative imports resolved against `package`)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from gato_ros import tokenizer`
    return names


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Our modules → the other modules they import: ours by full name, third-party by top-level name."""
    sources = {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).glob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in sources.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for imported in imported_names(ast.parse(path.read_text(), str(path)), package):
            if imported.split(".")[0] in PACKAGES:
                if imported in sources and imported != name:
                    edges.add(imported)
            else:
                edges.add(imported.split(".")[0])
        graph[name] = edges
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected set of our modules (Tarjan), each as a sorted list of names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_no_stage_imports_a_later_one(graph):
    order = {f"gato_ros.{s}": i for i, s in enumerate(STAGES)}
    late = {(m, d) for m, deps in graph.items() if m in order for d in deps if d in order and order[d] > order[m]}
    assert late == set()


def test_contract_imports_only_the_standard_library(graph):
    assert graph["gato_ros.contract"] <= {"__future__", "json", "dataclasses"}


def test_gato_ros_never_imports_sim(graph):
    leaks = {m: sorted(d for d in deps if d.startswith("sim")) for m, deps in graph.items() if m.startswith("gato_ros")}
    assert {m: d for m, d in leaks.items() if d} == {}


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free_modules_reach_no_torch(graph, module):
    assert "torch" not in reachable(graph, module)


@pytest.mark.parametrize("module", ROS_FREE)
def test_ros_free_modules_reach_no_rclpy(graph, module):
    assert "rclpy" not in reachable(graph, module)


def test_the_checks_see_a_violation(tmp_path):
    """The graph builder itself: a planted cycle, a late import and a torch import through a helper are found."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "gato_ros" / "runtime.py").write_text("def f():\n    from gato_ros import helper\n")
    (tmp_path / "gato_ros" / "helper.py").write_text("import torch\nfrom gato_ros.runtime import f\n")
    (tmp_path / "sim" / "a.py").write_text("from . import b\n")
    (tmp_path / "sim" / "b.py").write_text("import sim.a\n")
    planted = import_graph(tmp_path)
    assert sorted(cycles(planted)) == [["gato_ros.helper", "gato_ros.runtime"], ["sim.a", "sim.b"]]
    assert "torch" in reachable(planted, "gato_ros.runtime")
