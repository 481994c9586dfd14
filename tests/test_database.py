"""Database and the middleware's constructor: engine sources, session defaults, ping, check, dispose."""

from __future__ import annotations

import gc
import weakref

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_db_session import (
    Database,
    DatabaseSettings,
    DatabaseUnavailableError,
    DBSessionMiddleware,
    current_session,
    get_database,
    session_scope,
)

from .asgi import silent_server
from .conftest import Backend, client

pytestmark = pytest.mark.anyio

UNREACHABLE = "postgresql+asyncpg://app:Zx9q7WvPw@127.0.0.1:1/test"


async def noop(scope: object, receive: object, send: object) -> None:  # pragma: no cover - never called
    pass


def test_two_engine_sources_are_refused(sqlite_url: str) -> None:
    engine = create_async_engine(sqlite_url)
    with pytest.raises(ValueError, match="one engine source, got url and engine"):
        Database(sqlite_url, engine=engine)
    with pytest.raises(ValueError, match="got database and url: pass only one of database="):
        DBSessionMiddleware(noop, database=Database(sqlite_url), url=sqlite_url)
    with pytest.raises(ValueError, match="got engine and settings"):
        DBSessionMiddleware(noop, engine=engine, settings=DatabaseSettings(url=sqlite_url))


def test_conflicting_middleware_arguments_are_refused(sqlite_url: str) -> None:
    database = Database(sqlite_url, name="main")
    with pytest.raises(ValueError, match="does not match the name of database="):
        DBSessionMiddleware(noop, database=database, name="other")
    with pytest.raises(ValueError, match="give session_options= to Database"):
        DBSessionMiddleware(noop, database=database, session_options={"autoflush": True})
    with pytest.raises(ValueError, match="engine_options= applies to an engine that Database creates"):
        Database(engine=create_async_engine(sqlite_url), engine_options={"echo": True})


def test_without_arguments_the_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    middleware = DBSessionMiddleware(noop)
    assert middleware.database.redacted_url == sqlite_url
    monkeypatch.delenv("DATABASE_URL")
    # Not raised here but at lifespan startup (tests/test_lifespan.py): Starlette builds the middleware there.
    unusable = DBSessionMiddleware(noop)
    assert repr(unusable).startswith("DBSessionMiddleware(unusable: No database URL: set the DATABASE_URL")


async def test_app_add_middleware_without_arguments_serves_requests(
    monkeypatch: pytest.MonkeyPatch, backend: Backend
) -> None:
    monkeypatch.setenv("DATABASE_URL", backend.url)

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse(str(await current_session().scalar(text("SELECT 40 + 2"))))

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware)
    async with client(app) as http:
        assert (await http.get("/")).text == "42"
    # The middleware registered the Database it built, so the app can reach it.
    database = get_database()
    assert database.redacted_url == backend.url
    async with session_scope() as session:
        assert session.bind is database.engine
    await database.dispose()


def test_repr_masks_the_password() -> None:
    database = Database(UNREACHABLE)
    assert "Zx9q7WvPw" not in repr(database)
    assert "app:***@127.0.0.1:1" in repr(database)
    middleware = DBSessionMiddleware(noop, database=database)
    assert "Zx9q7WvPw" not in repr(middleware)
    engine_database = Database(engine=create_async_engine(UNREACHABLE))
    assert "Zx9q7WvPw" not in repr(engine_database)


async def test_session_defaults_and_overrides(database: Database, sqlite_url: str) -> None:
    session = database.new_session()
    assert session.sync_session.expire_on_commit is False
    assert session.sync_session.autoflush is False
    await session.close()
    custom = Database(sqlite_url, session_options={"expire_on_commit": True})
    session = custom.new_session()
    assert session.sync_session.expire_on_commit is True
    assert session.sync_session.autoflush is False
    await session.close()


async def test_the_engine_is_created_on_first_use_not_at_construction(backend: Backend) -> None:
    database = Database(backend.url)
    before = database._engine
    assert await database.ping() is True
    assert before is None
    assert database._engine is not None
    await database.dispose()
    # A disposed engine opens a fresh pool when used again.
    assert await database.ping() is True
    await database.dispose()


async def test_an_unreachable_database_is_reported_without_the_password() -> None:
    database = Database(UNREACHABLE)
    assert await database.ping(timeout=5) is False
    with pytest.raises(DatabaseUnavailableError) as caught:
        await database.check(timeout=5)
    message = str(caught.value)
    assert "Cannot reach database 'default' at postgresql+asyncpg://app:***@127.0.0.1:1/test" in message
    assert "Zx9q" not in message
    assert caught.value.__cause__ is None
    await database.dispose()


async def test_a_given_engine_reports_a_refused_connect_once_under_the_newest_database() -> None:
    """An engine given to Database has its connect wrapped too, once: a second Database on it adds no layer, and
    a failure is reported under the name of the newest Database on the engine (as get_database() finds the newest
    of a name): with a session-scoped engine and an app built per test, that is the current test's."""
    engine = create_async_engine(UNREACHABLE)
    Database(engine=engine, name="first_on_engine")
    Database(engine=engine, name="second_on_engine")
    try:
        with pytest.raises(DatabaseUnavailableError) as caught:
            async with engine.connect():
                pass  # pragma: no cover - the connect is refused
    finally:
        await engine.dispose()
    message = str(caught.value)
    assert message.count("Cannot reach") == 1
    assert "Cannot reach database 'second_on_engine' at postgresql+asyncpg://app:***@127.0.0.1:1/test" in message
    assert "Zx9q" not in message


async def test_the_connect_wrapper_keeps_no_database_alive() -> None:
    engine = create_async_engine(UNREACHABLE)
    first = Database(engine=engine, name="kept_alive")
    first_ref = weakref.ref(first)
    del first
    Database(engine=engine, name="kept_alive")  # replaces the first in the registry
    gc.collect()
    try:
        assert first_ref() is None
    finally:
        await engine.dispose()


def test_wrapping_the_connect_leaves_per_statement_dialect_events_off(sqlite_url: str) -> None:
    """A "do_connect" listener would do the same job, but any dialect listener makes SQLAlchemy dispatch dialect
    events at every statement (~6k instructions each in benchmarks/instructions.py); the wrapper does not."""
    engine = create_async_engine(sqlite_url)
    Database(engine=engine, name="wrapped_connect")
    assert engine.sync_engine.dialect._has_events is False


async def test_a_check_that_takes_too_long_times_out() -> None:
    async with silent_server() as port:
        database = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test")
        try:
            with pytest.raises(DatabaseUnavailableError, match="timed out"):
                await database.check(timeout=0.3)
        finally:
            await database.dispose()


async def test_a_forked_child_drops_the_pool_it_inherited(backend: Backend) -> None:
    """What os.register_at_fork runs in a child: a new pool, the parent's connections left alone."""
    from sqlalchemy.util import greenlet_spawn

    from asgi_db_session.database import _forget_inherited_connections

    database = Database(backend.url)
    assert await database.ping() is True
    inherited = database.engine.pool
    assert inherited.checkedin() == 1  # type: ignore[attr-defined]
    _forget_inherited_connections()
    assert database.engine.pool is not inherited
    assert inherited.checkedin() == 1, "the parent's connection must not be closed from the child"  # type: ignore[attr-defined]
    assert await database.ping() is True
    await greenlet_spawn(inherited.dispose)  # in a real child it is the parent's to close
    await database.dispose()
