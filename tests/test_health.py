"""health_endpoint(): 200 when the database answers, 503 (bounded in time) when it does not, with the reason
logged at WARNING (password masked)."""

from __future__ import annotations

import logging
import time

import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from asgi_db_session import Database
from asgi_db_session.health import health_endpoint

from .asgi import silent_server
from .conftest import client
from .system.server import free_port

PASSWORD = "Zx9Qv7kPw"

pytestmark = pytest.mark.anyio


async def test_a_reachable_database_is_healthy(database: Database, caplog: pytest.LogCaptureFixture) -> None:
    app = Starlette(routes=[Route("/healthz", health_endpoint())])
    with caplog.at_level(logging.WARNING, logger="asgi_db_session"):
        async with client(app) as http:
            response = await http.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"database": "ok"})
    assert caplog.records == []


async def test_an_unreachable_database_is_503_without_details(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there: the connection is refused
    database = Database(f"postgresql://app:{PASSWORD}@127.0.0.1:{port}/shop", name="gone")
    app = Starlette(routes=[Route("/healthz", health_endpoint("gone"))])
    with caplog.at_level(logging.WARNING, logger="asgi_db_session"):
        async with client(app) as http:
            response = await http.get("/healthz")
    assert (response.status_code, response.json()) == (503, {"database": "unavailable"})
    assert response.headers["retry-after"] == "1"
    assert PASSWORD not in response.text
    await database.dispose()

    # The reason is in the log instead, once, at WARNING, with the password masked.
    assert [(record.levelno, record.getMessage()) for record in caplog.records] == [
        (
            logging.WARNING,
            f"Health check of database 'gone' failed: Cannot reach database 'gone' at "
            f"postgresql+asyncpg://app:***@127.0.0.1:{port}/shop: ConnectionRefusedError: "
            f"[Errno 111] Connect call failed ('127.0.0.1', {port}). "
            "Check DATABASE_URL and that the server is running and accepts connections.",
        )
    ]
    assert [PASSWORD[i : i + 4] for i in range(len(PASSWORD) - 3) if PASSWORD[i : i + 4] in caplog.text] == []


async def test_a_database_that_hangs_is_503_within_the_timeout(caplog: pytest.LogCaptureFixture) -> None:
    async with silent_server() as port:
        database = Database(f"postgresql://postgres@127.0.0.1:{port}/test", name="hanging")
        app = Starlette(routes=[Route("/healthz", health_endpoint("hanging", timeout=0.3))])
        try:
            with caplog.at_level(logging.WARNING, logger="asgi_db_session"):
                async with client(app) as http:
                    started = time.monotonic()
                    response = await http.get("/healthz")
            assert response.status_code == 503
            assert time.monotonic() - started < 1.5
        finally:
            await database.dispose()
    assert [record.getMessage() for record in caplog.records] == [
        f"Health check of database 'hanging' failed: Cannot reach database 'hanging' at "
        f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test: timed out. "
        "Check DATABASE_URL and that the server is running and accepts connections."
    ]


def test_the_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        health_endpoint(timeout=0)
