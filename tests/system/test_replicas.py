"""Read replicas: read-only sessions on a streaming hot standby, everything else on the primary.

A real primary and standby (tests/system/pg_replica.py): where a session ran is what the server says,
``pg_is_in_recovery()`` (true only on the standby); which of two replica URLs it used is ``current_user``
(the two URLs reach the same standby as two roles). Writes of the test itself go to the primary, and the test
waits until the standby has replayed them; a test that must know the standby cannot have a write pauses its
replay.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg
import pytest
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_db_session import (
    Database,
    DatabaseSettings,
    DBSessionMiddleware,
    current_session,
    session_policy,
    session_scope,
)
from asgi_db_session._types import ASGIApp

from ..asgi import Channel
from ..conftest import client
from ..models import TABLE, Item
from .backends import backends_of
from .pg_replica import READERS, ReplicaSet, pg_replica_set

__all__ = ["pg_replica_set"]  # the session fixture, imported so that pytest finds it for this module

pytestmark = pytest.mark.anyio

APPLICATION_NAME = f"adbs-replicas-{os.getpid()}"
READ_ONLY_SQLSTATE = "25006"  # read_only_sql_transaction: "cannot execute INSERT in a read-only transaction"


@pytest.fixture
async def replicas(pg_replica_set: ReplicaSet) -> ReplicaSet:
    """The primary and standby, with an empty items table on both."""
    connection = await asyncpg.connect(pg_replica_set.primary.dsn)
    try:
        await connection.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (id INTEGER PRIMARY KEY, name VARCHAR(100) NOT NULL UNIQUE)"
        )
        await connection.execute(f"TRUNCATE {TABLE}")
    finally:
        await connection.close()
    await pg_replica_set.wait_until_replayed()
    return pg_replica_set


@pytest.fixture
def settings(replicas: ReplicaSet) -> DatabaseSettings:
    """The primary's settings, with an application_name that shows this test's backends on both servers."""
    return DatabaseSettings(url=replicas.primary_url, application_name=APPLICATION_NAME)


@pytest.fixture
async def make_database(replicas: ReplicaSet) -> AsyncIterator[list[Database]]:
    """Databases the test makes, disposed at its end whatever happened."""
    made: list[Database] = []
    yield made
    for database in made:
        await database.dispose()


async def where(session: AsyncSession) -> tuple[bool, str, str]:
    """(in recovery: the standby; the role connected; transaction_read_only) of the session's connection."""
    row = (
        await session.execute(
            text("SELECT pg_is_in_recovery(), current_user, current_setting('transaction_read_only')")
        )
    ).one()
    return bool(row[0]), str(row[1]), str(row[2])


def error_chain(error: BaseException | None) -> list[BaseException]:
    """The error, its causes and contexts, and the driver errors SQLAlchemy wraps (``.orig``)."""
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        orig = getattr(error, "orig", None)
        if isinstance(orig, BaseException) and orig not in seen:
            seen.extend(error_chain(orig))
        error = error.__cause__ or error.__context__
    return seen


def is_read_only_violation(error: BaseException) -> bool:
    return any(
        getattr(each, "sqlstate", None) == READ_ONLY_SQLSTATE or "read-only transaction" in str(each)
        for each in error_chain(error)
    )


async def backends_by_role(dsn: str, application_name: str) -> dict[str, int]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT usename, count(*) FROM pg_stat_activity WHERE application_name = $1 GROUP BY usename",
            application_name,
        )
    finally:
        await connection.close()
    return {row["usename"]: row["count"] for row in rows}


async def rows_on_primary(replicas: ReplicaSet) -> int:
    connection = await asyncpg.connect(replicas.primary.dsn)
    try:
        count: int = await connection.fetchval(f"SELECT count(*) FROM {TABLE}")
        return count
    finally:
        await connection.close()


# --- where sessions run -------------------------------------------------------------------------------------


