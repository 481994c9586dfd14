"""Cleanup always happens: a request cancelled at any point leaves no connection out and no transaction open.

Each request is driven with raw ASGI in a task of its own (httpx's ASGITransport would run the app in the
test's task), then cancelled: with ``task.cancel()`` while the endpoint waits in ``pg_sleep``, while a
transaction sits open and idle, and inside a commit; or by an anyio cancel scope in an outer middleware.
Afterwards the pool must have every connection back, PostgreSQL must show no backend of ours left
"idle in transaction" (each test's Database has an ``application_name`` of its own), the cancelled work must
not be in the table, and the next request must get the same row through quickly.

The Database has a pool of one connection with a 1 s timeout, so a connection that was not given back makes
the next request fail instead of quietly opening another one.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from typing import Any

import anyio
import asyncpg
import pytest
from sqlalchemy import Engine, event, make_url, text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_db_session import Database, DatabaseSettings, DBSessionMiddleware, current_session
from asgi_db_session._orphans import OrphanReaper
from asgi_db_session._types import ASGIApp, Message, Receive, Scope, Send

from .asgi import Channel, http_scope
from .conftest import Backend, database_named
from .models import Item

pytestmark = pytest.mark.anyio

# A table whose unique constraint is checked at COMMIT: a second connection holding the same name in an open
# transaction makes our COMMIT wait for it, which is how a test catches a request inside its commit.
DEFERRED_TABLE = f"adbs_cancel_deferred_{os.getpid()}"
CREATE_DEFERRED_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {DEFERRED_TABLE} "
    "(id INTEGER PRIMARY KEY, name VARCHAR(100) NOT NULL UNIQUE DEFERRABLE INITIALLY DEFERRED)"
)
# How long the next request may take after a cancellation (it takes milliseconds; a lock left behind by the
# cancelled request would hold it for seconds, a connection not given back for the 1 s pool timeout).
NEXT_REQUEST_DEADLINE = 3.0
PENDING = "pending"  # the row every cancelled request had written but not committed


# --- helpers ------------------------------------------------------------------------------------------------


def application_name(database: Database) -> str:
    assert database.settings is not None
    assert database.settings.application_name is not None
    return database.settings.application_name


async def our_backends(backend: Backend, database: Database) -> list[tuple[int, str, str]]:
    """(pid, state, query) of every PostgreSQL backend that this test's Database opened."""
    connection = await asyncpg.connect(backend.dsn)
    try:
        rows = await connection.fetch(
            "SELECT pid, coalesce(state, ''), query FROM pg_stat_activity WHERE application_name = $1",
            application_name(database),
        )
    finally:
        await connection.close()
    return [(row[0], row[1], row[2]) for row in rows]


async def wait_until_backend(backend: Backend, database: Database, state: str, query: str) -> int:
    """Wait until one of our backends is in ``state`` running a statement containing ``query``; its pid."""
    with anyio.fail_after(5):
        while True:
            for pid, seen_state, seen_query in await our_backends(backend, database):
                if seen_state == state and query in seen_query:
                    return pid
            await asyncio.sleep(0.01)


async def wait_until_none_active(backend: Backend, database: Database, seconds: float) -> None:
    """Wait up to ``seconds`` for every backend of ours to stop running a statement; fail if one still is."""
    deadline = time.monotonic() + seconds
    while True:
        active = [(pid, query) for pid, state, query in await our_backends(backend, database) if state == "active"]
        if not active:
            return
        assert time.monotonic() < deadline, f"still running on the server: {active}"
        await asyncio.sleep(0.02)


async def assert_no_open_transaction(backend: Backend, database: Database) -> None:
    """Nothing of ours holds a transaction open on the server (PostgreSQL) or the write lock (SQLite)."""
    if backend.name == "postgresql":
        states = [state for _pid, state, _query in await our_backends(backend, database)]
        assert not [state for state in states if state.startswith("idle in transaction")], states
    else:
        # A transaction left open after a flush keeps SQLite's RESERVED lock; then this fails at once.
        with closing(sqlite3.connect(backend.dsn, timeout=0)) as connection:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("ROLLBACK")


def body_request() -> Channel:
    return Channel([{"type": "http.request", "body": b"", "more_body": False}])


async def call(app: ASGIApp, scope: Scope, channel: Channel) -> None:
    await app(scope, channel.receive, channel.send)


