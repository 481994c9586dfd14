"""Exceptions raised by asgi_db_session, and the texts they carry.

Every exception the package defines derives from ``AsgiDbSessionError``, and keeps the builtin base its
meaning calls for, so that ``except RuntimeError`` (or ``LookupError``, ``ConnectionError``) still catches it:

    Exception
     └── AsgiDbSessionError ............. any error of this package
          ├── NoSessionError (RuntimeError)  current_session() outside a scope, after its scope ended, or on a
          │    │                             session_policy(session=False) route
          │    └── UnknownDatabaseError (LookupError)  no Database of that name (get_database(), session_scope())
          ├── ConcurrentSessionUseError (RuntimeError)  two tasks ran operations on one session at the same time
          ├── UsageError (RuntimeError) ... a call where it cannot work: query_stats() without counting, nested
          │                                 Database.sessions_joining(), the testing plugin's set-up refused
          ├── CommitFailedError ............ the commit of a request's session failed; the client got an error status
          ├── CommitOutcomeUnknownError .... the connection died while COMMIT was under way, and whether it
          │                                  committed could not be learned (PostgreSQL)
          └── DatabaseUnavailableError (ConnectionError)  the database could not be reached (startup check,
                                             Database.check(), a refused connect)

A wrong argument or setting is a ValueError (TypeError for a wrong type) at construction, as in Python itself.

The texts are module constants so that tests (and users' own tests) can match them.
"""

from __future__ import annotations

