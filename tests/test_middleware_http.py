"""HTTP requests through DBSessionMiddleware: one lazy session per request, and the transaction policy."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_db_session import Database, DBSessionMiddleware, current_session

from .conftest import Backend, client
from .models import Item

pytestmark = pytest.mark.anyio


async def add_item(request: Request) -> Response:
    current_session().add(Item(id=int(request.query_params["id"]), name=request.query_params["name"]))
    await current_session().flush()
    return JSONResponse({"ok": True}, status_code=int(request.query_params.get("status", "200")))


async def add_and_commit(request: Request) -> Response:
    session = current_session()
    session.add(Item(id=1, name="committed"))
    await session.commit()
    session.add(Item(id=2, name="left-open"))
    await session.flush()
    return PlainTextResponse("ok")


def make_app(database: Database, *, commit_on_success: bool | None = None) -> Starlette:
    app = Starlette(routes=[Route("/add", add_item), Route("/add-and-commit", add_and_commit)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=commit_on_success)
    return app


async def test_manual_policy_keeps_only_what_the_app_committed(backend: Backend, database: Database) -> None:
    async with client(make_app(database)) as http:
        assert (await http.get("/add", params={"id": 1, "name": "a"})).status_code == 200
        assert (await http.get("/add-and-commit")).status_code == 200
    assert await backend.names() == ["committed"]


async def test_commit_on_success_commits_a_2xx(backend: Backend, database: Database) -> None:
    async with client(make_app(database, commit_on_success=True)) as http:
        assert (await http.get("/add", params={"id": 1, "name": "a"})).status_code == 200
    assert await backend.names() == ["a"]


async def test_commit_on_success_rolls_back_a_4xx(backend: Backend, database: Database) -> None:
    async with client(make_app(database, commit_on_success=True)) as http:
        assert (await http.get("/add", params={"id": 1, "name": "a", "status": 422})).status_code == 422
    assert await backend.names() == []


async def test_sessions_differ_between_requests_and_are_shared_within_one(database: Database) -> None:
    seen: list[int] = []

    async def endpoint(request: Request) -> Response:
        first = current_session()
        assert current_session() is first
        seen.append(id(first))
        await first.execute(select(Item))
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=database)
    async with client(app) as http:
        await http.get("/")
        await http.get("/")
    assert len(set(seen)) == 2
