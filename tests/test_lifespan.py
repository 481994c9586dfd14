"""The lifespan scope: the app's own lifespan runs untouched, the engine is made at startup (and checked when
asked) and disposed at shutdown, and a server that runs no lifespan at all still works.

On PostgreSQL each Database gets an ``application_name`` of its own, so ``pg_stat_activity`` tells exactly
which server backends (pooled connections) belong to the test.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_db_session import (
    Database,
    DatabaseSettings,
    DBSessionMiddleware,
    NoSessionError,
    current_session,
    session_scope,
)
from asgi_db_session._types import ASGIApp, Receive, Scope, Send

from .asgi import Channel, http_scope, run_lifespan, websocket_scope
from .conftest import PG_URL, Backend, client
from .models import Item

pytestmark = pytest.mark.anyio

PASSWORD = "Zx9Pw77q"  # no dictionary word in it: any piece of it in a message is a leak
UNREACHABLE_URL = f"postgresql+asyncpg://postgres:{PASSWORD}@127.0.0.1:1/test"


# --- helpers ------------------------------------------------------------------------------------------------


class LifespanServer:
    """Drives the lifespan protocol the way a server does: startup now, shutdown later."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.channel = Channel()
        self.scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task: asyncio.Task[None] | None = None

    async def _call(self) -> None:
        await self.app(self.scope, self.channel.receive, self.channel.send)

    async def _answer(self, prefix: str) -> str:
        """Wait for the app's message whose type starts with ``prefix``; return that type."""
        assert self.task is not None
        deadline = time.monotonic() + 10
        while True:
            answers = [message["type"] for message in self.channel.sent if message["type"].startswith(prefix)]
            if answers:
                return str(answers[0])
            assert not self.task.done(), f"the app's lifespan ended without a {prefix}* message: {self.task}"
            assert time.monotonic() < deadline, f"no {prefix}* message: {self.channel.sent}"
            await asyncio.sleep(0.005)

    async def startup(self) -> str:
        self.channel.queue.put_nowait({"type": "lifespan.startup"})
        self.task = asyncio.create_task(self._call())
        return await self._answer("lifespan.startup.")

    async def shutdown(self) -> str:
        """Send shutdown and wait until the app's lifespan call has ended (an error included)."""
        assert self.task is not None
        self.channel.queue.put_nowait({"type": "lifespan.shutdown"})
        await asyncio.wait_for(asyncio.gather(self.task, return_exceptions=True), timeout=10)
        return await self._answer("lifespan.shutdown.")