__all__ = [
    "ALEMBIC_ELSEWHERE",
    "ALEMBIC_MISSING",
    "ASYNCPG_ONLY",
    "AT_ANOTHER_REVISION",
    "AsgiDbSessionError",
    "BAD_URL_VALUE",
    "CHECK_FAILED",
    "CLEANUP_FAILED",
    "CLEANUP_TIMED_OUT",
    "COMMIT_FAILED",
    "COMMIT_FAILED_LATE",
    "COMMIT_FAILED_LATE_UNKNOWN",
    "COMMIT_FAILED_UNKNOWN",
    "COMMIT_LEARNED_ABORTED",
    "COMMIT_LEARNED_COMMITTED",
    "COMMIT_OUTCOME_NOT_ASKED",
    "COMMIT_OUTCOME_UNKNOWN",
    "CONCURRENT_USE",
    "CommitFailedError",
    "CommitOutcomeUnknownError",
    "ConcurrentSessionUseError",
    "DatabaseUnavailableError",
    "ENGINE_OPTIONS_WITH_ENGINE",
    "HEALTH_TIMEOUT",
    "HOOKS_WOULD_NEVER_RUN",
    "INVALID_SETTINGS",
    "JOINS_NESTED",
    "LAZY_LOAD_OF_COLUMN",
    "LAZY_LOAD_OF_RELATIONSHIP",
    "LAZY_LOAD_UNNAMED",
    "MIDDLEWARE_NAME_MISMATCH",
    "MIDDLEWARE_ON_ENGINE_WITH_DATABASE",
    "MIDDLEWARE_SESSION_OPTIONS_WITH_DATABASE",
    "MISSING_EXTRA",
    "NOT_A_DATABASE",
    "NOT_A_SQLMODEL_SESSION",
    "NOT_COUNTING",
    "NOT_CREATED_YET",
    "NOT_STARTED",
    "NO_ASYNC_DRIVER",
    "NO_DATABASE",
    "NO_SCOPE",
    "NO_SESSION_ROUTE",
    "NO_TARGET_HOST",
    "NO_URL",
    "NoSessionError",
    "ON_COMMIT_NEEDS_GUARDED_SESSION",
    "OWN_EVENT_LOOP",
    "POLICY_CANNOT_MARK",
    "POLICY_TOO_LATE",
    "POLICY_WITHOUT_SESSION",
    "REPLAY_BODY_SIZE",
    "REPLAY_NOT_INSTALLED",
    "REPLICAS_AS_STRING",
    "REPLICAS_WITHOUT_SETTINGS",
    "RETRY_ATTEMPTS",
    "RETRY_BACKOFF",
    "SCOPE_ENDED",
    "SCOPE_SESSION_CLASS",
    "SETTING_DISAGREES_WITH_URL",
    "SEVERAL_HEADS",
    "SSL_FILE_UNREADABLE",
    "SSL_FILE_WITHOUT_MODE",
    "SSL_KEY_WITHOUT_CERT",
    "SSL_MODES_DISAGREE",
    "SSL_NO_ROOT_CERT",
    "SSL_SYSTEM_NEEDS_VERIFY_FULL",
    "STATEMENT_TIMEOUT_ABOVE_COMMAND_TIMEOUT",
    "STATEMENT_TIMEOUT_INVALID",
    "SYNC_DRIVER",
    "TABLES_EXIST",
    "TESTING_EXTRA_MISSING",
    "TWO_ENGINE_SOURCES",
    "UNKNOWN_DRIVER",
    "UNKNOWN_URL_PARAMETER",
    "UNKNOWN_URL_PARAMETER_ADVICE",
    "UNPARSEABLE_URL",
    "UNREACHABLE",
    "URL_VALUE_DISAGREES_WITH_SETTING",
    "UnknownDatabaseError",
    "UsageError",
]


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
COMMIT_FAILED_UNKNOWN = (
    "Committing the {name!r} session before sending the response lost its answer, and whether it committed could "
    "not be learned, so the client got {status} instead of the app's {app_status}; the request's changes may have "
    "been saved."
)
COMMIT_FAILED_LATE_UNKNOWN = (
    "Committing the {name!r} session after the response had started lost its answer, and whether it committed "
    "could not be learned; the client's response was cut short, and the work done after the response started may "
    "have been saved."
)
COMMIT_OUTCOME_UNKNOWN = (
    "The connection to the database was lost after COMMIT of transaction {xid} was sent and before its answer "
    "arrived, and the outcome could not be learned ({reason}): the transaction may or may not have been saved, and "
    "its on_commit callbacks were not run. Check its data before retrying; once the server can be reached, "
    "SELECT pg_xact_status('{xid}') there tells. DATABASE_COMMIT_OUTCOME_TIMEOUT sets how long to try."
)
COMMIT_OUTCOME_NOT_ASKED = (
    "The connection to the database was lost after COMMIT was sent and before its answer arrived: the transaction "
    "may or may not have been saved, and its on_commit callbacks were not run. Check its data before retrying. "
    "With DATABASE_COMMIT_OUTCOME_CHECK=true the transaction's id is read before COMMIT and the server is asked "
    "what became of it."
)
COMMIT_LEARNED_COMMITTED = (
    "The connection to the database was lost after COMMIT of transaction {xid} was sent and before its answer "
    "arrived; the server reports the transaction committed, so it is treated as committed."
)
COMMIT_LEARNED_ABORTED = (
    "The connection to the database was lost after COMMIT of transaction {xid} was sent and before its answer "
    "arrived; the server reports the transaction rolled back, so nothing of it was saved."
)
CLEANUP_FAILED = (
    "Rolling back and closing a session at the end of its scope failed; its connection was discarded, and "
    "whatever the session had not committed is lost (the database rolls it back)."
)
CLEANUP_TIMED_OUT = (
    "Rolling back and closing a session at the end of its scope got no answer from the database within {seconds} s "
    "(DATABASE_CLEANUP_TIMEOUT): its connection was closed and discarded, and the database rolls back whatever was "
    "left open in it once it sees the connection gone. The network or the server is failing; raise "
    "DATABASE_CLEANUP_TIMEOUT only if its rollbacks are slow."
)
# MissingGreenlet ("greenlet_spawn has not been called"): an attribute loaded lazily outside await.
LAZY_LOAD_OF_RELATIONSHIP = (
    "MissingGreenlet: {target} was loaded lazily on attribute access, which an AsyncSession cannot do. Load it "
    "with the query (.options(selectinload({target})) or joinedload({target})), or await it "
    "(await obj.awaitable_attrs.{attribute}, with sqlalchemy.ext.asyncio.AsyncAttrs as a base of the model). "
    'To find every such access in your tests, make lazy loads raise: lazy="raise" on the relationship, or '
    'raiseload("*") (see the docs\' "Lazy loading in async code" page).'
)
LAZY_LOAD_OF_COLUMN = (
    "MissingGreenlet: {target} was expired (by a commit with expire_on_commit=True, a rollback, or expire()) and "
    "then read, which loads it lazily, and an AsyncSession cannot do that on attribute access. Reload it with "
    "await session.refresh(obj) or await obj.awaitable_attrs.{attribute} (sqlalchemy.ext.asyncio.AsyncAttrs), "
    "or keep expire_on_commit=False (this package's default)."
)
LAZY_LOAD_UNNAMED = (
    "MissingGreenlet: an attribute was loaded lazily on attribute access (which model and attribute could not "
    "be told from the traceback), which an AsyncSession cannot do. Load relationships with the query "
    "(selectinload or joinedload in .options()), or await them (obj.awaitable_attrs.<name>, with "
    'sqlalchemy.ext.asyncio.AsyncAttrs); lazy="raise" or raiseload("*") in your tests finds every such access.'
)
TWO_ENGINE_SOURCES = "{owner} takes one engine source, got {given}: pass only one of {choices}."
MIDDLEWARE_SESSION_OPTIONS_WITH_DATABASE = (
    "With database=, give session_options= to Database(...) instead of the middleware."
)
MIDDLEWARE_ON_ENGINE_WITH_DATABASE = (
    "on_engine= applies to the Database that DBSessionMiddleware builds; with database=, pass on_engine= to "
    "Database(...) instead."
)
MIDDLEWARE_NAME_MISMATCH = "name={name!r} does not match the name of database= ({database!r}); drop one."
ENGINE_OPTIONS_WITH_ENGINE = "engine_options= applies to an engine that Database creates; it got engine= instead."
REPLICAS_AS_STRING = "replicas= takes a list of URLs, not one string: replicas=[url]."
REPLICAS_WITHOUT_SETTINGS = "replicas= needs url= or settings= for the primary: engine= gives no settings to share."
JOINS_NESTED = "Sessions of database {name!r} already join a connection; blocks do not nest."
UNREACHABLE = "Cannot reach database {name!r} at {url}: {reason}"
# UNREACHABLE's reason when every host of the URL answered and none was what its target_session_attrs asks for.
NO_TARGET_HOST = (
    "no host of the URL is what its target_session_attrs asks for (a failover under way: the primary down or "
    "fenced, the standby not promoted yet); retry once one is, and check that the URL names every server"
)
# Database.check(): the reason, then what to do.
CHECK_FAILED = "{error}. Check DATABASE_URL and that the server is running and accepts connections."
HEALTH_TIMEOUT = "timeout must be a positive number of seconds, got {timeout!r}"
POLICY_WITHOUT_SESSION = (
    "session_policy(session=False) takes no read_only=, commit_on_success= or statement_timeout=: there is no session."
)
STATEMENT_TIMEOUT_INVALID = (
    "statement_timeout= takes a positive number of seconds (an int, a float or a timedelta) of at most "
    "2147483.647 (PostgreSQL's limit), or None for no bound of its own; got {value!r}."
)
# Logged once per Database and value: the client's bound fires first, so the route's bound never does.
STATEMENT_TIMEOUT_ABOVE_COMMAND_TIMEOUT = (
    "statement_timeout={seconds:g} asked of a session of database {name!r} is not below its "
    "DATABASE_COMMAND_TIMEOUT ({command_timeout:g} s): the client stops waiting first, throws the connection "
    "away and answers 503, before the server's bound can fire. Keep the statement timeout below the command "
    "timeout, or raise DATABASE_COMMAND_TIMEOUT for this database."
)
POLICY_CANNOT_MARK = (
    "session_policy() cannot mark {name}: it takes no attributes (a bound method or a functools.partial?). "
    "Mark the function itself, or the HTTPEndpoint class."
)
POLICY_TOO_LATE = (
    "The session of database {name!r} was created before the endpoint {endpoint}, marked "
    "session_policy({asked}), was called (by a middleware, a hook or a dependency its framework runs first): "
    "it keeps the middleware's policy. Create it in the endpoint (call current_session() there or below), "
    "or see docs/how-to/route-policy-frameworks.md for where your framework reads the marker."
)
NOT_COUNTING = (
    "Queries of database {name!r} are not being counted here: query_stats() works inside a request of a "
    "DBSessionMiddleware(..., count_queries=True) (or server_timing=True, or warn_over_queries=N)."
)
NO_URL = (
    "No database URL: set the DATABASE_URL environment variable (e.g. "
    "DATABASE_URL=postgresql+asyncpg://user:password@host:5432/dbname) or pass url= to DBSessionMiddleware/Database."
)
ASYNCPG_ONLY = "{field} (DATABASE_{env}) is supported on PostgreSQL through asyncpg only, and the URL is {url!r}."
INVALID_SETTINGS = "Invalid database settings: {problems}"