async def test_read_only_scope_runs_on_the_replica_and_a_normal_one_on_the_primary(
    replicas: ReplicaSet, settings: DatabaseSettings, make_database: list[Database]
) -> None:
    database = Database(replicas.primary_url, replicas=[replicas.standby_url])
    make_database.append(database)

    async with session_scope(read_only=True) as session:
        assert await where(session) == (True, "postgres", "on")
    async with session_scope() as session:
        assert await where(session) == (False, "postgres", "off")
    assert len(database.replica_engines) == 1


async def test_without_replicas_a_read_only_scope_is_read_only_on_the_primary(
    replicas: ReplicaSet, make_database: list[Database]
) -> None:
    database = Database(replicas.primary_url)
    make_database.append(database)

    async with session_scope(read_only=True) as session:
        assert await where(session) == (False, "postgres", "on")
    assert database.replica_engines == []


async def test_read_only_endpoint_runs_on_the_replica(replicas: ReplicaSet, make_database: list[Database]) -> None:
    database = Database(replicas.primary_url, replicas=[replicas.standby_url])
    make_database.append(database)

    @session_policy(read_only=True)
    async def report(request: Request) -> Response:
        in_recovery, _, read_only = await where(current_session())
        return JSONResponse({"in_recovery": in_recovery, "read_only": read_only})

    async def normal(request: Request) -> Response:
        in_recovery, _, read_only = await where(current_session())
        return JSONResponse({"in_recovery": in_recovery, "read_only": read_only})

    app = Starlette(routes=[Route("/report", report), Route("/normal", normal)])
    app.add_middleware(DBSessionMiddleware, database=database)
    async with client(app) as http:
        assert (await http.get("/report")).json() == {"in_recovery": True, "read_only": "on"}
        assert (await http.get("/normal")).json() == {"in_recovery": False, "read_only": "off"}


@pytest.mark.parametrize("given_as", ["argument", "environment"])
async def test_read_only_sessions_take_the_replicas_in_turn(
    replicas: ReplicaSet, make_database: list[Database], monkeypatch: pytest.MonkeyPatch, given_as: str
) -> None:
    urls = [replicas.standby_url_as(role) for role in READERS]
    if given_as == "argument":
        database = Database(replicas.primary_url, replicas=urls)
    else:
        monkeypatch.setenv("DATABASE_REPLICA_URLS", ",".join(urls))
        database = Database(replicas.primary_url)
    make_database.append(database)

    used = []
    for _ in range(6):
        async with session_scope(read_only=True) as session:
            in_recovery, role, read_only = await where(session)
            assert (in_recovery, read_only) == (True, "on")
            used.append(role)
    first, second = used[0], used[1]
    assert {first, second} == set(READERS)
    assert used == [first, second] * 3
    assert len(database.replica_engines) == 2


# --- writes ---------------------------------------------------------------------------------------------------


async def test_a_write_in_a_read_only_scope_fails_and_writes_nothing(
    replicas: ReplicaSet, make_database: list[Database]
) -> None:
    database = Database(replicas.primary_url, replicas=[replicas.standby_url])
    make_database.append(database)

    with pytest.raises(Exception) as raised:  # noqa: PT011  (the library maps it as it chooses; the cause is checked)
        async with session_scope(read_only=True, commit=True) as session:
            await session.execute(text(f"INSERT INTO {TABLE} (id, name) VALUES (1, 'lost')"))
    assert is_read_only_violation(raised.value), error_chain(raised.value)
    assert await rows_on_primary(replicas) == 0


