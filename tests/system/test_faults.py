"""Surviving faults: the database restarts, the pool runs dry, the commit fails, the connection dies.

Everything runs against a real PostgreSQL: backends are killed with ``pg_terminate_backend`` (each test's
Database has an ``application_name`` of its own, so only its own backends are touched), a whole cluster is
restarted (a throwaway one, from ``tests/system/pg_cluster.py``: never the shared server), commits fail on real
constraints and real serialization conflicts. What the tests hold the middleware to:

- never a 2xx for a write that was lost: every 2xx write is in the table, as a second connection sees it;
- a failure a retry can fix (a lost connection, a serialization failure, a full pool) is a 503 with
  ``Retry-After``, a unique violation a 409; neither is a 500, and none carries the app's own headers;
- every connection is back in the pool afterwards, and the next request works.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import sqlite3
import time
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
from sqlalchemy import Connection, String, event, func, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_db_session import Database, DatabaseSettings, DBSessionMiddleware, current_session
from asgi_db_session._types import ASGIApp, Message, Receive, Scope, Send
from asgi_db_session.error_responses import OUTCOME_UNKNOWN
from asgi_db_session.exceptions import CLEANUP_FAILED

from ..asgi import http_scope
from ..conftest import PG_URL, client
from .pg_cluster import Cluster, pg_cluster

__all__ = ["pg_cluster"]  # the session fixture, imported so that pytest finds it for this module

pytestmark = pytest.mark.anyio

SUFFIX = os.getpid()
ITEMS = f"adbs_faults_items_{SUFFIX}"
DEFERRED = f"adbs_faults_deferred_{SUFFIX}"
DOCTORS = f"adbs_faults_doctors_{SUFFIX}"
WRITES = f"adbs_faults_writes_{SUFFIX}"
BOOKINGS = f"adbs_faults_bookings_{SUFFIX}"
TABLES = {
    ITEMS: f"CREATE TABLE {ITEMS} (id INTEGER PRIMARY KEY, name VARCHAR(100) NOT NULL UNIQUE)",
    # Checked at COMMIT, not at the INSERT: the endpoint's statement succeeds, the middleware's commit fails.
    DEFERRED: (
        f"CREATE TABLE {DEFERRED} "
        "(id INTEGER PRIMARY KEY, name VARCHAR(100) NOT NULL UNIQUE DEFERRABLE INITIALLY DEFERRED)"
    ),
    DOCTORS: f"CREATE TABLE {DOCTORS} (id INTEGER PRIMARY KEY, on_call BOOLEAN NOT NULL)",
    WRITES: f"CREATE TABLE {WRITES} (id INTEGER PRIMARY KEY)",
    # Two bookings of one room may not overlap: a violation is SQLSTATE 23P01, not the unique violation's 23505.
    BOOKINGS: f"CREATE TABLE {BOOKINGS} (id INTEGER PRIMARY KEY, during INT4RANGE NOT NULL, "
    f"EXCLUDE USING gist (during WITH &&))",
}

CLIENTS = 20  # concurrent clients in the load tests
WORK_SECONDS = 0.1  # how long a load request keeps its transaction open after its INSERT
AFTER_FAULT_SECONDS = 0.5  # how long the load goes on at least once the database is back
EACH_CLIENT_SECONDS = 15.0  # how long every client may take to send a request after that, on a loaded machine
RETRY_BACKOFF_SECONDS = 0.05  # a client's pause after an error response, as a real client would take


class Base(DeclarativeBase):
    pass


class FaultItem(Base):
    __tablename__ = ITEMS

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)


# --- helpers ------------------------------------------------------------------------------------------------


def to_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


def checked_out(database: Database) -> int:
    count: int = database.engine.pool.checkedout()  # type: ignore[attr-defined]
    return count


def application_name(database: Database) -> str:
    assert database.settings is not None
    assert database.settings.application_name is not None
    return database.settings.application_name


@asynccontextmanager
async def pg_connection(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A second connection, outside SQLAlchemy: what the database really holds, and the killing."""
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        yield connection
    finally:
        await connection.close()


async def terminate(dsn: str, *pids: int) -> None:
    """Kill these backends all at once, then wait until each is gone.

    A backend that ended meanwhile (the pool closed its connection) is fine: it is gone either way.
    """
    async with pg_connection(dsn) as connection:
        await connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY($1::int[])", list(pids)
        )
        await wait_until_gone(connection, pids)


async def wait_until_gone(connection: asyncpg.Connection, pids: Iterable[int]) -> None:
    with anyio.fail_after(5):
        while True:
            alive = await connection.fetch("SELECT pid FROM pg_stat_activity WHERE pid = ANY($1::int[])", list(pids))
            if not alive:
                return
            await asyncio.sleep(0.005)


async def our_pids(dsn: str, database: Database, *, in_transaction: bool = False) -> list[int]:
    """The backends this Database opened (only those inside a transaction, if asked)."""
    async with pg_connection(dsn) as connection:
        rows = await connection.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND (NOT $2 OR xact_start IS NOT NULL)",
            application_name(database),
            in_transaction,
        )
    return [row[0] for row in rows]


