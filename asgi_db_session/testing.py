"""Test helpers: every test in a transaction that is rolled back, and a session of your choosing for a block.

Enable the fixtures in your root ``conftest.py``::

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
- ``db_session`` (async tests, anyio's ``@pytest.mark.anyio``): opens one connection, begins the outer
  transaction on it, and for the length of the test makes every new session of ``database`` (the app's
  request sessions, ``session_scope()`` blocks) join it through a SAVEPOINT, so app code may commit as it
  likes; yields a session on that connection for the test's own checks; rolls everything back at the end.
  Drive the app with ``httpx.AsyncClient(transport=httpx.ASGITransport(app))``, or call services directly.
- ``db_client`` (sync tests): a Starlette ``TestClient`` for your ``app`` fixture, already started (lifespan
  run), with the same outer transaction opened on the client's own event loop.

Functions, for your own fixtures: ``outer_transaction()`` (what ``db_session`` runs), ``outer_transaction_in()``
(the same on a started TestClient's loop) and ``override_session()``.

Why the TestClient needs its own entry point: TestClient runs the app on an event loop of its own, in another
thread, and an asyncpg connection works only on the loop it was opened on. The outer connection is therefore
opened through ``client.portal`` (anyio's ``BlockingPortal.wrap_async_context_manager``), which exists only
while the client is started: ``with TestClient(app) as client:``. A client used without ``with`` gives every
request a new event loop, and no connection can serve them all.

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

from ._context import ScopeState, scope_var
from .database import Database, get_database
from .exceptions import NoSessionError

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal
    from starlette.testclient import TestClient

__all__ = ["outer_transaction", "outer_transaction_in", "override_session"]

NOT_CREATED_YET = (
    "asgi_db_session.testing: no Database named {name!r} exists, and none could be made from the environment "
    "({reason}). Set DATABASE_URL for the tests, or create the app's Database yourself, pass it to the "
    "middleware (DBSessionMiddleware, database=db) and return it from a `database` fixture in your conftest.py."
)
NOT_STARTED = (
    "asgi_db_session.testing: the TestClient is not started. Use it as `with TestClient(app) as client:`; "
    "without `with`, every request runs on a new event loop and the test's connection cannot serve them."
)
NOT_A_DATABASE = "asgi_db_session.testing: the `database` fixture returned {value!r}; it must return a Database."


def _lookup(name: str) -> Database:
    """The Database named ``name``; made from the ``DATABASE_*`` environment when there is none yet.

    The app's own may not exist yet: ``app.add_middleware(DBSessionMiddleware)`` creates it at the app's first
    request. One the app creates inside the test's transaction joins that transaction as this one does.
    """
    try:
        return get_database(name)
    except NoSessionError:
        pass
    try:
        return Database(name=name)
    except ValueError as exc:
        raise LookupError(NOT_CREATED_YET.format(name=name, reason=exc)) from None


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
        raise RuntimeError(NOT_STARTED)
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
    var = scope_var(name)
    token = var.set(ScopeState(database, database.commit_on_success, session))
    try:
        yield session
    finally:
        var.reset(token)


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


@pytest.fixture
async def db_session(database: object) -> AsyncIterator[AsyncSession]:
    """The test inside one outer transaction, rolled back at its end; the app's sessions join it.

    Yields a session on the outer connection (it sees what the app committed during the test). Async tests
    only (``@pytest.mark.anyio``): the connection is opened on the test's event loop, where an
    ``httpx.ASGITransport`` runs the app. For Starlette's TestClient use ``db_client``.
    """
    async with outer_transaction(_as_database(database)) as session:
        yield session


@pytest.fixture
def db_client(app: Any, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    """A started Starlette ``TestClient`` for your ``app`` fixture, inside one outer transaction.

    The transaction is opened on the client's event loop after its lifespan startup (so a Database that the
    middleware creates at startup exists by then) and rolled back before its shutdown.
    """
    from starlette.testclient import TestClient

    with TestClient(app) as client:
        database = _as_database(request.getfixturevalue("database"))
        with outer_transaction_in(client, database):
            yield client
