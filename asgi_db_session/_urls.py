"""Database URLs: choose the async driver, and show a URL without its password."""

from __future__ import annotations

import re
from urllib.parse import unquote

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

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
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)


def redact_url(raw: str) -> str:
    """Return ``raw`` with the password replaced by ``***``.

    Splits at the last ``@`` rather than trusting a URL parser, because a password may hold an unencoded
    ``@``, ``:`` or ``/`` that a parser would read as the start of the host (sqlalchemy #11027). A
    ``password=`` query parameter (which asyncpg accepts) is masked too.
    """
    prefix, sep, rest = raw.partition("://")
    if not sep:
        prefix, rest = "", raw
    at = rest.rfind("@")
    if at != -1:
        user, colon, _password = rest[:at].partition(":")
        rest = f"{user}{':' + MASK if colon else ''}@{rest[at + 1 :]}"
    return prefix + sep + _QUERY_PASSWORD.sub(r"\1" + MASK, rest)


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
    because the user asked for that driver's behaviour.
    """
    try:
        url = _parse(raw.strip())
    except (ArgumentError, ValueError):
        # Not shown: what cannot be parsed cannot be reliably stripped of its password.
        raise ValueError(
            "The database URL cannot be parsed (its text is not shown, as it may hold a password); write one "
            f"like {EXAMPLE_URL} or sqlite+aiosqlite:///./app.db"
        ) from None
    shown = redact_url(raw)
    backend, _, driver = url.drivername.partition("+")
    backend = BACKEND_ALIASES.get(backend, backend)
    default_driver = ASYNC_DRIVERS.get(backend)
    if not driver:
        if default_driver is None:
            raise ValueError(
                f"No async driver is known for {backend!r} in {shown!r}; name one in the URL: {backend}+<driver>://..."
            )
        return url.set(drivername=f"{backend}+{default_driver}")
    url = url.set(drivername=f"{backend}+{driver}")
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise ValueError(
            f"Unknown database driver {url.drivername!r} in {shown!r}; "
            f"write e.g. {EXAMPLE_URL} or sqlite+aiosqlite:///./app.db"
        ) from None
    if not dialect.get_async_dialect_cls(url).is_async:
        fix = f"{backend}+{default_driver}://..." if default_driver else f"{backend}+<async driver>://..."
        raise ValueError(
            f"{url.drivername!r} in {shown!r} is a synchronous driver, and an AsyncSession needs an async one: "
            f"write {fix}"
        )
    return url
