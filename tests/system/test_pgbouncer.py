"""Behind PgBouncer in transaction mode: what ``DATABASE_PGBOUNCER`` is for, and that it is enough.

PgBouncer (tests/system/pgbouncer.py, Debian's 1.18: no prepared statement support of its own) hands each
transaction whichever server connection is free, so that one client connection's transactions run on many
server connections and one server connection serves many clients. Named prepared statements live on a server
connection; asyncpg's statement cache and SQLAlchemy's (both on by default) name theirs per *client*
connection (``__asyncpg_stmt_1__``, ``__asyncpg_stmt_2__``, ...), so that a cached statement is missing
where the next transaction lands, or a new one collides with a name another client left there.

With ``pgbouncer=True`` both caches are off, and asyncpg then prepares every statement unnamed, in the same
round trip that runs it: nothing outlives the transaction, and nothing is left on the server connections.
(SQLAlchemy's documentation also suggests ``prepared_statement_name_func`` with uuid names; with the caches
off, as here, that is not needed, and it would leave one named statement per execution on the server
connections, since nothing deallocates them in transaction mode: the last test shows that this does not happen.)
The pool's pre-ping (on by default) runs in an explicit transaction of its own (SQLAlchemy 2.0.21+), so it
too works through PgBouncer, and it is what takes a client connection that PgBouncer dropped out of the pool.
A route's ``session_policy(statement_timeout=...)`` is ``SET LOCAL`` in each of its transactions: it holds through
PgBouncer and ends with the transaction, where a plain ``SET`` would stay on the server connection for the next
client (the last two tests, with one server connection).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_db_session import Database, DatabaseSettings, DBSessionMiddleware, current_session, session_policy

from ..conftest import client
from .pgbouncer import DEFAULT_POOL_SIZE, PgBouncer, running_pgbouncer

pytestmark = pytest.mark.anyio

TABLE = f"adbs_pgbouncer_{os.getpid()}"
REQUESTS = 1_000
CONCURRENCY = 32
WRITE_EVERY = 4  # every 4th request writes (and commits); the others read
# Distinct SELECT texts the reads cycle through: each becomes a prepared statement of its own, as the different
# queries of a real app do.
VARIANTS = 7
# What the caches break behind PgBouncer, with the statement name made uniform.
PREPARED_STATEMENT_MISSING = 'prepared statement "__asyncpg_stmt_N__" does not exist'


@pytest.fixture
async def table(postgresql_dsn: str) -> AsyncIterator[str]:
    """An empty table on the server behind PgBouncer, dropped at the end."""
    connection = await asyncpg.connect(postgresql_dsn)
    try:
        await connection.execute(f"DROP TABLE IF EXISTS {TABLE}")
        await connection.execute(f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
        yield TABLE
        await connection.execute(f"DROP TABLE IF EXISTS {TABLE}")
    finally:
        await connection.close()


@pytest.fixture
async def pgbouncer(postgresql_dsn: str, tmp_path: Path) -> AsyncIterator[PgBouncer]:
    """A fresh PgBouncer in transaction mode in front of the test server (``postgresql_dsn`` skips without one)."""
    async with running_pgbouncer(tmp_path / "pgbouncer") as bouncer:
        yield bouncer


def uniform(message: str) -> str:
    """The first line of an error message, with statement names and numbers made uniform, for counting."""
    first_line = message.splitlines()[0] if message else message
    first_line = re.sub(r"__asyncpg_stmt_[0-9a-f]+__", "__asyncpg_stmt_N__", first_line)
    return re.sub(r"\d+", "N", first_line.removeprefix("(sqlalchemy.dialects.postgresql.asyncpg.Error) "))


@dataclass
class Run:
    """The app under test and what happened to each request: its status, and the errors the endpoints saw."""

    database: Database
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    def app(self) -> Starlette:
        async def read(request: Request) -> Response:
            number = int(request.path_params["number"])
            session = current_session()
            try:
                # A different SELECT text per variant, and a second statement with a result of another type.
                value = await session.scalar(
                    text(f"SELECT CAST(:number AS integer) + {number % VARIANTS}"), {"number": number}
                )
                rows = await session.scalar(text(f"SELECT count(*) FROM {TABLE} WHERE id < :limit"), {"limit": number})
                # A statement that ran on the wrong server connection may even decode garbage: check the values.
                if value != number + number % VARIANTS or not isinstance(rows, int):
                    raise AssertionError(f"wrong result for {number}: {value!r}, {rows!r}")
            except Exception as exc:
                self.errors[f"{type(exc).__name__}: {uniform(str(exc))}"] += 1
                raise
            return JSONResponse({"value": value})

        async def write(request: Request) -> Response:
            number = int(request.path_params["number"])
            session = current_session()
            try:
                await session.execute(
                    text(f"INSERT INTO {TABLE} (id, name) VALUES (:id, :name)"), {"id": number, "name": f"n{number}"}
                )
                await session.commit()
            except Exception as exc:
                self.errors[f"{type(exc).__name__}: {uniform(str(exc))}"] += 1
                raise
            return JSONResponse({"id": number}, status_code=201)

        app = Starlette(
            routes=[Route("/read/{number:int}", read), Route("/write/{number:int}", write, methods=["POST"])]
        )
        app.add_middleware(DBSessionMiddleware, database=self.database)
        return app

    async def send(self, count: int, *, first: int = 0, concurrency: int = CONCURRENCY) -> None:
        """Requests ``first`` to ``first + count - 1``, from ``concurrency`` clients at once; every
        ``WRITE_EVERY``-th writes (its number is the new row's id)."""
        numbers = iter(range(first, first + count))
        async with client(self.app(), raise_app_exceptions=False) as http:

            async def one_client() -> None:
                for number in numbers:
                    if number % WRITE_EVERY == 0:
                        response = await http.post(f"/write/{number}")
                    else:
                        response = await http.get(f"/read/{number}")
                    self.statuses[response.status_code] += 1

            await asyncio.gather(*(one_client() for _ in range(concurrency)))


def database_through(bouncer: PgBouncer, *, pgbouncer: bool) -> Database:
    return Database(settings=DatabaseSettings(url=bouncer.url, pgbouncer=pgbouncer, application_name="adbs-pgbouncer"))


async def statements_left_on_server_connections(bouncer: PgBouncer) -> list[int]:
    """How many prepared statements each of PgBouncer's server connections holds.

    As many clients as PgBouncer has server connections each open a transaction and keep it open until all
    have asked: no two transactions can then share a server connection, so every one of them is asked.
    """
    connections = [await asyncpg.connect(bouncer.dsn, statement_cache_size=0) for _ in range(DEFAULT_POOL_SIZE)]
    try:
        transactions = [connection.transaction() for connection in connections]
        for transaction in transactions:
            await transaction.start()
        counts = [await c.fetchval("SELECT count(*) FROM pg_prepared_statements") for c in connections]
        pids = {await c.fetchval("SELECT pg_backend_pid()") for c in connections}
        assert len(pids) == DEFAULT_POOL_SIZE, pids
        for transaction in transactions:
            await transaction.rollback()
        return counts
    finally:
        for connection in connections:
            await connection.close()


async def count_rows(dsn: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        count: int = await connection.fetchval(f"SELECT count(*) FROM {TABLE}")
        return count
    finally:
        await connection.close()


async def test_a_thousand_requests_through_pgbouncer_with_the_setting(
    pgbouncer: PgBouncer, table: str, postgresql_dsn: str
) -> None:
    run = Run(database_through(pgbouncer, pgbouncer=True))
    try:
        await run.send(REQUESTS)
    finally:
        await run.database.dispose()

    writes = len(range(0, REQUESTS, WRITE_EVERY))
    assert run.errors == Counter(), run.errors
    assert run.statuses == {200: REQUESTS - writes, 201: writes}, run.statuses
    assert await count_rows(postgresql_dsn) == writes
    # Unnamed statements only: nothing outlives its transaction on the shared server connections.
    assert await statements_left_on_server_connections(pgbouncer) == [0] * DEFAULT_POOL_SIZE


async def test_without_the_setting_prepared_statements_break(pgbouncer: PgBouncer, table: str) -> None:
    run = Run(database_through(pgbouncer, pgbouncer=False))
    try:
        await run.send(REQUESTS)
    finally:
        await run.database.dispose()

    failed = REQUESTS - run.statuses[200] - run.statuses[201]
    assert failed > 0, run.statuses
    assert sum(run.errors.values()) == failed, (run.errors, run.statuses)
    # The classic error, for about half of the requests (PgBouncer 1.18, asyncpg 0.32, SQLAlchemy 2.0/2.1): a
    # statement the client connection cached is not on the server connection its transaction landed on. Its
    # relatives, seen with other workloads: a new statement's name collides with one another client left there
    # ("already exists"), a Bind reaches a same-named statement of another shape ("bind message supplies N
    # parameters, but prepared statement ... requires N"), or a result is decoded with another statement's types.
    assert run.errors[f"DBAPIError: {PREPARED_STATEMENT_MISSING}"] > 0, run.errors
    related = ("prepared statement", "buffer", "wrong result for")
    unrelated = {error: count for error, count in run.errors.items() if not any(word in error for word in related)}
    assert unrelated == {}, run.errors


async def test_pre_ping_replaces_connections_after_pgbouncer_restarts(
    postgresql_dsn: str, table: str, tmp_path: Path
) -> None:
    """Every pooled client connection dies with PgBouncer; the pre-ping (in a transaction of its own) notices."""
    async with running_pgbouncer(tmp_path / "first") as first:
        run = Run(database_through(first, pgbouncer=True))
        await run.send(200)
    pool = run.database.engine.pool
    try:
        assert pool.checkedin() > 1, pool.status()  # type: ignore[attr-defined]
        # Another PgBouncer on the same port: the app's URL is unchanged, every pooled connection leads nowhere.
        async with running_pgbouncer(tmp_path / "second", port=first.port):
            await run.send(200, first=200)
    finally:
        await run.database.dispose()

    assert run.errors == Counter(), run.errors
    assert run.statuses == {200: 300, 201: 100}, run.statuses
    assert await count_rows(postgresql_dsn) == 100


async def server_connection_state(bouncer: PgBouncer) -> list[object]:
    """The backend and the statement_timeout that another client of PgBouncer gets: its own transaction lands on
    whichever server connection is free."""
    other = await asyncpg.connect(bouncer.dsn, statement_cache_size=0)
    try:
        return [await other.fetchval(sql) for sql in ("SELECT pg_backend_pid()", "SHOW statement_timeout")]
    finally:
        await other.close()


async def test_a_route_statement_timeout_holds_through_pgbouncer_and_ends_with_its_transaction(
    postgresql_dsn: str, table: str, tmp_path: Path
) -> None:
    """session_policy(statement_timeout=...) is SET LOCAL in the route's transaction: PgBouncer runs the whole
    transaction on one server connection, so the bound holds, and it ends there, rolled back or committed, so the
    next transaction on that server connection, another client's or the app's, runs under the server's own
    setting."""

    async def state() -> list[object]:
        session = current_session()
        return [await session.scalar(text(sql)) for sql in ("SELECT pg_backend_pid()", "SHOW statement_timeout")]

    slow_saw: list[object] = []

    @session_policy(statement_timeout=0.2)
    async def slow(request: Request) -> Response:
        slow_saw.extend(await state())
        await current_session().execute(text(f"INSERT INTO {TABLE} (id, name) VALUES (1, 'lost')"))
        await current_session().execute(text("SELECT pg_sleep(5)"))
        return JSONResponse("slept")

    @session_policy(statement_timeout=0.2)
    async def fast(request: Request) -> Response:
        await current_session().execute(text(f"INSERT INTO {TABLE} (id, name) VALUES (2, 'kept')"))
        return JSONResponse(await state())

    async def show(request: Request) -> Response:
        return JSONResponse(await state())

    # One server connection behind PgBouncer: every transaction, of any client, runs on it.
    async with running_pgbouncer(tmp_path / "pgbouncer", pool_size=1) as bouncer:
        database = database_through(bouncer, pgbouncer=True)
        app = Starlette(routes=[Route("/slow", slow), Route("/fast", fast), Route("/show", show)])
        app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
        try:
            async with client(app) as http:
                started = time.monotonic()
                cancelled = await http.get("/slow")
                elapsed = time.monotonic() - started
                after_cancelled = [(await http.get("/show")).json(), await server_connection_state(bouncer)]
                committed = await http.get("/fast")
                after_committed = [(await http.get("/show")).json(), await server_connection_state(bouncer)]
        finally:
            await database.dispose()

    assert cancelled.status_code == 503, cancelled.text
    assert cancelled.headers["retry-after"] == "1"
    assert elapsed < 1.5, elapsed
    server_pid = slow_saw[0]
    assert slow_saw == [server_pid, "200ms"]
    assert committed.json() == [server_pid, "200ms"]
    assert after_cancelled == after_committed == [[server_pid, "0"], [server_pid, "0"]]
    # The write before the sleep was rolled back; the fast route's was committed.
    connection = await asyncpg.connect(postgresql_dsn)
    try:
        assert await connection.fetch(f"SELECT id, name FROM {TABLE}") == [(2, "kept")]
    finally:
        await connection.close()


async def test_a_plain_set_through_pgbouncer_reaches_the_next_client(postgresql_dsn: str, tmp_path: Path) -> None:
    """Why the bound is SET LOCAL: a session-level SET stays on PgBouncer's server connection after the
    transaction, and the next client whose transaction lands there runs under it."""
    async with running_pgbouncer(tmp_path / "pgbouncer", pool_size=1) as bouncer:
        first = await asyncpg.connect(bouncer.dsn, statement_cache_size=0)
        second = await asyncpg.connect(bouncer.dsn, statement_cache_size=0)
        try:
            await first.execute("SET statement_timeout = 200")
            assert await second.fetchval("SHOW statement_timeout") == "200ms"
            await second.execute("RESET statement_timeout")
        finally:
            await first.close()
            await second.close()
