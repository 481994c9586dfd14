"""current_session() and session_scope(): which session a piece of code gets, and when it is closed."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import Select, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_db_session import (
    ConcurrentSessionUseError,
    Database,
    DBSessionMiddleware,
    GuardedSession,
    NoSessionError,
    current_session,
    session_scope,
)
from asgi_db_session.exceptions import CONCURRENT_USE

from .conftest import Backend, client
from .models import Item
from .test_guarded_session import SQLITE_SLOW_QUERY

pytestmark = pytest.mark.anyio


async def test_outside_any_scope_the_error_says_how_to_get_a_session() -> None:
    with pytest.raises(NoSessionError) as caught:
        current_session("nowhere")
    assert isinstance(caught.value, RuntimeError)
    assert str(caught.value) == (
        "No database session for 'nowhere': current_session() works only inside a request handled by "
        "DBSessionMiddleware, or inside `async with session_scope('nowhere'):`. Add the middleware to the app "
        "(app.add_middleware(DBSessionMiddleware)) or open a session_scope() around this code."
    )


async def test_session_scope_for_a_database_nobody_created_names_the_fix() -> None:
    with pytest.raises(NoSessionError) as caught:
        async with session_scope("never-created"):
            pass  # pragma: no cover - the scope cannot open
    assert str(caught.value) == (
        "No database named 'never-created' is configured: create Database(url=..., name='never-created') or add "
        "DBSessionMiddleware(app, name='never-created', ...) before opening session_scope('never-created')."
    )


async def test_session_scope_outside_a_request(backend: Backend, database: Database) -> None:
    async with session_scope() as session:
        assert current_session() is session
        session.add(Item(id=1, name="rolled-back"))
    with pytest.raises(NoSessionError):
        current_session()
    async with session_scope(commit=True) as session:
        session.add(Item(id=2, name="kept"))
    assert await backend.names() == ["kept"]
    assert session.sync_session.get_bind() is database.engine.sync_engine


async def test_session_scope_rolls_back_when_the_block_raises(backend: Backend, database: Database) -> None:
    async def failing_block() -> None:
        async with session_scope(commit=True) as session:
            session.add(Item(id=1, name="lost"))
            await session.flush()
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await failing_block()
    assert await backend.names() == []


async def test_session_scope_follows_the_database_policy_by_default(backend: Backend) -> None:
    database = Database(backend.url, commit_on_success=True)
    try:
        async with session_scope() as session:
            session.add(Item(id=1, name="by-policy"))
        async with session_scope(commit=False) as session:
            session.add(Item(id=2, name="overridden"))
        assert await backend.names() == ["by-policy"]
    finally:
        await database.dispose()


async def test_inside_a_request_session_scope_follows_the_middleware_policy(
    backend: Backend, database: Database
) -> None:
    async def endpoint(request: Request) -> Response:
        async with session_scope() as session:
            session.add(Item(id=1, name="middleware-policy"))
        async with session_scope(commit=False) as session:
            session.add(Item(id=2, name="told-not-to"))
        return PlainTextResponse("ok")

    # The Database's own policy is not to commit; the middleware's says commit, and the request follows it.
    assert database.commit_on_success is False
    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    async with client(app) as http:
        await http.get("/")
    assert await backend.names() == ["middleware-policy"]
    async with session_scope() as session:
        session.add(Item(id=3, name="outside-a-request"))
    assert await backend.names() == ["middleware-policy"]


async def test_nested_scopes_shadow_and_restore(database: Database) -> None:
    async with session_scope() as outer:
        async with session_scope() as inner:
            assert inner is not outer
            assert current_session() is inner
        assert current_session() is outer


async def test_concurrent_tasks_each_open_their_own_scope_inside_a_request(database: Database) -> None:
    async def count(delay: float) -> tuple[int, AsyncSession]:
        async with session_scope() as session:
            await asyncio.sleep(delay)
            value = await current_session().scalar(select(text("1")))
            assert value == 1
            return id(current_session()), session

    async def endpoint(request: Request) -> Response:
        request_session = current_session()
        results = await asyncio.gather(count(0.02), count(0.01), count(0))
        assert current_session() is request_session
        assert len({session_id for session_id, _ in results}) == 3
        assert request_session not in {session for _, session in results}
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=database)
    async with client(app) as http:
        assert (await http.get("/")).text == "ok"


async def test_inside_a_request_session_scope_uses_the_request_database(backend: Backend, database: Database) -> None:
    # A Database created later under the same name must not divert the request's scopes.
    other = Database("sqlite+aiosqlite:///:memory:")
    engines = []

    async def endpoint(request: Request) -> Response:
        async with session_scope() as session:
            engines.append(session.sync_session.get_bind())
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=database)
    async with client(app) as http:
        await http.get("/")
    assert engines == [database.engine.sync_engine]
    await other.dispose()


async def test_a_task_that_outlives_its_request_is_told_to_open_its_own_scope(database: Database) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    outcome: list[BaseException | AsyncSession] = []

    async def orphan() -> None:
        started.set()
        await release.wait()
        try:
            outcome.append(current_session())
        except NoSessionError as exc:
            outcome.append(exc)

    tasks: list[asyncio.Task[None]] = []

    async def endpoint(request: Request) -> Response:
        current_session()
        tasks.append(asyncio.create_task(orphan()))
        await started.wait()
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=database)
    async with client(app) as http:
        await http.get("/")
    release.set()
    await tasks[0]
    assert len(outcome) == 1
    assert isinstance(outcome[0], NoSessionError)
    assert str(outcome[0]) == (
        "The scope that owned the 'default' session has ended and its session is closed: this code outlived its "
        "request (a task started with asyncio.create_task, say). Open a session of its own with "
        "`async with session_scope('default') as session:`."
    )


# --- session_options: one block's own session --------------------------------------------------------------


def pending_count() -> Select[int]:
    return select(func.count()).select_from(Item)


async def test_session_options_change_only_that_blocks_session(backend: Backend, database: Database) -> None:
    async with session_scope(session_options={"autoflush": True, "expire_on_commit": True}) as session:
        session.add(Item(id=1, name="pending"))
        assert await session.scalar(pending_count()) == 1  # autoflush sent the INSERT before the query
        assert session.sync_session.expire_on_commit is True
        async with session_scope() as inner:
            assert (inner.sync_session.autoflush, inner.sync_session.expire_on_commit) == (False, False)
    async with session_scope() as session:
        session.add(Item(id=2, name="pending"))
        assert await session.scalar(pending_count()) == 0  # the defaults again: no autoflush
    assert await backend.names() == []


async def test_session_options_inside_a_request_leave_the_request_session_alone(database: Database) -> None:
    seen: list[tuple[bool, bool]] = []

    async def endpoint(request: Request) -> Response:
        async with session_scope(session_options={"autoflush": True}) as session:
            seen.append((session.sync_session.autoflush, current_session() is session))
        seen.append((current_session().sync_session.autoflush, True))
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=database)
    async with client(app) as http:
        assert (await http.get("/")).text == "ok"
    assert seen == [(True, True), (False, True)]


async def test_session_options_keep_the_concurrency_guard(backend: Backend, database: Database) -> None:
    slow = "SELECT pg_sleep(0.3)" if backend.name == "postgresql" else SQLITE_SLOW_QUERY
    async with session_scope(session_options={"autoflush": True}) as session:
        assert isinstance(session, GuardedSession)
        with pytest.raises(ConcurrentSessionUseError) as caught:
            await asyncio.gather(session.execute(text(slow)), session.execute(text("SELECT 1")))
    assert str(caught.value) == CONCURRENT_USE.format(method="execute")
    assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_session_options_bind_sends_the_block_elsewhere(
    backend: Backend, database: Database, tmp_path: Path
) -> None:
    path = tmp_path / "elsewhere.db"
    elsewhere = create_async_engine(f"sqlite+aiosqlite:///{path}")
    async with elsewhere.begin() as connection:
        await connection.run_sync(Item.metadata.create_all)
    try:
        async with session_scope(commit=True, session_options={"bind": elsewhere}) as session:
            assert session.sync_session.get_bind() is elsewhere.sync_engine
            session.add(Item(id=1, name="elsewhere"))
    finally:
        await elsewhere.dispose()
    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute(f"SELECT name FROM {Item.__tablename__}").fetchall() == [("elsewhere",)]
    assert await backend.names() == []


@pytest.mark.parametrize("option", ["class_", "sync_session_class"])
async def test_session_options_that_would_drop_the_guard_are_refused(option: str) -> None:
    with pytest.raises(ValueError, match=r"Database\(session_options=") as caught:
        session_scope(session_options={option: AsyncSession})
    assert str(caught.value) == (
        f"session_scope(session_options=...) cannot set {option!r}: a block's session keeps its database's session "
        "class, which carries the package's guards (ConcurrentSessionUseError, on_commit hooks). Set the class for "
        "every session with Database(session_options=...) or DBSessionMiddleware(session_options=...) instead."
    )
