"""The benchmarked apps, all serving the same routes with the same statements on the same engine settings.

Each builder takes the EngineSettings and returns an ASGI app that owns its engine and disposes it at
lifespan shutdown. Peers are imported inside their builder: one that is missing or broken makes only its
own column "n/a" (the runner reports why), never the whole run.

The three middleware apps on Starlette (fastapi-async-sqlalchemy, advanced-alchemy, asgi_db_session) share
one set of endpoints (``_middleware_routes``) and differ only in how an endpoint gets its session. The two
FastAPI apps (classic ``Depends(get_db)`` and asgi_db_session on FastAPI) compare on FastAPI's own overhead.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .common import (
    SESSION_OPTIONS,
    EngineSettings,
    insert_one,
    read_many,
    read_one,
    read_ten,
    session_factory,
    stream_chunks,
)
from .fastapi_apps import build_asgi_db_session_fastapi, build_fastapi_depends

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

OK = b"ok"
TEXT = "text/plain"


def _disposing(engine: AsyncEngine) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    """A lifespan that disposes ``engine`` at shutdown (what an app that owns its engine does)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await engine.dispose()

    return lifespan


async def nodb(request: Request) -> Response:
    return PlainTextResponse(OK)


# ---- (1) bare Starlette, no database at all ------------------------------------------------------------


def build_bare(settings: EngineSettings) -> ASGIApp:
    return Starlette(routes=[Route("/nodb", nodb)])


# ---- floors: what any middleware costs, and any middleware that keeps per-request state in a ContextVar ----


class _PassThrough:
    """A pure ASGI middleware that does nothing: the cost of one more layer in Starlette's stack."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


_request_var: ContextVar[object] = ContextVar("bench_request")


class _ContextVarOnly:
    """Sets a ContextVar for each request and resets it after: the least a ContextVar-based middleware does."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = _request_var.set(scope)
        try:
            await self.app(scope, receive, send)
        finally:
            _request_var.reset(token)


class _ContextVarAndSend(_ContextVarOnly):
    """Also hands the app a send of its own that forwards every message: the least that a middleware which
    must act before the response starts (commit first) adds to a request."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        def forward(message: Message) -> Awaitable[None]:
            return send(message)

        token = _request_var.set(scope)
        try:
            await self.app(scope, receive, forward)
        finally:
            _request_var.reset(token)


class NotedRequest:
    """A request's place for a session made on first use, and what its response has said so far: what a middleware
    under the contract keeps even for a request that never asks for a session. A background task or the rest of a
    streaming body may still ask for one, and its work then follows the response (committed only after a status
    below 400 and a body that went out whole); an error is answered only before the response has started; once
    the call has ended, no session is made."""

    __slots__ = ("complete", "ended", "factory", "session", "started", "status")

    def __init__(self, factory: async_sessionmaker[AsyncSession]) -> None:
        self.factory = factory
        self.session: AsyncSession | None = None
        self.started = False
        self.status = 0
        self.complete = False
        self.ended = False

    def get(self) -> AsyncSession:
        if self.ended:
            raise RuntimeError("the request has ended: no session is made for it any more")
        session = self.session
        if session is None:
            session = self.session = self.factory()
        return session


class _ContextVarAndNotingSend:
    """floor-send, its send noting the response's start, status and last body, its request's session (if one was
    made) closed at the end: the least a middleware under the contract does for a request that never queries."""

    def __init__(self, app: ASGIApp, factory: async_sessionmaker[AsyncSession]) -> None:
        self.app = app
        self.factory = factory

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = NotedRequest(self.factory)

        def noting_send(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                request.started = True
                request.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                request.complete = True
            return send(message)

        token = _request_var.set(request)
        try:
            await self.app(scope, receive, noting_send)
        finally:
            _request_var.reset(token)
            request.ended = True
            if request.session is not None:
                await request.session.close()


def build_floor_passthrough(settings: EngineSettings) -> ASGIApp:
    app = Starlette(routes=[Route("/nodb", nodb)])
    app.add_middleware(_PassThrough)
    return app


def build_floor_contextvar(settings: EngineSettings) -> ASGIApp:
    app = Starlette(routes=[Route("/nodb", nodb)])
    app.add_middleware(_ContextVarOnly)
    return app


def build_floor_send(settings: EngineSettings) -> ASGIApp:
    app = Starlette(routes=[Route("/nodb", nodb)])
    app.add_middleware(_ContextVarAndSend)
    return app


def build_floor_noted(settings: EngineSettings) -> ASGIApp:
    # An engine and a session factory as the package's server holds them, though /nodb never uses them: the
    # objects they keep alive are what the collector walks at each full collection.
    engine = settings.create_engine()
    app = Starlette(routes=[Route("/nodb", nodb)], lifespan=_disposing(engine))
    app.add_middleware(_ContextVarAndNotingSend, factory=session_factory(engine))
    return app


# ---- the floor of a session that lives until the ASGI call ends --------------------------------------------


class _LateCloseHolder:
    """One request's session, made on first use: what _LateClose keeps in its ContextVar."""

    __slots__ = ("factory", "session")

    def __init__(self, factory: async_sessionmaker[AsyncSession]) -> None:
        self.factory = factory
        self.session: AsyncSession | None = None

    def get(self) -> AsyncSession:
        session = self.session
        if session is None:
            session = self.session = self.factory()
        return session


