"""What every benchmarked app shares: the database, the engine settings, the table and the route bodies.

The apps differ only in how an endpoint gets its session (and, for the FastAPI ones, in the framework);
the statements they run, the bodies they return and the engine they run them on are defined here, once.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import asyncpg
from sqlalchemy import Column, Integer, MetaData, Table, Text, delete, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"

METADATA = MetaData()
ITEMS = Table(
    "bench_items",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("name", Text, nullable=False),
)
SEED_ROWS = 100
READ_ID = 42
STREAM_CHUNKS = 3
TEN_QUERIES = 10
# Rows that /insert adds get ids from here up; seed rows stay below it, so cleaning is one DELETE.
INSERT_FIRST_ID = 1_000_000

NODB_ROUTE = "/nodb"
# /session opens the request's session (or, by hand, enters and leaves `async with factory()`) and runs
# no statement: the cost of the session's life cycle alone.
# /stream comes last: a peer that leaks connections there cannot starve the routes measured after it.
DB_ROUTES = ("/session", "/read", "/insert", "/ten", "/stream")
ROUTES = (NODB_ROUTE, *DB_ROUTES)
# Routes that run no statement: fast enough to need more requests for a stable figure.
NO_QUERY_ROUTES = (NODB_ROUTE, "/session")
METHODS = {"/insert": "POST"}
# The sweep's routes (sweep.py): /queries/N runs N SELECTs by primary key in one session. Not in ROUTES.
SWEEP_QUERY_COUNTS = (1, 10, 100)


def queries_path(count: int) -> str:
    return f"/queries/{count}"


def _queried_id(index: int) -> int:
    """The id the index-th query of /queries/N reads (0-based): the seed rows in turn."""
    return index % SEED_ROWS + 1


def item_name(item_id: int) -> str:
    return f"item-{item_id}"


EXPECTED_BODY: dict[str, bytes] = {
    "/nodb": b"ok",
    "/session": b"ok",
    "/read": item_name(READ_ID).encode(),
    "/insert": b"ok",
    "/stream": b"".join(f"{item_name(i)}\n".encode() for i in range(1, STREAM_CHUNKS + 1)),
    "/ten": item_name(TEN_QUERIES).encode(),
    **{queries_path(count): item_name(_queried_id(count - 1)).encode() for count in SWEEP_QUERY_COUNTS},
}


def git_state() -> dict[str, str | bool | None]:
    """The commit the benchmark ran on, and whether asgi_db_session/ had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", *args], capture_output=True, text=True, check=False, cwd=root)
        except OSError:
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    status = git("status", "--porcelain", "--", "asgi_db_session")
    return {"commit": commit, "package_modified": None if status is None else bool(status)}


def database_url() -> str:
    """``BENCH_DATABASE_URL``, or the local PostgreSQL database ``test``."""
    return os.environ.get("BENCH_DATABASE_URL", DEFAULT_URL)


@dataclass(frozen=True)
class EngineSettings:
    """The one engine configuration every app gets (each app builds its own engine from it)."""

    url: str
    pool_size: int = 32
    max_overflow: int = 0
    pool_pre_ping: bool = False
    pool_timeout: float = 10.0

    def create_engine(self) -> AsyncEngine:
        return create_async_engine(
            self.url,
            pool_size=self.pool_size,
            max_overflow=self.max_overflow,
            pool_pre_ping=self.pool_pre_ping,
            pool_timeout=self.pool_timeout,
        )

    def as_dict(self) -> dict[str, Any]:
        # The URL may carry a password; the results file keeps only what is needed to compare runs.
        data = asdict(self)
        data["url"] = self.url.split("@")[-1]
        return data

    def to_env(self) -> dict[str, str]:
        return {
            "BENCH_DATABASE_URL": self.url,
            "BENCH_POOL_SIZE": str(self.pool_size),
            "BENCH_MAX_OVERFLOW": str(self.max_overflow),
            "BENCH_POOL_PRE_PING": "1" if self.pool_pre_ping else "0",
            "BENCH_POOL_TIMEOUT": str(self.pool_timeout),
        }

    @classmethod
    def from_env(cls) -> EngineSettings:
        return cls(
            url=database_url(),
            pool_size=int(os.environ.get("BENCH_POOL_SIZE", "32")),
            max_overflow=int(os.environ.get("BENCH_MAX_OVERFLOW", "0")),
            pool_pre_ping=os.environ.get("BENCH_POOL_PRE_PING", "0") == "1",
            pool_timeout=float(os.environ.get("BENCH_POOL_TIMEOUT", "10")),
        )


