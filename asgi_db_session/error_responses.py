"""What the client gets when a database error ends a request: the mapping from exception to response.

The middleware asks this mapping when its own commit fails, and when a database error escapes the app before
the response started (the app's own exception handlers run first, inside the middleware). A mapped error is
answered with its response and logged as a warning; an unmapped one becomes a 500 (failed commit) or goes on
to the server's error handling (app exception), as it would without the middleware.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
from sqlalchemy import exc as sa_exc

from ._types import Message
from .exceptions import CommitOutcomeUnknownError, DatabaseUnavailableError

__all__ = [
    "CONFLICT",
    "ErrorResponse",
    "ErrorResponseMapper",
    "INTERNAL_SERVER_ERROR",
    "OUTCOME_UNKNOWN",
    "SERVICE_UNAVAILABLE",
    "default_error_response",
]


# PostgreSQL SQLSTATEs (Appendix A of its manual).
_UNIQUE_VIOLATION = "23505"
_EXCLUSION_VIOLATION = "23P01"
_SERIALIZATION_FAILURE = "40001"
_DEADLOCK_DETECTED = "40P01"
# query_canceled: statement_timeout (a route's, or DATABASE_STATEMENT_TIMEOUT) fired, or an administrator's
# pg_cancel_backend(). The transaction is aborted, nothing of it is saved, and the connection stays usable.
_QUERY_CANCELED = "57014"
# The server cannot serve now: shutting down, starting up, out of connection slots; class 08 is a lost link.
_UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})
# SQLite extended result codes (sqlite3 sets ``sqlite_errorcode`` on its errors).
_SQLITE_CONSTRAINT_UNIQUE = 2067
_SQLITE_CONSTRAINT_PRIMARYKEY = 1555
_SQLITE_BUSY = 5


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """A plain-text response the middleware sends in place of the app's."""

    status: int
    body: str
    headers: tuple[tuple[str, str], ...] = ()

    def messages(self) -> tuple[Message, Message]:
        """The ASGI messages that send this response."""
        body = self.body.encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            *((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in self.headers),
        ]
        return (
            {"type": "http.response.start", "status": self.status, "headers": headers},
            {"type": "http.response.body", "body": body},
        )


ErrorResponseMapper = Callable[[BaseException], "ErrorResponse | None"]

INTERNAL_SERVER_ERROR = ErrorResponse(500, "Internal Server Error")
CONFLICT = ErrorResponse(409, "Conflict: the request clashes with data saved meanwhile; nothing was saved.")
SERVICE_UNAVAILABLE = ErrorResponse(
    503, "Service Unavailable: the database could not complete the request; retry it.", (("Retry-After", "1"),)
)
# The connection died while COMMIT was under way and the server could not be asked what became of it: neither
# "saved" (a 2xx) nor "retry" (a 503), since a retry could save the data twice. A 500 says the server failed,
# and an HTTP client retries no POST on it by itself.
OUTCOME_UNKNOWN = ErrorResponse(
    500,
    "Internal Server Error: the connection to the database was lost while saving, and whether the request's "
    "changes were saved is not known. Check before retrying.",
)


def _driver_errors(error: BaseException) -> tuple[object, object]:
    """The driver's error behind a SQLAlchemy one, and its own cause: SQLAlchemy's asyncpg adapter raises an
    error of its own (with the SQLSTATE copied onto it) whose ``__cause__`` is asyncpg's."""
    orig = getattr(error, "orig", None)
    return orig, getattr(orig, "__cause__", None)


def _sqlstate(error: BaseException) -> str | None:
    for candidate in _driver_errors(error):
        state = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(state, str):
            return state
    return None


def _protocol_broken(error: BaseException) -> bool:
    # asyncpg's "cannot switch to state N; another operation is in progress": its protocol state machine is
    # stuck, which (with sessions guarded against concurrent use) means the server dropped the connection
    # under it, sometimes before SQLAlchemy has marked the connection invalidated.
    return any(isinstance(candidate, asyncpg.InternalClientError) for candidate in _driver_errors(error))


