"""The apps that benchmarks/faults.py runs under uvicorn: ``uvicorn --factory benchmarks.fault_apps:create_app``.

``FAULT_APP`` picks one of ``FAULT_APPS``. The database is ``DATABASE_URL`` (the fault proxy), and every
connection carries ``DATABASE_APPLICATION_NAME``, so that the runner finds the app's backends in
``pg_stat_activity``. The endpoints are the throughput benchmark's (``apps.py``, ``fastapi_apps.py``): ``/read``
and ``/insert``, which commits. Around each app sits a harness that takes the id of ``POST /insert?id=N`` from
the client (so that the client can look its write up in the table afterwards) and answers ``GET /pool`` (the
engine's checked-out connections) without the database.

How each app gets its engine:

- asgi_db_session: ``DBSessionMiddleware(database=Database())``, everything from ``DATABASE_*`` as a user's app
  would read it: the package's defaults, plus what the app's ``env`` sets (the commit outcome check, tighter
  bounds);
- the hand-written app and the peers: ``create_async_engine(DATABASE_URL)`` with SQLAlchemy's and asyncpg's own
  defaults, as their users get them (pool of 5 + 10, 30 s pool timeout, no pre-ping, 60 s connect timeout, no
  command timeout); ``handwritten-timeouts`` sets every bound by hand to the package's defaults instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_db_session.settings import (
    DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_COMMIT_OUTCOME_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_POOL_TIMEOUT,
)

from .apps import APPS, HANDWRITTEN, _middleware_routes
from .common import EngineSettings, use_insert_ids

# SQLAlchemy gives a connection whose pre-ping got no answer this long to close gracefully, inside the request
# (docs/how-to/timeouts.md).
GRACEFUL_CLOSE_SECONDS = 2.0


def documented_bound(pool_timeout: float, connect_timeout: float, command_timeout: float) -> float:
    """docs/how-to/timeouts.md: the longest a request waits on a database that has gone silent."""
    return pool_timeout + max(connect_timeout, command_timeout + GRACEFUL_CLOSE_SECONDS)


DEFAULT_BOUND = documented_bound(DEFAULT_POOL_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_COMMAND_TIMEOUT)
# The tighter bounds of tests/system/test_network_faults.py.
TIGHT_ENV = {
    "DATABASE_COMMIT_OUTCOME_TIMEOUT": "1",
    "DATABASE_CONNECT_TIMEOUT": "1",
    "DATABASE_COMMAND_TIMEOUT": "1",
    "DATABASE_POOL_TIMEOUT": "2",
    "DATABASE_CLEANUP_TIMEOUT": "1",
}


@dataclass(frozen=True)
class FaultApp:
    key: str
    description: str
    env: dict[str, str] = field(default_factory=dict)
    """What the server process gets besides DATABASE_URL and DATABASE_APPLICATION_NAME."""
    bound: float | None = None
    """The longest a request may wait on a silent database by the bounds the app runs with; None: unbounded."""
    outcome_seconds: float = 0.0
    """What the outcome check may add to a write's bound: asking what became of a COMMIT whose answer was lost."""
    peer: str | None = None
    """The key in apps.APPS of a hand-written or peer app; None: asgi_db_session from DATABASE_*."""
    timeouts: bool = False
    """A peer's engine with every bound set by hand, to the package's defaults."""


