"""A Starlette app for the tests that run a real server: ``uvicorn tests.system.server_app:app``.

Configured from the environment: ``DATABASE_*`` for the database (``DATABASE_URL`` is required), and

- ``SERVER_APP_TABLE``: the table that /idle and /write insert into (``id bigserial, name text``);
- ``SERVER_APP_CANCEL_ON_DISCONNECT=1``: cancel a request when its client goes away, which uvicorn does not
  do by itself (it lets the request run on and drops its response);
- ``SERVER_APP_TRACEMALLOC=1``: trace Python allocations from import on, for /stats;
- ``SERVER_APP_QUERY_AT_IMPORT=1``: run one query through the engine while importing, as an app that runs
  ``create_all`` at import time does: under ``gunicorn --preload`` that happens in the parent, before the fork.

The app object is created at import time, as most apps are: under ``gunicorn --preload`` in the parent
process, before the workers are forked.

Routes: /sleep (``pg_sleep``), /idle (an insert, then a long wait with the transaction open), /stream-sleep
(``pg_sleep`` inside a streaming body, which Starlette itself cancels when the client goes away), /write
(an insert the middleware commits), /write-pair and /stream-pair (two inserts with a wait between them, in
the endpoint or in a streaming body), /read, /pid (this process and its PostgreSQL backend), /fail-with (a
statement that fails, with the request's body as its parameter: what escapes to the server's log), and /stats
(pool and session counts, memory) that never touches the database.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import resource
import sys
import tracemalloc
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import QueuePool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_db_session import Database, DBSessionMiddleware, current_session
from asgi_db_session._types import ASGIApp, Message, Receive, Scope, Send

TABLE = os.environ.get("SERVER_APP_TABLE", "adbs_server_items")
PAGE_SIZE = resource.getpagesize()


class SessionGauge:
    """How many sessions exist: created and not yet closed (``open``), and not yet garbage (``alive``)."""

    def __init__(self) -> None:
        self.open = 0
        self.peak = 0
        self.created = 0
        self.alive = 0

    def opened(self) -> None:
        self.created += 1
        self.alive += 1
        self.open += 1
        self.peak = max(self.peak, self.open)

    def closed(self) -> None:
        self.open -= 1

    def collected(self) -> None:
        self.alive -= 1


GAUGE = SessionGauge()


class PoolCounts:
    """New DBAPI connections, invalidated ones (a cleanup cut short throws its connection away) and closed
    ones: connects minus closes is how many connections this process has open, whatever the pool's records."""

    def __init__(self) -> None:
        self.connects = 0
        self.invalidations = 0
        self.closes = 0

    def on_connect(self, dbapi_connection: Any, record: Any) -> None:
        self.connects += 1

    def on_close(self, dbapi_connection: Any, record: Any) -> None:
        self.closes += 1

    def on_invalidate(self, dbapi_connection: Any, record: Any, exception: BaseException | None) -> None:
        self.invalidations += 1


POOL_COUNTS = PoolCounts()


class CountedSession(AsyncSession):
    """An AsyncSession that GAUGE counts from its creation to its first ``close()``, and until it is freed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counted_open = True
        GAUGE.opened()
        weakref.finalize(self, GAUGE.collected)

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            if self.counted_open:
                self.counted_open = False
                GAUGE.closed()


class CancelOnDisconnect:
    """Cancel an HTTP request (with an anyio cancel scope, as Starlette does) once its client has gone away.

    A watcher task reads the server's ``receive`` and passes every message on to the app through a buffer;
    when ``http.disconnect`` comes before the app is done, it cancels the app.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        to_app, from_server = anyio.create_memory_object_stream[Message](math.inf)
        with to_app, from_server:
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    while True:
                        message = await receive()
                        to_app.send_nowait(message)
                        if message["type"] == "http.disconnect":
                            group.cancel_scope.cancel()
                            return

                group.start_soon(watch)
                await self.app(scope, from_server.receive, send)
                group.cancel_scope.cancel()


def _seconds(request: Request, default: float) -> float:
    return float(request.query_params.get("seconds", default))


async def sleep(request: Request) -> Response:
    await current_session().execute(text("SELECT pg_sleep(:seconds)"), {"seconds": _seconds(request, 5)})
    return PlainTextResponse("slept")


async def idle(request: Request) -> Response:
    await current_session().execute(text(f"INSERT INTO {TABLE} (name) VALUES ('idle')"))
    await asyncio.sleep(_seconds(request, 30))  # the transaction stays open, idle, meanwhile
    return PlainTextResponse("idled")


async def stream_sleep(request: Request) -> Response:
    seconds = _seconds(request, 5)

    async def body() -> AsyncIterator[bytes]:
        yield b"sleeping\n"
        await current_session().execute(text("SELECT pg_sleep(:seconds)"), {"seconds": seconds})
        yield b"slept\n"

    return StreamingResponse(body(), media_type="text/plain")


