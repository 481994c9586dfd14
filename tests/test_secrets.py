"""The password never shows: not in logs (even at DEBUG with echo_pool="debug"), reprs, errors, responses,
startup failures, nor in the local variables of a traceback that a crash reporter would print."""

from __future__ import annotations

import logging
import traceback
from urllib.parse import quote

import pytest
from sqlalchemy import text
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

from .asgi import run_lifespan
from .conftest import client
from .models import TABLE, Item

pytestmark = pytest.mark.anyio

# Like the example, with a raw "@", but no dictionary word (SecretStr's repr says "Secret").
PASSWORD = "Zx9-Qv7k@Pw"
PIECES = {PASSWORD[i : i + 4] for i in range(len(PASSWORD) - 3)} | {quote(PASSWORD, safe="")}


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
