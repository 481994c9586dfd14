"""Database URLs: choose the async driver, sort an asyncpg URL's query, and show a URL without its password."""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import asyncpg
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from ._extras import DRIVER_EXTRAS, require
from .exceptions import (
    BAD_URL_VALUE,
    NO_ASYNC_DRIVER,
    SSL_MODES_DISAGREE,
    SYNC_DRIVER,
    UNKNOWN_DRIVER,
    UNKNOWN_URL_PARAMETER,
    UNKNOWN_URL_PARAMETER_ADVICE,
    UNPARSEABLE_URL,
)

# The driver used when a URL names only the backend (postgresql://, sqlite://).
ASYNC_DRIVERS = {
    "postgresql": "asyncpg",
    "sqlite": "aiosqlite",
    "mysql": "aiomysql",
    "mariadb": "aiomysql",
}
# Spellings that other tools (Heroku, libpq) use for a backend SQLAlchemy names differently.
BACKEND_ALIASES = {"postgres": "postgresql"}

EXAMPLE_URL = "postgresql+asyncpg://user:password@host:5432/dbname"
MASK = "***"
_QUERY_PASSWORD = re.compile(r"([?&][a-z_]*password=)[^&]*", re.IGNORECASE)

# libpq's sslmode values, weakest first; asyncpg takes them as its ``ssl`` argument.
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
SSL_FILE_PARAMETERS = ("sslrootcert", "sslcert", "sslkey")
# What SQLAlchemy reads from the query itself: create_engine (plugin), the 2.0 asyncio adapter (async_fallback),
# the asyncpg dialect (prepared_statement_cache_size; host and port, for several hosts).
_SQLALCHEMY_PARAMETERS = frozenset({"plugin", "async_fallback", "prepared_statement_cache_size", "host", "port"})
# asyncpg.connect() keywords that take a Python object, which a URL's text cannot be.
_OBJECT_KEYWORDS = frozenset({"dsn", "loop", "connection_class", "record_class", "server_settings"})
# asyncpg.connect() keywords that take a number or a flag: the dialect passes the URL's text on unconverted,
# which asyncpg fails on at first use ("'<' not supported between instances of 'str' and 'int'").
_NUMBERS: dict[str, tuple[Callable[[str], Any], str]] = {
    "timeout": (float, "a number of seconds"),
    "command_timeout": (float, "a number of seconds"),
    "statement_cache_size": (int, "a whole number"),
    "max_cached_statement_lifetime": (int, "a whole number of seconds"),
    "max_cacheable_statement_size": (int, "a whole number of bytes"),
}
_FLAGS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
_FLAG_KEYWORDS = frozenset({"direct_tls"})
# libpq parameters asyncpg does not take as keywords, and what to write instead.
_FROM_DSN_ONLY = "asyncpg reads it from a DSN only: build an ssl.SSLContext and pass connect_args={'ssl': context}"
_INSTEAD = {
    "application_name": "set DATABASE_APPLICATION_NAME instead",
    "connect_timeout": "set DATABASE_CONNECT_TIMEOUT (seconds) instead, or write asyncpg's timeout= in the URL",
    "options": "set DATABASE_STATEMENT_TIMEOUT and the like, or pass connect_args={'server_settings': {...}}",
    "channel_binding": (
        "asyncpg does not support channel binding, so channel_binding=require cannot be honoured; remove it "
        "(prefer and disable change nothing, and are accepted)"
    ),
    "sslcrl": _FROM_DSN_ONLY,
    "sslcrldir": _FROM_DSN_ONLY,
    "sslpassword": _FROM_DSN_ONLY,
    "sslnegotiation": _FROM_DSN_ONLY,
    "sslsni": _FROM_DSN_ONLY,
    "ssl_min_protocol_version": _FROM_DSN_ONLY,
    "ssl_max_protocol_version": _FROM_DSN_ONLY,
    **dict.fromkeys(_OBJECT_KEYWORDS, "it takes a Python object, which a URL cannot hold: pass it in connect_args"),
}
_SSL_MODE_VALUES = (
    f"one of {', '.join(SSL_MODES)} (libpq's sslmode: sslmode=require encrypts; verify-full also checks the "
    "server's certificate and host name)"
)


