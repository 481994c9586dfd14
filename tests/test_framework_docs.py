"""docs/how-to/frameworks.md: its compatibility table is what the process tests run, and each framework's example
(examples/frameworks/, included in the page) puts the middleware where it sees the lifespan: started under a
LifespanManager with the startup check on, the example's database is checked at startup (one connection made),
answers a request through current_session(), and is disposed at shutdown (no backend left on PostgreSQL).

The examples are type-checked by the repository's own mypy --strict run (pyproject.toml: files include examples).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

from asgi_db_session import session_scope
from asgi_db_session._types import ASGIApp

from .conftest import PG_URL
from .frameworks.registry import FRAMEWORKS
from .system.test_framework_servers import SERVERS

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).parent.parent
PAGE = ROOT / "docs" / "how-to" / "frameworks.md"
EXAMPLES = ROOT / "examples" / "frameworks"

# Each example module: the name of its ASGI app, and a path that runs a query through current_session().
APPS = {
    "raw_asgi": ("app", "/"),
    "starlette_app": ("app", "/"),
    "fastapi_app": ("app", "/"),
    "litestar_app": ("app", "/"),
    "quart_app": ("asgi_app", "/"),
    "blacksheep_app": ("asgi_app", "/"),
    "django_asgi": ("application", None),  # its URLconf is the project's: the view is called below
}


def compatibility_table() -> list[list[str]]:
    section = PAGE.read_text().split("\n## Compatibility\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert set("".join(rows[1])) <= set("-: "), "the second line of the table is its separator"
    return [rows[0], *rows[2:]]


def test_the_compatibility_table_is_the_process_tests() -> None:
    """Rows: the frameworks of tests/frameworks/registry.py; columns: the servers of
    tests/system/test_framework_servers.py, which runs one test per cell."""
    header, *rows = compatibility_table()
    assert header == ["framework", *SERVERS]
    assert [row[0] for row in rows] == [framework.name for framework in FRAMEWORKS]
    assert [row[1:] for row in rows] == [["✓"] * len(SERVERS)] * len(FRAMEWORKS)


def test_the_page_includes_every_example() -> None:
    included = re.findall(r'^--8<-- "examples/frameworks/(\w+)\.py"$', PAGE.read_text(), flags=re.MULTILINE)
    modules = sorted(path.stem for path in EXAMPLES.glob("*.py") if path.stem != "__init__")
    assert sorted(included) == modules
    assert set(APPS) | {"django_views"} == set(modules)


async def our_backends(dsn: str, name: str) -> list[str]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT coalesce(state, '') FROM pg_stat_activity WHERE application_name = $1", name
        )
    finally:
        await connection.close()
    return [row[0] for row in rows]


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """The process's logging as it was: Litestar's default ``logging_config`` configures it when the example's app
    is built (the root logger's level and handlers), as it would in the user's own process, and the tests after
    this one count log records."""
    manager = logging.Logger.manager
    saved = {
        name: (logger.level, logger.handlers[:], logger.propagate, logger.disabled)
        for name, logger in [("", logging.getLogger()), *manager.loggerDict.items()]
        if isinstance(logger, logging.Logger)
    }
    yield
    for name, logger in [("", logging.getLogger()), *manager.loggerDict.items()]:
        if not isinstance(logger, logging.Logger):
            continue
        level, handlers, propagate, disabled = saved.get(name, (logging.NOTSET, [], True, False))
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate, logger.disabled = propagate, disabled


@pytest.mark.parametrize("module", list(APPS))
@pytest.mark.usefixtures("logging_restored")
async def test_each_example_checks_serves_and_disposes(
    module: str, postgresql_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"adbs-framework-docs-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("DATABASE_URL", PG_URL)
    monkeypatch.setenv("DATABASE_CHECK_ON_STARTUP", "true")
    monkeypatch.setenv("DATABASE_APPLICATION_NAME", name)
    if module.startswith("django"):
        importlib.import_module("tests.frameworks.django_app")  # Django's settings, configured once per process
    qualified = f"examples.frameworks.{module}"
    monkeypatch.delitem(sys.modules, qualified, raising=False)  # read the environment above, not an earlier one
    attribute, path = APPS[module]
    app: ASGIApp = getattr(importlib.import_module(qualified), attribute)
    monkeypatch.delitem(sys.modules, qualified)
    try:
        async with LifespanManager(app) as manager:
            assert await our_backends(postgresql_dsn, name) == ["idle"]  # the startup check's connection
            if path is not None:
                transport = httpx.ASGITransport(app=manager.app)
                async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
                    response = await http.get(path)
                assert response.status_code == 200, response.text
                assert re.search(r"[1-9]", response.text), response.text  # a count of tables
            else:
                views = importlib.import_module("examples.frameworks.django_views")
                async with session_scope():
                    response = await views.tables(None)
                assert b'"tables"' in response.content
        deadline = time.monotonic() + 10
        while await our_backends(postgresql_dsn, name):
            assert time.monotonic() < deadline, "the example's engine was not disposed at shutdown"
            await asyncio.sleep(0.02)
    finally:
        connection = await asyncpg.connect(postgresql_dsn)
        try:
            await connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", name
            )
        finally:
            await connection.close()