async def wait_for_transactions(connection: asyncpg.Connection, database: Database, count: int) -> None:
    """Wait until at least ``count`` of our backends are inside a transaction: the next fault catches them."""
    with anyio.fail_after(5):
        while True:
            in_transaction = await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND xact_start IS NOT NULL",
                application_name(database),
            )
            if in_transaction >= count:
                return
            await asyncio.sleep(0.005)


def app_response() -> Response:
    """What every endpoint answers when its work went well: a 201 with a header and a cookie of its own."""
    response = JSONResponse({"saved": True}, status_code=201, headers={"x-app": "yes"})
    response.set_cookie("session", "abc")
    return response


# What a client reads in the body of the default mapping's answers, as docs/reference/failures.md promises.
REPLACED_BODIES = {
    409: "Conflict: the request clashes with data saved meanwhile; nothing was saved.",
    503: "Service Unavailable: the database could not complete the request; retry it.",
}


def assert_replaced(response: httpx.Response, status: int) -> None:
    """``response`` is the middleware's error response ``status``: nothing of the app's own response."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.text == REPLACED_BODIES[status]
    assert "x-app" not in response.headers
    assert "set-cookie" not in response.headers
    if status == 503:
        assert response.headers["retry-after"] == "1"


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture
async def pg_tables(postgresql_dsn: str) -> AsyncIterator[str]:
    """This module's tables, new and empty, on the shared server; dropped afterwards. Yields the DSN."""
    async with pg_connection(postgresql_dsn) as connection:
        # A leaked transaction from an earlier test would block DROP forever; fail fast instead.
        await connection.execute("SET lock_timeout = '5s'")
        for table, create in TABLES.items():
            await connection.execute(f"DROP TABLE IF EXISTS {table}")
            await connection.execute(create)
    yield postgresql_dsn
    async with pg_connection(postgresql_dsn) as connection:
        await connection.execute("SET lock_timeout = '5s'")
        for table in TABLES:
            await connection.execute(f"DROP TABLE IF EXISTS {table}")


MakeDatabase = Callable[..., Database]


@pytest.fixture
async def make_database() -> AsyncIterator[MakeDatabase]:
    """Databases built from DatabaseSettings, each with an application_name of its own on PostgreSQL.

    At teardown every connection must be back in the pool; backends of ours still alive on the server (a
    failed test) are terminated, so that they hold no lock the next test waits on.
    """
    made: list[Database] = []

    def make(url: str, **options: Any) -> Database:
        if url.startswith("postgresql"):
            options.setdefault("application_name", f"adbs-faults-{uuid.uuid4().hex[:12]}")
        database = Database(settings=DatabaseSettings(url=url, **options))
        made.append(database)
        return database

    yield make
    for database in made:
        try:
            if database._engine is not None:
                assert checked_out(database) == 0, "a connection was not returned to the pool"
        finally:
            await database.dispose()
            assert database.settings is not None
            assert database.settings.url is not None
            if database.settings.url.startswith("postgresql"):
                dsn = to_dsn(database.settings.url)
                await terminate(dsn, *await our_pids(dsn, database))


# --- 1. the database restarts under load --------------------------------------------------------------------


@dataclass
class Outcome:
    """One request of the load: when it ran, what it got, and whether its transaction was open on the server."""

    number: int
    client: int
    started: float
    ended: float = math.inf
    status: int = 0
    retry_after: str | None = None
    body: str = ""
    began: bool = False  # its INSERT went through: a fault from then on caught it mid-transaction


