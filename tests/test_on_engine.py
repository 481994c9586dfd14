"""on_engine: called once for every engine a Database uses (the primary and each replica), as it is made.

Replicas here are a second SQLite file (the routing does not care what serves the URL); the same on a real
PostgreSQL standby, with OpenTelemetry's instrumentation, is in tests/system/test_replicas.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_db_session import Database, DBSessionMiddleware, current_session, session_scope
from asgi_db_session.exceptions import MIDDLEWARE_ON_ENGINE_WITH_DATABASE

from .conftest import client

pytestmark = pytest.mark.anyio


class Recorder:
    """An on_engine hook that adds a statement listener to each engine, as a tracing integration would."""

    def __init__(self) -> None:
        self.engines: list[tuple[AsyncEngine, str]] = []
        self.statements: list[tuple[str, str]] = []  # (role of the engine, statement)

    def __call__(self, engine: AsyncEngine, role: str) -> None:
        self.engines.append((engine, role))

        def before_cursor_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            self.statements.append((role, statement))

        event.listen(engine.sync_engine, "before_cursor_execute", before_cursor_execute)


async def test_each_engine_is_handed_over_once_as_it_is_made(tmp_path: Path) -> None:
    hook = Recorder()
    database = Database(
        f"sqlite+aiosqlite:///{tmp_path / 'primary.db'}",
        replicas=[f"sqlite+aiosqlite:///{tmp_path / 'replica.db'}"],
        on_engine=hook,
    )
    try:
        assert hook.engines == []  # nothing at construction: engines are made on first use
        async with session_scope() as session:
            await session.execute(text("SELECT 'on the primary'"))
        async with session_scope(read_only=True) as session:
            await session.execute(text("SELECT 'on the replica'"))
        async with session_scope(read_only=True) as session:
            await session.execute(text("SELECT 'on the replica again'"))
        assert hook.engines == [(database.engine, "primary"), (database.replica_engines[0], "replica")]
        assert ("primary", "SELECT 'on the primary'") in hook.statements
        assert ("replica", "SELECT 'on the replica'") in hook.statements
        assert ("replica", "SELECT 'on the replica again'") in hook.statements
    finally:
        await database.dispose()


async def test_a_given_engine_is_handed_over_at_construction(sqlite_url: str) -> None:
    hook = Recorder()
    engine = create_async_engine(sqlite_url)
    database = Database(engine=engine, on_engine=hook)
    try:
        assert hook.engines == [(engine, "primary")]
    finally:
        await database.dispose()


async def test_the_middleware_hands_over_the_engines_of_the_database_it_builds(sqlite_url: str) -> None:
    hook = Recorder()

    async def endpoint(request: Request) -> Response:
        await current_session().execute(text("SELECT 'from the endpoint'"))
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, url=sqlite_url, on_engine=hook)
    async with client(app) as http:
        assert (await http.get("/")).text == "ok"
    assert [role for _, role in hook.engines] == ["primary"]
    assert ("primary", "SELECT 'from the endpoint'") in hook.statements
    await hook.engines[0][0].dispose()


def test_the_middleware_refuses_on_engine_beside_a_database(sqlite_url: str) -> None:
    database = Database(sqlite_url)
    with pytest.raises(ValueError, match="on_engine=") as caught:
        DBSessionMiddleware(Starlette(), database=database, on_engine=Recorder())
    assert str(caught.value) == MIDDLEWARE_ON_ENGINE_WITH_DATABASE