@functools.cache
def _asyncpg_keywords() -> frozenset[str]:
    # From the installed asyncpg, so that a keyword a newer release adds (service=, 0.31) is known to it only.
    return frozenset(inspect.signature(asyncpg.connect).parameters)


@dataclass(frozen=True)
class AsyncpgQuery:
    """A postgresql+asyncpg URL's query, sorted by what it becomes.

    ``url`` keeps the parameters SQLAlchemy and asyncpg take as text; ``connect_args`` holds asyncpg's numbers
    and flags, converted; ``ssl_mode`` is the URL's ``sslmode`` (or asyncpg's spelling ``ssl``, named in
    ``ssl_mode_name``) and ``ssl_files`` its ``sslrootcert``, ``sslcert`` and ``sslkey``: asyncpg takes none of
    these as keywords, so they become one ``ssl`` argument (see ``_ssl.asyncpg_ssl``).
    """

    url: URL
    connect_args: dict[str, Any] = field(default_factory=dict)
    ssl_mode: str | None = None
    ssl_mode_name: str = "sslmode"
    ssl_files: dict[str, str] = field(default_factory=dict)


def asyncpg_query(url: URL) -> AsyncpgQuery:
    """Sort ``url``'s query (see AsyncpgQuery); ValueError naming a parameter that asyncpg cannot take."""
    if not url.query:
        return AsyncpgQuery(url)
    shown = redact_url(url.render_as_string(hide_password=True))
    keep: dict[str, str | tuple[str, ...]] = {}
    args: dict[str, Any] = {}
    modes: dict[str, str] = {}
    files: dict[str, str] = {}
    for name, given in url.query.items():
        value = given if isinstance(given, str) else given[-1]  # repeated: the last one counts, as in libpq
        if name in _SQLALCHEMY_PARAMETERS:
            keep[name] = given
        elif name in ("ssl", "sslmode"):
            if value not in SSL_MODES:
                raise ValueError(BAD_URL_VALUE.format(url=shown, name=name, value=value, expected=_SSL_MODE_VALUES))
            modes[name] = value
        elif name in SSL_FILE_PARAMETERS:
            files[name] = value
        elif name in _NUMBERS:
            convert, expected = _NUMBERS[name]
            try:
                args[name] = convert(value)
            except ValueError:
                raise ValueError(BAD_URL_VALUE.format(url=shown, name=name, value=value, expected=expected)) from None
        elif name in _FLAG_KEYWORDS:
            if value.lower() not in _FLAGS:
                raise ValueError(BAD_URL_VALUE.format(url=shown, name=name, value=value, expected="true or false"))
            args[name] = _FLAGS[value.lower()]
        elif name == "channel_binding" and value in ("prefer", "disable"):
            continue  # libpq's default, or off: asyncpg without channel binding does what they ask
        elif name in _asyncpg_keywords() and name not in _OBJECT_KEYWORDS:
            keep[name] = given
        else:
            advice = _INSTEAD.get(name, UNKNOWN_URL_PARAMETER_ADVICE)
            raise ValueError(UNKNOWN_URL_PARAMETER.format(url=shown, name=name, advice=advice))
    if len(set(modes.values())) > 1:
        raise ValueError(SSL_MODES_DISAGREE.format(url=shown, ssl=modes["ssl"], sslmode=modes["sslmode"]))
    mode_name = "sslmode" if "sslmode" in modes else "ssl"
    return AsyncpgQuery(url.set(query=keep), args, modes.get(mode_name), mode_name, files)


