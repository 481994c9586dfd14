"""DatabaseSettings: the engine's configuration, read from ``DATABASE_*`` environment variables."""

from __future__ import annotations

from ssl import SSLContext
from typing import Annotated, Any, Literal, cast

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.pool import QueuePool

from ._ssl import SslFile, asyncpg_ssl
from ._urls import AsyncpgQuery, asyncpg_query, redact_url, to_async_url
from .exceptions import (
    ASYNCPG_ONLY,
    INVALID_SETTINGS,
    NO_URL,
    SETTING_DISAGREES_WITH_URL,
    URL_VALUE_DISAGREES_WITH_SETTING,
)

__all__ = [
    "DEFAULT_CLEANUP_TIMEOUT",
    "DEFAULT_COMMAND_TIMEOUT",
    "DEFAULT_COMMIT_OUTCOME_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_POOL_TIMEOUT",
    "DatabaseSettings",
    "SslMode",
]

# The bounds of every wait on the database when nothing else is set; docs/how-to/timeouts.md says why these.
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_COMMAND_TIMEOUT = 10.0
DEFAULT_CLEANUP_TIMEOUT = 5.0
DEFAULT_POOL_TIMEOUT = 10.0
DEFAULT_COMMIT_OUTCOME_TIMEOUT = 5.0


SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]

_ASYNCPG_ONLY_FIELDS = (
    "application_name",
    "statement_timeout",
    "client_connection_check_interval",
    "command_timeout",
    "ssl",
    "ssl_root_cert",
    "pgbouncer",
)


def _settings_from_environment(**given: Any) -> DatabaseSettings:
    """``DatabaseSettings(**given)``, with a validation error restated in the environment's terms.

    pydantic names the field (``pool_size``); the person who has to fix it set ``DATABASE_POOL_SIZE``.
    Input values stay hidden: they may be the password.
    """
    try:
        return DatabaseSettings(**given)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            message = error["msg"].removeprefix("Value error, ")
            if not error["loc"]:  # a check across fields: its message names them
                problems.append(message)
                continue
            field = str(error["loc"][0])
            source = f"{field}=" if field in given else f"DATABASE_{field.upper()}"
            problems.append(f"{source}: {message}")
        raise ValueError(INVALID_SETTINGS.format(problems="; ".join(problems))) from None