# Session options every app uses (the ones asgi_db_session defaults to).
SESSION_OPTIONS: dict[str, Any] = {"expire_on_commit": False, "autoflush": False}


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, **SESSION_OPTIONS)


class InsertIds(Protocol):
    """Where /insert takes the primary key of its row from."""

    def next(self) -> int: ...


class _Ids:
    """Unique primary keys for /insert; HTTP servers get a distinct start each, through BENCH_INSERT_BASE."""

    def __init__(self) -> None:
        self._counter: Iterator[int] = itertools.count(int(os.environ.get("BENCH_INSERT_BASE", INSERT_FIRST_ID)))

    def next(self) -> int:
        return next(self._counter)


_ids: InsertIds = _Ids()


def use_insert_ids(ids: InsertIds) -> None:
    """Take /insert's ids from ``ids`` from now on: fault_apps.py takes the id each client sends, so that the
    client can look its write up in the table afterwards."""
    global _ids
    _ids = ids


# ---- the work each route does with its session --------------------------------------------------------


async def _name(session: AsyncSession, item_id: int) -> str:
    name = await session.scalar(select(ITEMS.c.name).where(ITEMS.c.id == item_id))
    if name is None:
        raise LookupError(f"bench_items has no row {item_id}: run the benchmark's table setup")
    return str(name)


async def read_one(session: AsyncSession) -> bytes:
    return (await _name(session, READ_ID)).encode()


async def insert_one(session: AsyncSession) -> bytes:
    """Insert one row; the caller (or the middleware) commits."""
    item_id = _ids.next()
    await session.execute(insert(ITEMS).values(id=item_id, name=item_name(item_id)))
    return b"ok"


async def read_ten(session: AsyncSession) -> bytes:
    name = ""
    for item_id in range(1, TEN_QUERIES + 1):
        name = await _name(session, item_id)
    return name.encode()


async def read_many(session: AsyncSession, count: int) -> bytes:
    """``count`` SELECTs by primary key (the route /queries/{count})."""
    name = ""
    for index in range(count):
        name = await _name(session, _queried_id(index))
    return name.encode()


async def stream_chunks(session: AsyncSession) -> AsyncIterator[bytes]:
    """One query per chunk, run while the response is being sent."""
    for item_id in range(1, STREAM_CHUNKS + 1):
        yield f"{await _name(session, item_id)}\n".encode()


# ---- table setup ---------------------------------------------------------------------------------------


async def prepare_table(url: str) -> None:
    """Create ``bench_items`` if needed and leave exactly the seed rows in it."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(METADATA.create_all)
            await connection.execute(delete(ITEMS))
            await connection.execute(insert(ITEMS), [{"id": i, "name": item_name(i)} for i in range(1, SEED_ROWS + 1)])
    finally:
        await engine.dispose()


async def clean_inserted(url: str) -> int:
    """Delete the rows /insert added; returns how many there were."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            result = await connection.execute(delete(ITEMS).where(ITEMS.c.id >= INSERT_FIRST_ID))
            return int(result.rowcount)
    finally:
        await engine.dispose()


async def recreate_database(server_dsn: str, name: str) -> None:
    """A new, empty database ``name`` on the server of ``server_dsn`` (a plain asyncpg DSN): a benchmark's own."""
    connection = await asyncpg.connect(server_dsn)
    try:
        await connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await connection.execute(f"CREATE DATABASE {name}")
    finally:
        await connection.close()


async def drop_database(server_dsn: str, name: str) -> None:
    connection = await asyncpg.connect(server_dsn)
    try:
        await connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await connection.close()
