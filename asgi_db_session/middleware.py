"""DBSessionMiddleware: one AsyncSession per HTTP request and WebSocket connection, closed when it ends."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from ._context import ScopeState, scope_var
from ._lazy_loads import log_lazy_load
from ._session import cancel_other_task, commit, finish
from ._tracing import request_spans
from ._types import AnyASGIApp, ASGIApp, Message, Receive, Scope, Send
from .database import Database, _EngineRole
from .error_responses import INTERNAL_SERVER_ERROR, ErrorResponse, ErrorResponseMapper, default_error_response
from .exceptions import (
    COMMIT_FAILED,
    COMMIT_FAILED_LATE,
    COMMIT_FAILED_LATE_UNKNOWN,
    COMMIT_FAILED_UNKNOWN,
    MIDDLEWARE_NAME_MISMATCH,
    MIDDLEWARE_ON_ENGINE_WITH_DATABASE,
    MIDDLEWARE_SESSION_OPTIONS_WITH_DATABASE,
    TWO_ENGINE_SOURCES,
    CommitFailedError,
    CommitOutcomeUnknownError,
)
from .query_insight import QueryStats, _stats_var, _warn_if_over
from .replay import _note_answered
from .settings import DatabaseSettings

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

__all__ = [
    "DBSessionMiddleware",
]


# Messages that end an HTTP response (or a WebSocket's denial response) when they have no more body to come:
# the last chance to fail it visibly if a late commit fails.
_FINAL_BODY_TYPES = frozenset(
    {"http.response.body", "http.response.pathsend", "http.response.zerocopysend", "websocket.http.response.body"}
)
_START_TYPES = frozenset({"http.response.start", "websocket.http.response.start"})
# Close codes that end a WebSocket normally; any other code rolls the connection's work back. 1005 is what a
# server reports for a close frame that carried no code, as a client's plain close() sends.
_NORMAL_CLOSE_CODES = frozenset({1000, 1001, 1005})
_SHUTDOWN_TYPES = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})

_logger = logging.getLogger("asgi_db_session")
_new_state = object.__new__
# Typed as what a request's session may become, so that mypy does not take every later read to be None.
_NO_SESSION: AsyncSession | None = None
_LIFESPAN_REFUSED = (
    "The app %s refused the lifespan scope (%s: %s); DBSessionMiddleware answers lifespan for it: the database is "
    "checked at startup (when asked) and disposed at shutdown."
)


def _log_answered(scope: Scope, error: BaseException, response: ErrorResponse) -> None:
    # The driver's first line ("duplicate key value violates unique constraint ...") says what happened;
    # SQLAlchemy's full text would add the statement's parameters, which may hold personal data.
    reason = str(getattr(error, "orig", None) or error).split("\n", 1)[0]
    _logger.warning(
        "%s %s answered %d: %s: %s",
        scope.get("method", ""),
        scope.get("path", ""),
        response.status,
        type(error).__name__,
        reason,
    )


def _with_server_timing(send: Send, stats: QueryStats, name: str) -> Send:
    """``send``, adding this request's database time to the response's Server-Timing header as it starts."""

    def timing_send(message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", ()), (b"server-timing", stats.server_timing(name))]
            message = {**message, "headers": headers}
        return send(message)

    return timing_send


class _RequestState(ScopeState):
    """A request's scope, plus what its messages said so far (class-level defaults until they change)."""

    in_request = True

    started = False  # the response (or the WebSocket) got going: an error can no longer be answered
    # The response went out whole (its last body message), or the WebSocket was accepted: its work may be
    # committed at the end. A streaming body that a framework stopped when its client left (Starlette does,
    # and then returns normally) never gets there: what it did is rolled back, not committed half done.
    complete = False
    keep = True  # nothing has said "roll back" yet
    failure: CommitFailedError | None = None
    # The response that replaced the app's after a failed commit, when the mapping had one for its error:
    # then the failure is an expected outcome (logged as a warning), not a crash (raised to the server).
    failure_response: ErrorResponse | None = None
    # Class attributes of the subclass each middleware makes (_state_class), with its database and policy: a
    # request's state is then made without calling __init__, and holds only what differs from one request to the
    # next (benchmarks/README.md, "Where /nodb's instructions go").
    middleware: DBSessionMiddleware


