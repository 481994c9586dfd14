"""Two tasks on one session: the second gets an error that says what to do, and cleanup still happens."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_db_session import (
    ConcurrentSessionUseError,
    Database,
    DBSessionMiddleware,
    current_session,
    session_scope,
)

from .conftest import Backend, client
from .models import Item

pytestmark = pytest.mark.anyio

SQLITE_SLOW_QUERY = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000) SELECT count(*) FROM c"
)


async def slow_count() -> int:
    # Long enough on both backends that the second task starts while the first one runs.
    await asyncio.sleep(0)
    result = await current_session().scalar(select(text("count(*)")).select_from(Item))
    return int(result or 0)


async def test_gather_over_the_request_session_names_the_fix(backend: Backend, database: Database) -> None:
    async def endpoint(request: Request) -> Response:
        current_session().add(Item(id=1, name="kept-apart"))
        await asyncio.gather(slow_count(), slow_count())
        raise AssertionError("not reached")  # pragma: no cover

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    async with client(app) as http:
        with pytest.raises(ConcurrentSessionUseError) as caught:
            await http.get("/")
    # The text itself, once (elsewhere the constant): a changed message has to change this test too.
    assert str(caught.value) == (
        "scalar() was called on a session that another task is using right now (asyncio.gather over "
        "current_session(), say). An AsyncSession runs one operation at a time: give each concurrent task a "
        "session of its own with `async with session_scope():` inside the task."
    )
    # The first task's query ran to its end and the session was closed after it: nothing checked out.
    assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await backend.names() == []


async def test_one_scope_per_task_is_the_way_that_works(backend: Backend, database: Database) -> None:
    async def counted() -> int:
        async with session_scope():
            return await slow_count()

    await backend.execute("INSERT INTO " + Item.__tablename__ + " (id, name) VALUES (1, 'a')")
    assert list(await asyncio.gather(counted(), counted(), counted())) == [1, 1, 1]


async def test_close_waits_for_the_other_task_instead_of_failing(database: Database) -> None:
    """A request that ends while another task still queries its session: close() waits, then closes."""
    started = asyncio.Event()
    orphans: list[asyncio.Task[int]] = []

    async def slow_query() -> int:
        started.set()
        if database.engine.dialect.name == "postgresql":
            await current_session().execute(text("SELECT pg_sleep(0.3)"))
        else:  # aiosqlite runs this in its thread, so the event loop goes on meanwhile
            await current_session().execute(text(SQLITE_SLOW_QUERY))
        return 1

    async def endpoint(request: Request) -> Response:
        orphans.append(asyncio.create_task(slow_query()))
        await started.wait()
        return PlainTextResponse("returned while the other task still queries")

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=database)
    async with client(app) as http:
        assert (await http.get("/")).status_code == 200
    assert orphans[0].done()
    assert orphans[0].result() == 1
    assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_session_class_of_your_own_is_respected(backend: Backend) -> None:
    class MySession(AsyncSession):
        pass

    database = Database(backend.url, session_options={"class_": MySession})
    try:
        async with session_scope() as session:
            assert type(session) is MySession
    finally:
        await database.dispose()