UNPARSEABLE_URL = (
    "The database URL cannot be parsed (its text is not shown, as it may hold a password); write one like "
    "{example} or sqlite+aiosqlite:///./app.db, and percent-encode a password's special characters: % as %25, "
    ": as %3A, / as %2F, @ as %40 (urllib.parse.quote(password, safe=''))."
)
NO_ASYNC_DRIVER = "No async driver is known for {backend!r} in {url!r}; name one in the URL: {backend}+<driver>://..."
UNKNOWN_DRIVER = "Unknown database driver {driver!r} in {url!r}; write e.g. {example} or sqlite+aiosqlite:///./app.db"
SYNC_DRIVER = "{driver!r} in {url!r} is a synchronous driver, and an AsyncSession needs an async one: write {fix}"
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

# The testing plugin (asgi_db_session.testing re-exports the ones its users match).
NOT_CREATED_YET = (
    "asgi_db_session.testing: no Database named {name!r} exists, and none could be made from the environment "
    "({reason}). Set DATABASE_URL for the tests, or create the app's Database yourself, pass it to the "
    "middleware (DBSessionMiddleware, database=db) and return it from a `database` fixture in your conftest.py."
)
NOT_STARTED = (
    "asgi_db_session.testing: the TestClient is not started. Use it as `with TestClient(app) as client:`; "
    "without `with`, every request runs on a new event loop and the test's connection cannot serve them."
)
NOT_A_SQLMODEL_SESSION = (
    "current_sqlmodel_session(): the sessions of database {name!r} are {session_class}, not SQLModelSession. "
    "Give session_options={{'class_': SQLModelSession}} to its Database or DBSessionMiddleware "
    "(from asgi_db_session.sqlmodel import SQLModelSession)."
)
NOT_A_DATABASE = "asgi_db_session.testing: the `database` fixture returned {value!r}; it must return a Database."
TESTING_EXTRA_MISSING = (
    "asgi_db_session.testing: the db_client fixture needs {module}, which is not installed. "
    "Install the plugin's extra: pip install 'asgi-db-session[testing]'."
)
TABLES_EXIST = (
    "asgi_db_session.testing: schema_from_metadata() creates the tables for the test session and drops them "
    "after it, but the database at {url} already has {tables}. Tests should run on a database of their own: "
    "point the tests' DATABASE_URL at an empty one, or drop these tables (a test run that was killed leaves "
    "them behind)."
)
ALEMBIC_MISSING = (
    "asgi_db_session.testing: schema_from_alembic() needs Alembic, which is not installed. "
    "Install it (pip install alembic), or make the schema with schema_from_metadata()."
)
SEVERAL_HEADS = (
    "asgi_db_session.testing: the test database already stands at several Alembic heads {heads}; "
    "schema_from_alembic() would not know where to bring it back to. Run the tests on an empty database."
)
ALEMBIC_ELSEWHERE = (
    "asgi_db_session.testing: the env.py of {config} did not run the migrations on the connection it was given "
    "({detail}). Make it run them on config.attributes['connection'] when that is set, as "
    "examples/alembic/env.py does."
)
AT_ANOTHER_REVISION = "after `alembic upgrade {revision}` the database at {url} is at {found!r}, not {expected!r}"
OWN_EVENT_LOOP = "it started an event loop of its own: {error}"
REPLAY_BODY_SIZE = (
    "ReplayConflicts(max_body_size={size!r}): the largest request body kept for a replay, in bytes, must be a "
    "whole number of at least 0 (0 replays only requests without a body)."
)
REPLAY_NOT_INSTALLED = (
    "The endpoint {endpoint} is marked session_policy(replay_conflicts=True), but its request that lost a race "
    "(SQLSTATE {state}) was answered, not run again: no ReplayConflicts wraps DBSessionMiddleware (or it sits "
    "inside it). Add it last, so that it is outermost: app.add_middleware(ReplayConflicts, only_marked=True) after "
    "app.add_middleware(DBSessionMiddleware). (Said once per endpoint.)"
)
RETRY_ATTEMPTS = (
    "{call}(attempts={attempts!r}): attempts counts every run of the work, the first included, so it "
    "must be a whole number of at least 1 (1 runs the work once and never retries)."
)
RETRY_BACKOFF = (
    "{call}(backoff={backoff!r}, max_backoff={max_backoff!r}): the waits between attempts need "
    "0 <= backoff <= max_backoff (seconds): backoff is the first wait's bound, max_backoff every wait's."
)


