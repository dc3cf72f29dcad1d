"""The package's layout: no import cycle among maskprune's modules, no module over 800 lines.

Imports are read from the source with :mod:`ast`, at every level (module level, functions, methods), so a
cycle hidden by an import inside a function counts; imports under ``if TYPE_CHECKING:`` do not run and do not
count. ``algorithms/`` is installed as ``maskprune.algorithms`` and is read under that name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"maskprune": ROOT / "maskprune", "maskprune.algorithms": ROOT / "algorithms"}
MAX_LINES = 800

Graph = dict[str, set[str]]


# ---- reading the imports ---------------------------------------------------------------------------------
def modules_of(packages: dict[str, Path]) -> dict[str, Path]:
    """Every module's dotted name and file; a package is named by its ``__init__.py``."""
    found = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, at any depth, except the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _type_checking(child.test):
            for other in child.orelse:
                yield from _import_nodes(ast.Module(body=[other], type_ignores=[]))
        else:
            yield from _import_nodes(child)


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module that ``name`` is or lies in: ``a.b.c`` is module ``a.b.c``, else an attribute of ``a.b``, ..."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that ``module`` imports.

    ``from P import x`` imports the module ``P.x`` where ``x`` is a module, else the package ``P`` (``x`` is one of
    its attributes); relative imports are resolved from the module's package."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        found.update(_owner(target, modules) for target in targets)
    return found - {None, module}


def import_graph(packages: dict[str, Path]) -> Graph:
    modules = modules_of(packages)
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


# ---- finding cycles ------------------------------------------------------------------------------------------
def knots(graph: Graph) -> list[set[str]]:
    """The strongly connected components that hold a cycle: modules that all import one another, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm; the graphs here are a few hundred nodes deep at most
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def cycles(graph: Graph) -> list[list[str]]:
    """One cycle per knot, each as ``[a, b, ..., a]``, sorted."""
    return sorted(_cycle_in(graph, knot) for knot in knots(graph))


def _cycle_in(graph: Graph, component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (by name), by breadth-first search inside it."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not a cycle")


def describe(graph: Graph) -> str:
    """Each knot's cycle, and the other modules caught in the knot."""
    parts = []
    for knot in knots(graph):
        cycle = _cycle_in(graph, knot)
        others = sorted(knot - set(cycle))
        parts.append(" -> ".join(cycle) + (f" (and in the same knot: {', '.join(others)})" if others else ""))
    return "; ".join(sorted(parts))


# ---- the package -----------------------------------------------------------------------------------------
def test_no_import_cycle_among_maskprunes_modules() -> None:
    graph = import_graph(PACKAGES)
    assert "maskprune._trace" in graph and "maskprune.algorithms" in graph  # the packages were read
    assert not cycles(graph), f"import cycles: {describe(graph)}"


def test_no_module_over_800_lines() -> None:
    paths = sorted(modules_of(PACKAGES).values())
    assert paths, "no module found"
    sizes = {path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines()) for path in paths}
    over = [f"{name} ({lines})" for name, lines in sizes.items() if lines > MAX_LINES]
    assert not over, f"modules over {MAX_LINES} lines: {', '.join(over)}"


# ---- the cycle finder, on packages written here ------------------------------------------------------------------
def write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {"pkg": root / "pkg"}


def test_imports_are_resolved_to_modules_or_to_the_package_holding_the_name(tmp_path: Path) -> None:
    packages = write_package(
        tmp_path,
        {
            "__init__.py": "from .a import f\nfrom . import b\n",
            "a.py": "import os\nfrom .sub import helper, tool\n\ndef f():\n    from pkg.b import g\n",
            "b.py": "def g(): ...\n",
            "sub/__init__.py": "helper = 1\n",
            "sub/tool.py": "from .. import b\nfrom ..sub import helper\nfrom ... import nothing_outside\n",
        },
    )
    assert import_graph(packages) == {
        "pkg": {"pkg.a", "pkg.b"},
        "pkg.a": {"pkg.b", "pkg.sub", "pkg.sub.tool"},  # `helper` is the package's, `tool` a module
        "pkg.b": set(),
        "pkg.sub": set(),
        "pkg.sub.tool": {"pkg.b", "pkg.sub"},
    }
    assert cycles(import_graph(packages)) == []


def test_a_cycle_through_an_import_inside_a_function_is_found_and_named(tmp_path: Path) -> None:
    packages = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "trace.py": "class Tracer:\n    def __init__(self):\n        from .rules import RULES\n",
            "rules.py": "from .attributes import sites\nRULES = {}\n",
            "attributes.py": "from pkg.trace import Tracer\n\ndef sites(): ...\n",
            "other.py": "from . import trace\n",
        },
    )
    graph = import_graph(packages)
    assert cycles(graph) == [["pkg.attributes", "pkg.trace", "pkg.rules", "pkg.attributes"]]
    assert describe(graph) == "pkg.attributes -> pkg.trace -> pkg.rules -> pkg.attributes"


def test_imports_for_type_checking_only_make_no_cycle(tmp_path: Path) -> None:
    files = {
        "__init__.py": "",
        "mask.py": "from .groups import Group\n",
        "groups.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .mask import Mask\n",
    }
    assert cycles(import_graph(write_package(tmp_path / "checking", files))) == []
    files["groups.py"] = "import typing\nif typing.TYPE_CHECKING:\n    import os\nelse:\n    from .mask import Mask\n"
    running = import_graph(write_package(tmp_path / "running", files))
    assert cycles(running) == [["pkg.groups", "pkg.mask", "pkg.groups"]]


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"a"}}, [["a", "a"]]),
        ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c", "e"}, "e": set()}, [["a", "b", "a"], ["c", "d", "c"]]),
        ({"a": {"b", "d"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "d", "a"]]),  # the shortest through a
    ],
)
def test_cycles_names_one_cycle_per_strongly_connected_component(graph: Graph, expected: list[list[str]]) -> None:
    assert cycles(graph) == expected


def test_the_description_names_the_modules_of_a_knot_outside_its_cycle() -> None:
    graph = {"a": {"b", "d"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"a"}}
    assert describe(graph) == "a -> d -> a (and in the same knot: b, c)"
