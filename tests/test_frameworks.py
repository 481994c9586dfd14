"""The middleware's contract on every ASGI framework it claims: raw ASGI, Starlette, FastAPI, Litestar, Quart,
BlackSheep and Django (async views through its ASGI handler), each with its own small app (tests/frameworks/).

Each app is run in-process in this test's event loop: its lifespan through asgi-lifespan's LifespanManager (as a
server runs it), its requests through httpx's ASGITransport. Rows are read through a second connection (asyncpg),
and each test's Database carries an application_name of its own, so that pg_stat_activity shows exactly its
connections. The same behaviour under real servers (uvicorn, hypercorn, granian) is
tests/system/test_framework_servers.py.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import event

from asgi_db_session import Database, DatabaseSettings
from asgi_db_session._types import ASGIApp

from .asgi import Channel, http_scope
from .conftest import PG_URL
from .frameworks import service
from .frameworks.registry import FRAMEWORKS, Framework
from .polling import eventually

pytestmark = pytest.mark.anyio

# Generous bounds for a loaded 2-core machine: each wait ends as soon as what it waits for is seen.
DEADLINE = 10.0


# Django's handler keeps the request body in a temporary file, which it closes only when the request ends without
# an exception: a request it sees cancelled, or whose send raised (the middleware's failed commit does), leaves
# the file to the garbage collector, which warns. Django's to fix, not this package's; started() collects the
# garbage at the end of each test, so that the warning (ignored for Django alone) comes inside the test.
DJANGO_BODY_FILE = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function SpooledTemporaryFile.__del__:pytest.PytestUnraisableExceptionWarning"
)
# The first of those collections in the whole suite also finds an asyncpg connection over TLS that an earlier
# test left unclosed (seen only when every test runs, after the system tier; not reproduced by any module alone
# or by the in-process tests before this module): not this module's, and ignored here until it is found.
EARLIER_GARBAGE = [
    pytest.mark.filterwarnings(f"ignore:Exception ignored in. {what}:pytest.PytestUnraisableExceptionWarning")
    for what in (
        "<socket.socket",
        "<function _SelectorTransport.__del__",
        "<function _SSLProtocolTransport.__del__",
        "<function Connection.__del__",
    )
]


def by_name(frameworks: list[Framework]) -> pytest.MarkDecorator:
    django_marks = [DJANGO_BODY_FILE, *EARLIER_GARBAGE]
    params = [pytest.param(f, marks=django_marks if f.name == "Django" else []) for f in frameworks]
    return pytest.mark.parametrize("framework", params, ids=[framework.name for framework in frameworks])


every_framework = by_name(FRAMEWORKS)


@pytest.fixture(scope="module")
def table(postgresql_dsn: str) -> Iterator[str]:
    """The frameworks' table (tests/frameworks/service.py), created once for this module and dropped after it."""

    async def execute(sql: str) -> None:
        connection = await asyncpg.connect(postgresql_dsn)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    def run(sql: str) -> None:
        # In a thread of its own: a module fixture may be set up while an event loop runs.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, execute(sql)).result()

    run(service.CREATE_TABLE)
    yield service.TABLE
    run(f"DROP TABLE IF EXISTS {service.TABLE}")


@dataclass
class Running:
    """A framework app that a LifespanManager has started, with what the tests look at."""

    app: ASGIApp  # as the server calls it (the lifespan's state passed on)
    http: httpx.AsyncClient
    database: Database
    dsn: str

    @property
    def application_name(self) -> str:
        assert self.database.settings is not None
        assert self.database.settings.application_name is not None
        return self.database.settings.application_name

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        connection = await asyncpg.connect(self.dsn)
        try:
            return list(await connection.fetch(sql, *args))
        finally:
            await connection.close()

    async def stored(self, name: str) -> int:
        """How many rows named ``name`` the table holds, as a second connection sees it."""
        rows = await self.fetch(f"SELECT count(*) FROM {service.TABLE} WHERE name = $1", name)
        count: int = rows[0][0]
        return count

    async def backends(self) -> list[tuple[str, str]]:
        """(state, query) of every PostgreSQL backend of this app's Database."""
        rows = await self.fetch(
            "SELECT coalesce(state, ''), query FROM pg_stat_activity WHERE application_name = $1",
            self.application_name,
        )
        return [(row[0], row[1]) for row in rows]

    def checkedout(self) -> int:
        count: int = self.database.engine.pool.checkedout()  # type: ignore[attr-defined]
        return count


def new_database() -> Database:
    """A Database with an application_name of its own and the startup check on."""
    name = f"adbs-frameworks-{uuid.uuid4().hex[:12]}"
    return Database(settings=DatabaseSettings(url=PG_URL, application_name=name, check_on_startup=True))


@asynccontextmanager
async def started(framework: Framework, dsn: str, database: Database) -> AsyncIterator[Running]:
    """``framework``'s app on ``database``, its lifespan run by a LifespanManager; every connection must be back in
    the pool when the block ends, before the shutdown."""
    async with LifespanManager(framework.make_app(database)) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield Running(manager.app, http, database, dsn)
        assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    if framework.name == "Django":
        gc.collect()  # see DJANGO_BODY_FILE