FAULT_APPS: dict[str, FaultApp] = {
    app.key: app
    for app in (
        FaultApp(
            "asgi-db-session",
            "asgi_db_session, the package's defaults",
            bound=DEFAULT_BOUND,
            outcome_seconds=DEFAULT_COMMIT_OUTCOME_TIMEOUT,
        ),
        FaultApp(
            "asgi-db-session-nocheck",
            "the same with DATABASE_COMMIT_OUTCOME_CHECK=false",
            env={"DATABASE_COMMIT_OUTCOME_CHECK": "false"},
            bound=DEFAULT_BOUND,
        ),
        FaultApp(
            "asgi-db-session-tight",
            "the defaults with connect and command timeouts 1 s, pool timeout 2 s, cleanup 1 s, outcome check 1 s",
            env=TIGHT_ENV,
            bound=documented_bound(2.0, 1.0, 1.0),
            outcome_seconds=1.0,
        ),
        FaultApp(
            HANDWRITTEN, "`async with session_factory()` in each endpoint, SQLAlchemy's defaults", peer=HANDWRITTEN
        ),
        FaultApp(
            "handwritten-timeouts",
            "the same, every bound set by hand as the package's defaults (connect 5 s, command 10 s, pool 10 s, "
            "pre-ping)",
            bound=DEFAULT_BOUND,
            peer=HANDWRITTEN,
            timeouts=True,
        ),
        FaultApp("fastapi-depends", "FastAPI `Depends(get_db)`, SQLAlchemy's defaults", peer="fastapi-depends"),
        FaultApp(
            "fastapi-async-sqlalchemy",
            "fastapi-async-sqlalchemy's middleware, SQLAlchemy's defaults",
            peer="fastapi-async-sqlalchemy",
        ),
        FaultApp(
            "advanced-alchemy", "advanced-alchemy's Starlette extension, SQLAlchemy's defaults", peer="advanced-alchemy"
        ),
    )
}


# ---- the harness: client-chosen ids for /insert, and /pool ------------------------------------------------------

_write_id: ContextVar[int] = ContextVar("fault_write_id")


class _RequestedIds:
    """/insert's id: the one its client sent (the harness has put it in ``_write_id``)."""

    def next(self) -> int:
        return _write_id.get()


class _Harness:
    def __init__(self, app: ASGIApp, engine: Callable[[], AsyncEngine]) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/pool":
            pool: Any = self.engine().pool
            body = json.dumps({"checkedout": pool.checkedout()}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["path"] == "/insert":
            ids = parse_qs(scope["query_string"].decode()).get("id")
            if ids:
                token = _write_id.set(int(ids[0]))
                try:
                    await self.app(scope, receive, send)
                finally:
                    _write_id.reset(token)
                return
        await self.app(scope, receive, send)


# ---- the engines -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PeerEngine(EngineSettings):
    """What a peer's builder calls ``create_engine()`` on: the engine as its users get it (the pool options of
    EngineSettings are not used), named in pg_stat_activity, and kept for /pool."""

    application_name: str = ""
    timeouts: bool = False
    made: list[AsyncEngine] = field(default_factory=list, compare=False)

    def create_engine(self) -> AsyncEngine:
        connect_args: dict[str, Any] = {"server_settings": {"application_name": self.application_name}}
        options: dict[str, Any] = {}
        if self.timeouts:
            connect_args.update(timeout=DEFAULT_CONNECT_TIMEOUT, command_timeout=DEFAULT_COMMAND_TIMEOUT)
            options.update(pool_timeout=DEFAULT_POOL_TIMEOUT, pool_pre_ping=True)
        engine = create_async_engine(self.url, connect_args=connect_args, **options)
        self.made.append(engine)
        return engine


def _build_package() -> tuple[ASGIApp, Callable[[], AsyncEngine]]:
    from asgi_db_session import Database, DBSessionMiddleware, current_session

    database = Database()  # DatabaseSettings() from DATABASE_*

    def get_session(request: Request) -> AsyncSession:
        return current_session()

    app = Starlette(routes=_middleware_routes(get_session, commit=True))
    app.add_middleware(DBSessionMiddleware, database=database)
    return app, lambda: database.engine


def _build_peer(spec: FaultApp) -> tuple[ASGIApp, Callable[[], AsyncEngine]]:
    assert spec.peer is not None
    settings = _PeerEngine(
        url=os.environ["DATABASE_URL"],
        application_name=os.environ["DATABASE_APPLICATION_NAME"],
        timeouts=spec.timeouts,
    )
    app = APPS[spec.peer].build(settings)
    engine = settings.made[0]
    return app, lambda: engine


def create_app() -> ASGIApp:
    key = os.environ.get("FAULT_APP", "")
    if key not in FAULT_APPS:
        raise SystemExit(f"FAULT_APP={key!r} is not one of {', '.join(FAULT_APPS)}")
    spec = FAULT_APPS[key]
    use_insert_ids(_RequestedIds())
    app, engine = _build_package() if spec.peer is None else _build_peer(spec)
    return _Harness(app, engine)
