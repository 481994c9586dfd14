"""Alembic environment: the app's database settings, an async engine, and Alembic running in ``run_sync``.

The URL and engine options come from ``DatabaseSettings()`` (``DATABASE_URL``, ``DATABASE_CONNECT_TIMEOUT``,
``DATABASE_SSL``, ...), so migrations connect exactly as the app does, with the same async driver (asyncpg,
aiosqlite). Alembic's migration code is synchronous: it runs inside ``AsyncConnection.run_sync()``, which
hands it a regular ``Connection`` backed by the async one.

``-x schema=NAME`` (PostgreSQL) runs the migrations, and keeps the version table, in that schema: one database
can then hold a set of tables per tenant, or per test run on a shared server. The schema must exist.

A program that runs Alembic itself (``asgi_db_session.testing.schema_from_alembic``, a test fixture) may hand
it a connection in ``config.attributes["connection"]``: the migrations then run on that one.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import MetaData
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_db_session import DatabaseSettings

# Your models, for `alembic revision --autogenerate`: change this import to your own models package.
from examples.notes.models import Base  # the demo's (examples/notes)

config = context.config
given_connection: Connection | None = config.attributes.get("connection")
if given_connection is None and config.config_file_name is not None:
    # Not when a program runs Alembic: its own logging stays as it is.
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata: MetaData = Base.metadata


def schema() -> str | None:
    return context.get_x_argument(as_dictionary=True).get("schema")


def run_migrations(connection: Connection) -> None:
    """Alembic's part, on the sync face of the async connection."""
    name = schema()
    if name is not None:
        quoted = connection.dialect.identifier_preparer.quote_identifier(name)
        connection.exec_driver_sql(f"SET search_path TO {quoted}")
        # SET began a transaction; end it, so that the one Alembic begins below is its own and is committed.
        connection.commit()
        connection.dialect.default_schema_name = name  # what autogenerate compares against
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    settings = DatabaseSettings()
    engine = create_async_engine(settings.engine_url(), **settings.engine_options())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


def run_offline() -> None:
    """``alembic upgrade head --sql``: print the SQL instead of running it (no connection needed)."""
    context.configure(
        url=DatabaseSettings().engine_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        name = schema()
        if name is not None:
            context.execute(f'SET search_path TO "{name}"')
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
elif given_connection is not None:
    run_migrations(given_connection)
else:
    asyncio.run(run_online())
