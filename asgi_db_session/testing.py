"""Test helpers: every test in a transaction that is rolled back, and a session of your choosing for a block.

Enable the fixtures in your root ``conftest.py``:

    pytest_plugins = ["asgi_db_session.testing"]

(or ``-p asgi_db_session.testing`` on the command line, or in ``addopts``). That conftest may also import from
this module: it has no asserts for pytest to rewrite, and says so (PYTEST_DONT_REWRITE), so pytest does not warn
that it was imported before pytest could rewrite it.

Why opt-in, and not a ``pytest11`` entry point that pytest loads by itself: this package is a runtime
dependency of web apps, so it is installed wherever those apps are, including environments whose test suites
have nothing to do with it. An entry point would import SQLAlchemy into every one of their pytest runs and add
fixtures with common names (``database``, ``db_session``, ``db_client``) that silently lose to, or shadow, the
project's own; and these fixtures need an async test plugin (anyio's) that a project may not use. One line in
the conftest of the projects that want them is cheaper than that surprise.

Fixtures:

- ``database``: the ``Database`` whose sessions the tests roll back; by default ``get_database("default")``,
  or one made from the ``DATABASE_*`` environment when none exists yet. Override it to return the Database
  your app uses (``DBSessionMiddleware(app, database=...)``) where the environment does not describe it.
- ``db_schema`` (session-scoped): the tables, made once for the test session and removed after it. The default
  makes none; override it with ``schema_from_metadata()`` or ``schema_from_alembic()``.
- ``db_session`` (async tests, anyio's ``@pytest.mark.anyio``): opens one connection, begins the outer
  transaction on it, and for the length of the test makes every new session of ``database`` (the app's
  request sessions, ``session_scope()`` blocks) join it through a SAVEPOINT, so app code may commit as it
  likes; yields a session on that connection for the test's own checks (made with the Database's session
  options: ``autoflush=False`` like the app's); rolls everything back at the end.
- ``db_client`` (async tests): an ``httpx.AsyncClient`` for your ``app`` fixture, with the app's lifespan run
  by asgi-lifespan's ``LifespanManager``, inside ``db_session``'s transaction. Needs the ``testing`` extra
  (``pip install 'asgi-db-session[testing]'``): httpx and asgi-lifespan, imported only when used.

Functions, for your own fixtures: ``schema_from_metadata()`` and ``schema_from_alembic()`` (for ``db_schema``),
``outer_transaction()`` (what ``db_session`` runs), ``outer_transaction_in()`` (the same on a started
Starlette TestClient's loop, for sync tests) and ``override_session()``.

Why ``db_client`` is an httpx client on the test's loop rather than Starlette's TestClient: TestClient runs the
app on an event loop of its own, in another thread, where the test cannot await anything; and Starlette 1.x
deprecates TestClient on httpx (it wants httpx2), a warning that fails a run with ``filterwarnings = error``.
Sync tests may still use a TestClient of their own with ``outer_transaction_in(client)``: the outer
connection is then opened through ``client.portal`` (anyio's ``BlockingPortal.wrap_async_context_manager``),
which exists only while the client is started (``with TestClient(app) as client:``), since an asyncpg
connection works only on the loop it was opened on.

Limits and notes:

- The app's sessions share the test's one connection, so sessions used *at the same time* (``asyncio.gather``
  over several ``session_scope()`` blocks, overlapping requests) nest their savepoints into each other and fail
  (``savepoint "sa_savepoint_2" does not exist``): test such code against real commits.
- ``app.add_middleware(DBSessionMiddleware)`` creates its Database only when Starlette builds the middleware,
  at the app's first request or lifespan startup, after ``db_session`` has opened the transaction. The plugin
  then opens it on a Database made from the ``DATABASE_*`` environment under the same name, and the app's,
  made inside the transaction, joins it too. An app that gives the middleware ``url=`` in code, with no
  ``DATABASE_URL`` in the tests' environment, must create its Database itself (``database=``) and return it
  from a ``database`` fixture.
- SQLite: the ``sqlite3`` module (under aiosqlite) emits BEGIN only before a write, so the app's first SAVEPOINT
  would open the transaction and its RELEASE commit it for real. The test's connection turns that handling off
  and emits BEGIN itself (see ``_begin_outer``).
- pytest-asyncio: ``db_session`` works in its auto mode; in strict mode wrap ``outer_transaction()`` in a fixture
  of your own decorated with ``@pytest_asyncio.fixture``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from . import _testing_schema
from ._context import ScopeState, enter, exit_scope
from .database import Database, get_database
from .exceptions import (
    ALEMBIC_ELSEWHERE,
    ALEMBIC_MISSING,
    NOT_A_DATABASE,
    NOT_CREATED_YET,
    NOT_STARTED,
    SEVERAL_HEADS,
    TABLES_EXIST,
    TESTING_EXTRA_MISSING,
    UnknownDatabaseError,
    UsageError,
)

if TYPE_CHECKING:
    import os

    import httpx
    from alembic.config import Config
    from anyio.from_thread import BlockingPortal
    from sqlalchemy import MetaData

__all__ = [
    "ALEMBIC_ELSEWHERE",
    "ALEMBIC_MISSING",
    "NOT_A_DATABASE",
    "NOT_CREATED_YET",
    "NOT_STARTED",
    "SEVERAL_HEADS",
    "TABLES_EXIST",
    "TESTING_EXTRA_MISSING",
    "database",
    "db_client",
    "db_schema",
    "db_session",
    "outer_transaction",
    "outer_transaction_in",
    "override_session",
    "schema_from_alembic",
    "schema_from_metadata",
]


def _lookup(name: str) -> Database:
    """The Database named ``name``; made from the ``DATABASE_*`` environment when there is none yet.

    The app's own may not exist yet: ``app.add_middleware(DBSessionMiddleware)`` creates it at the app's first
    request. One the app creates inside the test's transaction joins that transaction as this one does.
    """
    try:
        return get_database(name)
    except UnknownDatabaseError:
        pass
    try:
        return Database(name=name)
    except ValueError as exc:
        raise UnknownDatabaseError(NOT_CREATED_YET.format(name=name, reason=exc)) from None


async def _begin_outer(connection: AsyncConnection) -> None:
    if connection.dialect.name == "sqlite":
        # The sqlite3 module (which aiosqlite wraps) emits BEGIN only before the first INSERT/UPDATE/DELETE,
        # so SQLAlchemy's begin() sends nothing: the app's SAVEPOINT would then open the transaction itself,
        # and its RELEASE (the app's commit) would commit for real. Turn the module's own transaction handling
        # off for this connection (it is restored when the connection goes back to the pool) and begin here.
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        await connection.begin()
        await connection.exec_driver_sql("BEGIN")
    else:
        await connection.begin()


@asynccontextmanager
async def outer_transaction(database: Database | str = "default") -> AsyncIterator[AsyncSession]:
    """Run the block inside one transaction that is rolled back at its end, whatever the app commits.

    Opens one connection of ``database`` (a Database, or the name of one) on the running event loop and
    begins a transaction on it; inside the block every new session of that Database joins it through a
    SAVEPOINT, so ``commit()`` releases the savepoint and ``rollback()`` returns to it. Yields a session on
    the same connection, for the test's own queries (it sees what the app committed). At the end: rollback,
    the connection closed, and the Database's pool disposed, since its connections belong to this event loop
    and a test runner may close the loop after the test.
    """
    if isinstance(database, str):
        database = _lookup(database)
    connection = await database.engine.connect()
    try:
        await _begin_outer(connection)
        with database.sessions_joining(connection):
            session = database.new_session()
            try:
                yield session
            finally:
                await session.close()
    finally:
        try:
            await connection.rollback()
            # Closed for good rather than given back: the app's lifespan shutdown may have disposed the engine
            # meanwhile (the middleware does), and a connection given back to a pool that was disposed stays
            # open until the garbage collector finds it (a ResourceWarning). The pool is disposed below anyway.
            (await connection.get_raw_connection()).detach()
            await connection.close()
        finally:
            await database.dispose()


class _Started(Protocol):
    """What ``outer_transaction_in`` needs of a client: Starlette's TestClient has it while started."""

    @property
    def portal(self) -> BlockingPortal | None: ...


