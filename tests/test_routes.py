"""asgi_db_session._routes: where each framework keeps the route, read without importing any framework."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import asgi_db_session
from asgi_db_session._routes import policy_of, route_template

FRAMEWORKS = ("blacksheep", "django", "litestar", "quart")


def test_the_package_imports_no_framework() -> None:
    # Read from the source (a subprocess that imports the package takes seconds): no import of one, anywhere.
    imported: set[str] = set()
    for path in Path(asgi_db_session.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    assert "sqlalchemy" in imported  # the reading works
    assert not imported & set(FRAMEWORKS)


def test_frameworks_that_are_not_loaded_are_not_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("quart", "django.urls"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    scope = {"type": "http", "path": "/items/7"}
    assert policy_of(scope) is None
    assert route_template(scope) == "/items/7"