_late_close_var: ContextVar[_LateCloseHolder] = ContextVar("bench_late_close")


class _LateClose:
    """Makes each request's session on first use and closes it with ``close`` once the app has returned: by
    default plainly, ``session.close()`` (no shield against cancellation, no guard against two tasks, no commit
    policy), the least that a middleware whose session stays usable until the ASGI call ends (a streaming body, a
    background task) does; floor-safe-close gives it the close the contract asks for. The hand-written app closes
    its session before its response is even sent, which the middleware's contract cannot do."""

    def __init__(
        self,
        app: ASGIApp,
        factory: async_sessionmaker[AsyncSession],
        close: Callable[[AsyncSession], Awaitable[None]] = AsyncSession.close,
    ) -> None:
        self.app = app
        self.factory = factory
        self.close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder = _LateCloseHolder(self.factory)
        token = _late_close_var.set(holder)
        try:
            await self.app(scope, receive, send)
        finally:
            _late_close_var.reset(token)
            if holder.session is not None:
                await self.close(holder.session)


def build_floor_late_close(settings: EngineSettings) -> ASGIApp:
    engine = settings.create_engine()

    def get_session(request: Request) -> AsyncSession:
        return _late_close_var.get().get()

    app = Starlette(routes=_middleware_routes(get_session, commit=True), lifespan=_disposing(engine))
    app.add_middleware(_LateClose, factory=session_factory(engine))
    return app


# ---- the floor of the contract's close: safe from cancellation and bounded ---------------------------------

# asgi_db_session's default bound on a cleanup (not imported from it: the package's modules in this app's process
# would change its heap, and so what the collector costs it; a test checks the two agree).
SAFE_CLOSE_SECONDS = 5.0


async def _bounded_close(session: AsyncSession, seconds: float) -> None:
    """Roll back and give the connection back within ``seconds``, or throw the connection away."""
    try:
        async with asyncio.timeout(seconds):
            await session.close()
    except Exception:  # the timeout too: a connection that cannot be cleaned up is discarded, not kept
        await session.invalidate()


async def _shielded_close(session: AsyncSession, seconds: float) -> None:
    """``_bounded_close`` in a task of its own, waited for to its end whatever cancellations arrive; then the last
    of them is raised. An anyio cancel scope delivers its cancellation again at every await: each is caught."""
    closing = asyncio.get_running_loop().create_task(_bounded_close(session, seconds))
    cancelled: asyncio.CancelledError | None = None
    while not closing.done():
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError as exc:
            cancelled = exc
    closing.result()
    if cancelled is not None:
        raise cancelled


