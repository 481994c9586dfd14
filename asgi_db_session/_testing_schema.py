"""The tables for a test session: made from the models' MetaData or by Alembic, and removed afterwards.

Both helpers are synchronous context managers for a session-scoped fixture (``db_schema``). Their database
work runs on an event loop of its own, in a worker thread, so that they work wherever the fixture is set up;
the Database's pool is disposed after each step, since its connections belong to that loop.
"""

from __future__ import annotations

import asyncio
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import MetaData, Table, inspect
from sqlalchemy.engine import Connection

from .database import Database
from .exceptions import (
    ALEMBIC_ELSEWHERE,
    ALEMBIC_MISSING,
    AT_ANOTHER_REVISION,
    OWN_EVENT_LOOP,
    SEVERAL_HEADS,
    TABLES_EXIST,
    UsageError,
)

if TYPE_CHECKING:
    from alembic.config import Config

T = TypeVar("T")

# Alembic's default; an env.py that names another (version_table=) is not supported here.
VERSION_TABLE = "alembic_version"


def _run(database: Database, work: Callable[[Connection], T]) -> T:
    """``work`` on a sync face of one of the Database's connections, in one committed transaction."""

    async def run() -> T:
        try:
            async with database.engine.begin() as connection:
                return await connection.run_sync(work)
        finally:
            await database.dispose()

    # A thread of its own: asyncio.run() cannot start inside a running event loop.
    with ThreadPoolExecutor(1, thread_name_prefix="asgi-db-session-schema") as pool:
        return pool.submit(asyncio.run, run()).result()


@contextmanager
def schema_from_metadata(metadata: MetaData, database: Database) -> Iterator[None]:
    """Create ``metadata``'s tables in ``database`` for the block; drop them at its end.

    Tables that already exist are an error (TABLES_EXIST) rather than reused or dropped: reused, they may be
    of an older schema; dropped at the end, they would take rows that the tests did not write.
    """

    def create(connection: Connection) -> None:
        existing = [table.fullname for table in metadata.sorted_tables if _has_table(connection, table)]
        if existing:
            url = database.engine.url.render_as_string(hide_password=True)
            raise UsageError(TABLES_EXIST.format(url=url, tables=", ".join(existing)))
        metadata.create_all(connection)

    _run(database, create)
    try:
        yield
    finally:
        _run(database, metadata.drop_all)


def _has_table(connection: Connection, table: Table) -> bool:
    return inspect(connection).has_table(table.name, schema=table.schema)


@contextmanager
def schema_from_alembic(
    config: str | os.PathLike[str] | Config, database: Database, revision: str = "head"
) -> Iterator[None]:
    """``alembic upgrade revision`` on ``database`` for the block; back to where the database was at its end.

    The migrations run on a connection of ``database``, handed to env.py as ``config.attributes["connection"]``
    (Alembic's documented way to share a connection). At the end the database is downgraded to the revision
    it had before (``base`` when it had none), and a version table that the block created is dropped.
    """
    try:
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory
    except ImportError:
        raise ImportError(ALEMBIC_MISSING) from None
    if not isinstance(config, Config):
        config = Config(os.fspath(config))
    state: dict[str, Any] = {}

    def upgrade(connection: Connection) -> None:
        before = MigrationContext.configure(connection).get_current_heads()
        if len(before) > 1:
            raise UsageError(SEVERAL_HEADS.format(heads=before))
        state["before"] = before[0] if before else "base"
        state["had_version_table"] = inspect(connection).has_table(VERSION_TABLE)
        config.attributes["connection"] = connection
        _alembic_command(command.upgrade, config, revision)
        expected = ScriptDirectory.from_config(config).as_revision_number(revision)
        wanted = expected if isinstance(expected, tuple) else (expected,) if expected else ()
        found = MigrationContext.configure(connection).get_current_heads()
        if set(found) != set(wanted):
            url = database.engine.url.render_as_string(hide_password=True)
            detail = AT_ANOTHER_REVISION.format(revision=revision, url=url, found=found, expected=wanted)
            raise UsageError(ALEMBIC_ELSEWHERE.format(config=config.config_file_name, detail=detail))

    def downgrade(connection: Connection) -> None:
        config.attributes["connection"] = connection
        _alembic_command(command.downgrade, config, state["before"])
        if not state["had_version_table"]:
            Table(VERSION_TABLE, MetaData()).drop(connection, checkfirst=True)

    _run(database, upgrade)
    try:
        yield
    finally:
        _run(database, downgrade)
        config.attributes.pop("connection", None)


def _alembic_command(command: Callable[[Config, str], None], config: Config, revision: str) -> None:
    # An env.py that ignores the connection and runs asyncio.run() (Alembic's async template does) fails here,
    # inside the event loop that runs the connection; say what to change rather than show asyncio's words.
    failure: str | None = None
    with warnings.catch_warnings():
        # Its coroutine, never awaited, is collected when the error below is dropped.
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
        try:
            command(config, revision)
        except RuntimeError as exc:
            if "running event loop" not in str(exc):
                raise
            failure = str(exc)
    if failure is not None:
        detail = OWN_EVENT_LOOP.format(error=failure)
        raise UsageError(ALEMBIC_ELSEWHERE.format(config=config.config_file_name, detail=detail))
