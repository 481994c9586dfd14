"""benchmarks/apps.py's floor-safe-close: the least a close that the contract allows does, and it does all of it;
floor-guarded: the same with a guard against two tasks on one session, which it must then really have;
floor-noted: a send that notes what the contract needs of a response (its start, status and last body).

Its figures are a floor only if its close is as safe as the contract asks (to its end under cancellations, within
a bound, a connection that cannot be cleaned up thrown away): checked here against PostgreSQL, as the package's
own close is in test_cancellation.py; and floor-guarded's guard refuses a second task as the package's does
(test_guarded_session.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from asgi_db_session._types import Receive, Scope, Send
from asgi_db_session.settings import DEFAULT_CLEANUP_TIMEOUT
from benchmarks.apps import (
    APPS,
    FLOOR_GUARDED,
    FLOOR_LATE_CLOSE,
    FLOOR_SAFE_CLOSE,
    SAFE_CLOSE_SECONDS,
    NotedRequest,
    PlainGuardedSession,
    TwoTasksError,
    _ContextVarAndNotingSend,
    _request_var,
    _shielded_close,
)
from benchmarks.common import EngineSettings, prepare_table
from benchmarks.driver import Lifespan, run_batch

from .asgi import Channel, http_scope
from .conftest import PG_URL

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("postgresql_dsn")]


def test_the_floors_bound_is_the_packages_default() -> None:
    assert SAFE_CLOSE_SECONDS == DEFAULT_CLEANUP_TIMEOUT


async def _session_in_a_transaction(engine: AsyncEngine) -> AsyncSession:
    session = AsyncSession(engine)
    assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
    assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    return session


async def test_the_close_runs_to_its_end_under_repeated_cancellations() -> None:
    engine = create_async_engine(PG_URL, pool_size=1, max_overflow=0)
    invalidated: list[object] = []
    event.listen(engine.sync_engine, "invalidate", lambda *args: invalidated.append(args))
    rollbacks: list[object] = []
    event.listen(engine.sync_engine, "rollback", lambda connection: rollbacks.append(connection))
    try:
        session = await _session_in_a_transaction(engine)
        closing = asyncio.create_task(_shielded_close(session, SAFE_CLOSE_SECONDS))
        await asyncio.sleep(0)
        cancels = 0
        # Cancelled again at every turn until it ends, as an anyio cancel scope does.
        while not closing.done():
            cancels += closing.cancel()
            await asyncio.sleep(0)
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert cancels >= 2
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert invalidated == []
        assert len(rollbacks) == 1
    finally:
        await engine.dispose()


async def test_a_close_past_its_bound_throws_the_connection_away() -> None:
    engine = create_async_engine(PG_URL, pool_size=1, max_overflow=0)
    invalidated: list[object] = []
    event.listen(engine.sync_engine, "invalidate", lambda *args: invalidated.append(args))
    try:
        session = await _session_in_a_transaction(engine)
        await _shielded_close(session, 1e-9)
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert len(invalidated) == 1
    finally:
        await engine.dispose()


@pytest.mark.parametrize("key", [FLOOR_LATE_CLOSE, FLOOR_SAFE_CLOSE, FLOOR_GUARDED])
@pytest.mark.parametrize("route", ["/read", "/stream"])
async def test_the_floors_serve_the_querying_routes(key: str, route: str) -> None:
    """Each response checked by the driver, eight at a time on a pool of four: the sessions are closed."""
    await prepare_table(PG_URL)
    app = APPS[key].build(EngineSettings(url=PG_URL, pool_size=4, pool_timeout=10))
    lifespan = Lifespan(app)
    await lifespan.startup()
    try:
        batch = await run_batch(app, route, 40, 8, lifespan.state, limit=30, keep_alive=True)
    finally:
        await lifespan.shutdown()
    assert (batch.errors, batch.first_error) == (0, None)


async def test_the_guarded_floor_refuses_a_second_task_while_one_runs_and_not_after() -> None:
    engine = create_async_engine(PG_URL, pool_size=1, max_overflow=0)
    try:
        async with PlainGuardedSession(engine) as session:
            slow = asyncio.create_task(session.scalar(text("SELECT pg_sleep(0.3)::text || 'slept'")))
            await asyncio.sleep(0)  # its first step: into the guard and on to the server
            assert running(session) is slow
            with pytest.raises(TwoTasksError, match=r"^scalar\(\) while another task's operation runs"):
                await asyncio.create_task(session.scalar(text("SELECT 'second'")))
            assert await slow == "slept"
            assert running(session) is None
            # Once it is done, another task's operation runs; scalars() runs execute() one level down.
            assert await asyncio.create_task(session.scalar(text("SELECT 'third'"))) == "third"
            assert list(await session.scalars(text("SELECT 'fourth'"))) == ["fourth"]
    finally:
        await engine.dispose()


def running(session: PlainGuardedSession) -> asyncio.Task[Any] | None:
    return session.running_task


@pytest.mark.parametrize(
    ("key", "session_class"), [(FLOOR_SAFE_CLOSE, AsyncSession), (FLOOR_GUARDED, PlainGuardedSession)]
)
def test_each_safe_floor_makes_sessions_of_its_class(key: str, session_class: type[AsyncSession]) -> None:
    app = APPS[key].build(EngineSettings(url=PG_URL))
    [middleware] = app.user_middleware  # type: ignore[attr-defined]
    assert middleware.kwargs["factory"].class_ is session_class


@pytest.mark.parametrize(
    ("status", "more_body", "complete"),
    [(200, [False], True), (400, [False], True), (200, [True, True, False], True), (201, [True, True], False)],
)
async def test_the_noted_floor_notes_what_the_contract_needs_of_a_response(
    status: int, more_body: list[bool], complete: bool
) -> None:
    """What a background task or the rest of a streaming body that asks for a session later depends on: whether
    the response started, its status, and whether its body went out whole (the last case: a stream cut short)."""
    seen: list[NotedRequest] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        request = _request_var.get()
        assert isinstance(request, NotedRequest)
        seen.append(request)
        assert (request.started, request.ended) == (False, False)
        await send({"type": "http.response.start", "status": status, "headers": []})
        assert (request.started, request.status, request.complete) == (True, status, False)
        for more in more_body:
            await send({"type": "http.response.body", "body": b"x", "more_body": more})

    channel = Channel()
    engine = create_async_engine(PG_URL)
    try:
        await _ContextVarAndNotingSend(app, async_sessionmaker(engine))(http_scope(), channel.receive, channel.send)
    finally:
        await engine.dispose()
    [request] = seen
    assert (request.started, request.status, request.complete, request.ended) == (True, status, complete, True)
    assert channel.types() == ["http.response.start"] + ["http.response.body"] * len(more_body)
    assert request.session is None


async def test_the_noted_floor_closes_a_session_made_after_the_response_and_makes_none_once_ended() -> None:
    seen: list[NotedRequest] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x"})
        request = _request_var.get()
        assert isinstance(request, NotedRequest)
        seen.append(request)
        # As a background task does, after the response has gone out.
        assert (await request.get().execute(text("SELECT 1"))).scalar_one() == 1

    channel = Channel()
    engine = create_async_engine(PG_URL, pool_size=1, max_overflow=0)
    try:
        await _ContextVarAndNotingSend(app, async_sessionmaker(engine))(http_scope(), channel.receive, channel.send)
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()
    [request] = seen
    assert (request.complete, request.ended) == (True, True)
    with pytest.raises(RuntimeError, match="^the request has ended"):
        request.get()