async def our_backends(dsn: str, name: str) -> list[tuple[int, str]]:
    """(pid, state) of every PostgreSQL backend opened under application_name ``name``."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT pid, coalesce(state, '') FROM pg_stat_activity WHERE application_name = $1", name
        )
    finally:
        await connection.close()
    return sorted((row[0], row[1]) for row in rows)


async def wait_for_backends(dsn: str, name: str, count: int, seconds: float = 3.0) -> list[tuple[int, str]]:
    """Poll until exactly ``count`` backends of ours exist (a closed connection's backend takes a moment)."""
    deadline = time.monotonic() + seconds
    while True:
        backends = await our_backends(dsn, name)
        if len(backends) == count:
            return backends
        assert time.monotonic() < deadline, f"expected {count} backends named {name}, found {backends}"
        await asyncio.sleep(0.02)


async def assert_backends_stay(dsn: str, name: str, backends: list[tuple[int, str]], seconds: float) -> None:
    """Fail the moment the backends of ours differ from ``backends``, watching for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert await our_backends(dsn, name) == backends
        await asyncio.sleep(0.02)
    assert await our_backends(dsn, name) == backends


def application_name(database: Database) -> str:
    assert database.settings is not None
    assert database.settings.application_name is not None
    return database.settings.application_name


def engine_created(database: Database) -> bool:
    """Whether the Database has made its engine yet (reading ``engine`` would make it)."""
    return database._engine is not None


async def hold_connection(request: Request) -> Response:
    """Keeps its connection a moment, so that concurrent requests each need one of their own."""
    await current_session().execute(text("SELECT pg_sleep(0.1)"))
    return PlainTextResponse("ok")


async def write_item(request: Request) -> Response:
    session = current_session()
    session.add(Item(id=1, name="written"))
    await session.commit()
    return PlainTextResponse("ok")


def app_with(database: Database, **middleware_options: Any) -> Starlette:
    app = Starlette(routes=[Route("/hold", hold_connection), Route("/write", write_item)])
    app.add_middleware(DBSessionMiddleware, database=database, **middleware_options)
    return app


async def fill_pool(app: ASGIApp, connections: int) -> None:
    """``connections`` concurrent requests, each holding a connection: the pool ends up with that many."""
    async with client(app) as http:
        responses = await asyncio.gather(*(http.get("/hold") for _ in range(connections)))
    assert [response.status_code for response in responses] == [200] * connections


@pytest.fixture
async def pg_database(postgresql_dsn: str) -> AsyncIterator[Database]:
    """A PostgreSQL Database whose connections carry an application_name of their own."""
    db = Database(settings=DatabaseSettings(url=PG_URL, application_name=f"adbs-lifespan-{uuid.uuid4().hex[:12]}"))
    yield db
    await db.dispose()


# --- the app's own lifespan ---------------------------------------------------------------------------------


async def test_app_lifespan_runs_unchanged_and_can_use_the_database(backend: Backend) -> None:
    events: list[str] = []
    database = Database(backend.url)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, str]]:
        events.append("startup")
        async with session_scope(commit=True) as session:
            session.add(Item(id=1, name="written at startup"))
        yield {"greeting": "from the app's lifespan"}
        async with session_scope(commit=True) as session:
            session.add(Item(id=2, name="written at shutdown"))
        events.append("shutdown")

    async def greeting(request: Request) -> Response:
        return PlainTextResponse(request.state.greeting)

    app = Starlette(routes=[Route("/", greeting)], lifespan=lifespan)
    app.add_middleware(DBSessionMiddleware, database=database)
    server = LifespanServer(app)

    assert await server.startup() == "lifespan.startup.complete"
    assert events == ["startup"]
    # The lifespan state the app yielded is in the scope the server gave: the middleware passed it on as is.
    assert server.scope["state"] == {"greeting": "from the app's lifespan"}
    channel = Channel([{"type": "http.request", "body": b"", "more_body": False}])
    scope = http_scope("/")
    scope["state"] = dict(server.scope["state"])  # what a server does for every request
    await app(scope, channel.receive, channel.send)
    assert channel.sent[1]["body"] == b"from the app's lifespan"

    assert await server.shutdown() == "lifespan.shutdown.complete"
    assert events == ["startup", "shutdown"]
    assert server.channel.types() == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert await backend.names() == ["written at shutdown", "written at startup"]
    assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    await database.dispose()


async def test_app_startup_failure_is_reported_as_its_own(sqlite_url: str) -> None:
    """The app's own failed startup reaches the server with the app's message, not replaced or swallowed."""

    def warm_up_cache() -> None:
        raise RuntimeError("cache warm-up failed")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        warm_up_cache()
        yield

    app = Starlette(lifespan=lifespan)
    database = Database(settings=DatabaseSettings(url=sqlite_url, check_on_startup=True))
    app.add_middleware(DBSessionMiddleware, database=database)
    server = LifespanServer(app)

    assert await server.startup() == "lifespan.startup.failed"
    assert server.channel.types() == ["lifespan.startup.failed"]
    assert "RuntimeError: cache warm-up failed" in server.channel.sent[0]["message"]
    assert server.task is not None
    outcome = await asyncio.gather(server.task, return_exceptions=True)
    assert isinstance(outcome[0], RuntimeError)
    await database.dispose()


# --- startup: the engine, and the optional connectivity check -----------------------------------------------


@pytest.mark.parametrize("check_on_startup", [False, True])
async def test_startup_creates_the_engine_and_checks_it_when_asked(postgresql_dsn: str, check_on_startup: bool) -> None:
    name = f"adbs-lifespan-{uuid.uuid4().hex[:12]}"
    database = Database(settings=DatabaseSettings(url=PG_URL, application_name=name, check_on_startup=check_on_startup))
    assert not engine_created(database)  # nothing is created before the server starts the app
    server = LifespanServer(app_with(database))
    try:
        assert await server.startup() == "lifespan.startup.complete"
        assert engine_created(database)
        # The check connects (that connection stays in the pool); without it nothing connects until a request.
        states = [state for _pid, state in await our_backends(postgresql_dsn, name)]
        assert states == (["idle"] if check_on_startup else [])
        assert await server.shutdown() == "lifespan.shutdown.complete"
    finally:
        await database.dispose()


@pytest.mark.parametrize("source", ["database", "settings"])
async def test_unreachable_database_fails_startup_with_a_readable_message_and_no_password(source: str) -> None:
    options: dict[str, Any]
    if source == "database":
        options = {"database": Database(UNREACHABLE_URL, check_on_startup=True)}
    else:
        options = {"settings": DatabaseSettings(url=UNREACHABLE_URL, check_on_startup=True)}
    app = Starlette()
    app.add_middleware(DBSessionMiddleware, **options)

    started = time.monotonic()
    # A server stops after lifespan.startup.failed: it sends no shutdown (run_lifespan cancels the task).
    channel = await run_lifespan(app, shutdown=False)
    assert time.monotonic() - started < 5
    assert channel.types()[0] == "lifespan.startup.failed"
    message = channel.sent[0]["message"]
    assert isinstance(message, str)
    assert "127.0.0.1:1" in message  # says where it tried
    assert "Traceback" not in message
    pieces = {PASSWORD[start : start + 3] for start in range(len(PASSWORD) - 2)}
    assert [piece for piece in pieces if piece in message] == [], message


async def test_failed_startup_check_leaves_nothing_of_the_app_open() -> None:
    """The check runs before the app's own startup: a server sends no shutdown after a failed startup."""
    opened: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        opened.append("worker pool")
        yield
        opened.remove("worker pool")

    app = Starlette(lifespan=lifespan)
    app.add_middleware(DBSessionMiddleware, database=Database(UNREACHABLE_URL, check_on_startup=True))
    server = LifespanServer(app)
    try:
        assert await server.startup() == "lifespan.startup.failed"
        # The server stops here: it sends no lifespan.shutdown after a failed startup.
        assert opened == []
    finally:
        if server.task is not None:
            server.task.cancel()
            await asyncio.gather(server.task, return_exceptions=True)


BAD_SETTINGS = {
    "no DATABASE_URL": ({}, "No database URL: set the DATABASE_URL environment variable"),
    "DATABASE_POOL_SIZE=abc": (
        {"DATABASE_URL": UNREACHABLE_URL, "DATABASE_POOL_SIZE": "abc"},
        "Invalid database settings: DATABASE_POOL_SIZE: Input should be a valid integer, unable to parse string as "
        "an integer",
    ),
    "a sync driver": (
        {"DATABASE_URL": UNREACHABLE_URL.replace("+asyncpg", "+psycopg2")},
        "Invalid database settings: DATABASE_URL: 'postgresql+psycopg2' in "
        "'postgresql+psycopg2://postgres:***@127.0.0.1:1/test' is a synchronous driver",
    ),
}


@pytest.mark.parametrize("setting", list(BAD_SETTINGS))
async def test_a_bad_setting_fails_the_startup_and_every_request(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    """The README's ``app.add_middleware(DBSessionMiddleware)`` with a bad DATABASE_* variable. Starlette builds
    the middleware inside the lifespan call: the error must come out as lifespan.startup.failed, which stops a
    server, not as an exception from the lifespan call, which servers take for "no lifespan support". Under a
    server that runs no lifespan, every request raises it."""
    environment, expected = BAD_SETTINGS[setting]
    monkeypatch.delenv("DATABASE_URL", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    opened: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        opened.append("worker pool")
        yield

    app = Starlette(lifespan=lifespan)
    app.add_middleware(DBSessionMiddleware)
    server = LifespanServer(app)
    try:
        assert await server.startup() == "lifespan.startup.failed"
    finally:
        assert server.task is not None
        server.task.cancel()
        await asyncio.gather(server.task, return_exceptions=True)
    message = server.channel.sent[0]["message"]
    assert isinstance(message, str)
    assert expected in message
    assert "\n" not in message
    assert PASSWORD not in message
    assert opened == []  # the server sends no shutdown after a failed startup: nothing to close

    for scope in (http_scope("/"), websocket_scope("/")):
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            await app(scope, Channel().receive, Channel().send)


def test_two_engine_sources_are_still_refused_at_construction(sqlite_url: str) -> None:
    """A mistake in the code, not in the environment: raised where it is made, as DESIGN.md says."""
    app = Starlette()
    with pytest.raises(ValueError, match="one engine source, got url and settings"):
        DBSessionMiddleware(app, url=sqlite_url, settings=DatabaseSettings(url=sqlite_url))


# --- shutdown: dispose ----------------------------------------------------------------------------------------


async def test_shutdown_disposes_the_engine(postgresql_dsn: str, pg_database: Database) -> None:
    name = application_name(pg_database)
    server = LifespanServer(app_with(pg_database))
    assert await server.startup() == "lifespan.startup.complete"
    await fill_pool(server.app, 3)
    backends = await wait_for_backends(postgresql_dsn, name, 3)
    assert {state for _pid, state in backends} == {"idle"}

    assert await server.shutdown() == "lifespan.shutdown.complete"
    await wait_for_backends(postgresql_dsn, name, 0)


async def test_dispose_on_shutdown_false_keeps_the_pool(postgresql_dsn: str, pg_database: Database) -> None:
    name = application_name(pg_database)
    server = LifespanServer(app_with(pg_database, dispose_on_shutdown=False))
    assert await server.startup() == "lifespan.startup.complete"
    await fill_pool(server.app, 3)
    backends = await wait_for_backends(postgresql_dsn, name, 3)

    assert await server.shutdown() == "lifespan.shutdown.complete"
    # A disposed engine has a fresh, empty pool at once; its old backends take a moment to go on the server,
    # so those are watched for that long (as long as they took to go in the test above).
    assert pg_database.engine.pool.checkedin() == 3  # type: ignore[attr-defined]
    await assert_backends_stay(postgresql_dsn, name, backends, seconds=0.3)
    # They were ours to close all along.
    await pg_database.dispose()
    await wait_for_backends(postgresql_dsn, name, 0)


async def test_failed_app_shutdown_still_disposes_the_engine(postgresql_dsn: str, pg_database: Database) -> None:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        raise RuntimeError("flush of the metrics buffer failed")

    app = Starlette(routes=[Route("/hold", hold_connection)], lifespan=lifespan)
    app.add_middleware(DBSessionMiddleware, database=pg_database)
    server = LifespanServer(app)
    assert await server.startup() == "lifespan.startup.complete"
    await fill_pool(app, 2)
    await wait_for_backends(postgresql_dsn, application_name(pg_database), 2)

    assert await server.shutdown() == "lifespan.shutdown.failed"
    failed = next(message for message in server.channel.sent if message["type"] == "lifespan.shutdown.failed")
    assert "flush of the metrics buffer failed" in failed["message"]
    await wait_for_backends(postgresql_dsn, application_name(pg_database), 0)


# --- an app that refuses the lifespan scope ----------------------------------------------------------------


async def refuses_by_raising(scope: Scope, receive: Receive, send: Send) -> None:
    """What Django's ASGI handler does with a lifespan scope: raise before reading a message."""
    if scope["type"] != "http":
        raise ValueError(f"this app can only handle HTTP connections, not {scope['type']}")
    await query_and_answer(send)


async def refuses_by_returning(scope: Scope, receive: Receive, send: Send) -> None:
    """A bare ASGI app that handles HTTP only: it returns from any other scope without a word."""
    if scope["type"] != "http":
        return
    await query_and_answer(send)


async def reads_startup_and_returns(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        await receive()
        return
    await query_and_answer(send)


async def query_and_answer(send: Send) -> None:
    await current_session().execute(text("SELECT 1"))
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


REFUSING_APPS = {
    "raises": refuses_by_raising,
    "returns": refuses_by_returning,
    "reads startup and returns": reads_startup_and_returns,
}


@pytest.mark.parametrize("refusal", list(REFUSING_APPS))
async def test_an_app_that_refuses_lifespan_still_gets_the_check_and_the_disposal(
    postgresql_dsn: str, refusal: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Django's ASGI handler raises for the lifespan scope; a bare ASGI app may return from it unanswered. The
    middleware answers the protocol for such an app: the startup check runs and the server hears
    lifespan.startup.complete (not an exception, which it would take for "no lifespan": no disposal at shutdown,
    or, under uvicorn --lifespan on, no server at all), and the engine is disposed at shutdown."""
    name = f"adbs-lifespan-{uuid.uuid4().hex[:12]}"
    database = Database(settings=DatabaseSettings(url=PG_URL, application_name=name, check_on_startup=True))
    app = DBSessionMiddleware(REFUSING_APPS[refusal], database=database)
    server = LifespanServer(app)
    try:
        with caplog.at_level("INFO", logger="asgi_db_session"):
            assert await server.startup() == "lifespan.startup.complete"
        assert [state for _pid, state in await our_backends(postgresql_dsn, name)] == ["idle"]  # the check's
        await fill_pool(app, 1)  # not a Starlette app: /hold is any path here
        assert await server.shutdown() == "lifespan.shutdown.complete"
        assert server.channel.types() == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert server.task is not None
        assert server.task.exception() is None
        await wait_for_backends(postgresql_dsn, name, 0)
    finally:
        await database.dispose()
    if refusal == "raises":
        # Said once at startup, as servers say "lifespan unsupported": not an error, the app is made that way.
        (record,) = [record for record in caplog.records if "refused the lifespan scope" in record.getMessage()]
        assert (record.name, record.levelname) == ("asgi_db_session", "INFO")
        assert "this app can only handle HTTP connections, not lifespan" in record.getMessage()


async def test_an_app_that_refuses_lifespan_is_not_disposed_when_told_not_to(
    postgresql_dsn: str, pg_database: Database
) -> None:
    name = application_name(pg_database)
    app = DBSessionMiddleware(refuses_by_returning, database=pg_database, dispose_on_shutdown=False)
    server = LifespanServer(app)
    assert await server.startup() == "lifespan.startup.complete"
    await fill_pool(app, 1)
    backends = await wait_for_backends(postgresql_dsn, name, 1)
    assert await server.shutdown() == "lifespan.shutdown.complete"
    await assert_backends_stay(postgresql_dsn, name, backends, seconds=0.3)


async def test_an_app_whose_own_startup_raises_still_fails_to_the_server(sqlite_url: str) -> None:
    """An app that read the startup message and then raised has a lifespan of its own, which failed: that is the
    server's to hear (uvicorn --lifespan on stops), not something the middleware papers over."""

    async def broken_startup(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise RuntimeError("cache warm-up failed")

    database = Database(sqlite_url)
    server = LifespanServer(DBSessionMiddleware(broken_startup, database=database))
    server.channel.queue.put_nowait({"type": "lifespan.startup"})
    with pytest.raises(RuntimeError, match="cache warm-up failed"):
        await server._call()
    assert server.channel.sent == []
    await database.dispose()


async def test_an_app_that_answers_startup_and_returns_is_disposed_at_shutdown(
    postgresql_dsn: str, pg_database: Database
) -> None:
    """An app whose lifespan ends right after its startup: the server still sends shutdown, and the middleware,
    the only one left to answer it, disposes the engine."""

    async def startup_only(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            return
        await query_and_answer(send)

    server = LifespanServer(DBSessionMiddleware(startup_only, database=pg_database))
    assert await server.startup() == "lifespan.startup.complete"
    await fill_pool(server.app, 1)
    await wait_for_backends(postgresql_dsn, application_name(pg_database), 1)
    assert await server.shutdown() == "lifespan.shutdown.complete"
    assert server.channel.types() == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    await wait_for_backends(postgresql_dsn, application_name(pg_database), 0)


async def test_an_app_that_leaves_shutdown_unanswered_gets_it_answered(sqlite_url: str) -> None:
    """An app that reads lifespan.shutdown and returns without a word: the server still hears shutdown.complete,
    after the disposal."""

    async def silent_at_shutdown(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()

    database = Database(sqlite_url)
    server = LifespanServer(DBSessionMiddleware(silent_at_shutdown, database=database))
    assert await server.startup() == "lifespan.startup.complete"
    assert engine_created(database)
    pool = database.engine.pool
    assert await server.shutdown() == "lifespan.shutdown.complete"
    assert server.channel.types() == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert database.engine.pool is not pool  # disposed: a new, empty pool in place of the old one


# --- servers without lifespan, and other scope types --------------------------------------------------------


async def test_without_lifespan_the_engine_is_made_on_first_use(backend: Backend) -> None:
    database = Database(backend.url)
    app = app_with(database)
    assert not engine_created(database)
    async with client(app) as http:  # httpx's ASGITransport sends no lifespan events
        assert (await http.get("/write")).status_code == 200
    assert engine_created(database)
    assert await backend.names() == ["written"]
    assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    await database.dispose()


async def test_other_scope_types_pass_through_untouched(sqlite_url: str) -> None:
    seen: list[tuple[Scope, Receive, Send]] = []
    no_session: list[NoSessionError] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope, receive, send))
        try:
            current_session()
        except NoSessionError as exc:
            no_session.append(exc)
        await send({"type": "custom.reply", "echo": (await receive())["value"]})

    database = Database(sqlite_url)
    middleware = DBSessionMiddleware(inner, database=database)
    channel = Channel([{"type": "custom.event", "value": 42}])
    scope: dict[str, Any] = {"type": "custom", "asgi": {"version": "3.0"}}
    receive, send = channel.receive, channel.send

    await middleware(scope, receive, send)

    assert len(seen) == 1
    seen_scope, seen_receive, seen_send = seen[0]
    assert seen_scope is scope
    assert seen_receive is receive
    assert seen_send is send
    assert len(no_session) == 1  # no session scope was opened for it
    assert channel.sent == [{"type": "custom.reply", "echo": 42}]
    assert not engine_created(database)
    assert scope == {"type": "custom", "asgi": {"version": "3.0"}}
