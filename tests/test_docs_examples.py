"""Code blocks of the documentation pages that are run, not only type-checked (tests/docs_code.py's convention:
each is marked ``<!-- check: run tests/test_docs_examples.py::test_... -->`` on its page)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from asgi_db_session import Database

from .conftest import client
from .docs_code import DOCS, blocks_run_by

pytestmark = pytest.mark.anyio

DESIGN_PAGE = DOCS / "explanation" / "design.md"


def middleware_database(app: Any) -> Database:
    """The Database of the app's (outermost) DBSessionMiddleware."""
    middleware = app.middleware_stack
    while not hasattr(middleware, "database"):
        middleware = middleware.app
    database: Database = middleware.database
    return database


async def test_the_before_and_after_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (example,) = blocks_run_by(DESIGN_PAGE, "tests/test_docs_examples.py::test_the_before_and_after_example_runs")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(example.code, example.where, "exec"), namespace)
    async with client(namespace["app"]) as http:
        response = await http.get("/")
    assert response.json() == {"rows": 1}
    assert (tmp_path / "example.db").exists()
    await middleware_database(namespace["app"]).dispose()