class DatabaseSettings(BaseSettings):
    """How to reach the database and size its pool.

    Field names follow ``create_async_engine``'s arguments; each is read from ``DATABASE_<FIELD>`` (for
    example ``DATABASE_POOL_SIZE``). The URL's password never appears in ``repr()``, ``str()`` or in a
    validation error: input values are hidden from errors, and the URL is shown with its password masked.
    """

    model_config = SettingsConfigDict(env_prefix="DATABASE_", hide_input_in_errors=True, extra="forbid")

    url: str | None = Field(default=None, repr=False)
    """The database URL. ``postgresql://`` and ``sqlite://`` get their async driver (asyncpg, aiosqlite)."""
    replica_urls: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    """Read replicas (``DATABASE_REPLICA_URLS``, comma-separated): read-only sessions go to them in turn."""
    echo: bool = False
    """Log every statement (SQLAlchemy's ``echo``)."""
    echo_pool: bool | Literal["debug"] = False
    """Log pool checkouts and checkins; ``debug`` logs more."""
    hide_parameters: bool = True
    """Keep SQL parameters (often personal data) out of error messages and of ``echo``'s log; ``False``
    (``DATABASE_HIDE_PARAMETERS=false``) shows them, for debugging locally."""
    pool_size: int = Field(default=5, ge=0)
    """Connections the pool keeps open."""
    max_overflow: int = Field(default=10, ge=-1)
    """Connections allowed beyond ``pool_size`` under load (``-1``: no limit)."""
    pool_pre_ping: bool = True
    """Test a connection before handing it out, so that a database restart costs no request."""
    pool_recycle: int = -1
    """Seconds after which a connection is replaced (``-1``: never)."""
    pool_timeout: float = Field(default=DEFAULT_POOL_TIMEOUT, gt=0)
    """Seconds to wait for a free connection before the request fails with a 503. The default, 10, keeps a
    request's longest wait on a silent database (this, then the connect or a statement) under the 30 s after which
    common proxies and routers give up on a request, so that the client gets the 503 and its ``Retry-After``. See
    docs/how-to/timeouts.md."""
    pool_use_lifo: bool = False
    """Reuse the most recently returned connection first, so that idle ones can time out."""
    isolation_level: str | None = None
    """The transactions' isolation level, such as ``SERIALIZABLE`` or ``REPEATABLE READ`` (default: the driver's)."""
    connect_timeout: float | None = Field(default=DEFAULT_CONNECT_TIMEOUT, gt=0)
    """Seconds to wait for a new connection, its TLS and its login (asyncpg's ``timeout``). The default, 5, fails a
    request fast when the server cannot be reached (asyncpg alone would wait 60 s) and leaves ample time for a slow
    login; ``None``: the driver's default. On SQLite it is passed only when set (aiosqlite's ``timeout``: how long
    a statement waits for another connection's lock). See docs/how-to/timeouts.md."""
    command_timeout: float | None = Field(default=DEFAULT_COMMAND_TIMEOUT, gt=0)
    """Seconds the client waits for the answer to each statement, the pool's pre-ping, ``COMMIT`` and
    ``ROLLBACK`` among them (asyncpg's ``command_timeout``; asyncpg only). The one bound that holds when the
    network itself fails: the server's ``statement_timeout`` cannot reach a client whose link drops its packets.
    A statement that runs out of time fails, its connection is thrown away, and the request gets a 503 with
    ``Retry-After``. The default, 10, is far beyond any statement a web request should run; raise it (or set
    ``None``, no limit) for long reports. See docs/how-to/timeouts.md."""
    cleanup_timeout: float = Field(default=DEFAULT_CLEANUP_TIMEOUT, gt=0)
    """Seconds the end of a request or block may take to roll back and give its connection back. A cleanup that
    gets no answer in time discards its connection (its socket closed; the server rolls the transaction back)
    instead of holding it out of the pool. The client has its response by then; this bounds how long a connection
    stays checked out after a failure. Any driver. See docs/how-to/timeouts.md."""
    statement_timeout: int | None = Field(default=None, ge=0)
    """Milliseconds after which PostgreSQL cancels a statement (asyncpg only)."""
    client_connection_check_interval: int | None = Field(default=None, ge=0)
    """Milliseconds between PostgreSQL's checks, while a statement runs, that the client is still there
    (PostgreSQL 14+ on Linux, macOS or BSD; asyncpg only). A statement whose request was cancelled so abruptly
    that its cancel request was lost then stops within this interval instead of running to its end."""
    application_name: str | None = None
    """Shown in ``pg_stat_activity.application_name`` (asyncpg only)."""
    ssl: SslMode | None = None
    """libpq's SSL mode (asyncpg only); the URL's ``sslmode=`` (or ``ssl=``) says the same, and the two must agree."""
    ssl_root_cert: str | None = None
    """The CA certificate file (PEM) that ``verify-ca`` and ``verify-full`` check the server's certificate against;
    libpq's ``sslrootcert`` (``system``: the system's trusted CAs). asyncpg only."""
    pgbouncer: bool = False
    """Behind PgBouncer in transaction mode: turn off asyncpg's and SQLAlchemy's prepared statement caches."""
    commit_outcome_check: bool = True
    """Read each writing transaction's id just before its COMMIT (one more round trip per writing request), so
    that if the connection dies after COMMIT was sent and before its answer arrived the server can be asked
    whether it committed: the client then gets the app's response, or a 503, as it really was (PostgreSQL on
    asyncpg). Off, such a COMMIT is answered as of unknown outcome (a 500 that says so), never as "not saved",
    and writing requests save the round trip (see docs/explanation/commit-outcome.md)."""
    commit_outcome_timeout: float = Field(default=DEFAULT_COMMIT_OUTCOME_TIMEOUT, gt=0)
    """Seconds to spend learning whether a COMMIT committed when the connection died before its answer arrived
    (PostgreSQL on asyncpg), asking on a connection of its own; past it the client gets a 500 saying the outcome
    is unknown (see docs/explanation/commit-outcome.md)."""
    check_on_startup: bool = False
    """At lifespan startup, connect once and fail the startup (with a readable message) if that fails."""
    metrics: bool | None = None
    """Record each engine's connection pool metrics, OpenTelemetry's ``db.client.connection.*`` (connections
    idle and used, limits, requests waiting, timeouts, create, wait and use times). Unset (the default): when the
    application configured an OpenTelemetry MeterProvider before the engine is made, else nothing is recorded
    and nothing is paid; ``true``: always, through the global provider, from whenever one is configured (needs
    the ``opentelemetry`` extra); ``false``: never. See docs/how-to/metrics.md."""

    @field_validator("url")
    @classmethod
    def _async_driver(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return to_async_url(value).render_as_string(hide_password=False)

    @field_validator("replica_urls", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        # A URL holds no unencoded comma, so a comma-separated list reads back unambiguously.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("replica_urls")
    @classmethod
    def _async_drivers(cls, value: list[str]) -> list[str]:
        return [to_async_url(url).render_as_string(hide_password=False) for url in value]

    @model_validator(mode="after")
    def _asyncpg_only_settings_need_asyncpg(self) -> DatabaseSettings:
        # An ignored setting would be a silent surprise (a statement timeout that never fires).
        if self.url is None or make_url(self.url).drivername == "postgresql+asyncpg":
            return self
        for field in _ASYNCPG_ONLY_FIELDS:
            # Only what was asked for: command_timeout's default is a number, and means nothing elsewhere.
            if field in self.model_fields_set and getattr(self, field) not in (None, False):
                raise ValueError(ASYNCPG_ONLY.format(field=field, env=field.upper(), url=self.redacted_url))
        return self

    @model_validator(mode="after")
    def _connect_arguments_fit_together(self) -> DatabaseSettings:
        # What the URL's query and the settings both say must agree, and certificate files must be readable:
        # found out here, at construction, rather than at every connect.
        if self.url is not None:
            self._connect_args(make_url(self.url))
        return self

    def __repr_args__(self) -> Any:
        # getattr: repr() also runs on an instance whose validation failed, when a traceback shows locals.
        url = getattr(self, "url", None)
        yield "url", None if url is None else redact_url(url)
        replicas = getattr(self, "replica_urls", None)
        if replicas:
            yield "replica_urls", [redact_url(replica) for replica in replicas]
        yield from super().__repr_args__()

    @property
    def redacted_url(self) -> str:
        """The URL with its password masked, for messages and logs."""
        return "<unset>" if self.url is None else redact_url(self.url)

    def engine_url(self) -> URL:
        """The URL to connect to, with what ``pgbouncer`` needs added; ValueError when none is set."""
        if self.url is None:
            raise ValueError(NO_URL)
        url = make_url(self.url)
        if url.drivername == "postgresql+asyncpg":
            # Without what asyncpg does not take from a URL; _connect_args passes it on converted.
            url = asyncpg_query(url).url
            if self.pgbouncer:
                url = url.update_query_dict({"prepared_statement_cache_size": "0"})
        return url

    def engine_options(self) -> dict[str, Any]:
        """Keyword arguments for ``create_async_engine``, leaving out what the URL's pool or driver rejects."""
        url = self.engine_url()
        options: dict[str, Any] = {
            "echo": self.echo,
            "echo_pool": self.echo_pool,
            "hide_parameters": self.hide_parameters,
            "pool_pre_ping": self.pool_pre_ping,
            "pool_recycle": self.pool_recycle,
        }
        if self.isolation_level is not None:
            options["isolation_level"] = self.isolation_level
        # SQLite in memory runs on a StaticPool, which rejects sizing arguments.
        dialect = cast("type[DefaultDialect]", url.get_dialect().get_async_dialect_cls(url))
        if issubclass(dialect.get_pool_class(url), QueuePool):
            options.update(
                pool_size=self.pool_size,
                max_overflow=self.max_overflow,
                pool_timeout=self.pool_timeout,
                pool_use_lifo=self.pool_use_lifo,
            )
        connect_args = self._connect_args(url)
        if connect_args:
            options["connect_args"] = connect_args
        return options

    def _connect_args(self, url: URL) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if url.drivername == "postgresql+asyncpg":
            assert self.url is not None
            given = make_url(self.url)  # with the query as written
            query = asyncpg_query(given)
            server_settings = {}
            if self.application_name is not None:
                server_settings["application_name"] = self.application_name
            if self.statement_timeout is not None:
                server_settings["statement_timeout"] = str(self.statement_timeout)
            if self.client_connection_check_interval is not None:
                server_settings["client_connection_check_interval"] = str(self.client_connection_check_interval)
            if server_settings:
                args["server_settings"] = server_settings
            ssl = self._ssl_argument(query)
            if ssl is not None:
                args["ssl"] = ssl
            if self.pgbouncer:
                args["statement_cache_size"] = 0
            if self.connect_timeout is not None:
                args["timeout"] = self.connect_timeout
            if self.command_timeout is not None:
                args["command_timeout"] = self.command_timeout
            self._add_url_arguments(given, query, args)
        elif self.connect_timeout is not None and "connect_timeout" in self.model_fields_set:
            # Only when asked for: aiosqlite's timeout is SQLite's lock wait, which the URL may set (?timeout=).
            args["timeout"] = self.connect_timeout
        return args

    def _add_url_arguments(self, given: URL, query: AsyncpgQuery, args: dict[str, Any]) -> None:
        """Add the URL's asyncpg numbers and flags to ``args``; ValueError where a setting says otherwise."""
        settings = {
            "timeout": ("DATABASE_CONNECT_TIMEOUT", self.connect_timeout, "connect_timeout"),
            "command_timeout": ("DATABASE_COMMAND_TIMEOUT", self.command_timeout, "command_timeout"),
            "statement_cache_size": ("DATABASE_PGBOUNCER", "true", "pgbouncer"),
        }
        for name, value in query.connect_args.items():
            # The URL's value wins over a default; over a setting someone made, only when they agree.
            if name in args and args[name] != value and settings[name][2] in self.model_fields_set:
                setting, setting_value, _ = settings[name]
                raise ValueError(
                    URL_VALUE_DISAGREES_WITH_SETTING.format(
                        name=name,
                        value=given.query[name],
                        setting=setting,
                        setting_value=setting_value,
                    )
                )
            args[name] = value

    def _ssl_argument(self, query: AsyncpgQuery) -> str | SSLContext | None:
        """asyncpg's ``ssl`` argument from DATABASE_SSL, DATABASE_SSL_ROOT_CERT and the URL's SSL parameters."""
        mode: str | None = self.ssl
        mode_source = "DATABASE_SSL"
        if query.ssl_mode is not None:
            if mode is not None and mode != query.ssl_mode:
                raise ValueError(
                    SETTING_DISAGREES_WITH_URL.format(
                        setting=mode_source,
                        setting_value=mode,
                        name=query.ssl_mode_name,
                        value=query.ssl_mode,
                        url=self.redacted_url,
                    )
                )
            mode, mode_source = query.ssl_mode, query.ssl_mode_name
        root_cert = None if self.ssl_root_cert is None else SslFile(self.ssl_root_cert, "DATABASE_SSL_ROOT_CERT")
        url_root_cert = query.ssl_files.get("sslrootcert")
        if url_root_cert is not None:
            if root_cert is not None and root_cert.path != url_root_cert:
                raise ValueError(
                    SETTING_DISAGREES_WITH_URL.format(
                        setting=root_cert.source,
                        setting_value=root_cert.path,
                        name="sslrootcert",
                        value=url_root_cert,
                        url=self.redacted_url,
                    )
                )
            root_cert = SslFile(url_root_cert, "sslrootcert")
        cert, key = (
            None if name not in query.ssl_files else SslFile(query.ssl_files[name], name)
            for name in ("sslcert", "sslkey")
        )
        return asyncpg_ssl(mode, mode_source, root_cert, cert, key)