class AsgiDbSessionError(Exception):
    """The base of every exception asgi_db_session defines: ``except AsgiDbSessionError`` catches them all."""


class NoSessionError(AsgiDbSessionError, RuntimeError):
    """current_session() was called where no session scope is active."""


class UnknownDatabaseError(NoSessionError, LookupError):
    """No Database of the name asked for exists (``get_database()``, ``session_scope()`` outside a request).

    A NoSessionError too, as it was before it had a class of its own: no session can be had for that name.
    """


class ConcurrentSessionUseError(AsgiDbSessionError, RuntimeError):
    """A second task started an operation on a session while another task's operation was still running."""


class UsageError(AsgiDbSessionError, RuntimeError):
    """A call made where it cannot work; the message says where it does (``query_stats()`` without counting, say)."""


class CommitFailedError(AsgiDbSessionError):
    """The middleware's commit of a request's session failed; ``__cause__`` is the database error.

    Raised into the app at the ``send`` call that would have started the response, so the app stops (its
    background tasks do not run for data that was not saved), then out of the middleware to the server, which
    logs it. It does not derive from RuntimeError so that an app's handler for RuntimeError does not catch it.
    """


class CommitOutcomeUnknownError(AsgiDbSessionError):
    """The connection died after COMMIT was sent and before its answer arrived, and whether the transaction
    committed could not be learned (the server could not be reached in time); ``__cause__`` is the driver's error.

    ``transaction_id`` is the transaction's id on the server (``SELECT pg_xact_status('<id>')`` tells the outcome
    once it can be reached), None when it was not read (``DATABASE_COMMIT_OUTCOME_CHECK=false``). The middleware
    answers it with ``OUTCOME_UNKNOWN``, a 500 without Retry-After: a retry could save the data twice.
    """

    def __init__(self, message: str, transaction_id: str | None) -> None:
        super().__init__(message)
        self.transaction_id = transaction_id


class DatabaseUnavailableError(AsgiDbSessionError, ConnectionError):
    """The database could not be reached; the message names it with the password masked."""
