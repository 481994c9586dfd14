"""The app the README's quick start shows, for the tests that run it under a real server.

``app.add_middleware(DBSessionMiddleware)`` with no arguments: everything comes from ``DATABASE_*``, and
Starlette builds the middleware (so reads those variables) at the first ASGI call, in the server's worker.
/ answers through current_session(); /healthz is the package's health endpoint.
"""

from __future__ import annotations

from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_db_session import DBSessionMiddleware, current_session
from asgi_db_session.health import health_endpoint


async def backend_pid(request: Request) -> Response:
    return PlainTextResponse(str(await current_session().scalar(text("SELECT pg_backend_pid()"))))


app = Starlette(routes=[Route("/", backend_pid), Route("/healthz", health_endpoint())])
app.add_middleware(DBSessionMiddleware)