def _says_closed(error: BaseException | None) -> bool:
    # asyncpg raises a plain InterfaceError, with no code, for any use of a connection that has closed.
    return "connection is closed" in str(error)


# Where a database wait's own timeout is raised from: asyncpg's command_timeout, SQLAlchemy's pre-ping (the
# driver's error passes through it unwrapped). A TimeoutError of the app's own (an asyncio.timeout around its
# code) starts outside them.
_DATABASE_MODULES = ("asyncpg.", "sqlalchemy.")


def _database_timed_out(error: BaseException) -> bool:
    """A builtin TimeoutError raised inside the driver or SQLAlchemy: a statement, pre-ping or connect that got
    no answer in time (asyncpg raises it unwrapped, and SQLAlchemy passes it on as it is)."""
    if not isinstance(error, TimeoutError):
        return False
    traceback = error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_globals.get("__name__", "").startswith(_DATABASE_MODULES):
            return True
        traceback = traceback.tb_next
    return False


def _sqlite_code(error: BaseException) -> int | None:
    for candidate in _driver_errors(error):
        if isinstance(candidate, sqlite3.Error):
            return candidate.sqlite_errorcode
    return None


def default_error_response(error: BaseException) -> ErrorResponse | None:
    """409 for a unique violation; 503 with ``Retry-After`` for what a retry can fix; ``OUTCOME_UNKNOWN`` (a 500
    that says so) for a COMMIT whose outcome could not be learned; None for the rest.

    503: a serialization failure or deadlock (the transaction lost a race), a lost or invalidated connection
    (the server restarted, or became read-only: see _read_only_server.py), a server that refuses connections
    or is starting or shutting down, a full pool (``sqlalchemy.exc.TimeoutError``) or a server out of
    connection slots, a statement that got no answer within ``DATABASE_COMMAND_TIMEOUT`` (a TimeoutError
    raised by the driver), a statement the server cancelled (57014: its ``statement_timeout`` fired, a
    route's or ``DATABASE_STATEMENT_TIMEOUT``), a busy SQLite database.
    """
    if isinstance(error, sa_exc.TimeoutError | DatabaseUnavailableError) or _database_timed_out(error):
        return SERVICE_UNAVAILABLE
    if isinstance(error, CommitOutcomeUnknownError):
        return OUTCOME_UNKNOWN
    if isinstance(error, asyncpg.InterfaceError) and _says_closed(error):
        # asyncpg's own error, not wrapped by SQLAlchemy (seen once under load while every backend was being
        # terminated): the connection died under the request, as with the wrapped kind below.
        return SERVICE_UNAVAILABLE
    if not isinstance(error, sa_exc.DBAPIError):
        return None
    if error.connection_invalidated or _protocol_broken(error):
        return SERVICE_UNAVAILABLE
    state = _sqlstate(error)
    if state in (_UNIQUE_VIOLATION, _EXCLUSION_VIOLATION):
        return CONFLICT
    if state in (_SERIALIZATION_FAILURE, _DEADLOCK_DETECTED, _QUERY_CANCELED) or state in _UNAVAILABLE_SQLSTATES:
        return SERVICE_UNAVAILABLE
    if state is not None and state.startswith("08"):
        return SERVICE_UNAVAILABLE
    if state is not None:
        return None
    if isinstance(error, sa_exc.InterfaceError) and _says_closed(error.orig):
        return SERVICE_UNAVAILABLE
    code = _sqlite_code(error)
    if code in (_SQLITE_CONSTRAINT_UNIQUE, _SQLITE_CONSTRAINT_PRIMARYKEY):
        return CONFLICT
    if code == _SQLITE_BUSY:
        return SERVICE_UNAVAILABLE
    return None
