"""Database: one named database's engine, session factory and commit policy."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import asyncpg
import sqlalchemy.ext.asyncio
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from ._commit_outcome import CommitOutcomeReader
from ._extras import require
from ._orphans import OrphanReaper, server_ends_orphans
from ._pool_metrics import metrics_provider, record_pool_metrics
from ._read_only_server import discard_read_only_servers
from ._session import (
    GuardedSession,
    bound_statements,
    holds_hooks,
    sync_session_class,
)
from ._urls import redact_url
from .exceptions import (
    CHECK_FAILED,
    ENGINE_OPTIONS_WITH_ENGINE,
    HOOKS_WOULD_NEVER_RUN,
    JOINS_NESTED,
    NO_DATABASE,
    NO_TARGET_HOST,
    REPLICAS_AS_STRING,
    REPLICAS_WITHOUT_SETTINGS,
    STATEMENT_TIMEOUT_ABOVE_COMMAND_TIMEOUT,
    TWO_ENGINE_SOURCES,
    UNREACHABLE,
    DatabaseUnavailableError,
    UnknownDatabaseError,
    UsageError,
)
from .query_insight import _count_queries_on
from .settings import (
    DEFAULT_CLEANUP_TIMEOUT,
    DEFAULT_COMMIT_OUTCOME_TIMEOUT,
    DatabaseSettings,
    _settings_from_environment,
)

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

__all__ = [
    "Database",
    "get_database",
]


# What on_engine is told an engine is for.
_EngineRole = Literal["primary", "replica"]

# Recommended for async code: no lazy loads after commit, no implicit IO from autoflush.
_SESSION_DEFAULTS: Mapping[str, Any] = {"expire_on_commit": False, "autoflush": False, "class_": GuardedSession}

_logger = logging.getLogger("asgi_db_session")
_registry: dict[str, Database] = {}
# Connections whose transaction every new session of a database name joins (see Database.sessions_joining).
_joining: dict[str, AsyncConnection] = {}
# Every Database of this process, for the fork hook below; weak, so that it keeps none of them alive.
_all_databases: weakref.WeakSet[Database] = weakref.WeakSet()


def _forget_inherited_connections() -> None:
    """In a forked child (gunicorn --preload, multiprocessing): drop the pools the parent filled.

    Their connections belong to the parent's event loop and socket; used in the child they fail with
    "attached to a different loop", or worse, two processes talk over one socket. ``dispose(close=False)``
    replaces each pool without touching the parent's connections, so the child opens its own.
    """
    for database in list(_all_databases):
        for engine in [database._engine, *(database._replica_engines or ())]:
            if engine is not None:
                engine.sync_engine.dispose(close=False)


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_forget_inherited_connections)


def _refuse_lost_hooks(session_options: Mapping[str, Any]) -> None:
    """A sync session class that holds on_commit() callbacks under a class_ that never runs them: refused."""
    session_class = session_options.get("class_", AsyncSession)
    sync_class = session_options.get("sync_session_class") or getattr(session_class, "sync_session_class", Session)
    if (
        isinstance(session_class, type)
        and isinstance(sync_class, type)
        and holds_hooks(sync_class)
        and not issubclass(session_class, GuardedSession)
    ):
        raise TypeError(
            HOOKS_WOULD_NEVER_RUN.format(session_class=session_class.__name__, sync_class=sync_class.__name__)
        )


@functools.cache
def _tracking_writes(sync_class: type[Session]) -> type[Session]:
    """``sync_class``, noting its writes (databases with replicas): one class for every engine."""
    return sync_session_class(sync_class, tracking=True)


# What a Database given an engine (no settings) does about the outcome of a lost COMMIT: the settings' defaults.
_COMMIT_OUTCOME_CHECK: bool = DatabaseSettings.model_fields["commit_outcome_check"].default


class _ConnectWrapper:
    """An engine's connect: a refused or reset connect, a refused login or a missing database becomes
    DatabaseUnavailableError.

    The driver raises the first two as plain OSErrors that SQLAlchemy passes on unwrapped, which would make them
    indistinguishable from any other network error in the app, and a 500 instead of a 503. A login the server
    refuses (a wrong password, no pg_hba.conf line for the user: SQLSTATE class 28), or a database name it does
    not have (3D000), would otherwise be a 500 with asyncpg's error; the server's text names the user or the
    database, never the password.

    One per engine, however many Databases are built on it (a session-scoped engine and an app per test). The
    error names the newest of them that still exists, as get_database() finds the newest Database of a name; it
    holds them weakly, so that an engine outliving its Databases keeps none of them alive.
    """

    __slots__ = ("_connect", "_databases", "_name", "_redacted_url")

    def __init__(self, connect: Callable[..., Any], redacted_url: str) -> None:
        self._connect = connect
        self._redacted_url = redacted_url
        self._databases: list[weakref.ref[Database]] = []
        self._name = ""

    def add(self, database: Database) -> None:
        self._databases = [*(ref for ref in self._databases if ref() is not None), weakref.ref(database)]
        self._name = database.name  # the name to give once every Database on the engine is gone

    def _database_name(self) -> str:
        for ref in reversed(self._databases):
            database = ref()
            if database is not None:
                return database.name
        return self._name

    def __call__(self, *cargs: Any, **cparams: Any) -> Any:
        try:
            return self._connect(*cargs, **cparams)
        except OSError as exc:
            raise DatabaseUnavailableError(
                UNREACHABLE.format(
                    name=self._database_name(), url=self._redacted_url, reason=f"{type(exc).__name__}: {exc}"
                )
            ) from exc
        except Exception as exc:
            # SQLAlchemy 2.1 wraps asyncpg's error in one of its adapter (asyncpg's as __cause__); 2.0 does not.
            own = isinstance(exc, asyncpg.PostgresError | asyncpg.TargetServerAttributeNotMatched)
            refused = exc if own else exc.__cause__
            if isinstance(refused, asyncpg.TargetServerAttributeNotMatched):
                # Every host answered, none is what target_session_attrs asks for: a failover under way, say.
                reason = NO_TARGET_HOST
            elif isinstance(refused, asyncpg.InvalidAuthorizationSpecificationError):
                reason = "the server refused the login"
            elif isinstance(refused, asyncpg.InvalidCatalogNameError):
                reason = "the server has no such database"
            else:
                raise
            raise DatabaseUnavailableError(
                UNREACHABLE.format(
                    name=self._database_name(),
                    url=self._redacted_url,
                    reason=f"{reason}: {type(refused).__name__}: {refused}",
                )
            ) from exc


def _create_engine(url: str | URL, options: Mapping[str, Any]) -> AsyncEngine:
    # Looked up on the module at each call, not imported once: an instrumentation that wraps the module's
    # function after this package was imported (OpenTelemetry's SQLAlchemyInstrumentor().instrument()) sees
    # the engines made from then on.
    return sqlalchemy.ext.asyncio.create_async_engine(url, **options)


def get_database(name: str = "default") -> Database:
    """The Database most recently created under ``name`` (the middleware creates one when not given one).

    For what needs the database itself rather than a session: a health check (``ping()``), ``create_all``
    at startup, a script's ``dispose()``. UnknownDatabaseError when no Database of that name exists.
    """
    try:
        return _registry[name]
    except KeyError:
        raise UnknownDatabaseError(NO_DATABASE.format(name=name)) from None


class Database:
    """One named database: its engine, its session factory and its commit policy.

    The engine is created on first use (``engine``, a session, ``check()``), or at lifespan startup when the
    middleware runs one: never at import time, so an app object imported before a fork is safe. Creating a
    Database registers it under its name, which is what ``session_scope(name)`` outside a request finds.

    Give at most one engine source: ``url``, ``engine`` or ``settings``; none reads ``DatabaseSettings()``
    from the environment. ``url`` is combined with the other ``DATABASE_*`` settings from the environment.

    ``on_engine(engine, role)`` is called once for every engine this Database uses, as it is created (or, for
    ``engine=``, here): ``role`` is ``"primary"`` or ``"replica"``. Replica engines are made on first use, so a
    listener added at startup would miss them; this is the place to add SQLAlchemy event listeners (on
    ``engine.sync_engine``) or tracing to all of them. Engines are made with ``create_async_engine`` looked up
    on ``sqlalchemy.ext.asyncio`` at that moment, so OpenTelemetry's ``SQLAlchemyInstrumentor().instrument()``
    covers them too, whenever it ran before they were made.

    Each engine's pool reports OpenTelemetry's ``db.client.connection.*`` metrics when ``DATABASE_METRICS`` says
    so; by default, when the application configured a MeterProvider before the engine is made.
    ``meter_provider`` records them with that provider instead of the global one (docs/how-to/metrics.md). The
    pool of the primary is named after the Database (``default``), each replica's ``<name>/replica-<i>``, ``i``
    its place in the list of replicas from 0.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        name: str = "default",
        engine: AsyncEngine | None = None,
        settings: DatabaseSettings | None = None,
        commit_on_success: bool = False,
        session_options: Mapping[str, Any] | None = None,
        engine_options: Mapping[str, Any] | None = None,
        check_on_startup: bool | None = None,
        replicas: Sequence[str] | None = None,
        on_engine: Callable[[AsyncEngine, _EngineRole], object] | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        # Set first, so that repr() works on a Database whose construction failed (a traceback printing locals).
        self.name = name
        self.settings = settings
        self._engine = engine
        self.commit_on_success = commit_on_success
        given = [arg for arg, value in (("url", url), ("engine", engine), ("settings", settings)) if value is not None]
        if len(given) > 1:
            raise ValueError(
                TWO_ENGINE_SOURCES.format(
                    owner="Database", given=" and ".join(given), choices="url=, engine=, settings="
                )
            )
        if engine is not None and engine_options:
            raise ValueError(ENGINE_OPTIONS_WITH_ENGINE)
        if engine is None:
            if settings is None:
                settings = _settings_from_environment() if url is None else _settings_from_environment(url=url)
            # Fails here, at construction, rather than at the first request.
            settings.engine_options()
        self.settings = settings
        # The bound of each scope's rollback and close; an engine given as it is gets the default bound.
        self.cleanup_timeout = DEFAULT_CLEANUP_TIMEOUT if settings is None else settings.cleanup_timeout
        if check_on_startup is None:
            check_on_startup = settings is not None and settings.check_on_startup
        self.check_on_startup = check_on_startup
        self.session_options: Mapping[str, Any] = {**_SESSION_DEFAULTS, **(session_options or {})}
        _refuse_lost_hooks(self.session_options)
        self._engine_options = dict(engine_options or {})
        self._reapers: list[OrphanReaper] = []
        self._commit_outcome: CommitOutcomeReader | None = None
        self._sessionmaker: async_sessionmaker[AsyncSession] | None = None
        self._joined: async_sessionmaker[AsyncSession] | None = None
        joining = _joining.get(name)
        if joining is not None:
            self._join(joining)
        self._replica_settings = self._settings_of_replicas(replicas)
        self._replica_engines: list[AsyncEngine] | None = None
        self._read_only_makers: Iterator[async_sessionmaker[AsyncSession]] | None = None
        self._primary_read_only: async_sessionmaker[AsyncSession] | None = None
        self._counting_queries = False
        # The statement timeouts (ms) already compared with the command timeout: each is compared, and logged, once.
        self._checked_timeouts: set[int] = set()
        self.on_engine = on_engine
        self._meter_provider = meter_provider
        if settings is not None and settings.metrics:
            # Found missing here, at construction, rather than when the engine is made.
            require("opentelemetry.metrics", extra="opentelemetry", needed_by="DATABASE_METRICS=true (pool metrics)")
        if engine is not None:
            self._instrument(engine, None, "primary", name)
        _registry[name] = self
        _all_databases.add(self)

    def __repr__(self) -> str:
        replicas = getattr(self, "_replica_settings", None)
        shown = f", replicas={[replica.redacted_url for replica in replicas]!r}" if replicas else ""
        return (
            f"Database(name={self.name!r}, url={self.redacted_url!r}{shown}, "
            f"commit_on_success={self.commit_on_success})"
        )

    def _settings_of_replicas(self, replicas: Sequence[str] | None) -> list[DatabaseSettings]:
        """One DatabaseSettings per replica: the primary's pool and driver settings, the replica's URL."""
        if isinstance(replicas, str):
            raise TypeError(REPLICAS_AS_STRING)
        urls = list(replicas) if replicas is not None else []
        if self.settings is not None and not urls:
            urls = list(self.settings.replica_urls)
        if not urls:
            return []
        if self.settings is None:
            raise ValueError(REPLICAS_WITHOUT_SETTINGS)
        return [
            # Only what was set: a default the primary kept stays a default, which a replica URL's value overrides.
            _settings_from_environment(
                **{**self.settings.model_dump(exclude_unset=True), "url": url, "replica_urls": []}
            )
            for url in urls
        ]

    @property
    def redacted_url(self) -> str:
        """The URL with its password masked."""
        if self._engine is not None:
            return redact_url(self._engine.url.render_as_string(hide_password=True))
        return "<unset>" if self.settings is None else self.settings.redacted_url

    @property
    def engine(self) -> AsyncEngine:
        """The AsyncEngine, created on first access."""
        if self._engine is None:
            assert self.settings is not None
            options = {**self.settings.engine_options(), **self._engine_options}
            self._engine = _create_engine(self.settings.engine_url(), options)
            self._instrument(self._engine, self.settings, "primary", self.name)
        return self._engine

    def _instrument(
        self, engine: AsyncEngine, settings: DatabaseSettings | None, role: _EngineRole, pool_name: str
    ) -> None:
        """What every engine of this Database gets, whether it made the engine or was given it; then the app's
        on_engine hook, last, so that one that raises leaves the engine set up as without it."""
        self._instrument_own(engine, settings)
        provider = metrics_provider(None if settings is None else settings.metrics, self._meter_provider)
        if provider is not None:
            record_pool_metrics(engine, pool_name, provider)
        if self.on_engine is not None:
            self.on_engine(engine, role)

    def _instrument_own(self, engine: AsyncEngine, settings: DatabaseSettings | None) -> None:
        sync_engine = engine.sync_engine
        dialect = sync_engine.dialect
        # The dialect's own connect, wrapped on this engine's dialect rather than through a "do_connect" listener:
        # any dialect listener makes SQLAlchemy dispatch dialect events at every statement (do_execute,
        # do_setinputsizes), a cost per statement (measured in benchmarks/README.md, "Reading the results"). Wrapped
        # once: a second Database on the same engine joins the wrapper. (setattr: mypy refuses an assignment to
        # a method.)
        wrapper = vars(dialect).get("connect")
        if not isinstance(wrapper, _ConnectWrapper):
            wrapper = _ConnectWrapper(dialect.connect, redact_url(engine.url.render_as_string(hide_password=True)))
            setattr(dialect, "connect", wrapper)  # noqa: B010
        wrapper.add(self)
        if self._counting_queries:
            _count_queries_on(sync_engine, self.name)
        if engine.dialect.driver != "asyncpg":
            return
        discard_read_only_servers(dialect)
        if settings is None:
            # An engine given as it is: its URL, without the connect_args it was made with (an SSL setting,
            # say); if the side connection then fails, the backend stays, as it would without this.
            self._reapers.append(OrphanReaper(engine, engine.url, {}))
        elif not server_ends_orphans(settings.client_connection_check_interval):
            connect_args = settings.engine_options().get("connect_args", {})
            self._reapers.append(OrphanReaper(engine, settings.engine_url(), connect_args))

    @property
    def sessionmaker(self) -> async_sessionmaker[AsyncSession]:
        """The factory behind every session of this database."""
        factory = self._sessionmaker
        if factory is None:
            engine = self.engine
            factory = self._sessionmaker = self._maker(engine, self._commit_outcome_reader(engine))
        return factory

    def _commit_outcome_reader(self, engine: AsyncEngine) -> CommitOutcomeReader | None:
        """The reader that learns what became of a COMMIT whose answer was lost: PostgreSQL on asyncpg only."""
        if engine.dialect.driver != "asyncpg":
            return None
        reader = self._commit_outcome
        if reader is None:
            settings = self.settings
            if settings is None:  # an engine given as it is: its URL, without the connect_args it was made with
                reader = CommitOutcomeReader(
                    engine.url, {}, check=_COMMIT_OUTCOME_CHECK, timeout=DEFAULT_COMMIT_OUTCOME_TIMEOUT
                )
            else:
                reader = CommitOutcomeReader(
                    settings.engine_url(),
                    settings.engine_options().get("connect_args", {}),
                    check=settings.commit_outcome_check,
                    timeout=settings.commit_outcome_timeout,
                )
            self._commit_outcome = reader
        return reader

    def count_queries(self) -> None:
        """Count each scope's statements and database time from now on (see ``query_stats()``)."""
        if self._counting_queries:
            return
        self._counting_queries = True
        # Engines made from now on get the events as they are created; these exist already.
        for engine in [self._engine, *(self._replica_engines or ())]:
            if engine is not None:
                _count_queries_on(engine.sync_engine, self.name)

    @property
    def replica_engines(self) -> list[AsyncEngine]:
        """The replicas' engines (created on first access), in the order given; empty without replicas."""
        engines = self._replica_engines
        if engines is None:
            engines = self._replica_engines = []
            for index, replica in enumerate(self._replica_settings):
                options = {**replica.engine_options(), **self._engine_options}
                engine = _create_engine(replica.engine_url(), options)
                self._instrument(engine, replica, "replica", f"{self.name}/replica-{index}")
                engines.append(engine)
        return engines

    def new_session(
        self, *, read_only: bool = False, on_primary: bool = False, options: Mapping[str, Any] | None = None
    ) -> AsyncSession:
        """A new session; it checks out a connection only when it first runs a statement.

        ``read_only``: its transactions are READ ONLY (PostgreSQL enforces it), on the next replica in turn,
        or on the primary when there is none or ``on_primary`` (the request wrote, and a replica may lag).
        ``options``: session arguments over this database's ``session_options`` (its class stays).
        """
        maker = self._joined
        if maker is None:
            if not read_only:
                maker = self.sessionmaker
            elif on_primary or not self._replica_settings:
                maker = self._primary_read_only_maker()
            else:
                makers = self._read_only_makers
                if makers is None:
                    makers = self._read_only_makers = itertools.cycle(
                        [
                            self._maker(engine.execution_options(postgresql_readonly=True))
                            for engine in self.replica_engines
                        ]
                    )
                maker = next(makers)
        # The maker's own arguments, class_ among them, stay; the call's arguments override the rest.
        return maker() if options is None else maker(**options)

    def _maker(
        self, engine: AsyncEngine, commit_outcome: CommitOutcomeReader | None = None
    ) -> async_sessionmaker[AsyncSession]:
        options = dict(self.session_options)
        session_class = options.get("class_")
        if isinstance(session_class, type) and issubclass(session_class, GuardedSession):
            sync_class = options.get("sync_session_class") or session_class.sync_session_class
            if commit_outcome is not None:
                # With the check on it notes writes as well: a transaction that wrote has an id to read before COMMIT.
                options["sync_session_class"] = sync_session_class(
                    sync_class, tracking=bool(self._replica_settings), reader=commit_outcome
                )
            elif self._replica_settings:
                # Tells the request which of its reads must stay on the primary; only with replicas, as it costs.
                options["sync_session_class"] = _tracking_writes(sync_class)
        return async_sessionmaker(engine, **options)

    def _bound_statements(self, session: AsyncSession, milliseconds: int) -> None:
        """Bound every statement of ``session`` to ``milliseconds`` on the server (see ``bound_statements``);
        the first time a value is asked, a warning if the client's own bound would fire first."""
        checked = self._checked_timeouts
        if milliseconds not in checked:
            checked.add(milliseconds)
            command_timeout = self._command_timeout()
            if command_timeout is not None and milliseconds >= command_timeout * 1000:
                _logger.warning(
                    STATEMENT_TIMEOUT_ABOVE_COMMAND_TIMEOUT.format(
                        seconds=milliseconds / 1000, name=self.name, command_timeout=command_timeout
                    )
                )
        bound_statements(session, milliseconds)

    def _command_timeout(self) -> float | None:
        """asyncpg's command_timeout of the primary, as the settings and the URL make it; None when there is none
        or it is not known (an engine given as it is)."""
        settings = self.settings
        if settings is None or self._engine is None or self._engine.dialect.driver != "asyncpg":
            return None
        timeout = settings.engine_options().get("connect_args", {}).get("command_timeout")
        return timeout if isinstance(timeout, int | float) else None

    def _primary_read_only_maker(self) -> async_sessionmaker[AsyncSession]:
        maker = self._primary_read_only
        if maker is None:
            maker = self._primary_read_only = self._maker(self.engine.execution_options(postgresql_readonly=True))
        return maker

    @contextmanager
    def sessions_joining(self, connection: AsyncConnection) -> Iterator[None]:
        """Inside the block, every new session of this database runs inside ``connection``'s transaction.

        For tests (``asgi_db_session.testing``): the app's sessions use savepoints on that one connection, so
        the app may commit as it likes and the test still rolls everything back at its end. It applies to the
        whole Database, not one task: the app may run in another task, or (TestClient) another thread; and to
        a Database of the same name created inside the block, as DBSessionMiddleware(app, url=...) creates its
        own at the app's first request.
        """
        if self.name in _joining:
            raise UsageError(JOINS_NESTED.format(name=self.name))
        _joining[self.name] = connection
        self._join(connection)
        try:
            yield
        finally:
            del _joining[self.name]
            for database in list(_all_databases):
                if database.name == self.name:
                    database._joined = None

    def _join(self, connection: AsyncConnection) -> None:
        options = {**self.session_options, "join_transaction_mode": "create_savepoint"}
        self._joined = async_sessionmaker(connection, **options)

    # A health check needs its own bound; callers should not have to wrap it in asyncio.timeout().
    async def check(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Connect and run ``SELECT 1``; DatabaseUnavailableError (password masked) if that fails in time."""
        try:
            async with asyncio.timeout(timeout), self.engine.connect() as connection:
                await connection.exec_driver_sql("SELECT 1")
        except DatabaseUnavailableError as exc:  # from _ConnectWrapper: it names the database and the reason already
            raise DatabaseUnavailableError(CHECK_FAILED.format(error=str(exc).rstrip("."))) from None
        except Exception as exc:
            # The driver's text (connection refused, authentication failed) helps; it carries no password.
            reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            unreachable = UNREACHABLE.format(name=self.name, url=self.redacted_url, reason=reason)
            raise DatabaseUnavailableError(CHECK_FAILED.format(error=unreachable)) from None

    async def ping(self, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        """True when the database answers ``SELECT 1`` within ``timeout`` seconds."""
        try:
            await self.check(timeout)
        except DatabaseUnavailableError:
            return False
        return True

    async def dispose(self) -> None:
        """Close every pooled connection. The engine stays usable: a later session opens a fresh pool."""
        for reaper in self._reapers:
            await reaper.close()
        if self._commit_outcome is not None:
            await self._commit_outcome.close()
        if self._engine is not None:
            await self._engine.dispose()
        for engine in self._replica_engines or ():
            await engine.dispose()