@dataclass
class Load:
    """Clients sending writes (commit_on_success) through one app: in a burst, or one after another until stopped."""

    database: Database
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    # What escaped the middleware (and so became the server's 500): kept so that an assertion can name it.
    errors: list[str] = field(default_factory=list)

    def app(self) -> ASGIApp:
        app = self.starlette_app()

        async def recording(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await app(scope, receive, send)
            except Exception as exc:
                # The last frames say where it came from: the driver, SQLAlchemy's pool, or this package.
                frames = "".join(traceback.format_exception(exc)[-6:])
                self.errors.append(f"{type(exc).__module__}.{type(exc).__name__}: {exc!r}\n{frames}"[:4000])
                raise

        return recording

    def starlette_app(self) -> Starlette:
        async def write(request: Request) -> Response:
            number = int(request.query_params["n"])
            session = current_session()
            await session.execute(text(f"INSERT INTO {WRITES} (id) VALUES (:id)"), {"id": number})
            self.outcomes[number].began = True
            await session.execute(text("SELECT pg_sleep(:seconds)"), {"seconds": WORK_SECONDS})
            return PlainTextResponse("saved", status_code=201)

        app = Starlette(routes=[Route("/write", write, methods=["POST"])])
        app.add_middleware(DBSessionMiddleware, database=self.database, commit_on_success=True)
        return app

    @asynccontextmanager
    async def client(self) -> AsyncIterator[httpx.AsyncClient]:
        # raise_app_exceptions=False: a 500 is an outcome to count, not a crash of the test.
        async with client(self.app(), raise_app_exceptions=False) as http:
            yield http

    async def send(self, http: httpx.AsyncClient, client_number: int) -> Outcome:
        outcome = Outcome(next(self.numbers), client_number, time.monotonic())
        self.outcomes[outcome.number] = outcome
        response = await http.post("/write", params={"n": outcome.number})
        outcome.ended = time.monotonic()
        outcome.status = response.status_code
        outcome.retry_after = response.headers.get("retry-after")
        outcome.body = response.text
        return outcome

    async def burst(self, http: httpx.AsyncClient, clients: int) -> list[Outcome]:
        """One write from each of ``clients`` clients at once (each holds a connection for WORK_SECONDS)."""
        return list(await asyncio.gather(*(self.send(http, number) for number in range(clients))))

    @asynccontextmanager
    async def running(self, http: httpx.AsyncClient) -> AsyncIterator[None]:
        """CLIENTS clients writing one request after another, for the duration of the block."""
        stop = asyncio.Event()

        async def one_client(client_number: int) -> None:
            while not stop.is_set():
                if (await self.send(http, client_number)).status >= 400:
                    await asyncio.sleep(RETRY_BACKOFF_SECONDS)

        clients = [asyncio.create_task(one_client(number)) for number in range(CLIENTS)]
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*clients)

    def statuses(self, outcomes: list[Outcome] | None = None) -> Counter[int]:
        return Counter(outcome.status for outcome in (self.outcomes.values() if outcomes is None else outcomes))

    def started_after(self, moment: float) -> list[Outcome]:
        return [outcome for outcome in self.outcomes.values() if outcome.started >= moment]

    async def go_on_after(self, moment: float) -> None:
        """Let the load go on for AFTER_FAULT_SECONDS after ``moment``, and until every client has sent a request
        since then: a fixed time alone may end before a slow client's first one."""
        await asyncio.sleep(max(0.0, moment + AFTER_FAULT_SECONDS - time.monotonic()))
        deadline = time.monotonic() + EACH_CLIENT_SECONDS
        while {outcome.client for outcome in self.started_after(moment)} != set(range(CLIENTS)):
            if time.monotonic() > deadline:
                return  # the assertion on the clients after the fault then says which one never came back
            await asyncio.sleep(0.02)

    async def assert_no_2xx_lost(self, dsn: str) -> None:
        """Every write answered 2xx is in the table, as a second connection sees it."""
        async with pg_connection(dsn) as connection:
            stored = {row[0] for row in await connection.fetch(f"SELECT id FROM {WRITES}")}
        answered = {outcome.number for outcome in self.outcomes.values() if 200 <= outcome.status < 300}
        assert answered, "no write succeeded at all"
        assert sorted(answered - stored) == [], "answered 2xx, but not in the table"

    def caught_mid_transaction(self) -> list[Outcome]:
        """The requests whose transaction was open when their connection died; there must be some."""
        caught = [outcome for outcome in self.outcomes.values() if outcome.began and outcome.status != 201]
        assert caught, "the fault caught no request mid-transaction: the test proves nothing"
        return caught

    def assert_caught_mid_transaction_got_503(self) -> None:
        """A request whose transaction was open when its connection died got a 503, never a 2xx or a 500."""
        caught = self.caught_mid_transaction()
        assert self.statuses(caught) == {503: len(caught)}, self.statuses(caught)
        assert {outcome.retry_after for outcome in caught} == {"1"}

    async def assert_caught_mid_transaction_not_answered_saved(self, dsn: str) -> None:
        """After a restart: a request whose transaction was open when its connection died got a 503 (nothing saved,
        which the table confirms), or, when its COMMIT was on its way, the 500 "not known": the restarted server
        is not asked what became of it (docs/explanation/commit-outcome.md). Never a 2xx, nor another 500."""
        caught = self.caught_mid_transaction()
        refused = [outcome for outcome in caught if outcome.status == 503]
        unknown = [outcome for outcome in caught if outcome.status == 500]
        assert len(refused) + len(unknown) == len(caught), self.statuses(caught)
        assert {outcome.retry_after for outcome in refused} <= {"1"}
        assert {(outcome.retry_after, outcome.body) for outcome in unknown} <= {(None, OUTCOME_UNKNOWN.body)}
        async with pg_connection(dsn) as connection:
            saved = await connection.fetch(
                f"SELECT id FROM {WRITES} WHERE id = ANY($1::integer[])", [outcome.number for outcome in refused]
            )
        assert saved == [], "answered 503 (nothing saved), but in the table"


