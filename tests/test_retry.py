"""run_in_transaction(): a unit of work retried after a serialization failure or a deadlock, and only then.

Every conflict here is a real one on PostgreSQL: two units of work (or two HTTP requests) run concurrently,
coordinated with asyncio events so that each has done its first half before either does its second.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import types
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from contextlib import asynccontextmanager

import asyncpg
import httpx
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_db_session import (
    Database,
    DBSessionMiddleware,
    current_session,
    get_database,
    on_commit,
    run_in_transaction,
)
from asgi_db_session.error_responses import _sqlstate
from asgi_db_session.exceptions import RETRY_ATTEMPTS, RETRY_BACKOFF

from .conftest import PG_URL, client
from .docs_code import DOCS, blocks_run_by

pytestmark = pytest.mark.anyio

DOCTORS = f"adbs_retry_doctors_{os.getpid()}"
ROWS = f"adbs_retry_rows_{os.getpid()}"
# The server checks for a deadlock after this long waiting on a lock (1 s by default): short, to keep the
# tests fast. A superuser setting: the tests connect as postgres.
FAST_DEADLOCK_CHECK = "SET LOCAL deadlock_timeout = '50ms'"
# Each coordinated wait gives up after this long (generous: a loaded machine), so that a test that cannot
# reach its conflict fails instead of hanging.
WAIT = 20.0
RETRIES_PAGE = DOCS / "how-to" / "retries.md"


@pytest.fixture
async def pg(postgresql_dsn: str) -> AsyncIterator[Database]:
    async with tables(postgresql_dsn) as db:
        yield db


@asynccontextmanager
async def tables(postgresql_dsn: str) -> AsyncIterator[Database]:
    """A Database on PostgreSQL, with two on-call doctors and two rows of text; dropped at the end."""
    connection = await asyncpg.connect(postgresql_dsn)
    try:
        await connection.execute("SET lock_timeout = '5s'")
        await connection.execute(f"CREATE TABLE IF NOT EXISTS {DOCTORS} (id INTEGER PRIMARY KEY, on_call BOOLEAN)")
        await connection.execute(f"CREATE TABLE IF NOT EXISTS {ROWS} (id INTEGER PRIMARY KEY, value TEXT)")
        await connection.execute(f"TRUNCATE {DOCTORS}, {ROWS}")
        await connection.execute(f"INSERT INTO {DOCTORS} VALUES (1, true), (2, true)")
        await connection.execute(f"INSERT INTO {ROWS} VALUES (1, ''), (2, '')")
    finally:
        await connection.close()
    db = Database(PG_URL, name="retry")
    try:
        yield db
        assert db.engine.pool.checkedout() == 0, "a connection was not returned to the pool"  # type: ignore[attr-defined]
    finally:
        await db.dispose()
        connection = await asyncpg.connect(postgresql_dsn)
        try:
            await connection.execute(f"DROP TABLE IF EXISTS {DOCTORS}, {ROWS}")
        finally:
            await connection.close()


async def fetch(sql: str) -> list[tuple[object, ...]]:
    """Rows as a second connection, outside SQLAlchemy, sees them."""
    connection = await asyncpg.connect(PG_URL.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return [tuple(row) for row in await connection.fetch(sql)]
    finally:
        await connection.close()


def assert_winner_once_victim_replayed(runs: Sequence[Hashable]) -> None:
    """Two units of work ran: the winner of the conflict once, its victim more than once (replayed).

    Twice as a rule, but a replay that begins before the winner's COMMIT has ended can meet the same conflict
    again (seen with write skew in CI: the victim ran three times), so not exactly twice."""
    assert len(set(runs)) == 2, runs
    winner, victim = sorted(Counter(runs).values())
    assert winner == 1, runs
    assert victim >= 2, runs


class WriteSkew:
    """The on-call doctors: each unit of work lets its doctor go off call if another is still on call.

    Both read before either writes, so each sees two on call; run one after the other, the second sees one
    and stays. Under SERIALIZABLE the server refuses the second commit (or write) with 40001.
    """

    def __init__(self) -> None:
        self.read = {1: asyncio.Event(), 2: asyncio.Event()}
        self.attempts: list[int] = []
        self.committed: list[tuple[int, int]] = []

    def work(self, doctor: int) -> Callable[[AsyncSession], Awaitable[str]]:
        other = 2 if doctor == 1 else 1

        async def go_off_call(session: AsyncSession) -> str:
            self.attempts.append(doctor)
            attempt = self.attempts.count(doctor)
            on_commit(lambda: self.committed.append((doctor, attempt)), "retry")
            on_call = await session.scalar(text(f"SELECT count(*) FROM {DOCTORS} WHERE on_call"))
            self.read[doctor].set()
            await asyncio.wait_for(self.read[other].wait(), WAIT)
            if on_call is not None and on_call >= 2:
                await session.execute(text(f"UPDATE {DOCTORS} SET on_call = false WHERE id = {doctor}"))
                return "off call"
            return "stays"

        return go_off_call


class Deadlock:
    """Each unit of work appends its letter to both rows, in opposite orders, each holding its first row's
    lock before the other asks for it: the server ends one of them with 40P01."""

    def __init__(self) -> None:
        self.locked = {1: asyncio.Event(), 2: asyncio.Event()}
        self.attempts: list[str] = []
        self.committed: list[tuple[str, int]] = []

    def work(self, letter: str) -> Callable[[AsyncSession], Awaitable[str]]:
        first, second = (1, 2) if letter == "a" else (2, 1)

        async def append(session: AsyncSession) -> str:
            self.attempts.append(letter)
            attempt = self.attempts.count(letter)
            on_commit(lambda: self.committed.append((letter, attempt)), "retry")
            assert current_session("retry") is session
            await session.execute(text(FAST_DEADLOCK_CHECK))
            await session.execute(text(f"UPDATE {ROWS} SET value = value || '{letter}' WHERE id = {first}"))
            self.locked[first].set()
            await asyncio.wait_for(self.locked[second].wait(), WAIT)
            await session.execute(text(f"UPDATE {ROWS} SET value = value || '{letter}' WHERE id = {second}"))
            return letter

        return append


async def test_write_skew_is_retried_into_a_serial_outcome(pg: Database) -> None:
    skew = WriteSkew()
    results = await asyncio.gather(
        run_in_transaction(skew.work(1), "retry", isolation_level="SERIALIZABLE"),
        run_in_transaction(skew.work(2), "retry", isolation_level="SERIALIZABLE"),
    )
    # As if one ran after the other: exactly one doctor went off call, the other saw that and stayed.
    assert sorted(results) == ["off call", "stays"]
    assert await fetch(f"SELECT count(*) FROM {DOCTORS} WHERE on_call") == [(1,)]
    # One of them lost the race and ran again, the other ran once; the callbacks of the failed attempts never ran.
    # The loser can lose more than once: a retry that starts before the winner has committed reads the same rows
    # and is refused again (seen on a loaded CI machine: attempts [1, 2, 2, 2]).
    loser = 1 if skew.attempts.count(1) > 1 else 2
    winner = 3 - loser
    assert skew.attempts.count(winner) == 1
    assert skew.attempts.count(loser) >= 2
    assert sorted(skew.committed) == sorted([(loser, skew.attempts.count(loser)), (winner, 1)])


async def test_write_skew_without_retries_surfaces_the_serialization_failure(pg: Database) -> None:
    skew = WriteSkew()
    results = await asyncio.gather(
        run_in_transaction(skew.work(1), "retry", attempts=1, isolation_level="SERIALIZABLE"),
        run_in_transaction(skew.work(2), "retry", attempts=1, isolation_level="SERIALIZABLE"),
        return_exceptions=True,
    )
    failures = [result for result in results if isinstance(result, BaseException)]
    assert len(failures) == 1
    assert isinstance(failures[0], sa_exc.DBAPIError)
    assert _sqlstate(failures[0]) == "40001"
    assert sorted(skew.attempts) == [1, 2]
    assert len(skew.committed) == 1
    assert await fetch(f"SELECT count(*) FROM {DOCTORS} WHERE on_call") == [(1,)]


async def test_deadlock_is_retried_into_a_serial_outcome(pg: Database) -> None:
    deadlock = Deadlock()
    results = await asyncio.gather(
        run_in_transaction(deadlock.work("a"), "retry"), run_in_transaction(deadlock.work("b"), "retry")
    )
    assert list(results) == ["a", "b"]
    # Both rows hold both letters in the same order: one unit of work ran entirely before the other.
    rows = await fetch(f"SELECT value FROM {ROWS} ORDER BY id")
    assert rows in ([("ab",), ("ab",)], [("ba",), ("ba",)])
    assert sorted(deadlock.attempts) in (["a", "a", "b"], ["a", "b", "b"])
    victim = "a" if deadlock.attempts.count("a") == 2 else "b"
    winner = "b" if victim == "a" else "a"
    assert sorted(deadlock.committed) == sorted([(victim, 2), (winner, 1)])


async def test_the_attempts_are_bounded_and_the_last_error_is_raised(pg: Database) -> None:
    """Every attempt meets a real concurrent update (committed by another connection between its read and its
    write, under REPEATABLE READ): after three attempts the third one's 40001 is raised."""
    attempts = 0
    committed: list[int] = []

    async def read_then_write(session: AsyncSession) -> None:
        nonlocal attempts
        attempts += 1
        on_commit(lambda: committed.append(attempts), "retry")
        await session.scalar(text(f"SELECT value FROM {ROWS} WHERE id = 1"))
        other = await asyncpg.connect(PG_URL.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await other.execute(f"UPDATE {ROWS} SET value = value || 'x' WHERE id = 1")
        finally:
            await other.close()
        await session.execute(text(f"UPDATE {ROWS} SET value = value || 'y' WHERE id = 1"))

    with pytest.raises(sa_exc.DBAPIError) as caught:
        await run_in_transaction(read_then_write, "retry", attempts=3, isolation_level="REPEATABLE READ")
    assert _sqlstate(caught.value) == "40001"
    assert attempts == 3
    assert committed == []
    assert await fetch(f"SELECT value FROM {ROWS} WHERE id = 1") == [("xxx",)]


async def test_other_errors_are_not_retried(pg: Database) -> None:
    attempts = 0

    async def duplicate(session: AsyncSession) -> None:
        nonlocal attempts
        attempts += 1
        await session.execute(text(f"INSERT INTO {ROWS} VALUES (1, 'again')"))

    with pytest.raises(sa_exc.IntegrityError):
        await run_in_transaction(duplicate, "retry", attempts=5)
    assert attempts == 1

    async def fails(session: AsyncSession) -> None:
        nonlocal attempts
        attempts += 1
        await session.execute(text(f"UPDATE {ROWS} SET value = 'lost' WHERE id = 1"))
        raise LookupError("the app's own error")

    attempts = 0
    with pytest.raises(LookupError):
        await run_in_transaction(fails, "retry", attempts=5)
    assert attempts == 1
    assert await fetch(f"SELECT value FROM {ROWS} WHERE id = 1") == [("",)]


async def test_a_connection_lost_at_commit_is_not_retried(pg: Database) -> None:
    """The server goes away between the last statement and COMMIT: whether it committed cannot be known from
    the error, so the work is not run again."""
    attempts = 0

    async def write_then_lose_the_server(session: AsyncSession) -> None:
        nonlocal attempts
        attempts += 1
        await session.execute(text(f"UPDATE {ROWS} SET value = 'maybe' WHERE id = 1"))
        pid = await session.scalar(text("SELECT pg_backend_pid()"))
        other = await asyncpg.connect(PG_URL.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            # Waits (up to 5 s) until the backend has exited.
            assert await other.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
        finally:
            await other.close()

    with pytest.raises(sa_exc.DBAPIError) as caught:
        await run_in_transaction(write_then_lose_the_server, "retry", attempts=5)
    assert _sqlstate(caught.value) not in ("40001", "40P01")
    assert attempts == 1
    assert await fetch(f"SELECT value FROM {ROWS} WHERE id = 1") == [("",)]


@pytest.mark.parametrize("attempts", [1, 3])
async def test_deadlocked_requests_end_2xx_with_retries_and_503_without(pg: Database, attempts: int) -> None:
    deadlock = Deadlock()

    async def endpoint(request: Request) -> PlainTextResponse:
        request_session = current_session("retry")
        letter = request.path_params["letter"]

        async def work(session: AsyncSession) -> str:
            # The unit of work has a session of its own, apart from the request's.
            assert session is not request_session
            return await deadlock.work(letter)(session)

        return PlainTextResponse(await run_in_transaction(work, "retry", attempts=attempts))

    app = Starlette(routes=[Route("/append/{letter}", endpoint, methods=["POST"])])
    app.add_middleware(DBSessionMiddleware, database=pg)
    async with client(app) as http:
        responses: tuple[httpx.Response, ...] = await asyncio.gather(http.post("/append/a"), http.post("/append/b"))
    statuses = sorted(response.status_code for response in responses)
    rows = await fetch(f"SELECT value FROM {ROWS} ORDER BY id")
    if attempts == 3:
        assert statuses == [200, 200]
        assert rows in ([("ab",), ("ab",)], [("ba",), ("ba",)])
    else:
        assert statuses == [200, 503]
        refused = next(response for response in responses if response.status_code == 503)
        assert refused.headers["retry-after"] == "1"
        winner = next(response.text for response in responses if response.status_code == 200)
        assert rows == [(winner,), (winner,)]


async def test_wrong_bounds_are_refused_with_the_fix(pg: Database) -> None:
    async def nothing(session: AsyncSession) -> None:
        raise AssertionError("never run")  # pragma: no cover - refused before

    with pytest.raises(ValueError, match="attempts") as caught:
        await run_in_transaction(nothing, "retry", attempts=0)
    assert str(caught.value) == RETRY_ATTEMPTS.format(call="run_in_transaction", attempts=0)
    with pytest.raises(ValueError, match="backoff") as caught:
        await run_in_transaction(nothing, "retry", backoff=1.0, max_backoff=0.5)
    assert str(caught.value) == RETRY_BACKOFF.format(call="run_in_transaction", backoff=1.0, max_backoff=0.5)


async def test_outside_a_request_the_work_commits_and_returns(pg: Database) -> None:
    async def write(session: AsyncSession) -> int:
        await session.execute(text(f"UPDATE {ROWS} SET value = 'saved' WHERE id = 2"))
        return 2

    assert await run_in_transaction(write, "retry") == 2
    assert await fetch(f"SELECT value FROM {ROWS} WHERE id = 2") == [("saved",)]


async def test_the_docs_example_runs(
    pg: Database, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/how-to/retries.md's example (type-checked by tests/test_docs_code.py): two requests at once both end
    200, and one doctor goes off call, told to the rota once."""
    (example,) = blocks_run_by(RETRIES_PAGE, "tests/test_retry.py::test_the_docs_example_runs")
    code = example.code.replace('__tablename__ = "doctors"', f'__tablename__ = "{DOCTORS}"')
    assert code != example.code, "the example's table is no longer the one this test fills"
    monkeypatch.setenv("DATABASE_URL", PG_URL)
    module = types.ModuleType("retries_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, str(RETRIES_PAGE), "exec"), module.__dict__)
    caplog.set_level(logging.INFO, logger="rota")
    try:
        async with client(module.app) as http:
            responses = await asyncio.gather(http.post("/doctors/1/off-call"), http.post("/doctors/2/off-call"))
    finally:
        await get_database().dispose()
    assert [response.status_code for response in responses] == [200, 200]
    assert sorted(response.json()["off_call"] for response in responses) == [False, True]
    assert await fetch(f"SELECT count(*) FROM {DOCTORS} WHERE on_call") == [(1,)]
    assert len([record for record in caplog.records if record.getMessage().endswith("is off call")]) == 1
