"""on_commit(): callbacks that run only after the data they were registered for is committed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import asgi_db_session
from asgi_db_session import (
    ConcurrentSessionUseError,
    Database,
    DBSessionMiddleware,
    NoSessionError,
    current_session,
    on_commit,
    session_scope,
)
from asgi_db_session._session import HookSession
from asgi_db_session.exceptions import CONCURRENT_USE

from .conftest import Backend, client
from .models import Item

pytestmark = pytest.mark.anyio


class Journal:
    """What the callbacks saw: their order, and the names a fresh session of theirs could read."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.entries: list[str] = []

    def remember(self, label: str) -> None:
        self.entries.append(label)

    def seeing(self, label: str) -> Callable[[], Awaitable[None]]:
        async def callback() -> None:
            # The callback's own session, not the request's (closed by now or still committing).
            names = (await current_session().scalars(select(Item.name).order_by(Item.name))).all()
            # What a second connection sees: the commit really happened before the callback ran.
            self.entries.append(f"{label}:{','.join(names)}|{','.join(await self.backend.names())}")

        return callback


def make_app(database: Database, journal: Journal, *, commit_on_success: bool) -> Starlette:
    async def add(request: Request) -> Response:
        session = current_session()
        session.add(Item(id=int(request.query_params["id"]), name=request.query_params["name"]))
        on_commit(journal.seeing("first"))
        on_commit(lambda: journal.remember("second"))
        if request.query_params.get("commit"):
            await session.commit()
            journal.remember("after app commit")
        return PlainTextResponse("ok", status_code=int(request.query_params.get("status", "201")))

    app = Starlette(routes=[Route("/add", add, methods=["POST"])])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=commit_on_success)
    return app


async def test_callbacks_run_in_order_after_the_middlewares_commit(backend: Backend, database: Database) -> None:
    journal = Journal(backend)
    async with client(make_app(database, journal, commit_on_success=True)) as http:
        response = await http.post("/add", params={"id": 1, "name": "saved"})
    assert response.status_code == 201
    assert journal.entries == ["first:saved|saved", "second"]


async def test_callbacks_run_right_after_the_apps_own_commit(backend: Backend, database: Database) -> None:
    journal = Journal(backend)
    async with client(make_app(database, journal, commit_on_success=False)) as http:
        response = await http.post("/add", params={"id": 1, "name": "saved", "commit": "1"})
    assert response.status_code == 201
    assert journal.entries == ["first:saved|saved", "second", "after app commit"]


@pytest.mark.parametrize("commit_on_success", [True, False])
async def test_no_callback_runs_after_a_rollback(backend: Backend, database: Database, commit_on_success: bool) -> None:
    journal = Journal(backend)
    async with client(make_app(database, journal, commit_on_success=commit_on_success)) as http:
        # A 4xx rolls back under commit_on_success; without it nothing commits at all.
        response = await http.post("/add", params={"id": 1, "name": "lost", "status": "422"})
    assert response.status_code == 422
    assert journal.entries == []
    assert await backend.names() == []


async def test_a_failed_commit_runs_no_callback(backend: Backend, database: Database) -> None:
    await backend.execute(f"INSERT INTO {Item.__tablename__} (id, name) VALUES (1, 'taken')")
    journal = Journal(backend)
    async with client(make_app(database, journal, commit_on_success=True)) as http:
        response = await http.post("/add", params={"id": 2, "name": "taken"})
    assert response.status_code == 409
    assert journal.entries == []


async def test_a_rolled_back_savepoint_drops_only_its_own_callbacks(backend: Backend, database: Database) -> None:
    journal = Journal(backend)
    async with session_scope(commit=True) as session:
        session.add(Item(id=1, name="kept"))
        on_commit(lambda: journal.remember("outer"))
        savepoint = await session.begin_nested()
        session.add(Item(id=2, name="undone"))
        on_commit(lambda: journal.remember("inside rolled-back savepoint"))
        await savepoint.rollback()
        async with session.begin_nested():
            on_commit(lambda: journal.remember("inside released savepoint"))
    assert journal.entries == ["outer", "inside released savepoint"]
    assert await backend.names() == ["kept"]


