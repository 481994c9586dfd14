"""The password never shows: not in logs (even at DEBUG with echo_pool="debug"), reprs, errors, responses,
startup failures, nor in the local variables of a traceback that a crash reporter would print."""

from __future__ import annotations

import logging
import traceback
from urllib.parse import quote

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_db_session import (
    Database,
    DatabaseSettings,
    DatabaseUnavailableError,
    DBSessionMiddleware,
    current_session,
)

from ..asgi import run_lifespan
from ..conftest import Backend, client
from ..models import TABLE, Item
from .pg_cluster import PASSWORD_ROLE, ROLE_PASSWORD, Cluster, pg_cluster

__all__ = ["pg_cluster"]  # the session fixture, imported so that pytest finds it for this module

pytestmark = pytest.mark.anyio

# Like the example, with a raw "@", but no dictionary word (SecretStr's repr says "Secret").
PASSWORD = "Zx9-Qv7k@Pw"
PIECES = {PASSWORD[i : i + 4] for i in range(len(PASSWORD) - 3)} | {quote(PASSWORD, safe="")}


# A statement parameter that stands for personal data (an e-mail address).
PERSONAL = "jdoe-7Kq2x@example.org"


def leaks(text: str) -> list[str]:
    return sorted(piece for piece in PIECES if piece in text)


def url_with_password(dsn: str, *, encoded: bool) -> str:
    """The test server's URL with the password added; the server trusts 127.0.0.1, so it still connects."""
    password = quote(PASSWORD, safe="") if encoded else PASSWORD
    return dsn.replace("postgres@", f"postgres:{password}@", 1)


def format_with_locals(error: BaseException) -> str:
    """What a crash reporter that prints every frame's local variables would show of this package's frames.

    The test's own frames are left out: their locals hold the password the test put in.
    """
    shown = []
    exception: traceback.TracebackException | None = traceback.TracebackException.from_exception(
        error, capture_locals=True
    )
    while exception is not None:
        shown.extend(str(exception).splitlines())
        for frame in exception.stack:
            if "asgi_db_session" in frame.filename:
                shown.append(f"{frame.filename}:{frame.lineno} {frame.locals}")
        exception = exception.__cause__ or (None if exception.__suppress_context__ else exception.__context__)
    assert any("asgi_db_session" in line for line in shown), "no frame of the package in the traceback"
    return "\n".join(shown)


@pytest.mark.parametrize("encoded", [False, True])
async def test_debug_logging_shows_no_password(
    postgresql_dsn: str, caplog: pytest.LogCaptureFixture, encoded: bool
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = DatabaseSettings(url=url_with_password(postgresql_dsn, encoded=encoded), echo=True, echo_pool="debug")
    database = Database(settings=settings)

    async def endpoint(request: Request) -> Response:
        await current_session().execute(text("SELECT 1"))
        if request.query_params.get("dup"):
            current_session().add(Item(id=1, name="dup"))
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    assert (await run_lifespan(app, shutdown=False)).types()[0] == "lifespan.startup.complete"
    async with database.engine.begin() as connection:
        await connection.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {TABLE} (id INTEGER PRIMARY KEY, name TEXT)")
        await connection.exec_driver_sql(f"DELETE FROM {TABLE}")
    async with client(app) as http:
        assert (await http.get("/", params={"dup": 1})).status_code == 200
        assert (await http.get("/", params={"dup": 1})).status_code == 409  # logged as a warning
    await database.dispose()

    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    lines = [formatter.format(record) for record in caplog.records]
    assert any("sqlalchemy.pool" in line for line in lines), "the pool's debug log was not captured"
    assert any("answered 409" in line for line in lines)
    assert leaks("\n".join(lines)) == []
    for shown in (repr(database), repr(settings), str(settings), repr(DBSessionMiddleware(app, database=database))):
        assert leaks(shown) == []


async def test_an_unreachable_database_shows_no_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    database = Database(f"postgresql://app:{PASSWORD}@127.0.0.1:1/shop", check_on_startup=True)
    with pytest.raises(DatabaseUnavailableError) as caught:
        await database.check(timeout=5)
    assert leaks(str(caught.value)) == []
    assert leaks(format_with_locals(caught.value)) == []
    assert await database.ping(timeout=5) is False

    app = Starlette()
    app.add_middleware(DBSessionMiddleware, database=database)
    channel = await run_lifespan(app)
    assert channel.types() == ["lifespan.startup.failed"]
    assert "127.0.0.1:1" in channel.sent[0]["message"]
    assert leaks(channel.sent[0]["message"]) == []
    assert leaks("\n".join(logging.Formatter().format(record) for record in caplog.records)) == []
    await database.dispose()


@pytest.mark.parametrize(
    "environment",
    [
        {"DATABASE_URL": f"postgresql+psycopg2://app:{PASSWORD}@db/shop"},
        {"DATABASE_URL": f"postgresql://app:{PASSWORD}@db/shop", "DATABASE_POOL_SIZE": "abc"},
        {"DATABASE_URL": f"sqlite:///shop.db?password={PASSWORD}", "DATABASE_STATEMENT_TIMEOUT": "5"},
        {"DATABASE_URL": PASSWORD},
    ],
)
def test_bad_settings_show_no_password(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str]) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="DATABASE_") as caught:
        Database()
    assert leaks(str(caught.value)) == []
    assert leaks(format_with_locals(caught.value)) == []


# --- a wrong password, on a server that asks for one ----------------------------------------------------------