def start_request(app: ASGIApp, path: str, query: str = "") -> tuple[asyncio.Task[None], Channel]:
    """Run one HTTP request in a task of its own, as a server does."""
    channel = body_request()
    scope = http_scope(path)
    scope["query_string"] = query.encode()
    return asyncio.create_task(call(app, scope, channel)), channel


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)


async def assert_cleaned_up(
    backend: Backend, database: Database, app: ASGIApp, *, next_row: tuple[int, str] = (1, PENDING)
) -> None:
    """Every check that a cancelled request left nothing behind; ends with a quick next request.

    The next request writes ``next_row``: by default the very row the cancelled request had written, which
    would wait on the unique indexes if that request's transaction were still alive on the server.
    """
    assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    await assert_no_open_transaction(backend, database)
    assert await backend.names() == []
    channel = body_request()
    scope = http_scope("/next")
    scope["query_string"] = f"id={next_row[0]}&name={next_row[1]}".encode()
    started = time.monotonic()
    await asyncio.wait_for(app(scope, channel.receive, channel.send), timeout=NEXT_REQUEST_DEADLINE)
    assert channel.sent[0]["status"] == 200, channel.sent
    assert time.monotonic() - started < NEXT_REQUEST_DEADLINE
    assert await backend.names() == [next_row[1]]
    assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


class Reached:
    """Set by an endpoint when it gets to the point where the test cancels it."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def wait(self, task: asyncio.Task[None]) -> None:
        """Wait for the endpoint to get there; fail at once if the request ended before it did."""
        waiter = asyncio.ensure_future(self.event.wait())
        await asyncio.wait([waiter, task], timeout=5, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        assert self.event.is_set(), f"the endpoint did not get there: {task}"


def make_app(database: Database, reached: Reached, *, commit_on_success: bool = False) -> Starlette:
    async def write_pending(id: int = 1, name: str = PENDING) -> None:
        session = current_session()
        session.add(Item(id=id, name=name))
        await session.flush()

    async def sleep(request: Request) -> Response:
        await write_pending()
        reached.event.set()
        await current_session().execute(text("SELECT pg_sleep(5)"))
        return PlainTextResponse("slept")

    async def idle(request: Request) -> Response:
        await write_pending()
        reached.event.set()
        await asyncio.Event().wait()  # a transaction open and idle until the request is cancelled
        return PlainTextResponse("never")

    async def deferred(request: Request) -> Response:
        await current_session().execute(text(f"INSERT INTO {DEFERRED_TABLE} (id, name) VALUES (1, '{PENDING}')"))
        reached.event.set()
        if request.query_params.get("commit") == "app":
            await current_session().commit()
        return PlainTextResponse("written")

    async def next_request(request: Request) -> Response:
        await write_pending(int(request.query_params["id"]), request.query_params["name"])
        await current_session().commit()
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[
            Route("/sleep", sleep),
            Route("/idle", idle),
            Route("/deferred", deferred),
            Route("/next", next_request),
        ]
    )
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=commit_on_success)
    return app


class TimeoutMiddleware:
    """An outer pure-ASGI middleware that gives up on a request after ``seconds`` and answers 504."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        with anyio.move_on_after(self.seconds) as timeout:
            await self.app(scope, receive, send_wrapper)
        if timeout.cancelled_caught and not started:
            await send({"type": "http.response.start", "status": 504, "headers": []})
            await send({"type": "http.response.body", "body": b"timed out"})


class PoolLog:
    """Counts new DBAPI connections and invalidations: a cleanup cut halfway invalidates the connection."""

    def __init__(self, database: Database) -> None:
        self.connects = 0
        self.invalidations: list[str] = []
        engine = database.engine.sync_engine
        event.listen(engine, "connect", self._on_connect)
        event.listen(engine, "invalidate", self._on_invalidate)

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        self.connects += 1

    def _on_invalidate(self, dbapi_connection: Any, record: Any, exception: BaseException | None) -> None:
        self.invalidations.append(repr(exception))


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_connection_left_for_the_garbage_collector() -> Iterator[None]:
    """A session nobody closed leaves its connection to GC: SQLAlchemy then warns "non-checked-in connection".

    Runs after every other fixture's teardown (autouse fixtures are set up first), so the Database is gone.
    """
    yield
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert [str(warning.message) for warning in caught if "non-checked-in" in str(warning.message)] == []


