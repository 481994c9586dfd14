"""session_policy(statement_timeout=...) and session_scope(statement_timeout=...): the server's bound on a route's
statements, on the real PostgreSQL server.

Each slow route runs ``SELECT pg_sleep(5)`` under a bound of 0.2 s after a write: the client must get the 503
well before the sleep would end, the write must be absent when a second connection looks, and the pool's one
connection must serve the next request with the server's own ``statement_timeout`` back (``SET LOCAL`` ends with
its transaction). The same through PgBouncer in transaction mode is in tests/system/test_pgbouncer.py.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from litestar import Litestar, get
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_db_session import (
    Database,
    DatabaseSettings,
    DBSessionMiddleware,
    current_session,
    session_policy,
    session_scope,
)
from asgi_db_session._routes import POLICY_ATTRIBUTE
from asgi_db_session._types import ASGIApp, Receive, Scope, Send
from asgi_db_session.exceptions import (
    POLICY_WITHOUT_SESSION,
    STATEMENT_TIMEOUT_ABOVE_COMMAND_TIMEOUT,
)
from asgi_db_session.fastapi import SessionDep

from .conftest import Backend, client
from .models import TABLE

pytestmark = pytest.mark.anyio

# The route's bound, and how long the slow statement would run without it.
BOUND = 0.2
SLEEP = 5
# The 503 must come long before the sleep would end: the bound, plus a loaded machine's round trips.
ANSWERED_WITHIN = 1.5
SLOW_SQL = f"SELECT pg_sleep({SLEEP})"
INSERT = f"INSERT INTO {TABLE} (id, name) VALUES (1, 'lost')"


PG_ONLY = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


@pytest.fixture
async def one_connection(backend: Backend) -> AsyncIterator[Database]:
    """A Database whose pool holds one connection: every request of a test runs on the same one."""
    database = Database(settings=DatabaseSettings(url=backend.url, pool_size=1, max_overflow=0))
    yield database
    assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    await database.dispose()


async def server_state() -> dict[str, Any]:
    """The current session's backend and the statement_timeout its transaction runs under."""
    session = current_session()
    return {
        "pid": await session.scalar(text("SELECT pg_backend_pid()")),
        "timeout": await session.scalar(text("SHOW statement_timeout")),
    }