def build_floor_safe_close(settings: EngineSettings, session_class: type[AsyncSession] = AsyncSession) -> ASGIApp:
    engine = settings.create_engine()

    def get_session(request: Request) -> AsyncSession:
        return _late_close_var.get().get()

    app = Starlette(routes=_middleware_routes(get_session, commit=True), lifespan=_disposing(engine))
    # Under callgrind every wait is ~50 times longer: http_instructions.py raises the bound as it does the package's.
    seconds = float(os.environ.get("BENCH_CLEANUP_TIMEOUT", SAFE_CLOSE_SECONDS))
    close = functools.partial(_shielded_close, seconds=seconds)  # no frame of its own per request
    # _LateClose with the close that the contract asks of every close, written the plain way: it runs to its end
    # even when the request is cancelled and within a bound. Nothing more: no guard against two tasks (unless
    # session_class has one: floor-guarded), no commit policy, no on_commit, no outcome check, no route policy.
    factory = async_sessionmaker(engine, class_=session_class, **SESSION_OPTIONS)
    app.add_middleware(_LateClose, factory=factory, close=close)
    return app


# ---- the same floor, its sessions guarded against two tasks ------------------------------------------------


class TwoTasksError(RuntimeError):
    """A task used a floor-guarded session while another task's operation on it was running."""