async def test_terminated_backends_under_load(pg_tables: str, make_database: MakeDatabase) -> None:
    """Every backend of the app is killed while 20 clients write: the caught ones get 503, later ones succeed."""
    database = make_database(PG_URL, pool_size=10, max_overflow=10)  # pool_pre_ping: the package's default, on
    load = Load(database)
    async with load.client() as http, load.running(http), pg_connection(pg_tables) as connection:
        await wait_for_transactions(connection, database, count=CLIENTS // 2)
        # At once, from the connection that saw them in their transactions: every backend of the app. The call
        # stays in the select list, which runs only on the rows the WHERE kept: in the WHERE, the planner may
        # run it before the application_name test, on every backend of the server.
        killed = await connection.fetch(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            application_name(database),
        )
        # At least the connections seen in their transactions, at most what the pool allows (10 + 10).
        assert CLIENTS // 2 <= len(killed) <= 20
        await wait_until_gone(connection, [row[0] for row in killed])
        back = time.monotonic()
        await load.go_on_after(back)

    assert set(load.statuses()) <= {201, 503}, (load.statuses(), load.errors)
    load.assert_caught_mid_transaction_got_503()
    after = load.started_after(back)
    # Each client's next request (and every one after it) works: the pool replaced the dead connections.
    assert {outcome.client for outcome in after} == set(range(CLIENTS))
    assert load.statuses(after) == {201: len(after)}, (load.statuses(after), load.errors)
    await load.assert_no_2xx_lost(pg_tables)
    assert checked_out(database) == 0


async def test_terminated_idle_connections_are_replaced_at_checkout(
    pg_tables: str, make_database: MakeDatabase
) -> None:
    """Killed while they sat in the pool, no request noticing: the next requests still all succeed (pre-ping)."""
    database = make_database(PG_URL, pool_size=5, max_overflow=0)
    load = Load(database)
    async with load.client() as http:
        assert load.statuses(await load.burst(http, 5)) == {201: 5}
        idle = await our_pids(pg_tables, database)
        assert len(idle) == 5
        await terminate(pg_tables, *idle)
        following = await load.burst(http, 5)
    assert load.statuses(following) == {201: 5}
    await load.assert_no_2xx_lost(pg_tables)
    assert checked_out(database) == 0


@pytest.fixture
async def cluster_writes(pg_cluster: Cluster) -> AsyncIterator[Cluster]:
    """The throwaway cluster, with a new and empty writes table."""
    async with pg_connection(pg_cluster.dsn) as connection:
        await connection.execute(f"DROP TABLE IF EXISTS {WRITES}")
        await connection.execute(TABLES[WRITES])
    yield pg_cluster
    async with pg_connection(pg_cluster.dsn) as connection:
        await connection.execute(f"DROP TABLE IF EXISTS {WRITES}")


async def restart_under_load(cluster: Cluster, database: Database) -> tuple[Load, float, float]:
    """Restart the cluster (fast mode) while the load runs; the load, when the restart began, and when it was back."""
    load = Load(database)
    async with load.client() as http, load.running(http):
        async with pg_connection(cluster.dsn) as connection:
            await wait_for_transactions(connection, database, count=CLIENTS // 2)
        down = time.monotonic()
        await cluster.restart()
        back = time.monotonic()
        await load.go_on_after(back)
    return load, down, back


async def test_cluster_restart_under_load(cluster_writes: Cluster, make_database: MakeDatabase) -> None:
    # A restart that ends a backend while its COMMIT is in flight leaves that COMMIT's outcome open, and the
    # restarted server is not asked (after a crash it gives the ids of the transactions in flight out again).
    database = make_database(cluster_writes.url, pool_size=10, max_overflow=10, commit_outcome_check=True)
    load, _down, back = await restart_under_load(cluster_writes, database)

    await load.assert_caught_mid_transaction_not_answered_saved(cluster_writes.dsn)
    after = load.started_after(back)
    assert {outcome.client for outcome in after} == set(range(CLIENTS))
    assert load.statuses(after) == {201: len(after)}, (load.statuses(after), load.errors)
    await load.assert_no_2xx_lost(cluster_writes.dsn)
    assert checked_out(database) == 0


async def test_cluster_restart_while_idle_next_requests_succeed(
    cluster_writes: Cluster, make_database: MakeDatabase
) -> None:
    """No request notices the restart: every pooled connection is dead, and the next requests all succeed."""
    database = make_database(cluster_writes.url, pool_size=5, max_overflow=0)
    load = Load(database)
    async with load.client() as http:
        assert load.statuses(await load.burst(http, 5)) == {201: 5}
        await cluster_writes.restart()
        following = await load.burst(http, 5)
    assert load.statuses(following) == {201: 5}
    await load.assert_no_2xx_lost(cluster_writes.dsn)
    assert checked_out(database) == 0


async def test_requests_while_the_cluster_restarts_get_503_not_500(
    cluster_writes: Cluster, make_database: MakeDatabase
) -> None:
    """Refused and reset connects (DatabaseUnavailableError) and 57P03 (starting up, shutting down) are 503."""
    database = make_database(cluster_writes.url, pool_size=10, max_overflow=10, commit_outcome_check=True)
    load, down, back = await restart_under_load(cluster_writes, database)

    during = [outcome for outcome in load.outcomes.values() if down <= outcome.started < back]
    assert during, "no request ran while the cluster restarted"
    # The one 500 allowed: the "not known" of a COMMIT the restart caught in flight (see the test above).
    others = [outcome for outcome in during if not (outcome.status == 500 and outcome.body == OUTCOME_UNKNOWN.body)]
    assert set(load.statuses(others)) <= {201, 503}, (load.statuses(during), load.errors)
    await load.assert_no_2xx_lost(cluster_writes.dsn)
    assert checked_out(database) == 0


async def test_a_server_refusing_new_sessions_57p03_is_503(
    cluster_writes: Cluster, make_database: MakeDatabase
) -> None:
    """SQLSTATE 57P03 at connect time, made for certain: a smart shutdown waits for the open sessions to end and
    refuses every new one meanwhile ("the database system is shutting down")."""
    database = make_database(cluster_writes.url)
    load = Load(database)
    holder = await asyncpg.connect(cluster_writes.dsn, timeout=10)  # keeps the smart shutdown waiting
    stopping = await asyncio.create_subprocess_exec(
        *cluster_writes.ctl("stop", "-m", "smart"), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        with anyio.fail_after(10):
            while True:
                try:
                    probe = await asyncpg.connect(cluster_writes.dsn, timeout=5)
                except asyncpg.CannotConnectNowError:
                    break
                await probe.close()
                await asyncio.sleep(0.02)
        async with load.client() as http:
            outcome = await load.send(http, 0)
    finally:
        await holder.close()
        await asyncio.wait_for(stopping.wait(), timeout=60)
        await cluster_writes.run("start")

    assert (outcome.status, outcome.retry_after) == (503, "1"), load.errors
    assert checked_out(database) == 0


@pytest.fixture
async def limited_role(cluster_writes: Cluster) -> AsyncIterator[str]:
    """A role of the throwaway cluster allowed one connection at a time; yields its URL."""
    role = f"adbs_limited_{SUFFIX}"
    async with pg_connection(cluster_writes.dsn) as connection:
        await connection.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1")
        await connection.execute(f"GRANT ALL ON {WRITES} TO {role}")
    yield cluster_writes.url.replace("postgres@", f"{role}@")
    async with pg_connection(cluster_writes.dsn) as connection:
        await connection.execute(f"DROP OWNED BY {role}")
        await connection.execute(f"DROP ROLE {role}")


async def test_no_connection_slot_left_is_503_not_500(limited_role: str, make_database: MakeDatabase) -> None:
    """SQLSTATE 53300 (too_many_connections) at connect time is a 503."""
    database = make_database(limited_role)
    load = Load(database)
    async with pg_connection(to_dsn(limited_role)), load.client() as http:  # holds the role's one slot
        outcome = await load.send(http, 0)
    assert (outcome.status, outcome.retry_after) == (503, "1")
    assert checked_out(database) == 0


# --- 2. the pool runs dry -----------------------------------------------------------------------------------


async def test_pool_exhaustion_answers_503_at_the_pool_timeout(pg_tables: str, make_database: MakeDatabase) -> None:
    database = make_database(PG_URL, pool_size=2, max_overflow=0, pool_timeout=0.5)

    async def slow(request: Request) -> Response:
        await current_session().execute(text("SELECT pg_sleep(1)"))
        return app_response()

    app = Starlette(routes=[Route("/slow", slow)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)

    async def timed(http: httpx.AsyncClient) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        response = await http.get("/slow")
        return response, time.monotonic() - started

    async with client(app, raise_app_exceptions=False) as http:
        results = await asyncio.gather(*(timed(http) for _ in range(10)))

    assert Counter(response.status_code for response, _ in results) == {201: 2, 503: 8}
    for response, seconds in results:
        if response.status_code == 503:
            assert_replaced(response, 503)
            assert seconds < 0.6, f"a 503 took {seconds:.2f} s: it waited for more than the pool timeout"
    assert checked_out(database) == 0


# --- 3. the middleware's commit fails -----------------------------------------------------------------------


@dataclass
class CommitApp:
    """An app whose endpoints each leave work that the middleware's commit (commit_on_success) fails on."""

    database: Database
    dsn: str
    returned: list[str] = field(default_factory=list)  # endpoints that got as far as returning their response
    background_ran: list[str] = field(default_factory=list)

    def respond(self, name: str) -> Response:
        self.returned.append(name)
        response = app_response()
        response.background = BackgroundTask(self.background_ran.append, name)
        return response

    def app(self) -> Starlette:
        async def duplicate(request: Request) -> Response:
            # autoflush is off: the INSERT is sent by the flush inside the middleware's commit.
            current_session().add(FaultItem(id=2, name="taken"))
            return self.respond("duplicate")

        async def deferred(request: Request) -> Response:
            # The INSERT succeeds here; the deferred unique constraint is checked at COMMIT.
            await current_session().execute(text(f"INSERT INTO {DEFERRED} (id, name) VALUES (2, 'taken')"))
            return self.respond("deferred")

        async def off_call(request: Request) -> Response:
            doctor = int(request.query_params["doctor"])
            session = current_session()
            on_call = await session.scalar(text(f"SELECT count(*) FROM {DOCTORS} WHERE on_call"))
            if on_call is None or on_call < 2:
                return PlainTextResponse("someone must stay on call", status_code=409)
            await session.execute(text(f"UPDATE {DOCTORS} SET on_call = false WHERE id = :id"), {"id": doctor})
            # Both requests have read the count and written their row before either commits.
            with anyio.fail_after(5):
                await barrier.wait()
            return self.respond(f"off-call-{doctor}")

        async def killed(request: Request) -> Response:
            session = current_session()
            session.add(FaultItem(id=2, name="lost"))
            await session.flush()
            pid = await session.scalar(text("SELECT pg_backend_pid()"))
            assert isinstance(pid, int)
            await terminate(self.dsn, pid)
            return self.respond("killed")

        async def write(request: Request) -> Response:
            current_session().add(FaultItem(id=int(request.query_params["id"]), name=request.query_params["name"]))
            return self.respond("write")

        barrier = asyncio.Barrier(2)
        app = Starlette(
            routes=[
                Route("/duplicate", duplicate),
                Route("/deferred", deferred),
                Route("/off-call", off_call),
                Route("/killed", killed),
                Route("/write", write),
            ]
        )
        app.add_middleware(DBSessionMiddleware, database=self.database, commit_on_success=True)
        return app


async def names(dsn: str, table: str) -> list[str]:
    async with pg_connection(dsn) as connection:
        return sorted(row[0] for row in await connection.fetch(f"SELECT name FROM {table}"))


@pytest.mark.parametrize(
    ("path", "table"),
    [("/duplicate", ITEMS), ("/deferred", DEFERRED)],
    ids=["orm-duplicate-at-flush-in-commit", "deferred-unique-at-commit"],
)
async def test_unique_violation_at_commit_is_409(
    pg_tables: str, make_database: MakeDatabase, caplog: pytest.LogCaptureFixture, path: str, table: str
) -> None:
    async with pg_connection(pg_tables) as connection:
        await connection.execute(f"INSERT INTO {table} (id, name) VALUES (1, 'taken')")
    database = make_database(PG_URL)
    commit_app = CommitApp(database, pg_tables)
    async with client(commit_app.app()) as http:
        response = await http.get(path)

    assert commit_app.returned == [path.strip("/")], "the endpoint failed before the middleware's commit"
    assert_replaced(response, 409)
    assert commit_app.background_ran == []
    assert await names(pg_tables, table) == ["taken"]
    assert [record.getMessage().split(":")[0] for record in caplog.records] == [f"GET {path} answered 409"]
    assert checked_out(database) == 0


async def test_serializable_write_skew_one_commits_and_one_gets_503(
    pg_tables: str, make_database: MakeDatabase
) -> None:
    """Two doctors on call; each request takes a different one off call if two are on call. Only one may."""
    async with pg_connection(pg_tables) as connection:
        await connection.execute(f"INSERT INTO {DOCTORS} (id, on_call) VALUES (1, true), (2, true)")
    database = make_database(PG_URL, isolation_level="SERIALIZABLE")
    commit_app = CommitApp(database, pg_tables)
    async with client(commit_app.app(), raise_app_exceptions=False) as http:
        first, second = await asyncio.gather(
            http.get("/off-call", params={"doctor": 1}), http.get("/off-call", params={"doctor": 2})
        )

    assert sorted(commit_app.returned) == ["off-call-1", "off-call-2"]
    assert sorted([first.status_code, second.status_code]) == [201, 503]
    winner, loser = (1, second) if first.status_code == 201 else (2, first)
    assert_replaced(loser, 503)
    assert commit_app.background_ran == [f"off-call-{winner}"]
    async with pg_connection(pg_tables) as connection:
        rows = [tuple(row) for row in await connection.fetch(f"SELECT id, on_call FROM {DOCTORS} ORDER BY id")]
    assert rows == [(1, winner != 1), (2, winner != 2)]
    assert checked_out(database) == 0


async def test_backend_killed_before_the_commit_is_503_and_the_next_request_works(
    pg_tables: str, make_database: MakeDatabase
) -> None:
    database = make_database(PG_URL)
    commit_app = CommitApp(database, pg_tables)
    async with client(commit_app.app()) as http:
        response = await http.get("/killed")
        assert commit_app.returned == ["killed"]
        assert_replaced(response, 503)
        assert commit_app.background_ran == []
        assert await names(pg_tables, ITEMS) == []
        assert checked_out(database) == 0

        following = await http.get("/write", params={"id": 3, "name": "next"})
    assert following.status_code == 201
    assert await names(pg_tables, ITEMS) == ["next"]
    assert checked_out(database) == 0


async def test_sqlite_duplicate_at_commit_is_409(tmp_path: Path, make_database: MakeDatabase) -> None:
    path = tmp_path / "faults.db"
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute(TABLES[ITEMS])
        connection.execute(f"INSERT INTO {ITEMS} (id, name) VALUES (1, 'taken')")
    database = make_database(f"sqlite+aiosqlite:///{path}")
    commit_app = CommitApp(database, "")
    async with client(commit_app.app()) as http:
        response = await http.get("/duplicate")

    assert commit_app.returned == ["duplicate"]
    assert_replaced(response, 409)
    assert commit_app.background_ran == []
    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute(f"SELECT name FROM {ITEMS}").fetchall() == [("taken",)]
    assert checked_out(database) == 0


# --- 4. a database error escaping the app -------------------------------------------------------------------


@pytest.mark.parametrize("commit_on_success", [False, True], ids=["manual", "commit-on-success"])
async def test_query_on_a_killed_connection_in_the_endpoint_is_503(
    pg_tables: str, make_database: MakeDatabase, commit_on_success: bool
) -> None:
    database = make_database(PG_URL)
    reached: list[str] = []

    async def endpoint(request: Request) -> Response:
        session = current_session()
        session.add(FaultItem(id=1, name="lost"))
        await session.flush()
        pid = await session.scalar(text("SELECT pg_backend_pid()"))
        assert isinstance(pid, int)
        await terminate(pg_tables, pid)
        reached.append("killed")
        await session.scalar(select(func.count()).select_from(FaultItem))  # raises: the connection is gone
        await session.commit()  # pragma: no cover - not reached
        return app_response()  # pragma: no cover

    async def write(request: Request) -> Response:
        current_session().add(FaultItem(id=2, name="next"))
        await current_session().commit()
        return PlainTextResponse("ok", status_code=201)

    app = Starlette(routes=[Route("/", endpoint), Route("/write", write)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=commit_on_success)
    async with client(app) as http:
        response = await http.get("/")
        assert reached == ["killed"]
        assert_replaced(response, 503)
        assert checked_out(database) == 0
        assert (await http.get("/write")).status_code == 201
    assert await names(pg_tables, ITEMS) == ["next"]
    assert checked_out(database) == 0


async def test_a_real_deadlock_between_two_requests_is_503_for_the_loser(
    pg_tables: str, make_database: MakeDatabase
) -> None:
    """Two requests lock two rows in opposite orders; PostgreSQL aborts one (40P01), the other commits."""
    async with pg_connection(pg_tables) as connection:
        await connection.execute(f"INSERT INTO {ITEMS} (id, name) VALUES (1, 'a'), (2, 'b')")
    database = make_database(PG_URL)
    both_hold_one_lock = asyncio.Barrier(2)
    reached_second_lock: list[str] = []

    async def lock(request: Request) -> Response:
        first, second, who = (request.query_params[key] for key in ("first", "second", "who"))
        session = current_session()
        rename = text(f"UPDATE {ITEMS} SET name = name || :suffix WHERE id = :id")
        await session.execute(rename, {"suffix": f"-{who}", "id": int(first)})
        with anyio.fail_after(5):
            await both_hold_one_lock.wait()
        reached_second_lock.append(who)
        await session.execute(rename, {"suffix": f"-{who}", "id": int(second)})  # one of the two: 40P01
        return app_response()

    app = Starlette(routes=[Route("/lock", lock)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    async with client(app, raise_app_exceptions=False) as http:
        x, y = await asyncio.gather(
            http.get("/lock", params={"first": 1, "second": 2, "who": "x"}),
            http.get("/lock", params={"first": 2, "second": 1, "who": "y"}),
        )

    assert sorted(reached_second_lock) == ["x", "y"], "the requests did not both hold a lock: no deadlock"
    assert sorted([x.status_code, y.status_code]) == [201, 503]
    winner, loser = ("x", y) if x.status_code == 201 else ("y", x)
    assert_replaced(loser, 503)
    # The winner renamed both rows; nothing of the loser's first rename is left.
    assert await names(pg_tables, ITEMS) == [f"a-{winner}", f"b-{winner}"]
    assert checked_out(database) == 0


async def test_an_exclusion_constraint_violation_is_409(pg_tables: str, make_database: MakeDatabase) -> None:
    async with pg_connection(pg_tables) as connection:
        await connection.execute(f"INSERT INTO {BOOKINGS} (id, during) VALUES (1, '[1,5)')")
    database = make_database(PG_URL)

    async def book(request: Request) -> Response:
        await current_session().execute(text(f"INSERT INTO {BOOKINGS} (id, during) VALUES (2, '[3,8)')"))
        return app_response()

    app = Starlette(routes=[Route("/book", book)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    async with client(app) as http:
        response = await http.get("/book")

    assert_replaced(response, 409)
    async with pg_connection(pg_tables) as connection:
        assert [row[0] for row in await connection.fetch(f"SELECT id FROM {BOOKINGS} ORDER BY id")] == [1]
    assert checked_out(database) == 0


# --- 5. a cleanup that fails --------------------------------------------------------------------------------
# The request's transaction is still open when the middleware rolls it back and closes the session, and that
# rollback fails. Driven with raw ASGI, so that the test sees exactly what escapes to the server.


@dataclass
class CleanupApp:
    """Endpoints that leave an open transaction (one row inserted, never committed) for the cleanup to roll back."""

    database: Database
    dsn: str
    kill_after_response: bool = True
    pids: list[int] = field(default_factory=list)  # the backends of /left-open's requests

    def app(self) -> Starlette:
        async def app_error(request: Request) -> Response:
            session = current_session()
            await session.execute(text(f"INSERT INTO {WRITES} (id) VALUES (1)"))
            pid = await session.scalar(text("SELECT pg_backend_pid()"))
            assert isinstance(pid, int)
            await terminate(self.dsn, pid)
            raise ValueError("app's own")

        async def left_open(request: Request) -> Response:
            session = current_session()
            await session.execute(text(f"INSERT INTO {WRITES} (id) VALUES (2)"))
            pid = await session.scalar(text("SELECT pg_backend_pid()"))
            assert isinstance(pid, int)
            self.pids.append(pid)
            return PlainTextResponse("done")

        async def read(request: Request) -> Response:
            count = await current_session().scalar(text(f"SELECT count(*) FROM {WRITES}"))
            return PlainTextResponse(str(count))

        routes = [Route("/app-error", app_error), Route("/left-open", left_open), Route("/read", read)]
        app = Starlette(routes=routes)
        app.add_middleware(DBSessionMiddleware, database=self.database)
        return app

    async def call(self, app: ASGIApp, path: str) -> list[Message]:
        """Call ``app`` as a server does; what it sent (whatever escaped it propagates)."""
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)
            final = message["type"] == "http.response.body" and not message.get("more_body", False)
            if final and self.kill_after_response and self.pids:
                await terminate(self.dsn, *self.pids)

        await app(http_scope(path), receive, send)
        return sent


def cleanup_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "asgi_db_session" and record.exc_info]


async def assert_nothing_committed_and_next_request_works(cleanup_app: CleanupApp, app: ASGIApp) -> None:
    assert checked_out(cleanup_app.database) == 0
    async with pg_connection(cleanup_app.dsn) as connection:
        assert await connection.fetch(f"SELECT id FROM {WRITES}") == []
    cleanup_app.kill_after_response = False
    sent = await cleanup_app.call(app, "/read")
    assert sent[0]["status"] == 200
    assert sent[1]["body"] == b"0"
    assert checked_out(cleanup_app.database) == 0


async def test_app_error_wins_over_a_failed_rollback(
    pg_tables: str, make_database: MakeDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    """The backend dies while the request holds a transaction, then the app raises: the server hears of the app's
    error, not of the cleanup's, which is logged."""
    cleanup_app = CleanupApp(make_database(PG_URL), pg_tables)
    app = cleanup_app.app()
    with pytest.raises(ValueError, match="app's own") as caught:
        await cleanup_app.call(app, "/app-error")

    assert type(caught.value) is ValueError
    assert "asyncpg" not in "".join(traceback.format_exception(caught.value))
    [failure] = cleanup_failures(caplog)
    assert failure.getMessage() == (
        "Rolling back and closing a session at the end of its scope failed; its connection was discarded, and "
        "whatever the session had not committed is lost (the database rolls it back)."
    )
    assert failure.exc_info is not None
    # InterfaceError ("connection is closed") or, when asyncpg has not read the termination yet, InternalError.
    assert isinstance(failure.exc_info[1], sa_exc.DBAPIError)
    await assert_nothing_committed_and_next_request_works(cleanup_app, app)


async def test_a_failed_rollback_after_a_complete_response_is_logged_not_raised(
    pg_tables: str, make_database: MakeDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    """The response went out whole (200), the transaction was left open, the backend died before the cleanup's
    rollback: nothing for the server to hear of, a log line, the connection gone from the pool.

    asyncpg, which has not read the termination yet, fails the rollback with "another operation is in progress",
    which SQLAlchemy does not take for a disconnect: the connection would stay checked out without the discard.
    """
    cleanup_app = CleanupApp(make_database(PG_URL), pg_tables)
    app = cleanup_app.app()
    sent = await cleanup_app.call(app, "/left-open")

    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200
    [failure] = cleanup_failures(caplog)
    assert failure.getMessage() == CLEANUP_FAILED
    assert failure.exc_info is not None
    assert isinstance(failure.exc_info[1], sa_exc.DBAPIError)
    await assert_nothing_committed_and_next_request_works(cleanup_app, app)


async def test_a_rollback_that_fails_on_a_live_connection_discards_it(
    pg_tables: str, make_database: MakeDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    """A rollback that fails with the connection alive (here a "rollback" event listener that raises): SQLAlchemy
    leaves the connection checked out with its transaction open. The cleanup throws it away, so that it neither
    stays out of the pool nor holds its transaction (and its row locks) on the server."""
    database = make_database(PG_URL)
    cleanup_app = CleanupApp(database, pg_tables, kill_after_response=False)
    app = cleanup_app.app()
    failing = True

    def rollback_listener(connection: Connection) -> None:
        if failing:
            raise RuntimeError("listener failed")

    event.listen(database.engine.sync_engine, "rollback", rollback_listener)
    sent = await cleanup_app.call(app, "/left-open")
    failing = False

    assert sent[0]["status"] == 200
    [failure] = cleanup_failures(caplog)
    assert failure.exc_info is not None
    assert str(failure.exc_info[1]) == "listener failed"
    async with pg_connection(pg_tables) as connection:
        await wait_until_gone(connection, cleanup_app.pids)  # not left "idle in transaction", holding its lock
    await assert_nothing_committed_and_next_request_works(cleanup_app, app)