# Like the "Zx9-Secret@Pw", without its word: "ecre" is a piece of SQLAlchemy's "Pool recreating".
WRONG_PASSWORD = "Zx9-Sqv7t@Pw"
BOTH_PIECES = {
    piece
    for password in (ROLE_PASSWORD, WRONG_PASSWORD)
    for piece in {password[i : i + 4] for i in range(len(password) - 3)} | {quote(password, safe="")}
}
LOGIN_REFUSED = 'password authentication failed for user "adbs_app"'


def wrong_password_leaks(text: str) -> list[str]:
    """Pieces of the role's real password, or of the wrong one the URL holds, that ``text`` shows."""
    return sorted(piece for piece in BOTH_PIECES if piece in text)


async def test_a_wrong_password_is_a_clear_error_that_shows_no_password(
    pg_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """On a server that asks PASSWORD_ROLE for its password (scram-sha-256), a wrong one in the URL: the check
    and the startup fail with DatabaseUnavailableError naming the refused login, a request gets a 503, and no
    4-character piece of either password shows in a message, a traceback's locals, a repr, a response or the
    DEBUG log (echo, echo_pool="debug")."""
    caplog.set_level(logging.DEBUG)
    settings = DatabaseSettings(
        url=pg_cluster.url_as(PASSWORD_ROLE, WRONG_PASSWORD), echo=True, echo_pool="debug", check_on_startup=True
    )
    database = Database(settings=settings)

    with pytest.raises(DatabaseUnavailableError) as caught:
        await database.check(timeout=10)
    assert LOGIN_REFUSED in str(caught.value)
    assert f"{PASSWORD_ROLE}:***@127.0.0.1:{pg_cluster.port}" in str(caught.value)
    shown = [str(caught.value), format_with_locals(caught.value), repr(database), repr(settings), str(settings)]

    async def endpoint(request: Request) -> Response:
        await current_session().execute(text("SELECT 1"))
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=database)
    channel = await run_lifespan(app)
    assert channel.types() == ["lifespan.startup.failed"]
    assert LOGIN_REFUSED in channel.sent[0]["message"]
    shown.append(channel.sent[0]["message"])

    # Without the startup check, the first request finds out: a 503 (what a client can retry later), logged.
    unchecked = Database(settings=settings.model_copy(update={"check_on_startup": False}))
    request_app = Starlette(routes=[Route("/", endpoint)])
    request_app.add_middleware(DBSessionMiddleware, database=unchecked)
    async with client(request_app) as http:
        response = await http.get("/")
    assert response.status_code == 503
    shown += [response.text, str(response.headers)]
    await database.dispose()
    await unchecked.dispose()

    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    lines = "\n".join(formatter.format(record) for record in caplog.records)
    assert "answered 503: DatabaseUnavailableError: Cannot reach database 'default'" in lines
    assert LOGIN_REFUSED in lines
    shown.append(lines)
    assert [wrong_password_leaks(text) for text in shown] == [[]] * len(shown)

    # The right password gets in: what failed above was the password, not the role or the server's setup.
    right = Database(pg_cluster.url_as(PASSWORD_ROLE, ROLE_PASSWORD))
    try:
        assert await right.ping(timeout=10)
    finally:
        await right.dispose()


@pytest.mark.parametrize("shown", [False, True], ids=["default", "DATABASE_HIDE_PARAMETERS=false"])
async def test_sql_parameters_stay_out_of_errors_and_logs_unless_asked(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, shown: bool
) -> None:
    """A duplicate id, with personal data in another column: neither the error's text, nor its traceback, nor
    the package's log line, nor SQLAlchemy's echo shows that data, unless DATABASE_HIDE_PARAMETERS=false.

    (The duplicate is the id, not the data: PostgreSQL's own DETAIL repeats the duplicate key's value, which
    is the server's text, not a parameter.)"""
    caplog.set_level(logging.INFO)
    if shown:
        monkeypatch.setenv("DATABASE_HIDE_PARAMETERS", "false")
    database = Database(settings=DatabaseSettings(url=backend.url, echo=True))
    await backend.execute(f"INSERT INTO {TABLE} (id, name) VALUES (1, 'taken')")
    errors: list[DBAPIError] = []

    async def endpoint(request: Request) -> Response:
        statement = text(f"INSERT INTO {TABLE} (id, name) VALUES (:id, :name)")
        try:
            await current_session().execute(statement, {"id": 1, "name": PERSONAL})
        except DBAPIError as exc:
            errors.append(exc)
            raise
        raise AssertionError("not reached")  # pragma: no cover

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=database)
    async with client(app) as http:
        assert (await http.get("/")).status_code == 409
    await database.dispose()

    [error] = errors
    assert isinstance(error, IntegrityError)
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    package_log = [formatter.format(record) for record in caplog.records if record.name == "asgi_db_session"]
    echo_log = [formatter.format(record) for record in caplog.records if record.name.startswith("sqlalchemy.engine")]
    assert any("answered 409" in line for line in package_log)
    assert any("INSERT INTO" in line for line in echo_log), "the echo log was not captured"
    texts = {
        "str(error)": str(error),
        "traceback": "".join(traceback.format_exception(error)),
        "echo log": "\n".join(echo_log),
    }
    assert {name: PERSONAL in shown_text for name, shown_text in texts.items()} == dict.fromkeys(texts, shown)
    assert [line for line in package_log if PERSONAL in line] == []
