"""FastAPI apps: the same middleware, with HTTPException, dependencies and sync path operations."""

# No "from __future__ import annotations": FastAPI reads these annotations at run time, closures included.

from collections.abc import AsyncIterator
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from asgi_db_session import Database, DBSessionMiddleware, current_session
from asgi_db_session.fastapi import SessionDep, session_dependency

from .conftest import Backend, client
from .models import Item

pytestmark = pytest.mark.anyio


class ItemIn(BaseModel):
    id: int
    name: str


def make_app(database: Database) -> tuple[FastAPI, list[AsyncSession]]:
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    seen: list[AsyncSession] = []

    async def audited() -> AsyncIterator[AsyncSession]:
        # A dependency with yield runs inside the request, before and after the endpoint.
        seen.append(current_session())
        yield current_session()
        seen.append(current_session())

    @app.post("/items", status_code=201)
    async def create(item: ItemIn, session: Annotated[AsyncSession, Depends(audited)]) -> dict[str, int]:
        assert session is current_session()
        current_session().add(Item(id=item.id, name=item.name))
        await current_session().flush()
        if item.name.startswith("bad"):
            raise HTTPException(status_code=409, detail="bad name")
        return {"id": item.id}

    @app.get("/sync")
    def sync_endpoint() -> dict[str, int]:
        seen.append(current_session())
        return {"session": id(current_session())}

    return app, seen


async def test_fastapi_commits_a_success_and_rolls_back_an_http_exception(backend: Backend, database: Database) -> None:
    app, seen = make_app(database)
    async with client(app) as http:
        assert (await http.post("/items", json={"id": 1, "name": "good"})).status_code == 201
        assert (await http.post("/items", json={"id": 2, "name": "bad-one"})).status_code == 409
        assert (await http.post("/items", json={"name": "no id"})).status_code == 422
    assert await backend.names() == ["good"]
    assert seen[0] is seen[1]


async def test_fastapi_sync_path_operations_see_the_request_session(database: Database) -> None:
    app, seen = make_app(database)
    async with client(app) as http:
        first = (await http.get("/sync")).json()["session"]
        second = (await http.get("/sync")).json()["session"]
    assert [id(session) for session in seen] == [first, second]
    assert first != second


async def test_the_session_dependency_is_the_request_session(backend: Backend, database: Database) -> None:
    analytics = Database(backend.url, name="analytics")
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    app.add_middleware(DBSessionMiddleware, database=analytics)

    @app.post("/items", status_code=201)
    async def create(
        item: ItemIn, session: SessionDep, other: Annotated[AsyncSession, session_dependency("analytics")]
    ) -> dict[str, bool]:
        session.add(Item(id=item.id, name=item.name))
        return {"same": session is current_session(), "other": other is current_session("analytics")}

    async with client(app) as http:
        response = await http.post("/items", json={"id": 1, "name": "injected"})
    assert response.json() == {"same": True, "other": True}
    assert await backend.names() == ["injected"]
    await analytics.dispose()
