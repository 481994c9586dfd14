"""Which server a session runs on: read-only work goes round the replicas, and a request that wrote stays home.

A real streaming replica is tested in test_replicas.py. Here the "replicas" are other databases on the test
server (``postgres``, ``template1``), so that ``current_database()`` names the one each session reached.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest
from sqlalchemy import select, text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_db_session import (
    Database,
    DatabaseSettings,
    DBSessionMiddleware,
    GuardedSession,
    current_session,
    session_policy,
    session_scope,
)
from asgi_db_session._session import HookSession, holds_hooks

from .conftest import PG_URL, Backend, client
from .models import Item

pytestmark = pytest.mark.anyio

# The primary's database name: TEST_DATABASE_URL may name another than "test".
PRIMARY = PG_URL.rsplit("/", 1)[1].split("?", 1)[0]
REPLICAS = [PG_URL.rsplit("/", 1)[0] + "/postgres", PG_URL.rsplit("/", 1)[0] + "/template1"]


async def where() -> str:
    return str(await current_session().scalar(text("SELECT current_database()")))


@pytest.fixture
async def replicated(backend: Backend) -> AsyncIterator[Database]:
    database = Database(backend.url, replicas=REPLICAS)
    yield database
    await database.dispose()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_read_only_scopes_take_the_replicas_in_turn(replicated: Database) -> None:
    seen = []
    for _ in range(4):
        async with session_scope(read_only=True):
            seen.append(await where())
    async with session_scope():
        seen.append(await where())
    assert seen == ["postgres", "template1", "postgres", "template1", PRIMARY]


class OwnSession(GuardedSession):
    """A session class of the app's own, derived as on_commit() advises."""


class OwnSyncSession(HookSession):
    """A sync session class of the app's own."""


class OwnSessionWithOwnSync(GuardedSession):
    sync_session_class = OwnSyncSession


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
@pytest.mark.parametrize("session_class", [GuardedSession, OwnSession, OwnSessionWithOwnSync])
async def test_reads_after_a_write_in_the_request_stay_on_the_primary(
    backend: Backend, session_class: type[GuardedSession]
) -> None:
    async def endpoint(request: Request) -> Response:
        assert isinstance(current_session(), session_class)
        # The app's own sync session class is kept; the package's own (HookSession) is folded into one class.
        sync_class = session_class.sync_session_class
        assert sync_class is HookSession or isinstance(current_session().sync_session, sync_class)
        assert holds_hooks(type(current_session().sync_session))
        places = []
        async with session_scope(read_only=True):
            places.append(await where())
        if request.query_params.get("write"):
            current_session().add(Item(id=1, name="written"))
            await current_session().flush()
        else:
            await current_session().execute(select(1))  # a read is no reason to stay
        async with session_scope(read_only=True):
            places.append(await where())
        return JSONResponse(places)

    replicated = Database(backend.url, replicas=REPLICAS, session_options={"class_": session_class})
    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=replicated, commit_on_success=True)
    try:
        async with client(app) as http:
            assert (await http.get("/")).json() == ["postgres", "template1"]
            assert (await http.get("/", params={"write": "1"})).json() == ["postgres", PRIMARY]
    finally:
        await replicated.dispose()
    assert await backend.names() == ["written"]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_write_in_an_ended_block_counts_for_the_whole_request(replicated: Database) -> None:
    async def endpoint(request: Request) -> Response:
        async with session_scope(commit=True) as session:
            await session.execute(select(1))  # not a write
            await session.execute(text("  select 2"))  # nor this
        async with session_scope(read_only=True):
            before = await where()
        async with session_scope(commit=False) as session:
            # Raw SQL other than a plain SELECT counts as a write: the primary is the safe side.
            await session.execute(text("CREATE TEMPORARY TABLE scratch (id int)"))
        async with session_scope(read_only=True):
            after = await where()
        return JSONResponse([before, after])

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=replicated)
    async with client(app) as http:
        assert (await http.get("/")).json() == ["postgres", PRIMARY]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_read_only_route_reads_from_a_replica(replicated: Database) -> None:
    @session_policy(read_only=True)
    async def read(request: Request) -> Response:
        return JSONResponse([await where(), await current_session().scalar(text("SHOW transaction_read_only"))])

    async def plain(request: Request) -> Response:
        return JSONResponse([await where()])

    app = Starlette(routes=[Route("/read", read), Route("/plain", plain)])
    app.add_middleware(DBSessionMiddleware, database=replicated)
    async with client(app) as http:
        assert (await http.get("/read")).json() == ["postgres", "on"]
        assert (await http.get("/plain")).json() == [PRIMARY]
        assert (await http.get("/read")).json() == ["template1", "on"]
    engines = replicated.replica_engines
    assert [engine.pool.checkedout() for engine in engines] == [0, 0]  # type: ignore[attr-defined]


def test_replica_urls_come_comma_separated_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:Zx9-Secret@primary/db")
    monkeypatch.setenv("DATABASE_REPLICA_URLS", "postgresql://app:Zx9-Secret@r1/db, postgresql://app:Zx9-Secret@r2/db")
    settings = DatabaseSettings()
    assert settings.replica_urls == [
        "postgresql+asyncpg://app:Zx9-Secret@r1/db",
        "postgresql+asyncpg://app:Zx9-Secret@r2/db",
    ]
    database = Database(settings=settings, name="replicated-from-env")
    for text_form in (repr(settings), str(settings), repr(database)):
        assert "Secret" not in text_form
        assert "r1" in text_form
        assert "r2" in text_form


def test_replicas_take_a_list() -> None:
    with pytest.raises(TypeError, match="list of URLs"):
        Database("sqlite+aiosqlite://", replicas="postgresql://r1/db", name="one-string")


def test_replicas_need_settings_to_share() -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine("sqlite+aiosqlite://")
    with pytest.raises(ValueError, match="replicas= needs url= or settings="):
        Database(engine=engine, replicas=["postgresql://r1/db"], name="engine-only")


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_statement_cut_off_on_a_replica_stops_there(backend: Backend) -> None:
    """A replica's engine is watched like the primary's: a statement cut off by an anyio scope does not run on."""
    name = f"adbs-replica-cut-{uuid.uuid4().hex[:12]}"
    settings = DatabaseSettings(url=backend.url, replica_urls=REPLICAS[:1], application_name=name)
    database = Database(settings=settings, name="replica-cut")
    try:
        ran_on = []
        with anyio.move_on_after(0.3) as cut:
            async with session_scope("replica-cut", read_only=True) as session:
                ran_on.append((await session.execute(text("SELECT current_database()"))).scalar_one())
                await session.execute(text("SELECT pg_sleep(5)"))
        assert cut.cancelled_caught, "the statement was not cut off"
        assert ran_on == ["postgres"]  # the replica's database, not the primary's
        connection = await asyncpg.connect(backend.dsn)
        try:
            with anyio.fail_after(2):
                while True:
                    running = await connection.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state = 'active'", name
                    )
                    if not running:
                        break
                    await asyncio.sleep(0.05)
        finally:
            await connection.close()
    finally:
        await database.dispose()
