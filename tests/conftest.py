"""Fixtures: every behaviour test runs on PostgreSQL (asyncpg) and on SQLite (aiosqlite).

Rows are read back through a second connection that does not go through SQLAlchemy (asyncpg directly,
or the standard library's sqlite3), so that a test sees what the database really holds.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from asgi_db_session import Database, DatabaseSettings
from asgi_db_session._types import ASGIApp

from .models import TABLE

PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
PG_DSN = PG_URL.replace("postgresql+asyncpg://", "postgresql://")
# What the default bounds (docs/how-to/timeouts.md) add to asyncpg's connect arguments: its connect timeout and
# its client-side command timeout.
DEFAULT_BOUNDS = {"timeout": 5.0, "command_timeout": 10.0}
CREATE_TABLE = f"CREATE TABLE IF NOT EXISTS {TABLE} (id INTEGER PRIMARY KEY, name VARCHAR(100) NOT NULL UNIQUE)"


@pytest.fixture
def anyio_backend() -> str:
    # SQLAlchemy's asyncio extension runs on asyncio only.
    return "asyncio"


def _pg_unreachable_reason() -> str | None:
    async def probe() -> None:
        connection = await asyncpg.connect(PG_DSN, timeout=5)
        await connection.close()

    try:
        # In a thread of its own: this may be reached from inside a running event loop.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, probe()).result()
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"PostgreSQL at {PG_DSN} does not answer ({type(exc).__name__}: {exc})"
    return None


@pytest.fixture(scope="session")
def postgresql_dsn() -> Iterator[str]:
    """The DSN of the test PostgreSQL server; fails the test when CI is set and it does not answer."""
    reason = _pg_unreachable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the PostgreSQL tests must run. Start the server (.ci/run does).")
        pytest.skip(f"{reason}; start it (pg_ctlcluster ... main start) or set TEST_DATABASE_URL")
    yield PG_DSN

    async def drop_table() -> None:
        connection = await asyncpg.connect(PG_DSN)
        try:
            await connection.execute(f"DROP TABLE IF EXISTS {TABLE}")
        finally:
            await connection.close()

    asyncio.run(drop_table())


@dataclass
class Backend:
    """One database under test, and a second connection to check what it holds."""

    name: str
    url: str
    dsn: str

    async def execute(self, sql: str, *args: Any) -> None:
        if self.name == "postgresql":
            connection = await asyncpg.connect(self.dsn)
            try:
                await connection.execute(sql, *args)
            finally:
                await connection.close()
        else:
            with closing(sqlite3.connect(self.dsn)) as connection, connection:
                connection.execute(sql.replace("$1", "?"), args)

    async def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        if self.name == "postgresql":
            connection = await asyncpg.connect(self.dsn)
            try:
                return [tuple(row) for row in await connection.fetch(sql)]
            finally:
                await connection.close()
        with closing(sqlite3.connect(self.dsn)) as connection:
            return list(connection.execute(sql).fetchall())

    async def names(self) -> list[str]:
        """The names stored in the items table, sorted, as a second connection sees them."""
        return sorted(row[0] for row in await self.fetch(f"SELECT name FROM {TABLE}"))


@pytest.fixture(params=["postgresql", "sqlite"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each behaviour test runs once per backend, on an empty items table."""
    if request.param == "postgresql":
        dsn = request.getfixturevalue("postgresql_dsn")
        selected = Backend("postgresql", PG_URL, dsn)
        connection = await asyncpg.connect(dsn)
        try:
            # A leaked transaction from an earlier test would block TRUNCATE forever; fail fast instead.
            await connection.execute("SET lock_timeout = '5s'")
            await connection.execute(CREATE_TABLE)
            await connection.execute(f"TRUNCATE {TABLE}")
        finally:
            await connection.close()
    else:
        path = tmp_path / "test.db"
        selected = Backend("sqlite", f"sqlite+aiosqlite:///{path}", str(path))
        await selected.execute(CREATE_TABLE)
    return selected


@asynccontextmanager
async def database_named(backend: Backend, prefix: str, **options: Any) -> AsyncIterator[Database]:
    """A Database on ``backend`` whose PostgreSQL connections carry an application_name of their own
    (``prefix``-...), for tests that look for their backends; at the end every connection must be back in the
    pool, and the pool is disposed."""
    if backend.name == "postgresql":
        options["application_name"] = f"{prefix}-{uuid.uuid4().hex[:12]}"
    db = Database(settings=DatabaseSettings(url=backend.url, **options))
    try:
        yield db
        assert db.engine.pool.checkedout() == 0, "a connection was not returned to the pool"  # type: ignore[attr-defined]
    finally:
        await db.dispose()


@pytest.fixture
async def database(backend: Backend) -> AsyncIterator[Database]:
    """The default Database on the backend; at teardown every connection must be back in the pool."""
    db = Database(backend.url)
    yield db
    if db._engine is not None:
        assert db.engine.pool.checkedout() == 0, "a connection was not returned to the pool"  # type: ignore[attr-defined]
    await db.dispose()


def client(app: ASGIApp, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    """An httpx client that calls ``app`` in this test's event loop (no lifespan: httpx sends none).

    With ``raise_app_exceptions=False`` it returns the response the app sent before raising.
    """
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'plain.db'}"