@pytest.fixture
async def database(backend: Backend) -> AsyncIterator[Database]:
    """A Database with a pool of one connection and, on PostgreSQL, an application_name of its own."""
    name = None
    try:
        async with database_named(backend, "adbs-cancel", pool_size=1, max_overflow=0, pool_timeout=1) as db:
            if backend.name == "postgresql":
                name = application_name(db)
            yield db
    finally:
        if name is not None:
            # A failed test must not leave a backend holding locks that the next test's TRUNCATE waits on.
            connection = await asyncpg.connect(backend.dsn)
            try:
                await connection.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", name
                )
            finally:
                await connection.close()


@pytest.fixture
async def deferred_table(backend: Backend) -> AsyncIterator[str]:
    assert backend.name == "postgresql"
    await backend.execute(CREATE_DEFERRED_TABLE)
    await backend.execute(f"TRUNCATE {DEFERRED_TABLE}")
    yield DEFERRED_TABLE
    await backend.execute(f"DROP TABLE IF EXISTS {DEFERRED_TABLE}")


@pytest.fixture
async def name_holder(backend: Backend, deferred_table: str) -> AsyncIterator[asyncpg.Connection]:
    """A second connection holding the name PENDING in an open transaction: our COMMIT waits for it."""
    connection = await asyncpg.connect(backend.dsn)
    try:
        await connection.execute("BEGIN")
        await connection.execute(f"INSERT INTO {deferred_table} (id, name) VALUES (2, $1)", PENDING)
        yield connection
    finally:
        await connection.close()


# --- task.cancel() ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_cancel_while_waiting_in_pg_sleep(backend: Backend, database: Database) -> None:
    reached = Reached()
    app = make_app(database, reached)
    task, channel = start_request(app, "/sleep")
    await reached.wait(task)
    await wait_until_backend(backend, database, "active", "pg_sleep")

    started = time.monotonic()
    await cancel_and_wait(task)
    assert time.monotonic() - started < 2, "the cancelled request waited for pg_sleep(5)"
    assert channel.sent == []
    # The statement does not keep running on the server (asyncpg sends a cancel request as the connection is
    # closed), so its row lock is gone too and the next request can write the same row.
    await wait_until_none_active(backend, database, seconds=1)
    await assert_cleaned_up(backend, database, app)


