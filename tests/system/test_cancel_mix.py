"""1,000 requests, 300 of them cancelled, all kinds mixed: nothing is left behind and no clean connection is lost.

The requests are cancelled mid-statement (``pg_sleep``), while their transaction is open and idle (between
statements), and while the middleware commits; by ``task.cancel()`` (what a server does), by an anyio cancel
scope in an outer middleware (what a timeout middleware, or Starlette, does), and, for a smaller share, by a
real client that closes its socket on uvicorn (tests/system/server_app.py cancels a request whose client went away).
The other 700 are ordinary requests running alongside.

Afterwards: every connection is back in the pool, no backend of ours is idle in transaction, the garbage
collector finds no connection nobody checked in, and the next request answers within 1 s. Connections are
counted with the pool's "connect" and "invalidate" events, and each invalidation is attributed to the request
that held the connection (by backend pid): a request cancelled between statements (idle, or during the commit)
gives its connection back rolled back (or committed) and reusable, so the only connections ever replaced are
those of requests cut off mid-statement. And a statement cut off that way does not run on in the server: it is
gone from ``pg_stat_activity`` within 1 s of its cancellation.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import time
import uuid
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_db_session import Database, DatabaseSettings, DBSessionMiddleware, current_session
from asgi_db_session._types import ASGIApp

from ..asgi import Channel, http_scope
from ..conftest import PG_URL
from .server import Server, backends, free_port, log_problems, serve, terminate_backends, uvicorn_command
from .test_server import settle

pytestmark = pytest.mark.anyio

TABLE = f"adbs_cancel_mix_{os.getpid()}"
SLOW_COMMIT = f"adbs_cancel_mix_slow_{os.getpid()}"
# Rows named like this make their transaction's COMMIT take COMMIT_SECONDS: a deferred constraint trigger sleeps
# at commit time, which is how a test catches a request inside its commit without a second connection.
SLOW_NAME = "slow"
CREATE_TABLE = """
CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL);
CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER {function} AFTER INSERT ON {table} DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.name = '{name}') EXECUTE FUNCTION {function}();
"""
DROP_TABLE = "DROP TABLE IF EXISTS {table}; DROP FUNCTION IF EXISTS {function}();"

# In-process share: 900 requests, 270 cancelled; through uvicorn: 100 requests, 30 cancelled by hang-ups.
IN_PROCESS_REQUESTS = 900
CANCELLED_PER_KIND = 45  # per kind (mid-statement, idle, commit) and per way (task.cancel(), anyio scope)
CONCURRENCY = 12
POOL_SIZE = 8
COMMIT_SECONDS = 0.2
# How long after the endpoint reached its point the cancellation comes: the statement has been sent by then.
CANCEL_DELAY = {"sleep": 0.03, "idle": 0.0, "commit": 0.03}
ORPHAN_SECONDS = 1.0  # a statement cut off mid-way must be gone from the server within this
NEXT_REQUEST_SECONDS = 1.0


async def run_sql(dsn: str, sql: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def names(dsn: str, table: str) -> Counter[str]:
    connection = await asyncpg.connect(dsn)
    try:
        return Counter(row[0] for row in await connection.fetch(f"SELECT name FROM {table}"))
    finally:
        await connection.close()


@pytest.fixture
async def slow_commit_table(postgresql_dsn: str) -> AsyncIterator[str]:
    """A table whose rows named SLOW_NAME make COMMIT sleep COMMIT_SECONDS (dropped at the end)."""
    names = {"table": TABLE, "function": SLOW_COMMIT}
    await run_sql(postgresql_dsn, DROP_TABLE.format(**names))
    await run_sql(postgresql_dsn, CREATE_TABLE.format(**names, seconds=COMMIT_SECONDS, name=SLOW_NAME))
    yield TABLE
    await run_sql(postgresql_dsn, DROP_TABLE.format(**names))


@pytest.fixture(autouse=True)
def no_connection_left_for_the_garbage_collector() -> Iterator[None]:
    """SQLAlchemy warns "non-checked-in connection" when the garbage collector finds a connection nobody gave
    back; pytest turns warnings into errors, and this collects explicitly at the end to be sure to see one."""
    yield
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert [str(warning.message) for warning in caught if "non-checked-in" in str(warning.message)] == []


# --- in-process: task.cancel() and an anyio cancel scope ----------------------------------------------------


@dataclass
class Plan:
    """One request of the mix: its route kind and, for a cancelled one, how it is cancelled."""

    kind: str  # "ok", or where it is cancelled: "sleep" (mid-statement), "idle", "commit"
    way: str | None = None  # "task" (task.cancel()) or "scope" (an anyio cancel scope around the app)
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    pid: int | None = None  # the backend of its connection, once it has one
    cancelled_at: float | None = None


@dataclass
class Tally:
    """What the pool did, and which kind of request held each connection it threw away."""

    holder: dict[int, str] = field(default_factory=dict)  # backend pid -> kind of the request holding it now
    connects: int = 0
    invalidated: Counter[str] = field(default_factory=Counter)

    def on_connect(self, dbapi_connection: Any, record: Any) -> None:
        self.connects += 1

    def on_invalidate(self, dbapi_connection: Any, record: Any, exception: BaseException | None) -> None:
        pid = dbapi_connection.driver_connection.get_server_pid()
        self.invalidated[self.holder.get(pid, "unknown")] += 1


def make_plans() -> list[Plan]:
    cancelled = [
        Plan(kind, way) for kind in CANCEL_DELAY for way in ("task", "scope") for _ in range(CANCELLED_PER_KIND)
    ]
    plans = cancelled + [Plan("ok") for _ in range(IN_PROCESS_REQUESTS - len(cancelled))]
    random.Random(4).shuffle(plans)
    return plans


async def test_a_mix_of_cancellations_in_process(postgresql_dsn: str, slow_commit_table: str) -> None:
    settings = DatabaseSettings(
        url=PG_URL,
        pool_size=POOL_SIZE,
        max_overflow=0,
        pool_timeout=10,
        application_name=f"adbs-mix-{uuid.uuid4().hex[:12]}",
    )
    assert settings.application_name is not None
    database = Database(settings=settings, commit_on_success=True)
    tally = Tally()
    sync_engine = database.engine.sync_engine
    event.listen(sync_engine, "connect", tally.on_connect)
    event.listen(sync_engine, "invalidate", tally.on_invalidate)
    current: dict[int, Plan] = {}  # backend pid -> the request whose commit is under way on it

    def on_commit(connection: Any) -> None:
        # Fires just before COMMIT goes to the server.
        pid = connection.connection.driver_connection.get_server_pid()
        plan = current.get(pid)
        if plan is not None and plan.kind == "commit":
            plan.reached.set()

    event.listen(sync_engine, "commit", on_commit)

    async def hold(session: AsyncSession, plan: Plan) -> None:
        connection = await session.connection()
        raw = await connection.get_raw_connection()
        pid: int = raw.driver_connection.get_server_pid()  # type: ignore[union-attr]
        plan.pid = pid
        tally.holder[pid] = plan.kind
        current[pid] = plan

    def plan_of(request: Request) -> Plan:
        plan: Plan = request.scope["plan"]
        return plan

    async def ok(request: Request) -> Response:
        session = current_session()
        await hold(session, plan_of(request))
        await session.execute(text(f"INSERT INTO {slow_commit_table} (name) VALUES ('ok')"))
        return PlainTextResponse("ok")

    async def sleep(request: Request) -> Response:
        session = current_session()
        plan = plan_of(request)
        await hold(session, plan)
        plan.reached.set()
        await session.execute(text("SELECT pg_sleep(5)"))
        return PlainTextResponse("slept")

    async def idle(request: Request) -> Response:
        session = current_session()
        plan = plan_of(request)
        await hold(session, plan)
        await session.execute(text(f"INSERT INTO {slow_commit_table} (name) VALUES ('idle')"))
        plan.reached.set()
        await asyncio.Event().wait()  # the transaction stays open and idle until the request is cancelled
        return PlainTextResponse("never")

    async def commit(request: Request) -> Response:
        session = current_session()
        await hold(session, plan_of(request))
        await session.execute(text(f"INSERT INTO {slow_commit_table} (name) VALUES ('{SLOW_NAME}')"))
        return PlainTextResponse("committed")  # the middleware commits before this starts

    inner = Starlette(routes=[Route("/ok", ok), Route("/sleep", sleep), Route("/idle", idle), Route("/commit", commit)])
    inner.add_middleware(DBSessionMiddleware, database=database)
    app: ASGIApp = inner

    orphans: dict[int, str] = {}  # backends still running ORPHAN_SECONDS after their request was cancelled
    cancelled_pids: dict[int, float] = {}
    stop = asyncio.Event()

    async def watch_for_orphans() -> None:
        connection = await asyncpg.connect(postgresql_dsn)
        try:
            while not stop.is_set():
                rows = await connection.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND state = 'active' "
                    "AND query LIKE '%pg_sleep%'",
                    settings.application_name,
                )
                now = time.monotonic()
                for (pid,) in rows:
                    if pid in cancelled_pids and now - cancelled_pids[pid] > ORPHAN_SECONDS:
                        orphans.setdefault(pid, f"pg_sleep still running {now - cancelled_pids[pid]:.2f} s after")
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=0.1)
        finally:
            await connection.close()

    outcomes: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    plans = make_plans()
    queue = iter(plans)

    async def one(plan: Plan) -> None:
        scope = http_scope(f"/{plan.kind}")
        scope["plan"] = plan
        channel = Channel([{"type": "http.request", "body": b"", "more_body": False}])
        cancel_scope = anyio.CancelScope()

        async def call() -> None:
            if plan.way == "scope":
                with cancel_scope:  # an outer middleware's cancel scope around the whole app
                    await app(scope, channel.receive, channel.send)
            else:
                await app(scope, channel.receive, channel.send)

        task = asyncio.create_task(call())
        if plan.way is not None:
            reached = asyncio.ensure_future(plan.reached.wait())
            await asyncio.wait([reached, task], timeout=10, return_when=asyncio.FIRST_COMPLETED)
            reached.cancel()
            assert plan.reached.is_set(), f"/{plan.kind} did not get to its point: {task}"
            await asyncio.sleep(CANCEL_DELAY[plan.kind])
            plan.cancelled_at = time.monotonic()
            if plan.kind == "sleep" and plan.pid is not None:
                cancelled_pids[plan.pid] = plan.cancelled_at
            if plan.way == "task":
                task.cancel()
            else:
                cancel_scope.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=10)
            outcomes[f"{plan.kind}/{plan.way}: returned"] += 1
        except asyncio.CancelledError:
            outcomes[f"{plan.kind}/{plan.way}: cancelled"] += 1
        for message in channel.sent:
            if message["type"] == "http.response.start":
                statuses[message["status"]] += 1
                if plan.kind != "ok":
                    outcomes[f"{plan.kind}/{plan.way}: answered {message['status']}"] += 1

    async def worker() -> None:
        for plan in queue:
            await one(plan)

    watcher = asyncio.create_task(watch_for_orphans())
    started = time.monotonic()
    try:
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.monotonic() - started
        # The cleanup is over before each ASGI call returns: nothing is out the moment the last one did.
        assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        last_cancel = max(plan.cancelled_at or 0.0 for plan in plans)
        await asyncio.sleep(max(0.0, last_cancel + ORPHAN_SECONDS + 0.2 - time.monotonic()))
        stop.set()
        await watcher

        print(
            f"{len(plans)} requests in {elapsed:.1f} s: {dict(sorted(outcomes.items()))}; statuses {dict(statuses)}; "
            f"connects {tally.connects}, invalidated by kind {dict(tally.invalidated)}"
        )
        ok_count = sum(plan.kind == "ok" for plan in plans)
        # Every plain request answered once; a cancelled one answers nothing, or 200 when it was over first.
        answered_anyway = sum(count for outcome, count in outcomes.items() if outcome.endswith(": answered 200"))
        assert statuses == {200: ok_count + answered_anyway}, statuses
        assert orphans == {}, "statements ran on after their requests were cancelled"
        active = [b for b in await backends(postgresql_dsn, settings.application_name) if b.state != "idle"]
        assert active == [], "a backend of ours is not idle (idle in transaction, or still running a statement)"

        # Only connections cut off mid-statement were thrown away; every new connection beyond filling the pool
        # replaced one of those.
        assert set(tally.invalidated) <= {"sleep"}, tally.invalidated
        assert tally.connects <= POOL_SIZE + tally.invalidated["sleep"]

        # A commit under way when its request was cancelled finished: its row is there (and no 2xx went out for a
        # row that is not). Nothing of a request cancelled while idle was committed.
        stored = await names(postgresql_dsn, slow_commit_table)
        commits = [plan for plan in plans if plan.kind == "commit"]
        assert stored == {"ok": ok_count, SLOW_NAME: len(commits)}
        # Most of those cancellations did come during the commit (the others after it: answered 200).
        in_commit = len(commits) - sum(outcomes[f"commit/{way}: answered 200"] for way in ("task", "scope"))
        assert in_commit >= len(commits) // 2, f"most cancels came after the commit was over: {outcomes}"

        # The next request is quick.
        next_plan = Plan("ok")
        started = time.monotonic()
        await asyncio.wait_for(one(next_plan), timeout=NEXT_REQUEST_SECONDS)
        assert time.monotonic() - started < NEXT_REQUEST_SECONDS
        assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        stop.set()
        with suppress(Exception):
            await watcher
        await database.dispose()
        await terminate_backends(postgresql_dsn, settings.application_name)


# --- through uvicorn: clients that close their sockets ------------------------------------------------------


SERVER_REQUESTS = 100
HANG_UPS_PER_KIND = 10
SERVER_COMMIT_SECONDS = 1.0


async def hang_up_when(server: Server, dsn: str, request: bytes, count: int, state: str, query: str) -> None:
    """Send ``request`` on ``count`` new connections, wait until ``count`` backends are in ``state`` running
    ``query``, then close every socket."""
    connections = []
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(request)
            await writer.drain()
            connections.append((reader, writer))
        with anyio.fail_after(10):
            while True:
                seen = [
                    b for b in await backends(dsn, server.application_name) if b.state == state and query in b.query
                ]
                if len(seen) >= count:
                    break
                await asyncio.sleep(0.02)
    finally:
        for _reader, writer in connections:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()


def raw_request(method: str, path: str) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode()


async def active_statements(dsn: str, application_name: str, query: str, seconds: float) -> list[int]:
    """Backends of ours still running ``query`` after ``seconds`` (returns at once when there are none)."""
    deadline = time.monotonic() + seconds
    while True:
        seen = [b.pid for b in await backends(dsn, application_name) if b.state == "active" and query in b.query]
        if not seen or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.02)


async def test_a_mix_of_clients_hanging_up_on_uvicorn(postgresql_dsn: str, tmp_path: Path) -> None:
    """100 requests through uvicorn: 70 GET /read on keep-alive connections, meanwhile 30 clients that hang up
    mid-statement (/sleep), with the transaction idle (/idle), and during the middleware's commit (/write, whose
    COMMIT the trigger makes take 1 s). No DATABASE_CLIENT_CONNECTION_CHECK_INTERVAL: the package itself has to
    end the statements that the anyio cancel scope cut off."""
    table = f"{TABLE}_srv"
    function = f"{SLOW_COMMIT}_srv"
    await run_sql(postgresql_dsn, DROP_TABLE.format(table=table, function=function))
    await run_sql(
        postgresql_dsn,
        CREATE_TABLE.format(table=table, function=function, seconds=SERVER_COMMIT_SECONDS, name="written"),
    )
    env = {"SERVER_APP_TABLE": table, "SERVER_APP_CANCEL_ON_DISCONNECT": "1"}
    port = free_port()
    reads = SERVER_REQUESTS - 3 * HANG_UPS_PER_KIND
    try:
        async with (
            serve(
                uvicorn_command(port),
                database_url=PG_URL,
                admin_dsn=postgresql_dsn,
                log_path=tmp_path / "server.log",
                port=port,
                env=env,
            ) as server,
            httpx.AsyncClient(base_url=server.base_url, timeout=10, trust_env=False) as http,
        ):
            before = await server.stats(http)
            statuses: Counter[int] = Counter()
            sent = 0

            async def read_load() -> None:
                nonlocal sent
                async with httpx.AsyncClient(base_url=server.base_url, timeout=10, trust_env=False) as reader:
                    while sent < reads:
                        sent += 1
                        statuses[(await reader.get("/read")).status_code] += 1
                        await asyncio.sleep(0.02)

            loads = [asyncio.create_task(read_load()) for _ in range(2)]
            name = server.application_name

            # Between statements: the transaction open and idle.
            idle = raw_request("GET", "/idle?seconds=30")
            await hang_up_when(server, postgresql_dsn, idle, HANG_UPS_PER_KIND, "idle in transaction", "INSERT")
            # During the middleware's commit.
            write = raw_request("POST", "/write")
            await hang_up_when(server, postgresql_dsn, write, HANG_UPS_PER_KIND, "active", "COMMIT")
            # Once those requests are over (the commits take their second): no connection was thrown away.
            between, busy = await settle(server, http, postgresql_dsn, SERVER_COMMIT_SECONDS + 3.0)
            assert busy == []
            # Mid-statement.
            sleep = raw_request("GET", "/sleep?seconds=5")
            await hang_up_when(server, postgresql_dsn, sleep, HANG_UPS_PER_KIND, "active", "pg_sleep")
            assert await active_statements(postgresql_dsn, name, "pg_sleep", ORPHAN_SECONDS) == []

            await asyncio.gather(*loads)
            stats, busy = await settle(server, http, postgresql_dsn, 3.0)
            print(f"server: before {before}, after the between-statement hang-ups {between}, at the end {stats}")
            assert statuses == {200: reads}
            assert busy == []
            assert (stats["checkedout"], stats["sessions_open"]) == (0, 0)
            # The hang-ups between statements (idle, in the commit) replaced no connection.
            assert between["invalidations"] == before["invalidations"] == 0
            assert between["connects"] - before["connects"] <= 2 * HANG_UPS_PER_KIND
            # Exactly the connections cut off mid-statement: each /sleep was seen running pg_sleep before its
            # client hung up.
            assert stats["invalidations"] == HANG_UPS_PER_KIND
            stored = await names(postgresql_dsn, table)
            # Every commit under way finished; nothing of an idle transaction was saved.
            assert stored == {"written": HANG_UPS_PER_KIND}

            started = time.monotonic()
            response = await http.get("/read")
            assert response.status_code == 200
            assert time.monotonic() - started < NEXT_REQUEST_SECONDS
        assert log_problems(server.log()) == []
    finally:
        await run_sql(postgresql_dsn, DROP_TABLE.format(table=table, function=function))
