"""session_policy(): an endpoint's own policy (no session, read-only, commit on success) over the middleware's."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from asgi_db_session import (
    Database,
    DBSessionMiddleware,
    NoSessionError,
    current_session,
    session_policy,
    session_scope,
)
from asgi_db_session.fastapi import SessionDep

from .conftest import Backend, client
from .models import TABLE, Item

pytestmark = pytest.mark.anyio


async def add(request: Request) -> Response:
    current_session().add(Item(id=int(request.query_params["id"]), name=request.query_params["name"]))
    return PlainTextResponse("added", status_code=201)


@session_policy(commit_on_success=True)
async def add_and_keep(request: Request) -> Response:
    return await add(request)


@session_policy(commit_on_success=False)
async def add_and_drop(request: Request) -> Response:
    return await add(request)


@session_policy(commit_on_success=True)
async def stream_and_keep(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield b"streaming "
        # The session is created after the response started: the endpoint's policy still applies.
        current_session().add(Item(id=int(request.query_params["id"]), name="streamed"))
        yield b"done"

    return StreamingResponse(body())


@session_policy(session=False)
async def no_database(request: Request) -> Response:
    try:
        current_session()
    except NoSessionError as exc:
        return PlainTextResponse(str(exc), status_code=500)
    return PlainTextResponse("a session was handed out")


@session_policy(session=False)
async def explicit_scope(request: Request) -> Response:
    async with session_scope(commit=True) as session:
        session.add(Item(id=9, name="explicit"))
    return PlainTextResponse("ok")


@session_policy(commit_on_success=True)
class Items(HTTPEndpoint):
    async def post(self, request: Request) -> Response:
        return await add(request)


def make_app(database: Database, *, commit_on_success: bool) -> Starlette:
    routes = [
        Route("/plain", add, methods=["POST"]),
        Route("/keep", add_and_keep, methods=["POST"]),
        Route("/drop", add_and_drop, methods=["POST"]),
        Route("/stream", stream_and_keep),
        Route("/no-database", no_database),
        Route("/explicit", explicit_scope),
        Mount("/class", routes=[Route("/items", Items)]),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=commit_on_success)
    return app


async def test_a_route_can_commit_under_a_manual_middleware(backend: Backend, database: Database) -> None:
    async with client(make_app(database, commit_on_success=False)) as http:
        assert (await http.post("/plain", params={"id": 1, "name": "plain"})).status_code == 201
        assert (await http.post("/keep", params={"id": 2, "name": "kept"})).status_code == 201
        assert (await http.post("/class/items", params={"id": 3, "name": "class"})).status_code == 201
        assert (await http.get("/stream", params={"id": 4})).text == "streaming done"
    assert await backend.names() == ["class", "kept", "streamed"]


async def test_a_route_can_opt_out_of_commit_on_success(backend: Backend, database: Database) -> None:
    async with client(make_app(database, commit_on_success=True)) as http:
        assert (await http.post("/plain", params={"id": 1, "name": "plain"})).status_code == 201
        assert (await http.post("/drop", params={"id": 2, "name": "dropped"})).status_code == 201
    assert await backend.names() == ["plain"]


async def test_a_route_marked_session_false_gets_a_clear_error(database: Database) -> None:
    async with client(make_app(database, commit_on_success=True)) as http:
        response = await http.get("/no-database")
    assert response.status_code == 500
    assert "no_database is marked session_policy(session=False)" in response.text
    assert "session_scope" in response.text
    assert database._engine is None  # nothing was created for it


async def test_a_route_without_a_session_may_still_open_a_scope(backend: Backend, database: Database) -> None:
    async with client(make_app(database, commit_on_success=False)) as http:
        assert (await http.get("/explicit")).status_code == 200
    assert await backend.names() == ["explicit"]


def test_marking_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="no session"):
        session_policy(session=False, read_only=True)

    class Holder:
        async def method(self, request: Request) -> Response:
            return PlainTextResponse("")

    with pytest.raises(TypeError, match="bound method"):
        session_policy(read_only=True)(Holder().method)


def read_only_app(database: Database) -> Starlette:
    @session_policy(read_only=True)
    async def read(request: Request) -> Response:
        session = current_session()
        state = await session.scalar(text("SHOW transaction_read_only"))
        if request.query_params.get("write"):
            await session.execute(text(f"INSERT INTO {TABLE} (id, name) VALUES (1, 'sneaked')"))
        return PlainTextResponse(str(state))

    async def write(request: Request) -> Response:
        return PlainTextResponse(str(await current_session().scalar(text("SHOW transaction_read_only"))))

    app = Starlette(routes=[Route("/read", read), Route("/write", write)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    return app


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_read_only_route_runs_a_read_only_transaction(backend: Backend, database: Database) -> None:
    async with client(read_only_app(database), raise_app_exceptions=False) as http:
        assert (await http.get("/read")).text == "on"
        # The pooled connection is not left read-only for the next request.
        assert (await http.get("/write")).text == "off"
        response = await http.get("/read", params={"write": "1"})
    assert response.status_code == 500
    assert await backend.names() == []
    assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_read_only_session_scope(backend: Backend, database: Database) -> None:
    async with session_scope(read_only=True) as session:
        assert await session.scalar(text("SHOW transaction_read_only")) == "on"
        with pytest.raises(DBAPIError, match="read-only transaction"):
            await session.execute(text(f"INSERT INTO {TABLE} (id, name) VALUES (1, 'sneaked')"))
    async with session_scope() as session:
        assert await session.scalar(text("SHOW transaction_read_only")) == "off"
    assert await backend.names() == []


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_scope_inside_a_read_only_route_follows_it(backend: Backend, database: Database) -> None:
    seen: list[str] = []

    @session_policy(read_only=True)
    async def read(request: Request) -> Response:
        async with session_scope() as inherited, session_scope(read_only=False) as writable:
            seen.append(str(await inherited.scalar(text("SHOW transaction_read_only"))))
            seen.append(str(await writable.scalar(text("SHOW transaction_read_only"))))
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/read", read)])
    app.add_middleware(DBSessionMiddleware, database=database)
    async with client(app) as http:
        assert (await http.get("/read")).status_code == 200
    assert seen == ["on", "off"]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_fastapi_routes_take_the_marker_too(backend: Backend, database: Database) -> None:
    app = FastAPI()

    @app.get("/read")
    @session_policy(read_only=True)
    async def read(session: SessionDep) -> str:
        return str(await session.scalar(text("SHOW transaction_read_only")))

    @session_policy(commit_on_success=True)  # above the route decorator works as well
    @app.post("/add", status_code=201)
    async def add_item(session: Annotated[AsyncSession, Depends(current_session)]) -> str:
        session.add(Item(id=1, name="fastapi"))
        return "added"

    app.add_middleware(DBSessionMiddleware, database=database)
    async with client(app) as http:
        assert (await http.get("/read")).json() == "on"
        assert (await http.post("/add")).status_code == 201
    assert await backend.names() == ["fastapi"]


@session_policy(read_only=True)
async def annotated(request: Request) -> Response:
    return PlainTextResponse("")


def test_the_wrapper_resolves_annotations_in_the_endpoints_module() -> None:
    # How FastAPI 0.110 resolves a string annotation: in the __globals__ of the function it was given, which
    # for the wrapper session_policy() returns must be the endpoint's module.
    annotation = inspect.signature(annotated).parameters["request"].annotation
    assert annotation == "Request"
    assert eval(annotation, annotated.__globals__) is Request
    assert annotated.__wrapped__.__name__ == "annotated"  # type: ignore[attr-defined]
