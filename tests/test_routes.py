"""asgi_db_session._routes: where each framework keeps the route, read without importing any framework."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import asgi_db_session
from asgi_db_session._routes import policy_of, route_template

FRAMEWORKS = ("blacksheep", "django", "litestar", "quart")


def test_the_package_imports_no_framework() -> None:
    # Read from the source (a subprocess that imports the package takes seconds): no import of one, anywhere.
    statement = re.compile(rf"^\s*(?:import|from)\s+({'|'.join(FRAMEWORKS)}|sqlalchemy)\b", re.MULTILINE)
    found = {
        match
        for path in Path(asgi_db_session.__file__).parent.glob("*.py")
        for match in statement.findall(path.read_text(encoding="utf-8"))
    }
    assert found == {"sqlalchemy"}  # the reading works, and finds no framework


def test_frameworks_that_are_not_loaded_are_not_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("quart", "django.urls"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    scope = {"type": "http", "path": "/items/7"}
    assert policy_of(scope) is None
    assert route_template(scope) == "/items/7"
