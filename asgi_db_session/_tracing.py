"""The package's own OpenTelemetry spans: the middleware's commit, and the cleanup that rolls back and closes.

OpenTelemetry's statement instrumentation (SQLAlchemy's, asyncpg's) shows each statement, COMMIT and ROLLBACK
included where it sees them, but not whose they were nor when: that a COMMIT was the middleware's, made before the
response started, with the app's response held back until it succeeded; that a ROLLBACK after the response was
the cleanup, and whether the connection then went back to the pool or was thrown away. So one span each, around
the statements the instrumentation already traces (which nest under it), never a span per statement:

- ``asgi_db_session.commit``: the middleware's commit of a request's session.
- ``asgi_db_session.cleanup``: the rollback and close at the end of a request that left a transaction open.

Made only when tracing is on, which is decided when the middleware is built and again when the app's lifespan
startup has completed, never per request (see ``request_spans``): with it off, a request pays one test of
``None``, and this module imports nothing of OpenTelemetry. ``opentelemetry.trace`` is imported only once the app
has imported it itself, or handed the middleware a TracerProvider: neither can happen without it installed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .error_responses import _driver_errors, _sqlstate
from .exceptions import CommitOutcomeUnknownError

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

TRACER_NAME = "asgi_db_session"
COMMIT_SPAN = "asgi_db_session.commit"
CLEANUP_SPAN = "asgi_db_session.cleanup"

# Attributes. The Database's name (DBSessionMiddleware(name=...)), not the server's database: the statements'
# spans carry that one.
DATABASE = "asgi_db_session.database"
# When the middleware committed: "before_response" (before the response start was forwarded), "before_last_body"
# (work done while streaming, before the last body message was forwarded) or "call_end" (once the app returned:
# a background task's work after the response, or a WebSocket's).
COMMIT_WHEN = "asgi_db_session.commit.when"
# "committed", "failed" (nothing of the transaction was saved) or "unknown" (COMMIT's answer was lost and the
# server could not tell in time).
COMMIT_OUTCOME = "asgi_db_session.commit.outcome"
# Only when COMMIT's answer was lost: what asking the server learned ("committed", "aborted", "unknown"), or "off"
# (DATABASE_COMMIT_OUTCOME_CHECK=false: not asked).
COMMIT_OUTCOME_CHECK = "asgi_db_session.commit.outcome_check"
TRANSACTION_ID = "asgi_db_session.commit.transaction_id"
# Why the transaction was rolled back rather than committed (see _rollback_reason in middleware.py).
ROLLBACK_REASON = "asgi_db_session.rollback.reason"
# "rolled_back" (the connection went back to the pool), "discarded" (the rollback failed: the connection was
# thrown away) or "timed_out" (no answer within DATABASE_CLEANUP_TIMEOUT: the connection was closed under it).
CLEANUP_OUTCOME = "asgi_db_session.cleanup.outcome"
# OpenTelemetry's semantic conventions: the error's class, and the database's error code (PostgreSQL's SQLSTATE).
ERROR_TYPE = "error.type"
DB_STATUS_CODE = "db.response.status_code"


def request_spans(provider: TracerProvider | None, database: str) -> Spans | None:
    """The spans of the requests of ``database``, or None when tracing is off.

    ``provider`` given: its spans, unless it is OpenTelemetry's NoOpTracerProvider (off). Not given: the global
    TracerProvider's, if the app has set one; otherwise off: the API's
    stand-in until one is set would make a span object per commit that records nothing.
    """
    if provider is None:
        if "opentelemetry.trace" not in sys.modules:
            return None  # nothing imported OpenTelemetry, so nothing can have set a provider
        from opentelemetry import trace

        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider):
            return None
    from opentelemetry import trace

    if isinstance(provider, trace.NoOpTracerProvider):
        return None
    from . import __version__

    return Spans(provider.get_tracer(TRACER_NAME, __version__), database)


class Spans:
    """Makes the package's spans for one database's requests; exists only when tracing is on."""

    __slots__ = ("_database", "_tracer")

    def __init__(self, tracer: Tracer, database: str) -> None:
        self._tracer = tracer
        self._database = database

    @contextmanager
    def commit(self, when: str) -> Iterator[None]:
        """The commit span, current in the block (the statements the commit runs nest under it); the block's
        error, if it raises, is recorded on it."""
        with self._tracer.start_as_current_span(
            COMMIT_SPAN,
            attributes={DATABASE: self._database, COMMIT_WHEN: when},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            except BaseException as error:
                if isinstance(error, CommitOutcomeUnknownError):
                    span.set_attribute(COMMIT_OUTCOME, "unknown")
                    if error.transaction_id is not None:
                        span.set_attribute(TRANSACTION_ID, error.transaction_id)
                else:
                    span.set_attribute(COMMIT_OUTCOME, "failed")
                _record_error(span, error)
                raise
            span.set_attribute(COMMIT_OUTCOME, "committed")

    @contextmanager
    def cleanup(self, reason: str) -> Iterator[Span]:
        """The cleanup span, current in the block; the caller sets its outcome (``CLEANUP_OUTCOME``)."""
        with self._tracer.start_as_current_span(
            CLEANUP_SPAN,
            attributes={DATABASE: self._database, ROLLBACK_REASON: reason},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield span


def _record_error(span: Span, error: BaseException) -> None:
    """Mark ``span`` failed with ``error``: its class, SQLSTATE and first line, never the statement's parameters.

    Not Span.record_exception(): its message is str(error), which for SQLAlchemy's errors ends with the
    statement and its parameters (personal data, as the logs know: middleware._log_answered).
    """
    from opentelemetry.trace import Status, StatusCode

    # A CommitOutcomeUnknownError is the package's; the database error that left the outcome open is its cause.
    source = error.__cause__ if isinstance(error, CommitOutcomeUnknownError) and error.__cause__ else error
    # The driver's own error says most: asyncpg's UniqueViolationError rather than SQLAlchemy's IntegrityError.
    driver_error = next(
        (found for found in reversed(_driver_errors(source)) if isinstance(found, BaseException)), source
    )
    error_class = type(driver_error)
    error_type = f"{error_class.__module__}.{error_class.__qualname__}"
    message = str(driver_error).split("\n", 1)[0]
    span.set_attribute(ERROR_TYPE, error_type)
    state = _sqlstate(source)
    if state is not None:
        span.set_attribute(DB_STATUS_CODE, state)
    span.add_event("exception", {"exception.type": error_type, "exception.message": message})
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {message}"))


def note_outcome_check(outcome: str, transaction_id: str | None) -> None:
    """Mark the current span with what the check of a lost COMMIT's outcome learned: the package's commit span
    when the middleware committed, the app's own span (or the request's) when the app did."""
    if "opentelemetry.trace" not in sys.modules:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute(COMMIT_OUTCOME_CHECK, outcome)
        if transaction_id is not None:
            span.set_attribute(TRANSACTION_ID, transaction_id)
