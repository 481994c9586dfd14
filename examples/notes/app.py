"""The application factory."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware

from asgi_db_session import Database, DBSessionMiddleware

from .metrics import meter_provider
from .models import create_tables
from .routes import exception_handlers, routes

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./notes.db"

logger = logging.getLogger(__name__)


def notes_database(database_url: str | None = None) -> tuple[Database, str]:
    """The Database on ``database_url``, else on ``DATABASE_URL``, else on SQLite in ``./notes.db``; and where
    the URL came from, for the log.

    Other ``DATABASE_*`` variables (pool size, timeouts, ...) are read from the environment in every case.
    """
    if database_url is not None:
        source = "given to create_app()"
    elif os.environ.get("DATABASE_URL"):
        database_url, source = os.environ["DATABASE_URL"], "from DATABASE_URL"
    else:
        database_url, source = DEFAULT_DATABASE_URL, "the default; set DATABASE_URL to use another database"
    # The commit policy goes on the Database, where the middleware reads it, so that session_scope() blocks
    # (a script, a worker) follow it too; given to the middleware alone, it would apply to requests only.
    # Its pool metrics go to /metrics (metrics.py).
    return Database(database_url, commit_on_success=True, meter_provider=meter_provider()), source


def notes_lifespan(database: Database, source: str) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    """The demos' lifespan: log the database (without its password) and create the table if it is missing."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        logger.info("Notes database: %s (%s)", database.redacted_url, source)
        async with database.engine.begin() as connection:
            await connection.run_sync(create_tables)
        yield
        # Nothing to close here: the middleware disposes the engine at shutdown.

    return lifespan


def create_app(database_url: str | None = None) -> Starlette:
    """The notes app on ``database_url``, else on ``DATABASE_URL``, else on SQLite in ``./notes.db``."""
    # Built here rather than by the middleware so that the health check can reach it through app.state.
    database, source = notes_database(database_url)
    app = Starlette(
        routes=routes,
        exception_handlers=exception_handlers,
        middleware=[Middleware(DBSessionMiddleware, database=database)],
        lifespan=notes_lifespan(database, source),
    )
    app.state.database = database
    return app
