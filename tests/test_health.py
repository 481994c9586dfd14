"""health_endpoint(): 200 when the database answers, 503 (bounded in time) when it does not."""

from __future__ import annotations

import time

import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from asgi_db_session import Database
from asgi_db_session.health import health_endpoint

from .asgi import silent_server
from .conftest import client

pytestmark = pytest.mark.anyio


async def test_a_reachable_database_is_healthy(database: Database) -> None:
    app = Starlette(routes=[Route("/healthz", health_endpoint())])
    async with client(app) as http:
        response = await http.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"database": "ok"})


async def test_an_unreachable_database_is_503_without_details() -> None:
    database = Database("postgresql://app:Zx9Qv7kPw@127.0.0.1:1/shop", name="gone")
    app = Starlette(routes=[Route("/healthz", health_endpoint("gone"))])
    async with client(app) as http:
        response = await http.get("/healthz")
    assert (response.status_code, response.json()) == (503, {"database": "unavailable"})
    assert response.headers["retry-after"] == "1"
    await database.dispose()


async def test_a_database_that_hangs_is_503_within_the_timeout() -> None:
    async with silent_server() as port:
        database = Database(f"postgresql://postgres@127.0.0.1:{port}/test", name="hanging")
        app = Starlette(routes=[Route("/healthz", health_endpoint("hanging", timeout=0.3))])
        try:
            async with client(app) as http:
                started = time.monotonic()
                response = await http.get("/healthz")
            assert response.status_code == 503
            assert time.monotonic() - started < 1.5
        finally:
            await database.dispose()


def test_the_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        health_endpoint(timeout=0)
