"""The package's import structure: no import circle, front ends side by side.

The imports are read from the source (AST), those inside functions included, so a
circle broken only by importing late still counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import arrowinfer

PACKAGE = Path(arrowinfer.__file__).resolve().parent

#: A module under server/ whose name says one of these is a front end.
FRONT_END_WORDS = ("flight", "kserve", "shm", "http")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The arrowinfer modules ``name`` imports anywhere in its source.

    ``from . import x`` counts as importing the module ``x`` when it is one, else the
    package it comes from.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            module = target
            while module and module not in known:  # a name inside a module: the module
                module = module.rpartition(".")[0]
            if module and module != name:
                found.add(module)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports_inside_functions() -> None:
    graph = import_graph()
    # imports at module level and inside functions are both edges
    assert "arrowinfer.server._server" in graph["arrowinfer.server.workers._child"]
    assert "arrowinfer.repository" in graph["arrowinfer.client._local"]
    assert "arrowinfer.server" in graph["arrowinfer.cli"]  # imported inside a function
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle() -> None:
    assert circles(import_graph()) == []


def test_nothing_in_server_imports_the_server_package() -> None:
    graph = import_graph()
    inside = [m for m in graph if m.startswith("arrowinfer.server.")]
    assert inside
    assert [m for m in inside if "arrowinfer.server" in graph[m]] == []


def front_ends() -> list[str]:
    return sorted(
        name
        for name in modules()
        if name.startswith("arrowinfer.server.")
        and any(word in name.rpartition(".")[2] for word in FRONT_END_WORDS)
    )


def test_the_front_ends_are_found() -> None:
    assert {
        "arrowinfer.server._flight",
        "arrowinfer.server._kserve",
        "arrowinfer.server._shm",
    } <= set(front_ends())


@pytest.mark.parametrize("front_end", front_ends())
def test_front_ends_import_no_other_front_end(front_end: str) -> None:
    graph = import_graph()
    others = set(front_ends()) - {front_end}
    assert graph[front_end] & others == set()
