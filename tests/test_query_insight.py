"""Per-request query counts: query_stats(), the Server-Timing header, and the N+1 warning naming the route."""

from __future__ import annotations

import logging
import re

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_db_session import Database, DBSessionMiddleware, current_session, query_stats, session_scope

from .conftest import Backend, client
from .models import Item

pytestmark = pytest.mark.anyio

SERVER_TIMING = re.compile(r'^db;dur=(\d+\.\d\d);desc="(\d+) quer(?:y|ies)"$')


async def run_queries(request: Request) -> Response:
    count = int(request.path_params["count"])
    for number in range(count):
        await current_session().execute(select(Item).where(Item.id == number))
    if request.query_params.get("sleep"):
        await current_session().execute(text("SELECT pg_sleep(0.05)"))
    stats = query_stats()
    return JSONResponse({"statements": stats.statements, "seconds": stats.seconds})


async def in_blocks(request: Request) -> Response:
    async with session_scope() as first, session_scope() as second:
        await first.execute(select(1))
        await second.execute(select(1))
    return JSONResponse({"statements": query_stats().statements})


async def no_database(request: Request) -> Response:
    return PlainTextResponse("nothing")


def make_app(database: Database, **options: object) -> Starlette:
    routes = [Route("/queries/{count:int}", run_queries), Route("/blocks", in_blocks), Route("/none", no_database)]
    app = Starlette(routes=routes)
    app.add_middleware(DBSessionMiddleware, database=database, **options)  # type: ignore[arg-type]
    return app


async def test_each_request_counts_its_own_statements(database: Database) -> None:
    async with client(make_app(database, count_queries=True)) as http:
        first = (await http.get("/queries/3")).json()
        second = (await http.get("/queries/1")).json()
        blocks = (await http.get("/blocks")).json()
        plain = await http.get("/none")
    # BEGIN is not a statement the app sent; asyncpg and aiosqlite both begin without one through SQLAlchemy.
    assert first["statements"] == 3
    assert second["statements"] == 1
    assert blocks["statements"] == 2  # blocks opened in the request are charged to it
    assert first["seconds"] > 0
    assert "server-timing" not in plain.headers


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_server_timing_reports_the_database_time(database: Database) -> None:
    async with client(make_app(database, server_timing=True)) as http:
        slow = await http.get("/queries/2", params={"sleep": "1"})
        quiet = await http.get("/none")
    match = SERVER_TIMING.match(slow.headers["server-timing"])
    assert match is not None, slow.headers["server-timing"]
    assert int(match[2]) == 3
    assert 50 <= float(match[1]) < 5000  # pg_sleep(0.05) is inside it
    assert quiet.headers["server-timing"] == 'db;dur=0.00;desc="0 queries"'


async def test_a_named_database_gets_its_own_metric(backend: Backend) -> None:
    analytics = Database(backend.url, name="analytics")
    try:

        async def endpoint(request: Request) -> Response:
            await current_session("analytics").execute(select(1))
            return PlainTextResponse("ok")

        app = Starlette(routes=[Route("/", endpoint)])
        app.add_middleware(DBSessionMiddleware, database=analytics, server_timing=True)
        async with client(app) as http:
            response = await http.get("/")
        assert response.headers["server-timing"].startswith("db-analytics;dur=")
        assert response.headers["server-timing"].endswith('desc="1 query"')
    finally:
        await analytics.dispose()


async def test_too_many_statements_are_logged_with_the_route(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="asgi_db_session"):
        async with client(make_app(database, warn_over_queries=5)) as http:
            await http.get("/queries/5")
            assert not caplog.records
            await http.get("/queries/6")
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "GET /queries/{count:int} ran 6 statements" in message
    assert "N+1" in message


async def test_query_stats_without_counting_says_how_to_turn_it_on(database: Database) -> None:
    async with client(make_app(database), raise_app_exceptions=False) as http:
        response = await http.get("/queries/1")
    assert response.status_code == 500
    with pytest.raises(RuntimeError, match="count_queries=True"):
        query_stats()


async def test_counting_turned_on_after_the_engine_exists(database: Database) -> None:
    async with session_scope() as session:
        await session.execute(select(1))  # the engine is made here, before any middleware counts
    async with client(make_app(database, count_queries=True)) as http:
        assert (await http.get("/queries/2")).json()["statements"] == 2


async def test_a_failed_statement_counts_and_its_time_too(database: Database) -> None:
    async def failing(request: Request) -> Response:
        try:
            await current_session().execute(text("SELECT * FROM adbs_no_such_table"))
        except Exception:
            await current_session().rollback()
        stats = query_stats()
        return JSONResponse({"statements": stats.statements, "seconds": stats.seconds})

    app = Starlette(routes=[Route("/", failing)])
    app.add_middleware(DBSessionMiddleware, database=database, count_queries=True)
    async with client(app) as http:
        body = (await http.get("/")).json()
    assert body["statements"] == 1
    assert body["seconds"] > 0


async def test_databases_sharing_an_engine_count_each_statement_once(backend: Backend) -> None:
    """A session-scoped engine and an app built per test: each app counts one statement as one."""
    engine = create_async_engine(backend.url)
    try:
        for _ in range(3):
            database = Database(engine=engine)
            async with client(make_app(database, count_queries=True)) as http:
                assert (await http.get("/queries/1")).json()["statements"] == 1
    finally:
        await engine.dispose()