@pytest.mark.parametrize("replica", [True, False], ids=["on-a-replica", "no-replicas"])
async def test_a_write_in_a_read_only_endpoint_fails_and_writes_nothing(
    replicas: ReplicaSet, make_database: list[Database], replica: bool
) -> None:
    database = Database(replicas.primary_url, replicas=[replicas.standby_url] if replica else None)
    make_database.append(database)
    errors: list[BaseException] = []

    @session_policy(read_only=True)
    async def sneaky(request: Request) -> Response:
        try:
            current_session().add(Item(id=1, name="lost"))
            await current_session().flush()
        except Exception as exc:
            errors.append(exc)
            raise
        return JSONResponse({"written": True}, status_code=201)

    app = Starlette(routes=[Route("/sneaky", sneaky, methods=["POST"])])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    async with client(app, raise_app_exceptions=False) as http:
        response = await http.post("/sneaky")

    assert response.status_code == 500, response.text  # docs/reference/failures.md: a bug in the app
    assert len(errors) == 1, errors
    assert is_read_only_violation(errors[0]), error_chain(errors[0])
    assert await rows_on_primary(replicas) == 0


async def _insert(session: AsyncSession) -> None:
    await session.execute(text(f"INSERT INTO {TABLE} (id, name) VALUES (7, 'seven')"))


async def _add_and_flush(session: AsyncSession) -> None:
    session.add(Item(id=7, name="seven"))
    await session.flush()


async def _insert_and_commit(session: AsyncSession) -> None:
    await session.execute(text(f"INSERT INTO {TABLE} (id, name) VALUES (7, 'seven')"))
    await session.commit()


# The three ways a request writes: a non-SELECT statement, a flush with changes, a commit.
WRITES: dict[str, Callable[[AsyncSession], Awaitable[None]]] = {
    "statement": _insert,
    "flush": _add_and_flush,
    "commit": _insert_and_commit,
}


