"""Exceptions raised by asgi_db_session, and the texts they carry.

    Exception
     ├── RuntimeError
     │    ├── NoSessionError ........... current_session() outside a scope, or after its scope ended
     │    └── ConcurrentSessionUseError  two tasks ran operations on one session at the same time
     ├── CommitFailedError ............ the commit of a request's session failed; the client got an error status
     └── ConnectionError
          └── DatabaseUnavailableError . the startup check (or Database.check()) could not reach the database

The texts are module constants so that tests (and users' own tests) can match them.
"""

from __future__ import annotations

NO_SCOPE = (
    "No database session for {name!r}: current_session() works only inside a request handled by "
    "DBSessionMiddleware, or inside `async with session_scope({name!r}):`. Add the middleware to the app "
    "(app.add_middleware(DBSessionMiddleware)) or open a session_scope() around this code."
)
SCOPE_ENDED = (
    "The scope that owned the {name!r} session has ended and its session is closed: this code outlived its "
    "request (a task started with asyncio.create_task, say). Open a session of its own with "
    "`async with session_scope({name!r}) as session:`."
)
NO_SESSION_ROUTE = (
    "No database session for {name!r} here: the endpoint {endpoint} is marked session_policy(session=False). "
    "Remove that marker, or open a session explicitly with `async with session_scope({name!r}):`."
)
NO_DATABASE = (
    "No database named {name!r} is configured: create Database(url=..., name={name!r}) or add "
    "DBSessionMiddleware(app, name={name!r}, ...) before opening session_scope({name!r})."
)
CONCURRENT_USE = (
    "{method}() was called on a session that another task is using right now (asyncio.gather over "
    "current_session(), say). An AsyncSession runs one operation at a time: give each concurrent task a "
    "session of its own with `async with session_scope():` inside the task."
)
ON_COMMIT_NEEDS_GUARDED_SESSION = (
    "on_commit() cannot hold callbacks for the {name!r} session: it is a {session_class} on a sync "
    "{sync_class}, and only the package's session classes run them after a commit. In session_options, keep the "
    "default class_ or derive it from asgi_db_session.GuardedSession, and keep the default sync_session_class."
)
HOOKS_WOULD_NEVER_RUN = (
    "session_options: the sync session class {sync_class} holds on_commit() callbacks, but class_ {session_class} "
    "does not run them after a commit, so they would be lost. Keep the default class_ or derive it from "
    "asgi_db_session.GuardedSession."
)
SCOPE_SESSION_CLASS = (
    "session_scope(session_options=...) cannot set {option!r}: a block's session keeps its database's session "
    "class, which carries the package's guards (ConcurrentSessionUseError, on_commit hooks). Set the class for "
    "every session with Database(session_options=...) or DBSessionMiddleware(session_options=...) instead."
)
COMMIT_FAILED = (
    "Committing the {name!r} session before sending the response failed, so the client got {status} instead of "
    "the app's {app_status}; nothing of this request was saved."
)
COMMIT_FAILED_LATE = (
    "Committing the {name!r} session after the response had started failed; the work done after the response "
    "started (streaming body or background task) was rolled back and the client's response was cut short."
)

UNPARSEABLE_URL = (
    "The database URL cannot be parsed (its text is not shown, as it may hold a password); write one like "
    "{example} or sqlite+aiosqlite:///./app.db, and percent-encode a password's special characters: % as %25, "
    ": as %3A, / as %2F, @ as %40 (urllib.parse.quote(password, safe=''))."
)
UNKNOWN_URL_PARAMETER = (
    "The database URL {url!r} has the query parameter {name!r}, which asyncpg cannot take: {advice}."
)
UNKNOWN_URL_PARAMETER_ADVICE = (
    "neither asyncpg nor SQLAlchemy's asyncpg dialect knows it; check its spelling, or remove it"
)
BAD_URL_VALUE = "The database URL {url!r} has {name}={value}, and {name} takes {expected}."
SSL_MODES_DISAGREE = "The database URL {url!r} has ssl={ssl} and sslmode={sslmode}: they disagree; keep one of them."
SETTING_DISAGREES_WITH_URL = (
    "{setting}={setting_value} and {name}={value} in the URL {url!r} disagree: remove one of them, or make them "
    "the same."
)
URL_VALUE_DISAGREES_WITH_SETTING = (
    "{name}={value} in the URL and {setting}={setting_value} disagree: remove one of them, or make them the same."
)
SSL_FILE_WITHOUT_MODE = (
    "{files} given, with {mode}: certificate files are used only by sslmode=require, verify-ca or verify-full. "
    "Set DATABASE_SSL=verify-full (or sslmode=verify-full in the URL) to have the server's certificate checked."
)
SSL_KEY_WITHOUT_CERT = "sslkey is given without sslcert: the client certificate that the key belongs to is missing."
SSL_NO_ROOT_CERT = (
    "SSL mode {mode} checks the server's certificate against a CA certificate, and none is given: set "
    "DATABASE_SSL_ROOT_CERT=/path/to/ca.crt (or sslrootcert= in the URL; sslrootcert=system uses the system's CAs). "
    "libpq's PGSSLROOTCERT and {default} are read too, and neither is there."
)
SSL_SYSTEM_NEEDS_VERIFY_FULL = (
    "sslrootcert=system trusts every CA of the system, so it needs the host name checked too: use sslmode="
    "verify-full (got {mode})."
)
SSL_FILE_UNREADABLE = "The {what} file {path!r} ({source}) cannot be used: {reason}."
MISSING_EXTRA = (
    "{needed_by} needs {module}, which is not installed: pip install 'asgi-db-session[{extra}]' "
    "(or pip install {module})."
)


class NoSessionError(RuntimeError):
    """current_session() was called where no session scope is active."""


class ConcurrentSessionUseError(RuntimeError):
    """A second task started an operation on a session while another task's operation was still running."""


class CommitFailedError(Exception):
    """The middleware's commit of a request's session failed; ``__cause__`` is the database error.

    Raised into the app at the ``send`` call that would have started the response, so the app stops (its
    background tasks do not run for data that was not saved), then out of the middleware to the server, which
    logs it. It does not derive from RuntimeError so that an app's handler for RuntimeError does not catch it.
    """


class DatabaseUnavailableError(ConnectionError):
    """The database could not be reached; the message names it with the password masked."""
