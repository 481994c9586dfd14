"""The middleware under real servers: clients that hang up, several worker processes, a fork after import.

Each test starts tests/system/server_app.py in a subprocess (uvicorn, hypercorn, granian, or gunicorn with
uvicorn workers) on a free port of 127.0.0.1, with a PostgreSQL application_name of its own, so that
``pg_stat_activity`` shows exactly that server's backends. The app reports its pool and session counts at
/stats without touching the database.

What the servers do when a client hangs up (uvicorn 0.54, hypercorn 0.18, granian 2.8, HTTP/1.1): each marks
the request disconnected, drops what the app sends afterwards and makes ``receive()`` return
``http.disconnect``; none cancels the request. Starlette's StreamingResponse listens for that message and
cancels its body with an anyio cancel scope; anything else runs to its end unless the app cancels it
(tests/system/server_app.py's CancelOnDisconnect does, the way Starlette does). docs/how-to/servers.md says
what that means for a transaction.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from ..conftest import PG_URL
from .server import (
    Backend,
    BackendSampler,
    Server,
    backends,
    drop_table,
    free_port,
    fresh_table,
    granian_command,
    gunicorn_command,
    hypercorn_command,
    log_problems,
    serve,
    uvicorn_command,
)

pytestmark = pytest.mark.anyio

DEFAULT_POOL_SIZE = 5  # DATABASE_POOL_SIZE when not set: the connections a pool keeps once they are back
SETTLE_SECONDS = 3.0  # how long the server may take to put everything back after the last client hung up
NEXT_REQUEST_SECONDS = 1.0


TABLE = f"adbs_server_{os.getpid()}"


@pytest.fixture
async def table(postgresql_dsn: str) -> AsyncIterator[str]:
    """The table the app writes to, empty (one per test run)."""
    await fresh_table(postgresql_dsn, TABLE)
    yield TABLE
    await drop_table(postgresql_dsn, TABLE)


def running(
    command: Sequence[str], port: int, tmp_path: Path, dsn: str, table: str, env: Mapping[str, str] | None = None
) -> AbstractAsyncContextManager[Server]:
    """The app under ``command``, on the test database."""
    return serve(
        command,
        database_url=PG_URL,
        admin_dsn=dsn,
        log_path=tmp_path / "server.log",
        port=port,
        env={"SERVER_APP_TABLE": table, **(env or {})},
    )


async def send_request(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a new connection and send ``GET path`` on it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


ANSWER_SECONDS = 10.0  # how long a client that waits for the first chunk of its answer waits at most


async def hang_up(port: int, path: str, after: float, wait_for: bytes = b"") -> bytes:
    """Send ``GET path`` on a new connection, read what comes back, then close it.

    The client leaves ``after`` seconds after sending; with ``wait_for``, not before those bytes have come back
    either (or ``ANSWER_SECONDS`` have passed), however slow a loaded machine makes the server.
    """
    reader, writer = await send_request(port, path)
    sent = time.monotonic()
    received = b""
    try:
        deadline = sent + (ANSWER_SECONDS if wait_for else after)
        while not wait_for or wait_for not in received:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), timeout=max(deadline - time.monotonic(), 0))
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
        await asyncio.sleep(sent + after - time.monotonic())
        return received
    finally:
        writer.close()
        await writer.wait_closed()


async def hang_up_many(
    port: int,
    paths: Sequence[str],
    count: int,
    at_once: int,
    after: float,
    wait_for: Mapping[str, bytes] | None = None,
) -> dict[str, int]:
    """``count`` requests over ``paths`` in turn, ``at_once`` at a time, each closed after ``after`` seconds
    (requests to a path in ``wait_for``: once its bytes have come back too).

    Returns how many requests of each path had an answer (even a partial one) before their client left.
    """
    gate = asyncio.Semaphore(at_once)
    answered = dict.fromkeys(paths, 0)

    async def one(path: str) -> None:
        async with gate:
            if await hang_up(port, path, after, (wait_for or {}).get(path, b"")):
                answered[path] += 1

    await asyncio.gather(*(one(paths[i % len(paths)]) for i in range(count)))
    return answered


async def settle(server: Server, http: httpx.AsyncClient, dsn: str, seconds: float) -> tuple[dict[str, Any], list[str]]:
    """Wait up to ``seconds`` for the pool to be full, every session closed and every backend idle.

    Returns the last /stats and the states of the backends that were not idle, for the assertions.
    """
    deadline = time.monotonic() + seconds
    while True:
        stats = await server.stats(http)
        busy = [f"{b.state}: {b.query}" for b in await backends(dsn, server.application_name) if b.state != "idle"]
        if (stats["checkedout"] == 0 and stats["sessions_open"] == 0 and not busy) or time.monotonic() > deadline:
            return stats, busy
        await asyncio.sleep(0.05)


async def backends_and_connections(
    server: Server, http: httpx.AsyncClient, dsn: str, seconds: float = SETTLE_SECONDS
) -> tuple[int, int]:
    """How many backends the server's application_name has on PostgreSQL, and how many connections the server
    has open, once the two agree or after ``seconds`` (a closed connection's backend takes a moment to go)."""
    deadline = time.monotonic() + seconds
    while True:
        held = (await server.stats(http))["connections_open"]
        count = len(await backends(dsn, server.application_name))
        if count == held or time.monotonic() > deadline:
            return count, held
        await asyncio.sleep(0.05)


async def count_rows(dsn: str, table: str, name: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        count: int = await connection.fetchval(f"SELECT count(*) FROM {table} WHERE name = $1", name)
    finally:
        await connection.close()
    return count


async def backend_states(
    dsn: str, application_name: str, active: int, idle_in_transaction: int, seconds: float = 1
) -> tuple[int, int]:
    """How many backends are active and idle in transaction, once that is as expected or after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        states = [b.state for b in await backends(dsn, application_name)]
        seen = states.count("active"), states.count("idle in transaction")
        if seen == (active, idle_in_transaction) or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.02)


async def assert_next_request_is_quick(server: Server, http: httpx.AsyncClient) -> None:
    started = time.monotonic()
    response = await http.post(f"{server.base_url}/write")
    assert response.status_code == 200
    assert time.monotonic() - started < NEXT_REQUEST_SECONDS


# --- clients that hang up -----------------------------------------------------------------------------------


async def test_clients_that_hang_up_leave_nothing_behind(postgresql_dsn: str, table: str, tmp_path: Path) -> None:
    """60 clients, 20 at a time, hang up 0.2 s into a request: in pg_sleep, with a transaction open and idle,
    or in a streaming body (once its first chunk has come back). The app cancels each request (anyio cancel
    scope) when its client goes away.

    Within 3 s every connection is back in the pool, every session closed, no backend idle in transaction or
    still running a statement; nothing the requests wrote is committed; the next request is quick; and the log
    shows no connection left to the garbage collector. There are more requests at once (20) than connections
    (15), so some are waiting for the pool when their client leaves.
    """
    paths = ["/sleep?seconds=5", "/idle?seconds=30", "/stream-sleep?seconds=5"]
    env = {
        "SERVER_APP_CANCEL_ON_DISCONNECT": "1",
        # The server also notices the closed socket by itself; the Database's own cancel by backend pid does the
        # job without it (test_statements_stop_when_their_clients_hang_up).
        "DATABASE_CLIENT_CONNECTION_CHECK_INTERVAL": "100",
    }
    port = free_port()
    async with (
        running(uvicorn_command(port), port, tmp_path, postgresql_dsn, table, env) as server,
        httpx.AsyncClient(timeout=10, trust_env=False) as http,
    ):
        # Clients that leave once their transactions sit idle: each rollback runs to its end under the
        # cancellation, and the connection is kept.
        requests = [await send_request(port, "/idle?seconds=30") for _ in range(10)]
        try:
            assert await backend_states(postgresql_dsn, server.application_name, 0, 10, seconds=5) == (0, 10)
        finally:
            for _reader, writer in requests:
                writer.close()
                await writer.wait_closed()
        stats, busy = await settle(server, http, postgresql_dsn, SETTLE_SECONDS)
        assert (busy, stats["checkedout"], stats["invalidations"]) == ([], 0, 0)
        assert stats["connects"] == 10

        # A /stream-sleep client leaves once the body's first chunk is in (its pg_sleep is then under way), not at
        # a fixed time that a loaded machine may reach before the server has answered at all.
        answered = await hang_up_many(
            port, paths, count=60, at_once=20, after=0.2, wait_for={"/stream-sleep?seconds=5": b"sleeping\n"}
        )
        # /sleep and /idle were still running when their clients left; /stream-sleep had started its response.
        assert answered == {"/sleep?seconds=5": 0, "/idle?seconds=30": 0, "/stream-sleep?seconds=5": 20}

        stats, busy = await settle(server, http, postgresql_dsn, SETTLE_SECONDS)
        assert busy == []
        assert stats["checkedout"] == 0
        assert stats["sessions_open"] == 0
        assert stats["sessions_created"] >= 40  # the requests that got past the pool's queue did open one
        assert (await server.quiet_stats(http))["sessions_alive"] == 0
        # Every backend left on the server is a connection in the pool: none was orphaned.
        count, held = await backends_and_connections(server, http, postgresql_dsn)
        assert count == held <= DEFAULT_POOL_SIZE
        assert await count_rows(postgresql_dsn, table, "idle") == 0
        await assert_next_request_is_quick(server, http)

    assert log_problems(server.log()) == []
    assert "Application shutdown complete." in server.log()
    # The lifespan shutdown disposed of the engine: no connection of the server is left on PostgreSQL.
    assert await backends(postgresql_dsn, server.application_name) == []


async def test_statements_stop_when_their_clients_hang_up(postgresql_dsn: str, table: str, tmp_path: Path) -> None:
    """As above, without DATABASE_CLIENT_CONNECTION_CHECK_INTERVAL: 8 clients, 4 at a time, on a pool of 4."""
    env = {"SERVER_APP_CANCEL_ON_DISCONNECT": "1", "DATABASE_POOL_SIZE": "2", "DATABASE_MAX_OVERFLOW": "2"}
    port = free_port()
    async with (
        running(uvicorn_command(port), port, tmp_path, postgresql_dsn, table, env) as server,
        httpx.AsyncClient(timeout=10, trust_env=False) as http,
    ):
        await hang_up_many(port, ["/sleep?seconds=4"], count=8, at_once=4, after=0.2)
        stats, busy = await settle(server, http, postgresql_dsn, 1.5)
        assert stats["checkedout"] == 0  # the pool itself is fine
        count, held = await backends_and_connections(server, http, postgresql_dsn)
        assert count == held <= 2  # what DATABASE_POOL_SIZE keeps
        assert busy == []


# --- what each server does when a client hangs up ---------------------------------------------------------

HANG_UP_SERVERS: dict[str, Callable[[int], list[str]]] = {
    "uvicorn": uvicorn_command,
    "hypercorn": hypercorn_command,
    "granian": granian_command,
}
PAIR_SECONDS = 1.5  # the /write-pair endpoint's pg_sleep between its two inserts
CUT_SECONDS = 10  # the /stream-pair body's wait: far longer than the test, which must not wait for it


@pytest.mark.parametrize("server_kind", list(HANG_UP_SERVERS))
async def test_each_server_with_a_client_that_hangs_up_mid_request(
    postgresql_dsn: str, table: str, tmp_path: Path, server_kind: str
) -> None:
    """One server process, its clients hanging up in the middle of a transaction (commit_on_success=True).

    In a streaming body (a row written, the first chunk sent, then a wait in the event loop or in
    ``pg_sleep``): every server tells the app at once (``receive()`` returns ``http.disconnect``), Starlette's
    StreamingResponse stops the body and returns normally, and the middleware rolls the cut-off body back,
    quietly; the statement it left running on the server is ended.

    In the endpoint, before the response started (a row, ``pg_sleep``, a row; or a row, then a wait in the
    event loop with the transaction open): uvicorn 0.54, hypercorn 0.18 and granian 2.8 all let the endpoint
    run to its end and drop its response, so the response start commits what it wrote (the response went to
    nobody); a second connection never sees one row of the pair without the other.

    Either way, once the requests are over: no connection checked out, no session open, no backend idle in
    transaction or still running a statement, one backend per pooled connection, nothing in the server's log.
    """
    port = free_port()
    async with (
        running(HANG_UP_SERVERS[server_kind](port), port, tmp_path, postgresql_dsn, table) as server,
        httpx.AsyncClient(timeout=10, trust_env=False) as http,
    ):
        cut_in_loop, cut_in_statement = await asyncio.gather(
            hang_up(port, f"/stream-pair?name=cut-in-loop&wait=loop&seconds={CUT_SECONDS}", 0, b"first\n"),
            hang_up(port, f"/stream-pair?name=cut-in-statement&seconds={CUT_SECONDS}", 0, b"first\n"),
        )
        assert (b"first\n" in cut_in_loop, b"second" in cut_in_loop) == (True, False)
        assert (b"first\n" in cut_in_statement, b"second" in cut_in_statement) == (True, False)
        stats, busy = await settle(server, http, postgresql_dsn, SETTLE_SECONDS)
        assert (busy, stats["checkedout"], stats["sessions_open"]) == ([], 0, 0)
        assert await count_rows(postgresql_dsn, table, "cut-in-loop") == 0
        assert await count_rows(postgresql_dsn, table, "cut-in-statement") == 0

        sent = time.monotonic()
        paths = [f"/write-pair?name=pair&seconds={PAIR_SECONDS}", f"/idle?seconds={PAIR_SECONDS}"]
        assert await hang_up_many(port, paths, count=2, at_once=2, after=0.3) == dict.fromkeys(paths, 0)
        # The clients have gone; the endpoints go on: one in pg_sleep, its first row visible to no one else,
        # the other waiting in the event loop with its transaction open.
        assert await backend_states(postgresql_dsn, server.application_name, 1, 1) == (1, 1)
        assert await count_rows(postgresql_dsn, table, "pair") == 0
        assert (await server.stats(http))["sessions_open"] == 2
        stats, busy = await settle(server, http, postgresql_dsn, PAIR_SECONDS + SETTLE_SECONDS)
        assert (busy, stats["checkedout"], stats["sessions_open"]) == ([], 0, 0)
        assert time.monotonic() - sent >= PAIR_SECONDS  # they did run to their end
        assert await count_rows(postgresql_dsn, table, "pair") == 2
        assert await count_rows(postgresql_dsn, table, "idle") == 1

        count, held = await backends_and_connections(server, http, postgresql_dsn)
        assert count == held <= DEFAULT_POOL_SIZE
        await assert_next_request_is_quick(server, http)

    assert log_problems(server.log()) == []
    assert server.backends_left == []


# --- several worker processes -------------------------------------------------------------------------------


SERVERS = [
    "uvicorn --workers 2",
    "hypercorn --workers 2",
    "granian --workers 2",
    "gunicorn --preload -w 2 -k uvicorn_worker.UvicornWorker",
]
POOL_ENV = {"DATABASE_POOL_SIZE": "2", "DATABASE_MAX_OVERFLOW": "1"}
MOST_BACKENDS = 2 * (2 + 1)  # two workers, each with its own pool


def workers_command(server: str, port: int) -> list[str]:
    if server.startswith("uvicorn"):
        return uvicorn_command(port, workers=2)
    if server.startswith("hypercorn"):
        return hypercorn_command(port, workers=2)
    if server.startswith("granian"):
        return granian_command(port, workers=2)
    missing = [module for module in ("gunicorn", "uvicorn_worker") if find_spec(module) is None]
    if missing:
        reason = f"{' and '.join(missing)} not installed (pip install -e '.[test]' installs them)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the gunicorn tests must run")
        pytest.skip(reason)
    return gunicorn_command(port, workers=2, preload=True)


async def pids_of_requests(server: Server, count: int, at_once: int) -> list[tuple[int, int, int]]:
    """(status, worker pid, backend pid) of ``count`` GET /pid, each on a new connection, ``at_once`` at a time."""
    gate = asyncio.Semaphore(at_once)
    # No keep-alive: every request is a new connection, which any worker may accept.
    limits = httpx.Limits(max_keepalive_connections=0)

    async with httpx.AsyncClient(base_url=server.base_url, timeout=10, trust_env=False, limits=limits) as http:

        async def one() -> tuple[int, int, int]:
            async with gate:
                response = await http.get("/pid", params={"seconds": "0.01"})
            if response.status_code != 200:
                return response.status_code, 0, 0
            body = response.json()
            return 200, body["pid"], body["backend_pid"]

        return list(await asyncio.gather(*(one() for _ in range(count))))


async def startup_backends(dsn: str, application_name: str, count: int, seconds: float = 10) -> list[Backend]:
    """The server's backends once there are ``count`` of them, all idle, or after ``seconds`` (a worker may
    still be starting, or running its check, when another already answers)."""
    deadline = time.monotonic() + seconds
    while True:
        found = await backends(dsn, application_name)
        if len(found) >= count and all(backend.state == "idle" for backend in found):
            return found
        if time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("server_kind", SERVERS)
async def test_workers_each_use_connections_of_their_own(
    postgresql_dsn: str, table: str, tmp_path: Path, server_kind: str
) -> None:
    """Two worker processes serve requests, each from its own pool: each worker runs the startup check (whose
    connection it keeps in its pool: one idle backend per worker before any request), no backend is shared
    between them, the server never holds more backends than two pools allow, and each worker disposes its pool
    at shutdown (SQLAlchemy's "Pool disposed", once per worker).

    uvicorn, hypercorn and granian start their workers as new interpreters, which import the app; under
    gunicorn --preload the app (and its Database) is created in the parent, before the fork.
    """
    port = free_port()
    command = workers_command(server_kind, port)
    env = {**POOL_ENV, "DATABASE_CHECK_ON_STARTUP": "true", "DATABASE_ECHO_POOL": "true"}
    async with running(command, port, tmp_path, postgresql_dsn, table, env) as server:
        checked = await startup_backends(postgresql_dsn, server.application_name, 2)
        assert sorted(backend.state for backend in checked) == ["idle", "idle"]
        sampler = BackendSampler(postgresql_dsn, server.application_name)
        async with sampler.sampling():
            results = await pids_of_requests(server, count=200, at_once=20)

    assert [status for status, _pid, _backend in results] == [200] * 200
    backends_of: dict[int, set[int]] = {}
    for _status, pid, backend_pid in results:
        backends_of.setdefault(pid, set()).add(backend_pid)
    workers = sorted(backends_of)
    assert len(workers) == 2, f"the requests reached {workers}"
    assert not backends_of[workers[0]] & backends_of[workers[1]], "a PostgreSQL backend served both workers"
    assert 0 < sampler.most <= MOST_BACKENDS

    log = server.log()
    assert log_problems(log) == []
    created_in = {int(line.rsplit(" ", 1)[1]) for line in log.splitlines() if "app created in process" in line}
    if server_kind.startswith("gunicorn"):
        assert created_in == {server.process.pid}, "--preload imports the app in the parent"
    else:
        assert created_in == set(workers), f"{server_kind} starts its workers anew, each importing the app"
    assert log.count("Pool disposed") == 2
    assert server.backends_left == []


async def test_engine_used_before_the_fork(postgresql_dsn: str, table: str, tmp_path: Path) -> None:
    port = free_port()
    command = workers_command(SERVERS[-1], port)
    env = {**POOL_ENV, "SERVER_APP_QUERY_AT_IMPORT": "1"}
    async with running(command, port, tmp_path, postgresql_dsn, table, env) as server:
        results = await pids_of_requests(server, count=40, at_once=10)
    assert [status for status, _pid, _backend in results] == [200] * 40
    # Dropping the inherited pool without closing it (the parent still uses those sockets) leaves asyncpg to
    # report the connection objects it finds unclosed when they are collected: a ResourceWarning, shown only
    # because the servers run with PYTHONWARNINGS=default.
    assert [line for line in log_problems(server.log()) if "ResourceWarning" not in line] == []


# --- what the server logs -----------------------------------------------------------------------------------

# A statement parameter that stands for personal data (an e-mail address), to look for in the server's log.
PERSONAL = "jdoe-7Kq2x@example.org"


@pytest.mark.parametrize("hide_parameters", [None, "false"], ids=["default", "DATABASE_HIDE_PARAMETERS=false"])
async def test_the_traceback_in_the_server_log_shows_sql_parameters_only_when_asked(
    postgresql_dsn: str, table: str, tmp_path: Path, hide_parameters: str | None
) -> None:
    env = {} if hide_parameters is None else {"DATABASE_HIDE_PARAMETERS": hide_parameters}
    port = free_port()
    async with (
        running(uvicorn_command(port), port, tmp_path, postgresql_dsn, table, env) as server,
        httpx.AsyncClient(timeout=10, trust_env=False) as http,
    ):
        response = await http.post(f"{server.base_url}/fail-with", content=PERSONAL)
        assert response.status_code == 500
    log = server.log()
    assert "Exception in ASGI application" in log
    assert "division by zero" in log
    assert (PERSONAL in log) is (hide_parameters == "false")
