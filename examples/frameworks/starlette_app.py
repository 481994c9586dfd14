"""Starlette: the middleware list (or ``app.add_middleware``). Serve with
``uvicorn examples.frameworks.starlette_app:app``."""

from __future__ import annotations

from sqlalchemy import text
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_db_session import DBSessionMiddleware, current_session


async def count_tables() -> int:
    """A service function: it reaches the request's session without being handed it."""
    count: int = (await current_session().execute(text("SELECT count(*) FROM information_schema.tables"))).scalar_one()
    return count


async def tables(request: Request) -> Response:
    return JSONResponse({"tables": await count_tables()})


# Starlette's middleware stack sees the lifespan scope: the database is checked at startup and disposed at shutdown.
app = Starlette(routes=[Route("/", tables)], middleware=[Middleware(DBSessionMiddleware, commit_on_success=True)])