@pytest.mark.parametrize("write", list(WRITES))
async def test_after_a_write_read_only_blocks_of_the_request_read_on_the_primary(
    replicas: ReplicaSet, make_database: list[Database], write: str
) -> None:
    database = Database(replicas.primary_url, replicas=[replicas.standby_url])
    make_database.append(database)

    async def read_only_block() -> dict[str, object]:
        async with session_scope(read_only=True) as session:
            in_recovery, _, read_only = await where(session)
            count = await session.scalar(select(func.count()).select_from(Item))
        return {"in_recovery": in_recovery, "read_only": read_only, "rows": count}

    async def endpoint(request: Request) -> Response:
        before = await read_only_block()
        await WRITES[write](current_session())
        after = await read_only_block()
        return JSONResponse({"before": before, "after": after})

    async def later(request: Request) -> Response:
        return JSONResponse(await read_only_block())

    app = Starlette(routes=[Route("/write", endpoint, methods=["POST"]), Route("/later", later)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    # The standby applies none of the write meanwhile: a read that sees it can only have run on the primary.
    async with replicas.replay_paused(), client(app) as http:
        body = (await http.post("/write")).json()
        next_request = (await http.get("/later")).json()

    assert body["before"] == {"in_recovery": True, "read_only": "on", "rows": 0}
    # Read-your-writes: on the primary (which has the write, committed or not yet), still read-only.
    assert body["after"]["in_recovery"] is False
    assert body["after"]["read_only"] == "on"
    # A block in a scope of its own sees what is committed: the "commit" write; the others are not yet.
    assert body["after"]["rows"] == (1 if write == "commit" else 0)
    # Another request has written nothing: back on the replica, which has not replayed the write.
    assert next_request == {"in_recovery": True, "read_only": "on", "rows": 0}
    assert await rows_on_primary(replicas) == 1


# --- shutdown -------------------------------------------------------------------------------------------------


@asynccontextmanager
async def lifespan_running(app: ASGIApp) -> AsyncIterator[Channel]:
    """The app's lifespan started for the block; shut down (and awaited) at its end."""
    channel = Channel([{"type": "lifespan.startup"}])

    async def call() -> None:
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, channel.receive, channel.send)

    task = asyncio.create_task(call())
    await asyncio.wait_for(channel.sent_event.wait(), timeout=10)
    assert channel.types() == ["lifespan.startup.complete"], channel.sent
    try:
        yield channel
    finally:
        channel.queue.put_nowait({"type": "lifespan.shutdown"})
        await asyncio.wait_for(task, timeout=10)
    assert channel.types() == ["lifespan.startup.complete", "lifespan.shutdown.complete"], channel.sent


async def test_lifespan_shutdown_disposes_the_replica_engines(
    replicas: ReplicaSet, settings: DatabaseSettings, make_database: list[Database]
) -> None:
    urls = [replicas.standby_url_as(role) for role in READERS]
    database = Database(
        settings=DatabaseSettings(url=settings.url, application_name=APPLICATION_NAME, replica_urls=urls)
    )
    make_database.append(database)

    all_connected = asyncio.Barrier(6)

    @session_policy(read_only=True)
    async def report(request: Request) -> Response:
        in_recovery = (await where(current_session()))[0]
        # Each request keeps its connection until all six hold one: six connections, whatever the timing.
        await asyncio.wait_for(all_connected.wait(), timeout=10)
        return JSONResponse({"in_recovery": in_recovery})

    app = Starlette(routes=[Route("/report", report)])
    app.add_middleware(DBSessionMiddleware, database=database)
    async with lifespan_running(app), client(app) as http:
        responses = await asyncio.gather(*(http.get("/report") for _ in range(6)))
        assert [response.json() for response in responses] == [{"in_recovery": True}] * 6
        # Back in the pools, still connected: two replicas, three sessions each.
        assert await backends_by_role(replicas.standby.dsn, APPLICATION_NAME) == dict.fromkeys(READERS, 3)

    assert await backends_of(replicas.standby.dsn, APPLICATION_NAME) == 0
    assert await backends_of(replicas.primary.dsn, APPLICATION_NAME) == 0


# --- tracing ------------------------------------------------------------------------------------------------


def peer_port(span: ReadableSpan) -> object:
    """The server port a statement's span names (the attribute's name depends on the semantic conventions)."""
    attributes = span.attributes or {}
    return attributes.get("server.port", attributes.get("net.peer.port"))


async def test_opentelemetry_traces_statements_on_the_replica_and_on_engine_sees_each_engine(
    replicas: ReplicaSet, make_database: list[Database]
) -> None:
    """SQLAlchemyInstrumentor().instrument() after the package was imported (as an app's startup does) still
    covers the engines the package makes from then on, the replica's among them."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = SQLAlchemyInstrumentor()
    # The instrumentation declares SQLAlchemy < 2.1 and otherwise refuses the 2.1 these tests may run on; what it
    # does (SQLAlchemy's engine events) works on both, as this test shows.
    instrumentor.instrument(tracer_provider=provider, skip_dep_check=True)
    try:
        engines: list[tuple[str, int | None]] = []
        database = Database(
            replicas.primary_url,
            replicas=[replicas.standby_url],
            on_engine=lambda engine, role: engines.append((role, engine.url.port)),
        )
        make_database.append(database)

        @session_policy(read_only=True)
        async def report(request: Request) -> Response:
            await current_session().execute(text("SELECT 'traced on the replica'"))
            return Response()

        async def normal(request: Request) -> Response:
            await current_session().execute(text("SELECT 'traced on the primary'"))
            return Response()

        app = Starlette(routes=[Route("/report", report), Route("/normal", normal)])
        app.add_middleware(DBSessionMiddleware, database=database)
        async with client(app) as http:
            assert (await http.get("/report")).status_code == 200
            assert (await http.get("/normal")).status_code == 200
    finally:
        instrumentor.uninstrument()

    assert engines == [("replica", replicas.standby.port), ("primary", replicas.primary.port)]
    ports = {
        (span.attributes or {}).get("db.statement", (span.attributes or {}).get("db.query.text")): peer_port(span)
        for span in exporter.get_finished_spans()
    }
    assert ports["SELECT 'traced on the replica'"] == replicas.standby.port
    assert ports["SELECT 'traced on the primary'"] == replicas.primary.port