async def write_pair(request: Request) -> Response:
    """Two rows named ``name`` in one transaction, with ``pg_sleep`` between them: a second connection sees
    both or neither, never one."""
    name = request.query_params["name"]
    session = current_session()
    await session.execute(text(f"INSERT INTO {TABLE} (name) VALUES (:name)"), {"name": name})
    await session.execute(text("SELECT pg_sleep(:seconds)"), {"seconds": _seconds(request, 1)})
    await session.execute(text(f"INSERT INTO {TABLE} (name) VALUES (:name)"), {"name": name})
    return PlainTextResponse("written")


async def stream_pair(request: Request) -> Response:
    """As /write-pair, in a streaming body: a row, the first chunk, a wait (``pg_sleep``, or with
    ``?wait=loop`` an asyncio sleep with the transaction idle), the second row, the last chunk."""
    name = request.query_params["name"]
    seconds = _seconds(request, 1)
    in_loop = request.query_params.get("wait") == "loop"

    async def body() -> AsyncIterator[bytes]:
        session = current_session()
        await session.execute(text(f"INSERT INTO {TABLE} (name) VALUES (:name)"), {"name": name})
        yield b"first\n"
        if in_loop:
            await asyncio.sleep(seconds)
        else:
            await session.execute(text("SELECT pg_sleep(:seconds)"), {"seconds": seconds})
        await session.execute(text(f"INSERT INTO {TABLE} (name) VALUES (:name)"), {"name": name})
        yield b"second\n"

    return StreamingResponse(body(), media_type="text/plain")


async def write(request: Request) -> Response:
    result = await current_session().execute(text(f"INSERT INTO {TABLE} (name) VALUES ('written') RETURNING id"))
    return JSONResponse({"id": result.scalar_one()})


async def read(request: Request) -> Response:
    result = await current_session().execute(text(f"SELECT id FROM {TABLE} ORDER BY id DESC LIMIT 1"))
    return JSONResponse({"id": result.scalar_one_or_none()})


async def pid(request: Request) -> Response:
    # Holding the connection a little makes concurrent requests spread over the workers.
    result = await current_session().execute(
        text("SELECT pg_backend_pid() FROM pg_sleep(:seconds)"), {"seconds": _seconds(request, 0)}
    )
    return JSONResponse({"pid": os.getpid(), "backend_pid": result.scalar_one()})


async def fail_with(request: Request) -> Response:
    # Division by zero: the server's message does not repeat the parameter; only SQLAlchemy's text could.
    parameter = (await request.body()).decode()
    await current_session().execute(text("SELECT CAST(:parameter AS text), 1 / 0"), {"parameter": parameter})
    raise AssertionError("not reached")  # pragma: no cover


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


async def stats(request: Request) -> Response:
    """Counts of this process; ``?gc=1`` collects garbage first, ``?reset_peak=1`` restarts the session peak."""
    if request.query_params.get("gc"):
        gc.collect()
    pool = database.engine.pool
    assert isinstance(pool, QueuePool)
    body = {
        "pid": os.getpid(),
        "checkedout": pool.checkedout(),
        "checkedin": pool.checkedin(),
        "connects": POOL_COUNTS.connects,
        "invalidations": POOL_COUNTS.invalidations,
        # An invalidated connection's record stays in the pool (checkedin) without a connection.
        "connections_open": POOL_COUNTS.connects - POOL_COUNTS.closes,
        "sessions_open": GAUGE.open,
        "sessions_peak": GAUGE.peak,
        "sessions_created": GAUGE.created,
        "sessions_alive": GAUGE.alive,
        "traced_bytes": tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None,
        "rss_bytes": _rss_bytes(),
    }
    if request.query_params.get("reset_peak"):
        GAUGE.peak = GAUGE.open
    return JSONResponse(body)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    # The middleware has created the engine by now (its startup runs first), in this process: the worker.
    engine = database.engine.sync_engine
    event.listen(engine, "connect", POOL_COUNTS.on_connect)
    event.listen(engine, "invalidate", POOL_COUNTS.on_invalidate)
    event.listen(engine, "close", POOL_COUNTS.on_close)
    yield


def create_app() -> Starlette:
    """The app, on the module's ``database``."""
    app = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/sleep", sleep),
            Route("/idle", idle),
            Route("/stream-sleep", stream_sleep),
            Route("/write", write, methods=["POST"]),
            Route("/write-pair", write_pair),
            Route("/stream-pair", stream_pair),
            Route("/read", read),
            Route("/pid", pid),
            Route("/fail-with", fail_with, methods=["POST"]),
            Route("/stats", stats),
        ],
    )
    app.add_middleware(DBSessionMiddleware, database=database)
    if os.environ.get("SERVER_APP_CANCEL_ON_DISCONNECT") == "1":
        app.add_middleware(CancelOnDisconnect)
    return app


async def _query_at_import() -> None:
    async with database.engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


if os.environ.get("SERVER_APP_TRACEMALLOC") == "1":
    tracemalloc.start()
# Created here, as an app that runs create_all at import time must: DBSessionMiddleware itself is built only
# when Starlette builds its middleware stack, at the first ASGI call (the lifespan startup, in the worker).
database = Database(commit_on_success=True, session_options={"class_": CountedSession})
app = create_app()
print(f"server_app: app created in process {os.getpid()}", file=sys.stderr, flush=True)
if os.environ.get("SERVER_APP_QUERY_AT_IMPORT") == "1":
    asyncio.run(_query_at_import())