def _rollback_reason(state: _RequestState) -> str:
    """Why a request's transaction is not committed at the end of the call, for the cleanup's span. (When it is,
    the cleanup's span, if the commit fails, says "commit_failed".)"""
    if not state.commit_on_success:
        return "not_committing"  # the policy: only what the app committed itself is kept
    if state.failure is not None:
        return "commit_failed"
    if not state.keep:
        return "error"  # a status of 400 or more, an exception, a cancellation, an abnormal WebSocket close
    return "incomplete"  # the response never went out whole (its client left), or the WebSocket never opened


def _watching_disconnects(receive: Receive, state: _RequestState) -> Receive:
    async def receive_wrapper() -> Message:
        message = await receive()
        if message["type"] == "websocket.disconnect" and message.get("code", 1005) not in _NORMAL_CLOSE_CODES:
            state.keep = False  # the client went away abnormally (1006: the connection dropped)
        return message

    return receive_wrapper


async def _committing_send(state: _RequestState, send: Send, message: Message) -> None:
    """The send of a message that may need a commit first, or that changes the outcome (WebSockets)."""
    if state.failure is not None:
        return  # our error response replaced the app's; drop the rest of it
    middleware = state.middleware
    message_type = message["type"]
    session = state.session
    if message_type in _START_TYPES:
        if message["status"] >= 400:
            state.keep = False
        elif session is not None and state.commit_on_success and session.in_transaction():
            try:
                await commit(session, middleware._spans, "before_response")
            except Exception as exc:
                state.keep = False
                response = state.failure_response = middleware.error_response(exc)
                response = response or INTERNAL_SERVER_ERROR
                _note_answered(exc, state.route_policy)
                text = COMMIT_FAILED_UNKNOWN if isinstance(exc, CommitOutcomeUnknownError) else COMMIT_FAILED
                failure = state.failure = CommitFailedError(
                    text.format(name=middleware.database.name, status=response.status, app_status=message["status"])
                )
                for error_message in response.messages():
                    await send(error_message)
                raise failure from exc
        state.started = True
    elif message_type in _FINAL_BODY_TYPES:
        # Work done while streaming is committed before the last chunk, so that a failure still reaches
        # the client as a broken response instead of a complete one.
        if not message.get("more_body", False):
            if state.keep and session is not None and state.commit_on_success and session.in_transaction():
                try:
                    await commit(session, middleware._spans, "before_last_body")
                except Exception as exc:
                    state.keep = False
                    unknown = isinstance(exc, CommitOutcomeUnknownError)
                    late = COMMIT_FAILED_LATE_UNKNOWN if unknown else COMMIT_FAILED_LATE
                    failure = state.failure = CommitFailedError(late.format(name=middleware.database.name))
                    raise failure from exc
            state.complete = True
    elif message_type == "websocket.accept":
        state.started = state.complete = True
    elif message_type == "websocket.close" and (
        not state.started or message.get("code", 1000) not in _NORMAL_CLOSE_CODES
    ):
        state.keep = False
    await send(message)