class ViewInATaskOfItsOwn:
    """What Django's ASGI handler and Quart do: the view runs in a task of their own, which the handler awaits
    with asyncio.wait(); a cancellation of the handler does not reach that task."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def view() -> None:
            await self.app(scope, receive, send)

        await asyncio.wait([asyncio.create_task(view())])


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_cancel_reaches_a_view_task_the_framework_started(backend: Backend, database: Database) -> None:
    """Cancelled while the framework's own view task waits in pg_sleep: the middleware cancels that task (the
    one using the request's session), so the statement ends now and the connection comes back at once, rather
    than after close() has waited CLOSE_WAIT_SECONDS for it and thrown the connection away."""
    reached = Reached()
    inner = make_app(database, reached)
    app = DBSessionMiddleware(ViewInATaskOfItsOwn(inner.router), database=database)
    task, channel = start_request(app, "/sleep")
    await reached.wait(task)
    await wait_until_backend(backend, database, "active", "pg_sleep")

    started = time.monotonic()
    await cancel_and_wait(task)
    assert time.monotonic() - started < 2, "the cancelled request waited for the view task's pg_sleep(5)"
    assert channel.sent == []
    await wait_until_none_active(backend, database, seconds=1)
    await assert_cleaned_up(backend, database, app)


async def test_cancel_while_transaction_is_open_and_idle(backend: Backend, database: Database) -> None:
    log = PoolLog(database)
    reached = Reached()
    app = make_app(database, reached)
    task, channel = start_request(app, "/idle")
    await reached.wait(task)
    if backend.name == "postgresql":
        await wait_until_backend(backend, database, "idle in transaction", "INSERT")

    await cancel_and_wait(task)
    assert channel.sent == []
    await assert_cleaned_up(backend, database, app)
    # No statement was in flight, so the connection was rolled back and kept, not thrown away.
    assert log.invalidations == []
    assert log.connects == 1


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_cancel_inside_the_apps_own_commit(
    backend: Backend, database: Database, name_holder: asyncpg.Connection
) -> None:
    reached = Reached()
    app = make_app(database, reached)
    task, channel = start_request(app, "/deferred", "commit=app")
    await reached.wait(task)
    await wait_until_backend(backend, database, "active", "COMMIT")

    started = time.monotonic()
    await cancel_and_wait(task)
    assert time.monotonic() - started < 2
    assert channel.sent == []
    await assert_no_open_transaction(backend, database)
    # Releasing the other transaction would let a COMMIT still running on the server go through: it must have
    # stopped first. Then nothing of ours can commit any more, and the table is checked once, at once.
    await wait_until_none_active(backend, database, seconds=5)
    await name_holder.execute("ROLLBACK")
    assert await backend.fetch(f"SELECT name FROM {DEFERRED_TABLE}") == []
    await assert_cleaned_up(backend, database, app)


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_cancel_inside_the_middlewares_commit_lets_the_commit_finish(
    backend: Backend, database: Database, name_holder: asyncpg.Connection
) -> None:
    """commit_on_success: a COMMIT already sent is never cut in half; the request ends once it is over."""
    log = PoolLog(database)
    reached = Reached()
    app = make_app(database, reached, commit_on_success=True)
    task, channel = start_request(app, "/deferred")
    await reached.wait(task)
    pid = await wait_until_backend(backend, database, "active", "COMMIT")

    task.cancel()
    # Watched to the end of the window, not looked at once after it: an early end fails the moment it happens.
    done, _pending = await asyncio.wait({task}, timeout=0.3)
    assert not done, "the request ended while its commit was still running"
    assert [(seen_pid, state) for seen_pid, state, _query in await our_backends(backend, database)] == [(pid, "active")]
    assert database.engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    await name_holder.execute("ROLLBACK")
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)

    # The commit went through, but the response it was made for was not sent: the client went away.
    assert await backend.fetch(f"SELECT name FROM {DEFERRED_TABLE}") == [(PENDING,)]
    assert channel.sent == []
    assert [(seen_pid, state) for seen_pid, state, _query in await our_backends(backend, database)] == [(pid, "idle")]
    await assert_cleaned_up(backend, database, app)
    assert log.invalidations == []


# --- an anyio cancel scope in an outer middleware -----------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "path"),
    [("postgresql", "/sleep"), ("postgresql", "/idle"), ("sqlite", "/idle")],
    indirect=["backend"],
)
async def test_outer_anyio_timeout(backend: Backend, database: Database, path: str) -> None:
    """anyio delivers its cancellation again at every await until the scope exits; the cleanup still ends."""
    log = PoolLog(database)
    reached = Reached()
    app = TimeoutMiddleware(make_app(database, reached), seconds=0.2)
    channel = body_request()
    started = time.monotonic()
    await asyncio.wait_for(app(http_scope(path), channel.receive, channel.send), timeout=5)
    assert time.monotonic() - started < 2
    assert reached.event.is_set(), "the timeout hit before the endpoint had its transaction open"

    assert [message.get("status") for message in channel.sent if message["type"] == "http.response.start"] == [504]
    # Checked the moment the ASGI call returned: the cleanup is over before the server moves on.
    assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    # Cut off mid-statement (/sleep), the statement runs on in the server until the Database's cancel by backend
    # pid reaches it (test_statement_cut_off_by_anyio_scope_stops_on_the_server), keeping the lock on the row it
    # wrote: there the next request writes a row that shares no key with it. The next request goes to the app
    # inside the timeout: its deadline is assert_cleaned_up's, not the 0.2 s that cut off the first one (a loaded
    # CI machine once took longer than that over a SQLite commit, and the test read that as a leftover).
    await assert_cleaned_up(backend, database, app.app, next_row=(2, "other") if path == "/sleep" else (1, PENDING))
    if path == "/idle":
        # No statement was in flight: the ROLLBACK ran to the end under the re-delivered cancellation, and the
        # connection was kept rather than thrown away.
        assert log.invalidations == []
        assert log.connects == 1


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
@pytest.mark.parametrize("check_interval", [None, 100])
async def test_statement_cut_off_by_anyio_scope_stops_on_the_server(
    backend: Backend, check_interval: int | None
) -> None:
    """The statement of a request cut off by an anyio cancel scope does not run on in the server.

    anyio re-delivers the cancellation inside SQLAlchemy's graceful close of the invalidated asyncpg
    connection, which falls back to terminate() and drops asyncpg's pending cancel request (before asyncpg
    0.32 it did not even close the socket). The Database then cancels the statement by backend pid; with
    client_connection_check_interval the server also notices the closed socket by itself.
    """
    settings = DatabaseSettings(
        url=backend.url,
        pool_size=1,
        max_overflow=0,
        application_name=f"adbs-cancel-{uuid.uuid4().hex[:12]}",
        client_connection_check_interval=check_interval,
    )
    database = Database(settings=settings)
    try:
        app = TimeoutMiddleware(make_app(database, Reached()), seconds=0.2)
        channel = body_request()
        await asyncio.wait_for(app(http_scope("/sleep"), channel.receive, channel.send), timeout=5)
        assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        await wait_until_none_active(backend, database, seconds=1)
    finally:
        await database.dispose()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_given_engine_gets_the_same_protection(backend: Backend) -> None:
    """Database(engine=...) (and so DBSessionMiddleware(engine=...)) watches that engine's pool too."""
    settings = DatabaseSettings(
        url=backend.url, pool_size=1, max_overflow=0, application_name=f"adbs-cancel-{uuid.uuid4().hex[:12]}"
    )
    engine = create_async_engine(settings.engine_url(), **settings.engine_options())
    database = Database(engine=engine)
    # The helpers find our backends by the settings' application_name; this Database has only the engine.
    named = Database(settings=settings, name="adbs-cancel-names")
    try:
        app = TimeoutMiddleware(make_app(database, Reached()), seconds=0.2)
        channel = body_request()
        await asyncio.wait_for(app(http_scope("/sleep"), channel.receive, channel.send), timeout=5)
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        await wait_until_none_active(backend, named, seconds=1)
    finally:
        await database.dispose()
        await named.dispose()


