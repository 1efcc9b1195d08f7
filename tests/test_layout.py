"""The package layout: no import cycles, small modules, client-side code apart from serving.

The import graph is read from the source (every ``import`` statement, at any depth,
including ``TYPE_CHECKING`` blocks and imports inside functions), so a cycle that only
shows at run time on some path is still caught.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "fedlearn"
GENERATED = ("_pb2.py", "_pb2_grpc.py")
MAX_LINES = 700


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The fedlearn module ``name`` refers to: itself, else its longest module prefix."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> Iterator[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # ``from pkg import sub``: an edge to the submodule when it is one
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "fedlearn" or target.startswith("fedlearn."):
                resolved = _resolve(target)
                if resolved is not None and resolved != module:
                    yield resolved


def import_graph() -> dict[str, set[str]]:
    """Module -> the fedlearn modules it imports anywhere in its source."""
    return {m: set(_imports(m, p)) for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every fedlearn module ``start`` can reach through imports."""
    seen = {start}
    todo = [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_fedlearn() -> None:
    graph = import_graph()
    assert "fedlearn.engine.coordinator" in graph  # the walk found the package
    assert _cycles(graph) == []


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: p.name)
def test_no_module_over_700_lines(path: Path) -> None:
    if path.name.endswith(GENERATED):
        return
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT.parent)} has {lines} lines"


@pytest.mark.parametrize(
    "module", ["fedlearn.apps.torch_app", "fedlearn.apps.flower", "fedlearn.deploy.site"]
)
def test_client_side_code_does_not_reach_serving_or_reporting(module: str) -> None:
    reached = closure(import_graph(), module)
    assert not {m for m in reached if m.startswith(("fedlearn.serving", "fedlearn.report"))}


def test_no_top_level_modules_but_the_api_and_the_errors() -> None:
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert top == ["__init__.py", "errors.py"]