def outer_transaction_in(
    client: _Started, database: Database | str = "default"
) -> AbstractContextManager[AsyncSession]:
    """``outer_transaction()`` for a sync test, on the event loop of a started Starlette ``TestClient``.

    ``with TestClient(app) as client, outer_transaction_in(client) as session:``. Leave it before the client
    (as that ``with`` does), so that the rollback runs while the client's loop is still there. The yielded
    session lives on the client's loop: query it through ``client.portal.call(...)``.
    """
    portal = client.portal
    if portal is None:
        raise UsageError(NOT_STARTED)
    return portal.wrap_async_context_manager(outer_transaction(database))


@contextmanager
def override_session(session: AsyncSession, name: str = "default") -> Iterator[AsyncSession]:
    """Inside the block, ``current_session(name)`` returns ``session``.

    For calling services and repositories directly in a test, with a session of your choosing (``db_session``,
    say). A ``session_scope(name)`` opened inside the block still opens a new session of the Database named
    ``name``, which must exist. The block does not commit, roll back or close ``session``: that stays yours. It
    applies to the current context: code in a task started inside the block sees it, a request that goes through
    ``DBSessionMiddleware`` does not (the middleware gives each request its own scope).
    """
    database = get_database(name)
    state = ScopeState(database, database.commit_on_success, session)
    token = enter(state)
    try:
        yield session
    finally:
        exit_scope(state, token)  # the session stays open: it is the caller's