# --- the cleanup itself cannot be cancelled halfway ---------------------------------------------------------


async def test_second_cancel_during_cleanup_does_not_cut_it_short(backend: Backend, database: Database) -> None:
    log = PoolLog(database)
    reached = Reached()
    app = make_app(database, reached)
    task, channel = start_request(app, "/idle")
    await reached.wait(task)

    second_cancels: list[bool] = []

    def cancel_again(connection: Any) -> None:
        # Fires inside the middleware's close, just before the ROLLBACK is sent to the database.
        if not second_cancels:
            second_cancels.append(task.cancel())

    event.listen(database.engine.sync_engine, "rollback", cancel_again)
    await cancel_and_wait(task)
    assert second_cancels == [True], "the second cancellation did not reach the request during its cleanup"

    await assert_cleaned_up(backend, database, app)
    # The ROLLBACK ran to the end: the same connection went back to the pool and served the next request.
    assert log.invalidations == []
    assert log.connects == 1
    assert channel.sent == []


# --- the watch that ends orphaned backends --------------------------------------------------------------------


async def test_ending_an_orphan_holds_no_transaction_open(postgresql_dsn: str) -> None:
    """The reaper's own connection runs its one statement outside a transaction: a check for leftover
    transactions, run while it works, never finds it idle in one."""
    url = postgresql_dsn.replace("postgresql://", "postgresql+asyncpg://")
    engine = create_async_engine(url)
    reaper = OrphanReaper(engine, make_url(url), {})
    orphan = await asyncpg.connect(postgresql_dsn)
    pid = orphan.get_server_pid()
    in_transaction: list[bool] = []

    def after_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "pg_terminate_backend" in statement:
            in_transaction.append(conn.connection.driver_connection.is_in_transaction())

    event.listen(Engine, "after_cursor_execute", after_execute)
    try:
        await reaper._end_backend(pid)
    finally:
        event.remove(Engine, "after_cursor_execute", after_execute)
        await reaper.close()
        await engine.dispose()
    assert in_transaction == [False]
    # And it did its job: the backend is gone from the server.
    observer = await asyncpg.connect(postgresql_dsn)
    try:
        deadline = time.monotonic() + 5
        while await observer.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
            assert time.monotonic() < deadline, f"backend {pid} still there 5 s after the reaper ended it"
            await asyncio.sleep(0.02)
    finally:
        await observer.close()
        orphan.terminate()