def redact_url(raw: str) -> str:
    """Return ``raw`` with the password replaced by ``***``.

    Splits at the last ``@`` rather than trusting a URL parser, because a password may hold an unencoded
    ``@``, ``:`` or ``/`` that a parser would read as the start of the host (sqlalchemy #11027). A
    ``password=`` query parameter (which asyncpg accepts) is masked too, and libpq's ``sslpassword=``.
    """
    # First: a password given as a query parameter may hold an "@" or an encoded "&".
    raw = _QUERY_PASSWORD.sub(r"\1" + MASK, raw)
    prefix, sep, rest = raw.partition("://")
    if not sep:
        prefix, rest = "", raw
    at = rest.rfind("@")
    credentials = ""
    if at != -1:
        user, colon, _password = rest[:at].partition(":")
        credentials = f"{user}{':' + MASK if colon else ''}@"
        rest = rest[at + 1 :]
    # Path and query as written: SQLAlchemy renders sqlite's :memory: as %3Amemory%3A, a file path's / as %2F.
    host, slash, path = rest.partition("/")
    path, question, query = path.partition("?")
    return prefix + sep + credentials + host + slash + unquote(path) + question + unquote(query)


def _parse(raw: str) -> URL:
    """Parse ``raw``, keeping a raw ``@`` in the password whole.

    SQLAlchemy's parser ends the password at the first ``@``, leaving the rest of it in the host; when the
    host it finds holds an ``@``, split the credentials at the last ``@`` before the path instead.
    """
    url = make_url(raw)
    if "@" not in (url.host or ""):
        return url
    scheme, _sep, rest = raw.partition("://")
    first_at = rest.index("@")
    path_start = min((i for i in (rest.find("/", first_at), rest.find("?", first_at)) if i != -1), default=len(rest))
    at = rest.rfind("@", 0, path_start)
    user, colon, password = rest[:at].partition(":")
    return make_url(f"{scheme}://{rest[at + 1 :]}").set(
        username=unquote(user) or None, password=unquote(password) if colon else None
    )


def to_async_url(raw: str) -> URL:
    """Return ``raw`` as a URL whose driver is async, or raise ValueError saying what to write instead.

    ``postgresql://`` and ``postgres://`` become ``postgresql+asyncpg://``; ``sqlite://`` becomes
    ``sqlite+aiosqlite://``. A synchronous driver named explicitly is an error rather than a silent swap,
    because the user asked for that driver's behaviour. A query parameter that asyncpg cannot take is an
    error here, at construction, rather than at every connect; so is a driver that an extra of this package
    installs (aiosqlite) and that is missing: a ModuleNotFoundError naming the extra.
    """
    try:
        url = _parse(raw.strip())
    except (ArgumentError, ValueError):
        # Not shown: what cannot be parsed cannot be reliably stripped of its password.
        raise ValueError(UNPARSEABLE_URL.format(example=EXAMPLE_URL)) from None
    url = _with_async_driver(url, redact_url(raw))
    require_driver(url, redact_url(raw))
    if url.drivername == "postgresql+asyncpg":
        asyncpg_query(url)
    return url


def _with_async_driver(url: URL, shown: str) -> URL:
    backend, _, driver = url.drivername.partition("+")
    backend = BACKEND_ALIASES.get(backend, backend)
    default_driver = ASYNC_DRIVERS.get(backend)
    if not driver:
        if default_driver is None:
            raise ValueError(NO_ASYNC_DRIVER.format(backend=backend, url=shown))
        return url.set(drivername=f"{backend}+{default_driver}")
    url = url.set(drivername=f"{backend}+{driver}")
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise ValueError(UNKNOWN_DRIVER.format(driver=url.drivername, url=shown, example=EXAMPLE_URL)) from None
    if not dialect.get_async_dialect_cls(url).is_async:
        fix = f"{backend}+{default_driver}://..." if default_driver else f"{backend}+<async driver>://..."
        raise ValueError(SYNC_DRIVER.format(driver=url.drivername, url=shown, fix=fix))
    return url


def require_driver(url: URL, shown: str) -> None:
    """Raise ModuleNotFoundError naming the extra when ``url``'s driver comes with one and is not installed.

    SQLAlchemy imports the driver only when the engine is made (at lifespan startup or first use), and its
    error names the module alone; checked when the URL is read, the error comes earlier and names the extra.
    """
    driver = url.get_driver_name()
    extra = DRIVER_EXTRAS.get(driver)
    if extra is not None:
        require(driver, extra=extra, needed_by=f"The database URL {shown!r}")