async def test_a_failing_callback_is_logged_and_the_next_still_runs(
    backend: Backend, database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal(backend)

    async def broken() -> None:
        current_session().add(Item(id=3, name="from broken callback"))
        raise ValueError("mail server down")

    async def writing() -> None:
        current_session().add(Item(id=4, name="from callback"))

    with caplog.at_level(logging.ERROR, logger="asgi_db_session"):
        async with session_scope(commit=True) as session:
            session.add(Item(id=1, name="saved"))
            on_commit(broken)
            on_commit(writing)
            on_commit(lambda: journal.remember("last"))
    assert journal.entries == ["last"]
    # The failing callback's session rolled back; the next one's committed.
    assert await backend.names() == ["from callback", "saved"]
    assert "mail server down" in caplog.text


async def test_on_commit_outside_a_scope_names_the_fix() -> None:
    with pytest.raises(NoSessionError, match="session_scope"):
        on_commit(lambda: None)


async def test_on_commit_with_a_foreign_sync_session_class_says_what_to_keep(sqlite_url: str) -> None:
    # Only the package's sync session class moves hooks along at commit: another would drop them silently.
    database = Database(sqlite_url, name="foreign", session_options={"sync_session_class": Session})
    try:
        async with session_scope("foreign"):
            with pytest.raises(TypeError, match="keep the default sync_session_class") as caught:
                on_commit(lambda: None, "foreign")
    finally:
        await database.dispose()
    # What the message tells the user to derive from is public.
    assert "asgi_db_session.GuardedSession" in str(caught.value)
    assert "HookSession" not in str(caught.value)


async def test_on_commit_with_a_session_class_not_derived_from_guarded_session_names_it(sqlite_url: str) -> None:
    class PlainSession(AsyncSession):
        pass

    database = Database(sqlite_url, name="plain", session_options={"class_": PlainSession})
    try:
        async with session_scope("plain"):
            with pytest.raises(TypeError, match=r"derive it from asgi_db_session\.GuardedSession"):
                on_commit(lambda: None, "plain")
    finally:
        await database.dispose()


async def test_a_session_class_derived_from_guarded_session_runs_the_callbacks(backend: Backend) -> None:
    class MySession(asgi_db_session.GuardedSession):  # what the TypeError above advises
        pass

    journal = Journal(backend)
    database = Database(backend.url, session_options={"class_": MySession})
    try:
        async with session_scope() as session:
            assert type(session) is MySession
            session.add(Item(id=1, name="saved"))
            on_commit(journal.seeing("first"))
            await session.commit()
            journal.remember("after commit")
    finally:
        await database.dispose()
    assert journal.entries == ["first:saved|saved", "after commit"]


def test_hooks_on_a_session_class_that_would_never_run_them_are_refused_at_construction(sqlite_url: str) -> None:
    """The sync class moves hooks along, but only the package's AsyncSession class runs them after a commit."""

    class MySyncSession(HookSession):
        pass

    class MySession(AsyncSession):
        sync_session_class = MySyncSession

    for options in (
        {"class_": MySession},
        {"class_": AsyncSession, "sync_session_class": MySyncSession},
    ):
        with pytest.raises(TypeError, match=r"derive it from asgi_db_session\.GuardedSession"):
            Database(sqlite_url, name="refused", session_options=options)


async def test_callbacks_of_a_scope_that_rolls_back_never_run(backend: Backend, database: Database) -> None:
    journal = Journal(backend)

    async def failing_block() -> None:
        async with session_scope(commit=True) as session:
            session.add(Item(id=1, name="lost"))
            on_commit(lambda: journal.remember("never"))
            raise KeyError("app error")

    with pytest.raises(KeyError):
        await failing_block()
    assert journal.entries == []
    assert await backend.names() == []


async def test_a_rollback_drops_the_callbacks_registered_before_it(backend: Backend, database: Database) -> None:
    journal = Journal(backend)
    async with session_scope(commit=True) as session:
        session.add(Item(id=1, name="rolled back"))
        on_commit(lambda: journal.remember("for rolled-back data"))
        await session.rollback()
        session.add(Item(id=2, name="saved"))
        on_commit(lambda: journal.remember("for saved data"))
    assert journal.entries == ["for saved data"]
    assert await backend.names() == ["saved"]


async def test_a_cancelled_callback_saves_none_of_its_work(backend: Backend, database: Database) -> None:
    started = asyncio.Event()

    async def slow() -> None:
        current_session().add(Item(id=2, name="half-done"))
        await current_session().flush()
        started.set()
        await asyncio.sleep(30)

    async def block() -> None:
        async with session_scope(commit=True) as session:
            session.add(Item(id=1, name="saved"))
            on_commit(slow)

    task = asyncio.create_task(block())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await backend.names() == ["saved"]


@pytest.mark.parametrize("commit", [False, True])
async def test_a_begin_block_runs_the_callbacks_when_it_commits(
    backend: Backend, database: Database, commit: bool
) -> None:
    journal = Journal(backend)
    async with session_scope(commit=commit) as session:
        async with session.begin():
            session.add(Item(id=1, name="saved"))
            on_commit(journal.seeing("first"))
        journal.remember("after the block")
    assert journal.entries == ["first:saved|saved", "after the block"]


async def test_a_begin_block_in_a_request_runs_the_callbacks_when_it_commits(
    backend: Backend, database: Database
) -> None:
    journal = Journal(backend)

    async def add(request: Request) -> Response:
        session = current_session()
        async with session.begin():
            session.add(Item(id=1, name="saved"))
            on_commit(journal.seeing("first"))
        journal.remember("after the block")
        return PlainTextResponse("ok", status_code=201)

    app = Starlette(routes=[Route("/add", add, methods=["POST"])])
    app.add_middleware(DBSessionMiddleware, database=database)
    async with client(app) as http:
        assert (await http.post("/add")).status_code == 201
    assert journal.entries == ["first:saved|saved", "after the block"]
    assert await backend.names() == ["saved"]


async def test_a_begun_transactions_own_commit_runs_the_callbacks(backend: Backend, database: Database) -> None:
    journal = Journal(backend)
    async with session_scope() as session:
        transaction = await session.begin()
        session.add(Item(id=1, name="saved"))
        on_commit(journal.seeing("first"))
        await transaction.commit()
        journal.remember("after the commit")
    assert journal.entries == ["first:saved|saved", "after the commit"]


async def test_callbacks_wait_for_the_outermost_commit_not_a_savepoint_release(
    backend: Backend, database: Database
) -> None:
    journal = Journal(backend)
    async with session_scope() as session:
        async with session.begin():
            session.add(Item(id=1, name="kept"))
            on_commit(lambda: journal.remember("outer"))
            async with session.begin_nested():
                on_commit(lambda: journal.remember("inside the savepoint"))
            journal.remember("savepoint released")
        journal.remember("committed")
    assert journal.entries == ["savepoint released", "outer", "inside the savepoint", "committed"]


async def test_a_released_savepoint_does_not_save_callbacks_from_a_later_rollback(
    backend: Backend, database: Database
) -> None:
    journal = Journal(backend)
    async with session_scope(commit=True) as session:
        session.add(Item(id=1, name="rolled back"))
        on_commit(lambda: journal.remember("for rolled-back data"))
        async with session.begin_nested():
            pass
        await session.rollback()
        session.add(Item(id=2, name="saved"))
        on_commit(lambda: journal.remember("for saved data"))
    assert journal.entries == ["for saved data"]
    assert await backend.names() == ["saved"]


async def test_a_begin_block_in_a_second_task_names_the_fix(backend: Backend, database: Database) -> None:
    async def write(number: int) -> None:
        session = current_session()
        async with session.begin():
            session.add(Item(id=number, name=f"from task {number}"))

    async with session_scope():
        results = await asyncio.gather(write(1), write(2), return_exceptions=True)
    assert results[0] is None
    assert isinstance(results[1], ConcurrentSessionUseError)
    assert str(results[1]) == CONCURRENT_USE.format(method="begin")
    assert await backend.names() == ["from task 1"]