class DBSessionMiddleware:
    """Give every HTTP request and WebSocket connection one AsyncSession, reached with current_session().

    Pass at most one engine source: ``database``, ``engine``, ``url`` or ``settings``; with none, the
    database is configured from ``DATABASE_*`` environment variables. Two sources raise ValueError here; a
    missing or invalid setting is reported at lifespan startup (``lifespan.startup.failed``, which stops the
    server), and raised for every request under a server that runs no lifespan. The session is created on the first
    ``current_session()`` call of a request, so a request that never asks for one costs no connection.

    ``app`` is any ASGI app: a Starlette or FastAPI app takes the middleware with ``add_middleware``; the app
    object of another framework (Litestar, Quart, BlackSheep, Django's ASGI handler) is wrapped as a whole, which
    is where the middleware sees the lifespan scope. An app that refuses that scope (Django's) gets it answered
    for it: the database is still checked at startup and disposed at shutdown.

    ``commit_on_success=True`` commits before the response starts when its status is below 400, and turns a
    failed commit into an error response (the app's own response is never sent); a status of 400 or more,
    or an exception, rolls back. ``None`` takes the policy of ``database``, which defaults to not committing.

    ``error_response`` maps a database error (from the failed commit, or escaping the app before its
    response started) to the response the client gets: 409 for a unique violation, 503 with Retry-After for
    what a retry can fix (see ``default_error_response``); None leaves it a 500.

    ``count_queries=True`` counts each request's statements and database time (``query_stats()``);
    ``server_timing=True`` also sends them as a ``Server-Timing: db;dur=...;desc="N queries"`` header;
    ``warn_over_queries=N`` logs a warning naming the route when a request runs more than N statements.
    Either of the last two implies the first. Off by default: counting costs two engine events per statement.

    ``on_engine(engine, role)`` is called for every engine of the Database the middleware builds, the primary
    and each replica, as it is created (see ``Database``): for event listeners or tracing on all of them.

    With OpenTelemetry set up, the middleware's commit and its cleanup (the rollback and close of a transaction
    left open) each make a span of their own, under the request's span, with the statements they run nested
    under them (docs/how-to/tracing.md). ``tracer_provider`` None takes the global TracerProvider, if the app set
    one by the time the middleware is built or its lifespan startup completes; a TracerProvider given is used as
    it is; OpenTelemetry's ``NoOpTracerProvider()`` turns the spans off.
    """

    def __init__(
        self,
        app: AnyASGIApp,
        *,
        database: Database | None = None,
        url: str | None = None,
        engine: AsyncEngine | None = None,
        settings: DatabaseSettings | None = None,
        name: str | None = None,
        commit_on_success: bool | None = None,
        session_options: Mapping[str, Any] | None = None,
        dispose_on_shutdown: bool = True,
        error_response: ErrorResponseMapper = default_error_response,
        count_queries: bool = False,
        server_timing: bool = False,
        warn_over_queries: int | None = None,
        on_engine: Callable[[AsyncEngine, _EngineRole], object] | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        given = [
            arg
            for arg, value in (("database", database), ("url", url), ("engine", engine), ("settings", settings))
            if value is not None
        ]
        if len(given) > 1:
            raise ValueError(
                TWO_ENGINE_SOURCES.format(
                    owner="DBSessionMiddleware",
                    given=" and ".join(given),
                    choices="database=, engine=, url=, settings=",
                )
            )
        self.app: ASGIApp = app
        self._settings_error: str | None = None
        if database is None:
            try:
                database = Database(
                    url,
                    name=name or "default",
                    engine=engine,
                    settings=settings,
                    commit_on_success=bool(commit_on_success),
                    session_options=session_options,
                    on_engine=on_engine,
                )
            except (ValueError, ModuleNotFoundError) as exc:
                # A missing or invalid setting (no DATABASE_URL, DATABASE_POOL_SIZE=abc, a sync driver, a driver
                # whose extra is not installed): the arguments were checked above. Starlette builds its middleware
                # inside the server's first ASGI call, the lifespan startup, and an exception from there reads to
                # uvicorn's --lifespan auto, hypercorn and granian as "no lifespan support": they would serve, a
                # 500 to every request. Kept, and reported at lifespan startup, where a server stops on it (see
                # _refuse).
                self._settings_error = str(exc)
                return
        elif session_options is not None:
            raise ValueError(MIDDLEWARE_SESSION_OPTIONS_WITH_DATABASE)
        elif on_engine is not None:
            raise ValueError(MIDDLEWARE_ON_ENGINE_WITH_DATABASE)
        elif name is not None and name != database.name:
            raise ValueError(MIDDLEWARE_NAME_MISMATCH.format(name=name, database=database.name))
        self.database = database
        self.commit_on_success = database.commit_on_success if commit_on_success is None else commit_on_success
        self.dispose_on_shutdown = dispose_on_shutdown
        self.error_response = error_response
        self._var = scope_var(database.name)
        self.server_timing = server_timing
        self.warn_over_queries = warn_over_queries
        self._counting = count_queries or server_timing or warn_over_queries is not None
        if self._counting:
            database.count_queries()
        self._stats_var = _stats_var(database.name)
        self._tracer_provider = tracer_provider
        self._spans = request_spans(tracer_provider, database.name)
        self._state_class: type[_RequestState] = type(
            "_RequestState",
            (_RequestState,),
            {"database": database, "commit_on_success": self.commit_on_success, "middleware": self},
        )

    def _look_for_tracing(self) -> None:
        """Take the global TracerProvider if the app has set one since the middleware was built (in its lifespan
        startup, say), unless one was given."""
        if self._spans is None and self._tracer_provider is None:
            self._spans = request_spans(None, self.database.name)

    def __repr__(self) -> str:
        if self._settings_error is not None:
            return f"DBSessionMiddleware(unusable: {self._settings_error})"
        return f"DBSessionMiddleware(database={self.database!r}, commit_on_success={self.commit_on_success})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings_error = self._settings_error
        if settings_error is not None:
            await self._refuse(settings_error, scope, receive, send)
            return
        scope_type = scope["type"]
        if scope_type != "http" and scope_type != "websocket":
            if scope_type == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        counting = self._counting
        if counting:
            stats = QueryStats()
            stats_token = self._stats_var.set(stats)
            if self.server_timing:
                send = _with_server_timing(send, stats, self.database.name)
        # The policy may change when the session is created: the endpoint's session_policy() is read then.
        state = _new_state(self._state_class)
        # The attributes read on every request are the instance's own: CPython reads a class attribute through an
        # instance more slowly.
        state.session = _NO_SESSION
        state.asgi_scope = scope
        token = self._var.set(state)

        # A plain function that returns send's awaitable: a valid ASGI send without a coroutine of its own on
        # the common path, a measurable share of a request that never touches the database.
        def send_wrapper(message: Message) -> Awaitable[None]:
            session = state.session
            # Nothing to commit (a failure is only possible where a commit was tried): note what the message
            # says and pass it on.
            if (
                session is None
                or not state.commit_on_success
                or (state.failure is None and not session.in_transaction())
            ):
                message_type = message["type"]
                if message_type == "http.response.start":
                    if message["status"] >= 400:
                        state.keep = False
                    state.started = True
                elif not message.get("more_body", False) and message_type in _FINAL_BODY_TYPES:
                    state.complete = True
                return send(message)
            return _committing_send(state, send, message)

        if scope_type == "websocket":
            receive = _watching_disconnects(receive, state)
            app_send: Send = functools.partial(_committing_send, state, send)
        else:
            app_send = send_wrapper
        try:
            await self.app(scope, receive, app_send)
        except Exception as exc:
            state.keep = False
            log_lazy_load(exc, f"{scope.get('method', 'WEBSOCKET')} {scope.get('path', '')}")
            failure = state.failure
            if failure is None:
                if state.started or not await self._answer_error(scope, send, exc, state):
                    raise
            elif state.failure_response is None:
                raise failure from failure.__cause__  # not the app's re-raise of it: the database error
        except BaseException:
            state.keep = False
            session = state.session
            if session is not None:
                cancel_other_task(session)  # a view task the framework started, which our cancellation missed
            raise
        finally:
            self._var.reset(token)
            session = state.session
            if session is None:
                state.ended = True  # end() without its bookkeeping of a session, the common case
            else:
                state.end()
                spans = self._spans
                if spans is None:
                    await finish(
                        session,
                        commit=state.keep and state.complete and state.commit_on_success,
                        cleanup_timeout=state.database.cleanup_timeout,
                    )
                else:
                    await finish(
                        session,
                        commit=state.keep and state.complete and state.commit_on_success,
                        cleanup_timeout=state.database.cleanup_timeout,
                        spans=spans,
                        rollback_reason=_rollback_reason(state),
                    )
            if counting:
                self._stats_var.reset(stats_token)
                if self.warn_over_queries is not None:
                    _warn_if_over(scope, self.database.name, stats, self.warn_over_queries)
        # Only a request with a session can have a failed commit.
        if session is not None and (failure := state.failure) is not None:
            if state.failure_response is None:
                # The app caught the error we raised into it; the server must still hear of it.
                raise failure
            _log_answered(scope, failure.__cause__ or failure, state.failure_response)

    async def _answer_error(self, scope: Scope, send: Send, error: Exception, state: _RequestState) -> bool:
        """Send the mapped response for ``error`` (True), or leave it to the server's handling (False)."""
        if scope["type"] != "http":
            return False
        response = self.error_response(error)
        if response is None:
            return False
        _note_answered(error, state.route_policy)
        _log_answered(scope, error, response)
        for message in response.messages():
            await send(message)
        return True

    async def _refuse(self, message: str, scope: Scope, receive: Receive, send: Send) -> None:
        """Report the settings error found at construction: as ``lifespan.startup.failed``, which stops the
        server; raised for anything else (a request, under a server that runs no lifespan)."""
        # The app's own lifespan does not run: it would start what no shutdown will stop, as the server sends
        # no lifespan.shutdown after a failed startup.
        if scope["type"] == "lifespan" and (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.failed", "message": message})
            return
        raise ValueError(message)  # a new one each time: one exception shared by requests would grow its traceback

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Let the app's lifespan run unchanged; check the database at startup, dispose it at shutdown.

        An app that refuses the lifespan scope (raises before reading a message, as Django's ASGI handler does, or
        returns without answering, as many bare ASGI apps do) gets the protocol answered for it here: a server
        that saw the exception would run no lifespan at all, and the engine would never be disposed.
        """
        database = self.database
        first = await receive()
        if first["type"] == "lifespan.startup":
            # Before the app's own startup runs: when the database is unusable the app starts nothing that
            # would need shutting down, since a server sends no lifespan.shutdown after a failed startup.
            try:
                database.engine  # noqa: B018 - created here, once, rather than by the first request
                if database.check_on_startup:
                    await database.check()
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
        pending: list[Message] = [first]
        received: set[str] = set()
        answered: set[str] = set()

        async def receive_wrapper() -> Message:
            message = pending.pop() if pending else await receive()
            received.add(message["type"])
            return message

        async def send_wrapper(message: Message) -> None:
            answered.add(message["type"])
            if message["type"] == "lifespan.startup.complete":
                self._look_for_tracing()  # the app's startup may have set up OpenTelemetry
            elif message["type"] in _SHUTDOWN_TYPES and self.dispose_on_shutdown:
                await database.dispose()
            await send(message)

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except Exception as exc:
            # After reading the startup message the app has a lifespan of its own, and this is its failure: the
            # server's to hear (uvicorn --lifespan on stops on it).
            if received or answered:
                raise
            app_name = getattr(self.app, "__qualname__", None) or type(self.app).__qualname__
            _logger.info(_LIFESPAN_REFUSED, app_name, type(exc).__name__, exc)
        if answered & {"lifespan.startup.failed", *_SHUTDOWN_TYPES}:
            return
        if "lifespan.startup.complete" not in answered:
            self._look_for_tracing()
            await send({"type": "lifespan.startup.complete"})
        if "lifespan.shutdown" not in received:
            await receive()  # the server's lifespan.shutdown: the only message left in the protocol
        await send_wrapper({"type": "lifespan.shutdown.complete"})