@asynccontextmanager
async def running(framework: Framework, dsn: str) -> AsyncIterator[Running]:
    """``started()`` on a new Database, disposed at the end whatever happened."""
    database = new_database()
    try:
        async with started(framework, dsn, database) as app:
            yield app
    finally:
        await database.dispose()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@every_framework
async def test_a_write_is_committed_through_one_lazy_session(
    framework: Framework, table: str, postgresql_dsn: str
) -> None:
    """The endpoint and the service it calls reach one session with current_session(); it is created on first
    use (a request that never asks checks out no connection), and committed before the 201 goes out."""
    async with running(framework, postgresql_dsn) as app:
        checkouts: list[object] = []
        event.listen(app.database.engine.sync_engine, "checkout", lambda *args: checkouts.append(args))
        response = await app.http.get("/nodb")
        assert (response.status_code, response.text) == (200, "no database")
        assert checkouts == []

        name = unique("write")
        response = await app.http.post("/write", params={"name": name})
        assert (response.status_code, response.text) == (201, "one session")
        assert len(checkouts) == 1
        assert await app.stored(name) == 1


@every_framework
async def test_a_4xx_is_rolled_back(framework: Framework, table: str, postgresql_dsn: str) -> None:
    async with running(framework, postgresql_dsn) as app:
        name = unique("reject")
        assert (await app.http.post("/reject", params={"name": name})).status_code == 400
        assert await app.stored(name) == 0


@every_framework
async def test_an_exception_is_rolled_back(framework: Framework, table: str, postgresql_dsn: str) -> None:
    async with running(framework, postgresql_dsn) as app:
        name = unique("crash")
        assert (await app.http.post("/crash", params={"name": name})).status_code == 500
        assert await app.stored(name) == 0


@every_framework
async def test_a_failed_commit_is_never_a_2xx(framework: Framework, table: str, postgresql_dsn: str) -> None:
    """The app answers 201, but the deferred unique constraint refuses the row at COMMIT: the client gets 409."""
    async with running(framework, postgresql_dsn) as app:
        name = unique("taken")
        await app.fetch(f"INSERT INTO {service.TABLE} (name) VALUES ($1)", name)
        response = await app.http.post("/duplicate", params={"name": name})
        assert response.status_code == 409, response.text
        assert "saved?" not in response.text
        assert await app.stored(name) == 1


@every_framework
async def test_a_streaming_body_uses_the_session_and_is_committed(
    framework: Framework, table: str, postgresql_dsn: str
) -> None:
    async with running(framework, postgresql_dsn) as app:
        name = unique("stream")
        response = await app.http.get("/stream", params={"name": name})
        assert response.status_code == 200
        first, count = response.text.splitlines()
        assert first == "start"
        assert int(count) >= 1  # the row written in the body, seen by the same session
        assert await app.stored(name) == 1


@by_name([framework for framework in FRAMEWORKS if framework.background_tasks])
async def test_the_frameworks_background_task_is_committed(
    framework: Framework, table: str, postgresql_dsn: str
) -> None:
    """Starlette's, FastAPI's and Litestar's background tasks run inside the request's ASGI call and use its session;
    Quart's run after the request has ended, in a session_scope() of their own."""
    async with running(framework, postgresql_dsn) as app:
        name = unique("background")
        assert (await app.http.post("/background", params={"name": name})).status_code == 202

        async def stored() -> bool:
            return await app.stored(name) == 1

        await eventually(stored, f"the background task's row {name!r}", seconds=DEADLINE)


@every_framework
async def test_a_cancelled_request_leaves_nothing_checked_out(
    framework: Framework, table: str, postgresql_dsn: str
) -> None:
    """A request cancelled while its statement runs (as a server cancels it when the client goes away, or at
    shutdown): its connection comes back to the pool and nothing of it keeps running on the server.

    Django and Quart run the view in a task of their own, which the cancellation of the ASGI call does not reach:
    the middleware cancels the task that is using the request's session."""
    async with running(framework, postgresql_dsn) as app:
        channel = Channel([{"type": "http.request", "body": b"", "more_body": False}])

        async def request() -> None:
            await app.app(http_scope("/sleep"), channel.receive, channel.send)

        task = asyncio.create_task(request())

        async def sleeping() -> bool:
            return any(state == "active" and "pg_sleep" in query for state, query in await app.backends())

        await eventually(sleeping, "the request's pg_sleep running on the server", seconds=DEADLINE)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=DEADLINE)

        async def cleaned_up() -> bool:
            return app.checkedout() == 0 and not await sleeping()

        await eventually(cleaned_up, "the connection back in the pool and the statement ended", seconds=DEADLINE)
        assert channel.sent == []  # nothing was answered for the cancelled request


@every_framework
async def test_shutdown_disposes_the_engine(framework: Framework, table: str, postgresql_dsn: str) -> None:
    """The lifespan reaches the middleware (Django's handler refuses it: the middleware answers for it), and the
    pool's connections are closed at shutdown."""
    database = new_database()
    try:
        async with started(framework, postgresql_dsn, database) as app:
            assert (await app.http.post("/write", params={"name": unique("before-shutdown")})).status_code == 201
            assert [state for state, _query in await app.backends()] == ["idle"]  # one pooled connection

        async def gone() -> bool:
            return await app.backends() == []

        await eventually(gone, "no backend of the app's left after shutdown", seconds=DEADLINE)
    finally:
        await database.dispose()