def _one_task_at_a_time(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``method`` of AsyncSession, refused (before it touches the session) to a task other than the one whose
    operation is running; the same task may go one level down (scalars() runs execute())."""
    name = method.__name__

    async def guarded(self: PlainGuardedSession, *args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        running = self.running_task
        if running is not None and running is not task:
            raise TwoTasksError(f"{name}() while another task's operation runs on this session")
        self.running_task = task
        try:
            return await method(self, *args, **kwargs)
        finally:
            self.running_task = running

    return guarded


class PlainGuardedSession(AsyncSession):
    """AsyncSession whose operations refuse a second task while one runs, written the plain way (a wrapper per
    method, the running task in an attribute): the least that asgi_db_session's guard does, without its close
    that waits for the other task's operation."""

    running_task: asyncio.Task[Any] | None = None


for _method in ("execute", "scalar", "scalars", "get", "stream", "stream_scalars", "flush", "commit", "rollback"):
    setattr(PlainGuardedSession, _method, _one_task_at_a_time(getattr(AsyncSession, _method)))


def build_floor_guarded(settings: EngineSettings) -> ASGIApp:
    """floor-safe-close, its sessions of the class above: what a guard against two tasks on one session costs at
    every statement, over the contract's close."""
    return build_floor_safe_close(settings, PlainGuardedSession)


# ---- (2) hand-written: every endpoint opens and closes its own session (the lower bound) ---------------


def build_handwritten(settings: EngineSettings) -> ASGIApp:
    engine = settings.create_engine()
    factory = session_factory(engine)

    async def session(request: Request) -> Response:
        async with factory():
            pass
        return PlainTextResponse(OK)

    async def read(request: Request) -> Response:
        async with factory() as db:
            return PlainTextResponse(await read_one(db))

    async def insert(request: Request) -> Response:
        async with factory() as db:
            body = await insert_one(db)
            await db.commit()
        return PlainTextResponse(body)

    async def stream(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            async with factory() as db:
                async for chunk in stream_chunks(db):
                    yield chunk

        return StreamingResponse(body(), media_type=TEXT)

    async def ten(request: Request) -> Response:
        async with factory() as db:
            return PlainTextResponse(await read_ten(db))

    async def queries(request: Request) -> Response:
        async with factory() as db:
            return PlainTextResponse(await read_many(db, request.path_params["count"]))

    routes = [
        Route("/nodb", nodb),
        Route("/session", session),
        Route("/read", read),
        Route("/insert", insert, methods=["POST"]),
        Route("/stream", stream),
        Route("/ten", ten),
        Route("/queries/{count:int}", queries),
    ]
    return Starlette(routes=routes, lifespan=_disposing(engine))


# ---- shared endpoints for the middleware-based apps on Starlette ---------------------------------------


def _middleware_routes(get_session: Callable[[Request], AsyncSession], *, commit: bool) -> list[Route]:
    """Endpoints that take the request's session from ``get_session``; ``commit``: /insert commits itself."""

    async def session(request: Request) -> Response:
        get_session(request)
        return PlainTextResponse(OK)

    async def read(request: Request) -> Response:
        return PlainTextResponse(await read_one(get_session(request)))

    async def insert(request: Request) -> Response:
        db = get_session(request)
        body = await insert_one(db)
        if commit:
            await db.commit()
        return PlainTextResponse(body)

    async def stream(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            # The session is asked for inside the body, where the streaming code runs.
            async for chunk in stream_chunks(get_session(request)):
                yield chunk

        return StreamingResponse(body(), media_type=TEXT)

    async def ten(request: Request) -> Response:
        return PlainTextResponse(await read_ten(get_session(request)))

    async def queries(request: Request) -> Response:
        return PlainTextResponse(await read_many(get_session(request), request.path_params["count"]))

    return [
        Route("/nodb", nodb),
        Route("/session", session),
        Route("/read", read),
        Route("/insert", insert, methods=["POST"]),
        Route("/stream", stream),
        Route("/ten", ten),
        Route("/queries/{count:int}", queries),
    ]


# ---- (4) fastapi-async-sqlalchemy's middleware (BaseHTTPMiddleware + a ContextVar proxy `db`) -----------


def build_fastapi_async_sqlalchemy(settings: EngineSettings) -> ASGIApp:
    from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db

    engine = settings.create_engine()

    def get_session(request: Request) -> AsyncSession:
        session: AsyncSession = db.session
        return session

    app = Starlette(routes=_middleware_routes(get_session, commit=True), lifespan=_disposing(engine))
    # Its sessionmaker always sets expire_on_commit=False; autoflush goes through session_args.
    app.add_middleware(SQLAlchemyMiddleware, custom_engine=engine, session_args={"autoflush": False})
    return app


# ---- (5) advanced-alchemy's Starlette extension (pure ASGI SessionMiddleware + request.state) ----------


def build_advanced_alchemy(settings: EngineSettings) -> ASGIApp:
    from advanced_alchemy.extensions.starlette import AdvancedAlchemy, AsyncSessionConfig, SQLAlchemyAsyncConfig

    engine = settings.create_engine()
    config = SQLAlchemyAsyncConfig(
        engine_instance=engine,
        session_config=AsyncSessionConfig(expire_on_commit=False, autoflush=False),
        commit_mode="manual",
    )
    # No lifespan of ours: the extension wraps the app's lifespan and disposes engine_instance at shutdown.
    app = Starlette()
    alchemy = AdvancedAlchemy(config=config, app=app)

    def get_session(request: Request) -> AsyncSession:
        session: AsyncSession = alchemy.get_async_session(request)
        return session

    app.router.routes.extend(_middleware_routes(get_session, commit=True))
    return app


# ---- (6) asgi_db_session ----------------------------------------------------------------------------------


def _build_asgi_db_session(
    settings: EngineSettings, *, commit_on_success: bool, session_options: dict[str, Any] | None = None
) -> ASGIApp:
    from asgi_db_session import DBSessionMiddleware, current_session

    def get_session(request: Request) -> AsyncSession:
        return current_session()

    # Under commit_on_success /insert leaves the commit to the middleware, which commits before the response.
    app = Starlette(routes=_middleware_routes(get_session, commit=not commit_on_success))
    # The middleware disposes the engine at lifespan shutdown.
    app.add_middleware(
        DBSessionMiddleware,
        engine=settings.create_engine(),
        commit_on_success=commit_on_success,
        session_options=session_options,
    )
    return app


def build_asgi_db_session(settings: EngineSettings) -> ASGIApp:
    return _build_asgi_db_session(settings, commit_on_success=False)


def build_asgi_db_session_commit(settings: EngineSettings) -> ASGIApp:
    """commit_on_success=True: /insert does not commit; the middleware commits before the response starts."""
    return _build_asgi_db_session(settings, commit_on_success=True)


def build_asgi_db_session_replay(settings: EngineSettings) -> ASGIApp:
    """commit_on_success=True with ReplayConflicts(only_marked=True) outside: every request's body kept, no route
    marked. What a replay decided inside DBSessionMiddleware, which knows the endpoint only after routing, would
    cost every request."""
    from asgi_db_session import ReplayConflicts

    app = _build_asgi_db_session(settings, commit_on_success=True)
    return ReplayConflicts(app, only_marked=True)


def build_asgi_db_session_commit_nocheck(settings: EngineSettings) -> ASGIApp:
    """commit_on_success=True with DATABASE_COMMIT_OUTCOME_CHECK=false: no transaction id read before COMMIT.

    The Database is built from settings (the check is a setting), with the engine options the others get and no
    command timeout (the engine the others get has none).
    """
    from asgi_db_session import Database, DatabaseSettings, DBSessionMiddleware, current_session

    def get_session(request: Request) -> AsyncSession:
        return current_session()

    database = Database(
        settings=DatabaseSettings(
            url=settings.url,
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_pre_ping=settings.pool_pre_ping,
            pool_timeout=settings.pool_timeout,
            command_timeout=None,
            commit_outcome_check=False,
        )
    )
    app = Starlette(routes=_middleware_routes(get_session, commit=False))
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    return app


def build_asgi_db_session_unguarded(settings: EngineSettings) -> ASGIApp:
    """Plain AsyncSession sessions: without the guard against two tasks sharing one session (and on_commit)."""
    return _build_asgi_db_session(
        settings, commit_on_success=False, session_options={**SESSION_OPTIONS, "class_": AsyncSession}
    )


def build_asgi_db_session_metrics(settings: EngineSettings) -> ASGIApp:
    """asgi-db-session with its pool metrics recorded (OpenTelemetry's SDK, a MeterProvider of the app's own).

    The reader is never collected: what is measured is the recording each request does (the checkout's wrapper,
    the checkin's listener, their histograms); a real reader collects every few seconds at most, apart from the
    requests.
    """
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from asgi_db_session import Database, DBSessionMiddleware, current_session

    def get_session(request: Request) -> AsyncSession:
        return current_session()

    database = Database(
        engine=settings.create_engine(), meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()])
    )
    app = Starlette(routes=_middleware_routes(get_session, commit=True))
    app.add_middleware(DBSessionMiddleware, database=database)
    return app


# ---- registry ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppSpec:
    key: str
    description: str
    build: Callable[[EngineSettings], ASGIApp]
    serves_db: bool = True
    """False: the app has /nodb only."""
    in_default_run: bool = True
    """False: run.py measures it only when --apps names it (paired.py and instructions.py take any app)."""
    modules: tuple[str, ...] = ()
    """What its builder imports beyond this module's own imports: a server started with ``BENCH_SAME_HEAP``
    imports these for every app of the run, so that each walks the same heap in its collections (server.py)."""


BARE = "bare"
HANDWRITTEN = "handwritten"
OURS = "asgi-db-session"
FLOOR_PASSTHROUGH = "floor-passthrough"
FLOOR_CONTEXTVAR = "floor-contextvar"
FLOOR_SEND = "floor-send"
FLOOR_NOTED = "floor-noted"
FLOOR_LATE_CLOSE = "floor-late-close"
FLOOR_SAFE_CLOSE = "floor-safe-close"
FLOOR_GUARDED = "floor-guarded"
_OUR_MODULES = ("asgi_db_session",)
FLOORS = (
    FLOOR_PASSTHROUGH,
    FLOOR_CONTEXTVAR,
    FLOOR_SEND,
    FLOOR_NOTED,
    FLOOR_LATE_CLOSE,
    FLOOR_SAFE_CLOSE,
    FLOOR_GUARDED,
)

APPS: dict[str, AppSpec] = {
    spec.key: spec
    for spec in (
        AppSpec(BARE, "Starlette, no middleware, no database", build_bare, serves_db=False),
        AppSpec(HANDWRITTEN, "Starlette, `async with session_factory()` in each endpoint", build_handwritten),
        AppSpec(
            FLOOR_PASSTHROUGH, "Starlette + a middleware that does nothing", build_floor_passthrough, serves_db=False
        ),
        AppSpec(
            FLOOR_CONTEXTVAR,
            "Starlette + a middleware that only sets a ContextVar per request",
            build_floor_contextvar,
            serves_db=False,
        ),
        AppSpec(
            FLOOR_SEND,
            "Starlette + a middleware that sets a ContextVar and forwards send through a function of its own",
            build_floor_send,
            serves_db=False,
        ),
        AppSpec(
            FLOOR_NOTED,
            "the same, its send noting the response's start, status and last body, and its request's end",
            build_floor_noted,
            serves_db=False,
        ),
        AppSpec(
            FLOOR_LATE_CLOSE,
            "Starlette + a middleware that closes the request's session once the app has returned, plainly",
            build_floor_late_close,
        ),
        AppSpec(
            FLOOR_SAFE_CLOSE,
            "the same, its close shielded from cancellation (asyncio.shield, a task) and bounded (asyncio.timeout)",
            build_floor_safe_close,
        ),
        AppSpec(
            FLOOR_GUARDED,
            "the same, its sessions refusing a second task while one task's operation runs (a wrapper per method)",
            build_floor_guarded,
        ),
        AppSpec(
            "fastapi-depends",
            "FastAPI, `Depends(get_db)` yield dependency",
            build_fastapi_depends,
            modules=("fastapi",),
        ),
        AppSpec(
            "fastapi-async-sqlalchemy",
            "Starlette + fastapi-async-sqlalchemy",
            build_fastapi_async_sqlalchemy,
            modules=("fastapi_async_sqlalchemy",),
        ),
        AppSpec(
            "advanced-alchemy",
            "Starlette + advanced-alchemy extension",
            build_advanced_alchemy,
            modules=("advanced_alchemy.extensions.starlette",),
        ),
        AppSpec(OURS, "Starlette + DBSessionMiddleware (manual commit)", build_asgi_db_session, modules=_OUR_MODULES),
        AppSpec(
            "asgi-db-session-commit",
            "Starlette + DBSessionMiddleware(commit_on_success=True)",
            build_asgi_db_session_commit,
            modules=_OUR_MODULES,
        ),
        AppSpec(
            "asgi-db-session-replay",
            "the same with ReplayConflicts(only_marked=True) outside, no route marked",
            build_asgi_db_session_replay,
            modules=_OUR_MODULES,
            in_default_run=False,
        ),
        AppSpec(
            "asgi-db-session-commit-nocheck",
            "the same with DATABASE_COMMIT_OUTCOME_CHECK=false: no transaction id read before COMMIT",
            build_asgi_db_session_commit_nocheck,
            modules=_OUR_MODULES,
            in_default_run=False,
        ),
        AppSpec(
            "asgi-db-session-fastapi",
            "FastAPI + DBSessionMiddleware",
            build_asgi_db_session_fastapi,
            modules=("fastapi", *_OUR_MODULES),
        ),
        AppSpec(
            "asgi-db-session-metrics",
            "Starlette + DBSessionMiddleware with the pool metrics recorded (OpenTelemetry SDK)",
            build_asgi_db_session_metrics,
            modules=(*_OUR_MODULES, "opentelemetry.sdk.metrics"),
            in_default_run=False,
        ),
        AppSpec(
            "asgi-db-session-unguarded",
            "Starlette + DBSessionMiddleware(session_options={'class_': AsyncSession}): no concurrency guard",
            build_asgi_db_session_unguarded,
            modules=_OUR_MODULES,
            in_default_run=False,
        ),
    )
}
PEERS = ("fastapi-depends", "fastapi-async-sqlalchemy", "advanced-alchemy")


def baseline_for(route: str) -> str:
    """The app a route's ratios are taken against: bare for /nodb, the hand-written app for DB routes."""
    return BARE if route == "/nodb" else HANDWRITTEN


def describe(key: str) -> dict[str, Any]:
    spec = APPS[key]
    return {"key": key, "description": spec.description, "serves_db": spec.serves_db}
