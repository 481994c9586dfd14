"""The URLs users are given (Heroku, Neon, Supabase, Render print libpq's ``?sslmode=require``): they work, or
they fail at construction with a message that names what is wrong.

SQLAlchemy's asyncpg dialect hands every query parameter of the URL to ``asyncpg.connect()`` as a keyword
argument, as a string: a libpq parameter asyncpg does not take made every request a 500 (``TypeError: connect()
got an unexpected keyword argument 'sslmode'``), and a numeric one failed at first use.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_db_session import Database, DatabaseSettings, DatabaseUnavailableError, DBSessionMiddleware, current_session
from asgi_db_session._urls import redact_url, to_async_url
from asgi_db_session.settings import DEFAULT_COMMAND_TIMEOUT

from .conftest import DEFAULT_BOUNDS, PG_URL, client

pytestmark = pytest.mark.anyio

HOST_URL = "postgresql://app@db.internal:5432/shop"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("URL", "SSL", "SSL_ROOT_CERT", "CONNECT_TIMEOUT", "PGBOUNCER"):
        monkeypatch.delenv(f"DATABASE_{name}", raising=False)
    monkeypatch.delenv("PGSSLROOTCERT", raising=False)


def connect_args(url: str, **settings: object) -> dict[str, object]:
    options = DatabaseSettings(url=url, **settings).engine_options()  # type: ignore[arg-type]
    args: dict[str, object] = options.get("connect_args", {})
    return args


@pytest.mark.parametrize(
    ("query", "ssl"),
    [
        ("sslmode=require", "require"),
        ("sslmode=prefer", "prefer"),
        ("sslmode=disable", "disable"),
        ("ssl=require", "require"),
        ("ssl=require&sslmode=require", "require"),
    ],
)
def test_libpq_sslmode_becomes_asyncpg_ssl(query: str, ssl: str) -> None:
    settings = DatabaseSettings(url=f"postgres://app@db.internal/shop?{query}")
    assert "sslmode" not in settings.engine_url().query
    assert "ssl" not in settings.engine_url().query
    assert settings.engine_options()["connect_args"] == {**DEFAULT_BOUNDS, "ssl": ssl}
    # The URL as shown keeps what the user wrote: the log says what is in force.
    assert query in settings.redacted_url


async def test_sslmode_in_the_url_connects(postgresql_dsn: str) -> None:
    """The shared test server has no SSL: prefer falls back to plaintext, as libpq does; a request answers 200."""

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse(str((await current_session("sslmode_prefer").execute(text("SELECT 1"))).scalar_one()))

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, url=PG_URL + "?sslmode=prefer", name="sslmode_prefer")
    async with client(app) as http:
        response = await http.get("/")
    assert (response.status_code, response.text) == (200, "1")


def test_ssl_and_sslmode_that_disagree_are_an_error() -> None:
    with pytest.raises(ValueError, match=re.escape("ssl=require and sslmode=disable")):
        to_async_url(f"{HOST_URL}?ssl=require&sslmode=disable")


@pytest.mark.parametrize(
    ("environment", "url", "named"),
    [
        ({"DATABASE_SSL": "disable"}, f"{HOST_URL}?ssl=require", ("DATABASE_SSL=disable", "ssl=require")),
        ({"DATABASE_SSL": "require"}, f"{HOST_URL}?sslmode=disable", ("DATABASE_SSL=require", "sslmode=disable")),
        (
            {"DATABASE_SSL": "verify-full", "DATABASE_SSL_ROOT_CERT": "/etc/a.crt"},
            f"{HOST_URL}?sslrootcert=/etc/b.crt",
            ("DATABASE_SSL_ROOT_CERT=/etc/a.crt", "sslrootcert=/etc/b.crt"),
        ),
    ],
)
def test_a_setting_that_disagrees_with_the_url_is_an_error_naming_both(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], url: str, named: tuple[str, str]
) -> None:
    """Before: DATABASE_SSL=disable silently won over ?ssl=require, while the logged URL said ssl=require."""
    monkeypatch.setenv("DATABASE_URL", url)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"^Invalid database settings: ") as caught:
        Database(name="ssl_conflict")
    for part in named:
        assert part in str(caught.value)


def test_a_setting_that_agrees_with_the_url_is_fine() -> None:
    assert connect_args(f"{HOST_URL}?sslmode=require", ssl="require") == {**DEFAULT_BOUNDS, "ssl": "require"}


@pytest.mark.parametrize(
    ("query", "named", "advice"),
    [
        ("sslmod=require", "'sslmod'", "neither asyncpg nor SQLAlchemy"),
        ("application_name=billing", "'application_name'", "DATABASE_APPLICATION_NAME"),
        ("connect_timeout=5", "'connect_timeout'", "DATABASE_CONNECT_TIMEOUT"),
        ("channel_binding=require", "'channel_binding'", "asyncpg does not support channel binding"),
        ("sslcrl=/etc/crl.pem", "'sslcrl'", "ssl.SSLContext"),
        ("server_settings=x", "'server_settings'", "connect_args"),
        ("ssl=true", "ssl=true", "sslmode=require"),
        ("sslmode=sometimes", "sslmode=sometimes", "verify-full"),
        ("statement_cache_size=none", "statement_cache_size=none", "a whole number"),
        ("direct_tls=maybe", "direct_tls=maybe", "true or false"),
    ],
)
def test_an_unknown_or_unusable_query_parameter_is_an_error_naming_it(query: str, named: str, advice: str) -> None:
    url = f"postgresql://app:Zx9q7WvPw@db.internal/shop?{query}"
    with pytest.raises(ValueError, match=re.escape(named)) as caught:
        DatabaseSettings(url=url)
    message = str(caught.value)
    assert named in message
    assert advice in message
    assert "Zx9q7WvPw" not in message


@pytest.mark.parametrize(
    ("query", "args"),
    [
        ("prepared_statement_cache_size=0", {}),
        ("async_fallback=true", {}),
        ("host=h1:5432&host=h2:5433", {}),
        ("host=h1,h2&port=5432,5433", {}),
        ("target_session_attrs=read-write", {}),
        ("krbsrvname=postgres&gsslib=gssapi", {}),
        ("passfile=/run/pgpass&service=shop", {}),
        ("channel_binding=prefer", {}),
        ("command_timeout=2.5", {"command_timeout": 2.5}),
        ("timeout=4", {"timeout": 4.0}),
        ("statement_cache_size=0", {"statement_cache_size": 0}),
        ("max_cached_statement_lifetime=60&max_cacheable_statement_size=1024", {}),
        ("direct_tls=false", {"direct_tls": False}),
    ],
)
def test_what_sqlalchemy_or_asyncpg_take_is_accepted(query: str, args: dict[str, object]) -> None:
    """Numbers and flags reach asyncpg as numbers and flags (as strings they failed at first use)."""
    got = connect_args(f"{HOST_URL}?{query}")
    for name, value in args.items():
        assert got[name] == value
        assert type(got[name]) is type(value)
    if "max_cached" in query:
        assert (got["max_cached_statement_lifetime"], got["max_cacheable_statement_size"]) == (60, 1024)


def test_several_hosts_and_their_target_session_attrs_reach_asyncpg() -> None:
    """A failover URL (docs/how-to/failover.md): every host, in order, and the kind of server to connect to."""
    settings = DatabaseSettings(
        url="postgresql://app@/shop?host=db1:5432&host=db2:5433&target_session_attrs=read-write&timeout=2"
    )
    engine = create_async_engine(settings.engine_url(), **settings.engine_options())
    _, args = engine.dialect.create_connect_args(engine.url)
    assert (args["host"], args["port"], args["target_session_attrs"]) == (["db1", "db2"], [5432, 5433], "read-write")
    assert settings.engine_options()["connect_args"] == {"timeout": 2.0, "command_timeout": DEFAULT_COMMAND_TIMEOUT}


async def test_a_numeric_parameter_in_the_url_connects(postgresql_dsn: str) -> None:
    database = Database(PG_URL + "?statement_cache_size=0&timeout=5", name="numeric_query")
    try:
        await database.check(timeout=10)
        async with database.sessionmaker() as session:
            # Twice: a statement cache of size "0" (a string) failed at a statement's preparation, not at connect.
            for _ in range(2):
                assert (await session.execute(text("SELECT 41 + 1"))).scalar_one() == 42
    finally:
        await database.dispose()


def test_a_number_in_the_url_and_its_setting_that_disagree_are_an_error() -> None:
    with pytest.raises(ValueError, match=r"timeout=4 in the URL and DATABASE_CONNECT_TIMEOUT=9\.0"):
        connect_args(f"{HOST_URL}?timeout=4", connect_timeout=9)
    with pytest.raises(ValueError, match=r"statement_cache_size=100 in the URL and DATABASE_PGBOUNCER"):
        connect_args(f"{HOST_URL}?statement_cache_size=100", pgbouncer=True)
    assert connect_args(f"{HOST_URL}?statement_cache_size=0", pgbouncer=True) == {
        **DEFAULT_BOUNDS,
        "statement_cache_size": 0,
    }


def test_other_drivers_keep_their_own_query_parameters(tmp_path: Path) -> None:
    settings = DatabaseSettings(url=f"sqlite:///{tmp_path}/app.db?timeout=3&check_same_thread=false")
    assert settings.engine_url().query == {"timeout": "3", "check_same_thread": "false"}
    assert settings.model_copy(update={"connect_timeout": 2.0}).engine_options()["connect_args"] == {"timeout": 2.0}


def test_the_unparseable_url_message_says_what_to_percent_encode() -> None:
    with pytest.raises(ValueError, match="cannot be parsed") as caught:
        to_async_url("postgresql://app@db.internal:54x2/shop")
    message = str(caught.value)
    assert "percent-encode" in message
    for character, code in (("%", "%25"), (":", "%3A"), ("/", "%2F")):
        assert f"{character} as {code}" in message


def test_sqlite_memory_is_shown_as_written() -> None:
    settings = DatabaseSettings(url="sqlite:///:memory:")
    assert settings.redacted_url == "sqlite+aiosqlite:///:memory:"
    assert repr(Database(settings=settings, name="memory")).startswith(
        "Database(name='memory', url='sqlite+aiosqlite:///:memory:'"
    )
    assert redact_url("sqlite+aiosqlite:///%3Amemory%3A?cache=shared") == "sqlite+aiosqlite:///:memory:?cache=shared"
    with pytest.raises(ValueError, match=re.escape("the URL is 'sqlite+aiosqlite:///:memory:'")):
        DatabaseSettings(url="sqlite:///:memory:", statement_timeout=100)
    # The password part is still masked when the path is decoded for showing.
    assert redact_url("postgresql://app:Zx9q%3Aw@h/a%3Ab") == "postgresql://app:***@h/a:b"


async def test_a_database_that_does_not_exist_is_a_503_and_a_readable_check_failure(postgresql_dsn: str) -> None:
    """SQLSTATE 3D000 (InvalidCatalogNameError), like a refused connect or login: the database is not there to
    serve, so DatabaseUnavailableError, a 503 for a request and a readable message from the startup check."""
    url = PG_URL.rsplit("/", 1)[0] + "/adbs_no_such_database"
    database = Database(url, name="no_such_database")

    with pytest.raises(DatabaseUnavailableError) as caught:
        await database.check(timeout=10)
    message = str(caught.value)
    assert 'database "adbs_no_such_database" does not exist' in message
    assert "Check DATABASE_URL" in message

    async def endpoint(request: Request) -> Response:
        await current_session("no_such_database").execute(text("SELECT 1"))
        return PlainTextResponse("ok")  # pragma: no cover - the connect fails

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=database, name="no_such_database")
    async with client(app) as http:
        response = await http.get("/")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    await database.dispose()


def test_a_password_in_any_query_parameter_stays_hidden() -> None:
    """sslpassword= (a libpq parameter asyncpg takes from a DSN only) is refused, and its value not shown."""
    with pytest.raises(ValueError, match="'sslpassword'") as caught:
        DatabaseSettings(url="postgresql://app@db.internal/shop?sslpassword=Zx9q7WvPw&sslmode=require")
    assert "Zx9q7WvPw" not in str(caught.value)
    assert "sslpassword=***" in str(caught.value)