def timeout_app(database: Database, seen: list[dict[str, Any]]) -> Starlette:
    """``/slow`` (bounded) writes, notes its backend in ``seen``, then sleeps; ``/bounded`` shows its bound in
    two transactions and a savepoint; ``/show`` (unbounded) shows the connection's own."""

    @session_policy(statement_timeout=BOUND)
    async def slow(request: Request) -> Response:
        session = current_session()
        seen.append(await server_state())
        await session.execute(text(INSERT))
        await session.execute(text(SLOW_SQL))
        return PlainTextResponse("slept")

    @session_policy(statement_timeout=timedelta(milliseconds=200))
    async def bounded(request: Request) -> Response:
        session = current_session()
        first = await session.scalar(text("SHOW statement_timeout"))
        await session.commit()
        second = await session.scalar(text("SHOW statement_timeout"))
        async with session.begin_nested():
            nested = await session.scalar(text("SHOW statement_timeout"))
        return JSONResponse([first, second, nested])

    async def show(request: Request) -> Response:
        return JSONResponse(await server_state())

    app = Starlette(routes=[Route("/slow", slow), Route("/bounded", bounded), Route("/show", show)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    return app


@PG_ONLY
async def test_a_slow_statement_is_cancelled_and_nothing_is_committed(
    backend: Backend, one_connection: Database
) -> None:
    seen: list[dict[str, Any]] = []
    async with client(timeout_app(one_connection, seen)) as http:
        started = time.monotonic()
        response = await http.get("/slow")
        elapsed = time.monotonic() - started
        after = (await http.get("/show")).json()
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert elapsed < ANSWERED_WITHIN, elapsed
    # Under commit_on_success=True the write before the sleep would have been committed; it was rolled back.
    assert await backend.names() == []
    assert seen[0]["timeout"] == "200ms"
    # The same server connection, reused, and its own setting (the server's default) back.
    assert after == {"pid": seen[0]["pid"], "timeout": "0"}


@PG_ONLY
async def test_every_transaction_of_the_session_is_bounded(one_connection: Database) -> None:
    async with client(timeout_app(one_connection, [])) as http:
        assert (await http.get("/bounded")).json() == ["200ms", "200ms", "200ms"]
        assert (await http.get("/show")).json()["timeout"] == "0"


@PG_ONLY
async def test_the_route_bound_overrides_the_connection_setting_either_way(backend: Backend) -> None:
    # DATABASE_STATEMENT_TIMEOUT: the connections' own statement_timeout, 100 ms.
    database = Database(settings=DatabaseSettings(url=backend.url, pool_size=1, max_overflow=0, statement_timeout=100))

    @session_policy(statement_timeout=2)  # longer than the connection's
    async def patient(request: Request) -> Response:
        await current_session().execute(text("SELECT pg_sleep(0.3)"))
        return JSONResponse(await server_state())

    @session_policy(statement_timeout=0.05)  # shorter
    async def hasty(request: Request) -> Response:
        await current_session().execute(text("SELECT pg_sleep(0.08)"))
        return PlainTextResponse("slept")

    async def plain(request: Request) -> Response:
        await current_session().execute(text("SELECT pg_sleep(0.3)"))
        return PlainTextResponse("slept")

    async def show(request: Request) -> Response:
        return JSONResponse(await server_state())

    routes = [Route("/patient", patient), Route("/hasty", hasty), Route("/plain", plain), Route("/show", show)]
    app = Starlette(routes=routes)
    app.add_middleware(DBSessionMiddleware, database=database)
    try:
        async with client(app) as http:
            patient_response = await http.get("/patient")
            assert patient_response.status_code == 200
            assert patient_response.json()["timeout"] == "2s"
            assert (await http.get("/hasty")).status_code == 503
            assert (await http.get("/plain")).status_code == 503  # the connection's own 100 ms
            assert (await http.get("/show")).json()["timeout"] == "100ms"
    finally:
        await database.dispose()


@PG_ONLY
async def test_session_scope_takes_a_bound_of_its_own(backend: Backend, one_connection: Database) -> None:
    pids: list[int] = []

    async def write_then_sleep() -> None:
        async with session_scope(commit=True, statement_timeout=BOUND) as session:
            pids.append(await session.scalar(text("SELECT pg_backend_pid()")))
            await session.execute(text(INSERT))
            await session.execute(text(SLOW_SQL))

    started = time.monotonic()
    with pytest.raises(DBAPIError, match="canceling statement due to statement timeout") as raised:
        await write_then_sleep()
    assert time.monotonic() - started < ANSWERED_WITHIN
    assert getattr(raised.value.orig, "sqlstate", None) == "57014"  # query_canceled
    assert await backend.names() == []
    async with session_scope() as session:
        assert await session.scalar(text("SELECT pg_backend_pid()")) == pids[0]
        assert await session.scalar(text("SHOW statement_timeout")) == "0"


@PG_ONLY
async def test_a_scope_inside_a_bounded_route_follows_it_unless_told(one_connection: Database) -> None:
    seen: list[str] = []

    @session_policy(statement_timeout=BOUND)
    async def bounded(request: Request) -> Response:
        async with session_scope() as inherited:
            seen.append(str(await inherited.scalar(text("SHOW statement_timeout"))))
        async with session_scope(statement_timeout=timedelta(seconds=3)) as own:
            seen.append(str(await own.scalar(text("SHOW statement_timeout"))))
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/bounded", bounded)])
    app.add_middleware(DBSessionMiddleware, database=one_connection)
    async with client(app) as http:
        assert (await http.get("/bounded")).status_code == 200
    assert seen == ["200ms", "3s"]


@PG_ONLY
async def test_fastapi_routes_take_the_bound(backend: Backend, one_connection: Database) -> None:
    app = FastAPI()

    @app.get("/show")
    @session_policy(statement_timeout=BOUND)
    async def show(session: SessionDep) -> str:  # the session comes from a dependency, after routing
        return str(await session.scalar(text("SHOW statement_timeout")))

    @session_policy(statement_timeout=BOUND, commit_on_success=True)  # above the route decorator too
    @app.get("/slow")
    async def slow(session: SessionDep) -> str:
        await session.execute(text(INSERT))
        await session.execute(text(SLOW_SQL))
        return "slept"

    @app.get("/plain")
    async def plain(session: SessionDep) -> str:
        return str(await session.scalar(text("SHOW statement_timeout")))

    app.add_middleware(DBSessionMiddleware, database=one_connection)
    async with client(app) as http:
        assert (await http.get("/show")).json() == "200ms"
        started = time.monotonic()
        response = await http.get("/slow")
        assert time.monotonic() - started < ANSWERED_WITHIN
        assert (await http.get("/plain")).json() == "0"
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert await backend.names() == []


@PG_ONLY
async def test_litestar_routes_take_the_bound(backend: Backend, one_connection: Database) -> None:
    @get("/show")
    @session_policy(statement_timeout=BOUND)
    async def show() -> str:
        return str(await current_session().scalar(text("SHOW statement_timeout")))

    @session_policy(statement_timeout=BOUND, commit_on_success=True)  # above the route decorator: the handler
    @get("/slow")
    async def slow() -> str:
        await current_session().execute(text(INSERT))
        await current_session().execute(text(SLOW_SQL))
        return "slept"

    @get("/plain")
    async def plain() -> str:
        return str(await current_session().scalar(text("SHOW statement_timeout")))

    app: ASGIApp = Litestar([show, slow, plain], logging_config=None)  # type: ignore[assignment]
    async with client(DBSessionMiddleware(app, database=one_connection)) as http:
        assert (await http.get("/show")).text == "200ms"
        started = time.monotonic()
        response = await http.get("/slow")
        assert time.monotonic() - started < ANSWERED_WITHIN
        assert (await http.get("/plain")).text == "0"
    # Litestar answers an exception from a handler itself (its own 500) before the middleware could map it.
    assert response.status_code == 500, response.text
    assert await backend.names() == []


@PG_ONLY
async def test_a_session_made_before_the_endpoint_is_not_bounded_and_says_so(
    one_connection: Database, caplog: pytest.LogCaptureFixture
) -> None:
    @session_policy(statement_timeout=BOUND)
    async def bounded(scope: Scope, receive: Receive, send: Send) -> None:
        shown = str(await current_session().scalar(text("SHOW statement_timeout")))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": shown.encode()})

    def created_before_routing(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            current_session()
            await app(scope, receive, send)

        return middleware

    # A raw ASGI app: the marked function itself is called, with the session made already.
    app = created_before_routing(bounded)
    with caplog.at_level(logging.WARNING, logger="asgi_db_session"):
        async with client(DBSessionMiddleware(app, database=one_connection)) as http:
            assert (await http.get("/")).text == "0"
    [warning] = [record.getMessage() for record in caplog.records]
    assert "session_policy(statement_timeout=0.2)" in warning
    assert "created before the endpoint" in warning


@PG_ONLY
async def test_a_bound_the_client_side_timeout_would_beat_is_logged_once(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    database = Database(settings=DatabaseSettings(url=backend.url, command_timeout=2))
    try:
        with caplog.at_level(logging.WARNING, logger="asgi_db_session"):
            for _ in range(2):
                async with session_scope(statement_timeout=2) as session:
                    assert await session.scalar(text("SHOW statement_timeout")) == "2s"
            async with session_scope(statement_timeout=1.5) as session:
                assert await session.scalar(text("SHOW statement_timeout")) == "1500ms"
    finally:
        await database.dispose()
    expected = STATEMENT_TIMEOUT_ABOVE_COMMAND_TIMEOUT.format(seconds=2, name="default", command_timeout=2)
    assert [record.getMessage() for record in caplog.records] == [expected]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_other_databases_ignore_the_bound(backend: Backend, database: Database) -> None:
    @session_policy(statement_timeout=BOUND, commit_on_success=True)
    async def add(request: Request) -> Response:
        await current_session().execute(text(f"INSERT INTO {TABLE} (id, name) VALUES (1, 'kept')"))
        return PlainTextResponse("added")

    app = Starlette(routes=[Route("/add", add)])
    app.add_middleware(DBSessionMiddleware, database=database)
    async with client(app) as http:
        assert (await http.get("/add")).text == "added"
    async with session_scope(statement_timeout=BOUND) as session:
        assert await session.scalar(text("SELECT 1")) == 1
    assert await backend.names() == ["kept"]


@pytest.mark.parametrize(
    ("given", "milliseconds"),
    [(0.2, 200), (2, 2000), (timedelta(milliseconds=250), 250), (1.1, 1100), (0.0001, 1), (2147483.647, 2**31 - 1)],
)
def test_the_bound_is_kept_in_milliseconds(given: float | timedelta, milliseconds: int) -> None:
    async def endpoint() -> None:
        pass

    marked = session_policy(statement_timeout=given)(endpoint)
    assert getattr(marked, POLICY_ATTRIBUTE).statement_timeout == milliseconds


@pytest.mark.parametrize(
    ("given", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (timedelta(0), ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (2147484, ValueError),
        ("1", TypeError),
        (True, TypeError),
    ],
)
def test_a_wrong_bound_is_refused_when_marking(given: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="statement_timeout= takes a positive number of seconds"):
        session_policy(statement_timeout=given)
    with pytest.raises(error, match="statement_timeout= takes a positive number of seconds"):
        session_scope(statement_timeout=given)


def test_a_route_without_a_session_takes_no_bound() -> None:
    with pytest.raises(ValueError, match="statement_timeout=") as raised:
        session_policy(session=False, statement_timeout=1)
    assert str(raised.value) == POLICY_WITHOUT_SESSION
