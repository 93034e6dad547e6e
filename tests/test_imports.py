"""The import graph of ``src/gradfit``, read from the source: no cycles, and the core never
imports the CLI or the views (docs/architecture.md: dependencies point one way).

Only imports that run when a module is imported count: module-level ``import``/``from``
statements, including those in module-level ``try``/``if``/``with`` blocks and class bodies,
but not those under ``if TYPE_CHECKING:`` (typing only) or inside functions (on demand).
The implicit import of a module's parent packages (``import gradfit.a.b`` runs
``gradfit/__init__.py`` and ``gradfit/a/__init__.py``) is not an edge; an explicit import of
a package (``from gradfit import fit``) is one, to that package's ``__init__``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "gradfit"
#: subpackages that make up the core: they may not import the CLI or the views
CORE = ("results", "model", "optim", "fitting", "batch")
FORBIDDEN = ("gradfit.cli", "gradfit.views")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING`` (or any ``x.TYPE_CHECKING``)."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _runtime_imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run at import time, in source order."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue  # runs on demand, not at import time
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _runtime_imports(node.body)
            yield from _runtime_imports(node.orelse)
        elif isinstance(node, ast.Try | ast.TryStar):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _runtime_imports(block)
            for handler in node.handlers:
                yield from _runtime_imports(handler.body)
        elif isinstance(node, ast.With | ast.AsyncWith | ast.For | ast.While | ast.ClassDef):
            yield from _runtime_imports(node.body)
            if isinstance(node, ast.For | ast.While):
                yield from _runtime_imports(node.orelse)
        elif isinstance(node, ast.Match):
            for case in node.cases:
                yield from _runtime_imports(case.body)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name ``from ... import`` reads from (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(
    module: str, path: Path, node: ast.Import | ast.ImportFrom, known: set[str]
) -> Iterator[str]:
    """The project modules an import statement imports (``from pkg import sub`` is
    ``pkg.sub`` when ``sub`` is a module, else ``pkg`` itself)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in known:
                yield alias.name
        return
    source = _resolve(module, path.name == "__init__.py", node)
    if source not in known:
        return
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        yield sub if sub in known else source


def _graph() -> dict[str, dict[str, list[str]]]:
    """module -> imported module -> the import lines (``path:line: statement``)."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, dict[str, list[str]]] = {m: {} for m in modules}
    for module, path in modules.items():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
        for node in _runtime_imports(tree.body):
            where = f"{path.relative_to(SRC.parent)}:{node.lineno}: {ast.unparse(node)}"
            for target in dict.fromkeys(_targets(module, path, node, known)):
                if target != module:
                    graph[module].setdefault(target, []).append(where)
    return graph


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with a cycle (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _describe(component: list[str], graph: dict[str, dict[str, list[str]]]) -> str:
    members = set(component)
    lines = [f"cycle among {', '.join(component)}:"]
    for module in component:
        for target, where in sorted(graph[module].items()):
            if target in members:
                lines += [f"  {module} -> {target}  ({w})" for w in where]
    return "\n".join(lines)


def _subpackage(module: str) -> str:
    """``gradfit.fitting.fit`` -> ``gradfit.fitting``; top-level modules stand alone."""
    parts = module.split(".")
    return ".".join(parts[:2])


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, list[str]]]:
    return _graph()


def test_the_graph_is_read(graph: dict[str, dict[str, list[str]]]) -> None:
    """Guards the reader itself: known edges are found, typing-only and lazy ones are not."""
    assert "gradfit.errors" in graph["gradfit"]
    # gradfit/__init__ imports its public names lazily (PEP 562), the rest only for typing
    assert "gradfit.fitting.fit" not in graph["gradfit"]
    assert "gradfit.fitting.fit" in graph["gradfit.cli.commands"]
    assert "gradfit.results.stats" in graph["gradfit.results.fit_result"]  # from pkg import sub
    assert "gradfit.io.files" in graph["gradfit.views.plots"]
    # the views import FitResult only for typing; FitResult imports the views only on call
    assert "gradfit.results.fit_result" not in graph["gradfit.views.plots"]
    assert not any(t.startswith("gradfit.views") for t in graph["gradfit.results.fit_result"])


def test_from_imports_resolve_to_modules_or_packages() -> None:
    known = {"p", "p.a", "p.a.m", "p.b"}
    node = ast.parse("from p.a import m, name").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert list(_targets("p.b", Path("b.py"), node, known)) == ["p.a.m", "p.a"]
    relative = ast.parse("from .a import m").body[0]
    assert isinstance(relative, ast.ImportFrom)
    assert list(_targets("p.b", Path("b.py"), relative, known)) == ["p.a.m"]
    assert list(_targets("p.a", Path("__init__.py"), relative, known)) == []  # p.a.a unknown


def test_reader_skips_typing_and_function_imports() -> None:
    source = """
import os
from typing import TYPE_CHECKING
import typing
if TYPE_CHECKING:
    import a
if typing.TYPE_CHECKING:
    import b
else:
    import c
try:
    import d
except ImportError:
    import e
class K:
    import f
    def method(self):
        import g
def function():
    import h
"""
    found = [alias.name for n in _runtime_imports(ast.parse(source).body) for alias in n.names]
    assert found == ["os", "TYPE_CHECKING", "typing", "c", "d", "e", "f"]


def test_no_module_import_cycle(graph: dict[str, dict[str, list[str]]]) -> None:
    edges = {m: set(targets) for m, targets in graph.items()}
    cycles = _cycles(edges)
    assert not cycles, "\n".join(_describe(c, graph) for c in cycles)


def test_no_subpackage_import_cycle(graph: dict[str, dict[str, list[str]]]) -> None:
    """One level up: between ``gradfit.model``, ``gradfit.fitting``, ``gradfit.results``, ...
    (the top-level ``gradfit/__init__.py``, which gathers the public API, left out)."""
    edges: dict[str, set[str]] = {}
    lines: dict[str, dict[str, list[str]]] = {}
    for module, targets in graph.items():
        if module == PACKAGE:
            continue
        here = _subpackage(module)
        edges.setdefault(here, set())
        lines.setdefault(here, {})
        for target, where in targets.items():
            there = _subpackage(target)
            if there not in (here, PACKAGE):
                edges[here].add(there)
                lines[here].setdefault(there, []).extend(where)
    cycles = _cycles(edges)
    assert not cycles, "\n".join(_describe(c, lines) for c in cycles)


@pytest.mark.parametrize("subpackage", CORE)
def test_core_does_not_import_cli_or_views(
    graph: dict[str, dict[str, list[str]]], subpackage: str
) -> None:
    prefix = f"{PACKAGE}.{subpackage}"
    offending = [
        where
        for module, targets in sorted(graph.items())
        if module == prefix or module.startswith(prefix + ".")
        for target, lines in sorted(targets.items())
        if any(target == f or target.startswith(f + ".") for f in FORBIDDEN)
        for where in lines
    ]
    assert not offending, "\n".join(offending)