def schema_from_metadata(metadata: MetaData, database: Database | str = "default") -> AbstractContextManager[None]:
    """Inside the block, ``metadata``'s tables exist in ``database`` (a Database, or the name of one).

    For a session-scoped ``db_schema`` fixture: ``with schema_from_metadata(Base.metadata, db): yield``.
    ``create_all()`` on entry, ``drop_all()`` at the end. Tables that exist already are an error
    (``TABLES_EXIST``), not reused or dropped: the tests want a database of their own.
    """
    return _testing_schema.schema_from_metadata(metadata, _resolve(database))


def schema_from_alembic(
    config: str | os.PathLike[str] | Config, database: Database | str = "default", *, revision: str = "head"
) -> AbstractContextManager[None]:
    """Inside the block, ``database`` is migrated to ``revision`` by the Alembic setup of ``config``.

    ``config`` is the path of an ``alembic.ini`` (or an ``alembic.config.Config``). The migrations run on a
    connection of ``database`` that env.py finds in ``config.attributes["connection"]`` (examples/alembic's
    env.py uses it). At the end the database is downgraded to the revision it had before, and the version
    table is dropped if the block created it.
    """
    return _testing_schema.schema_from_alembic(config, _resolve(database), revision)


def _resolve(database: Database | str) -> Database:
    return _lookup(database) if isinstance(database, str) else database


@pytest.fixture
def database() -> Database:
    """The Database whose sessions ``db_session`` and ``db_client`` roll back: ``get_database("default")``.

    Override it in your conftest.py to return the Database your app uses.
    """
    return _lookup("default")


def _as_database(value: object) -> Database:
    if not isinstance(value, Database):
        raise TypeError(NOT_A_DATABASE.format(value=value))
    return value


@pytest.fixture(scope="session")
def db_schema() -> None:
    """The tables for the whole test session; this default makes none (the database has them already).

    Override it in your conftest.py, session-scoped, with ``schema_from_metadata()`` or
    ``schema_from_alembic()``: ``db_session`` and ``db_client`` request it, so the tables exist before the
    first test's transaction begins, and are removed when the session ends.
    """


@pytest.fixture
async def db_session(database: object, db_schema: object) -> AsyncIterator[AsyncSession]:
    """The test inside one outer transaction, rolled back at its end; the app's sessions join it.

    Yields a session on the outer connection (it sees what the app committed during the test), made with the
    Database's session options (``autoflush=False``, ``expire_on_commit=False`` unless the Database says
    otherwise). Async tests only (``@pytest.mark.anyio``): the connection is opened on the test's event loop,
    where an ``httpx.ASGITransport`` (or ``db_client``) runs the app.
    """
    async with outer_transaction(_as_database(database)) as session:
        yield session


@pytest.fixture
async def db_client(app: Any, db_session: AsyncSession) -> AsyncIterator[httpx.AsyncClient]:
    """An ``httpx.AsyncClient`` for your ``app`` fixture, its lifespan run, inside ``db_session``'s transaction.

    On the test's event loop: the app's lifespan startup runs (asgi-lifespan's ``LifespanManager``) after the
    transaction began, and its shutdown before the rollback; requests go through ``httpx.ASGITransport``.
    """
    try:
        import httpx
        from asgi_lifespan import LifespanManager
    except ImportError as exc:
        raise ImportError(TESTING_EXTRA_MISSING.format(module=exc.name)) from None

    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://testserver") as client,
    ):
        yield client
