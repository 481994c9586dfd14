"""The package's modules import each other without a circle, as read from their source.

Imports under ``if TYPE_CHECKING:`` are left out (they never run); imports inside functions count: a function
that imports a module above it is a circle that only shows at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import asgi_db_session

PACKAGE = Path(asgi_db_session.__file__).parent
NAME = asgi_db_session.__name__


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_modules(tree: ast.AST, modules: set[str]) -> set[str]:
    """The package's modules that ``tree`` imports at run time."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for branch in node.orelse:
                visit(branch)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level > 0:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:  # from . import x
                    found.update(alias.name for alias in node.names)
            elif node.module is not None and node.module.split(".")[0] == NAME:
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == NAME and len(parts) > 1:
                    found.add(parts[1])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    """Module name -> the package's modules it imports (``__init__`` included)."""
    paths = {path.stem: path for path in PACKAGE.glob("*.py")}
    modules = set(paths)
    return {
        name: _imported_modules(ast.parse(path.read_text(encoding="utf-8")), modules) - {name}
        for name, path in paths.items()
    }


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            connect(module)
    return found


def test_the_import_graph_has_no_circle() -> None:
    graph = import_graph()
    assert circles(graph) == []


def test_the_circle_finder_finds_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_imports_are_read_from_source() -> None:
    tree = ast.parse(
        "from . import a\n"
        "from .b import x\n"
        "from asgi_db_session.c import y\n"
        "import asgi_db_session.d\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from .e import z\n"
        "def f():\n"
        "    from .f import w\n"
    )
    assert _imported_modules(tree, {"a", "b", "c", "d", "e", "f"}) == {"a", "b", "c", "d", "f"}


def test_the_package_is_read() -> None:
    graph = import_graph()
    assert {"__init__", "middleware", "database", "exceptions"} <= set(graph)
    assert "middleware" in graph["__init__"]
