"""The service layer every framework app calls: it reaches the request's session with current_session() alone,
knowing nothing of the framework above it."""

from __future__ import annotations

import os

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from asgi_db_session import current_session

__all__ = ["CREATE_TABLE", "TABLE", "add_item", "count_items", "sleep_in_database", "write"]

# One table per test process (a server process is told the test's table in FRAMEWORKS_TABLE): two runs against
# the same PostgreSQL server do not see each other's rows. The unique constraint is checked at COMMIT, so that
# /duplicate fails there, after the app has chosen its 201.
TABLE = os.environ.get("FRAMEWORKS_TABLE", f"adbs_frameworks_{os.getpid()}")
CREATE_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} "
    "(id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL UNIQUE DEFERRABLE INITIALLY DEFERRED)"
)


async def add_item(name: str) -> AsyncSession:
    """Insert a row named ``name`` in the current session (not committed here); that session."""
    session = current_session()
    await session.execute(text(f"INSERT INTO {TABLE} (name) VALUES (:name)"), {"name": name})
    return session


async def count_items() -> int:
    """How many rows the current session sees."""
    count: int = (await current_session().execute(text(f"SELECT count(*) FROM {TABLE}"))).scalar_one()
    return count


async def sleep_in_database(seconds: float = 60) -> None:
    """A statement that keeps the current session's connection busy for ``seconds``."""
    await current_session().execute(text("SELECT pg_sleep(:seconds)"), {"seconds": seconds})


async def write(name: str) -> str:
    """What POST /write does: a row, then a count, through two calls that must reach the same session."""
    session = await add_item(name)
    await count_items()
    return "one session" if session is current_session() else "two sessions"
