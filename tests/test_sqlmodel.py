"""SQLModel's AsyncSession as the session class: SQLModelSession keeps the guard, on_commit() and read-your-writes.

SQLModel's own AsyncSession as ``class_`` would lose all three; each test here fails with it (or without
asgi_db_session.sqlmodel): on_commit() is refused, a second task's exec() is not stopped, a write does not keep
the request's reads on the primary.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import closing, nullcontext
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import Field, SQLModel, col, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_db_session import (
    ConcurrentSessionUseError,
    Database,
    DBSessionMiddleware,
    UsageError,
    current_session,
    get_database,
    on_commit,
    session_scope,
)
from asgi_db_session.exceptions import MISSING_EXTRA, NOT_A_SQLMODEL_SESSION
from asgi_db_session.sqlmodel import SQLModelSession, current_sqlmodel_session

from .conftest import Backend, client
from .docs_code import DOCS, blocks_run_by
from .models import TABLE
from .test_replica_routing import PRIMARY, REPLICAS, where

pytestmark = pytest.mark.anyio


class Hero(SQLModel, table=True):
    """A SQLModel table model on the tests' items table (the backend fixture makes and empties it)."""

    __tablename__ = TABLE

    # The table's id is a plain integer (no sequence): each Hero is given its own.
    id: int = Field(primary_key=True)
    name: str


@pytest.fixture
async def sqlmodel_database(backend: Backend) -> AsyncIterator[Database]:
    database = Database(backend.url, session_options={"class_": SQLModelSession})
    yield database
    await database.dispose()


async def test_a_request_reads_with_exec_and_follows_the_commit_policy(backend: Backend) -> None:
    async def create(request: Request) -> Response:
        session = current_sqlmodel_session()
        session.add(Hero(id=int(request.path_params["id"]), name=request.path_params["name"]))
        await session.flush()
        heroes = (await session.exec(select(Hero).order_by(col(Hero.name)))).all()
        names = [hero.name for hero in heroes]
        return JSONResponse(names, status_code=400 if request.query_params.get("fail") else 201)

    app = Starlette(routes=[Route("/heroes/{id}/{name}", create, methods=["POST"])])
    # The middleware's own Database, made at the first request with these session options.
    app.add_middleware(
        DBSessionMiddleware, url=backend.url, session_options={"class_": SQLModelSession}, commit_on_success=True
    )
    try:
        async with client(app) as http:
            created = await http.post("/heroes/1/Deadpond")
            assert (created.status_code, created.json()) == (201, ["Deadpond"])
            refused = await http.post("/heroes/2/Rusty-Man", params={"fail": "1"})
            assert (refused.status_code, refused.json()) == (400, ["Deadpond", "Rusty-Man"])
    finally:
        await get_database().dispose()  # no lifespan here to dispose it
    assert await backend.names() == ["Deadpond"]  # the 4xx's row was rolled back


async def test_on_commit_runs_after_the_commit_and_not_after_a_rollback(
    backend: Backend, sqlmodel_database: Database
) -> None:
    seen: list[list[str]] = []

    async def callback() -> None:
        seen.append(await backend.names())  # a second connection: the commit has happened

    async def create(request: Request) -> Response:
        current_sqlmodel_session().add(Hero(id=int(request.path_params["id"]), name=request.path_params["name"]))
        on_commit(callback)
        return Response(status_code=400 if request.query_params.get("fail") else 201)

    app = Starlette(routes=[Route("/heroes/{id}/{name}", create, methods=["POST"])])
    app.add_middleware(DBSessionMiddleware, database=sqlmodel_database, commit_on_success=True)
    async with client(app) as http:
        assert (await http.post("/heroes/1/Deadpond")).status_code == 201
        assert (await http.post("/heroes/2/Rusty-Man", params={"fail": "1"})).status_code == 400
    assert seen == [["Deadpond"]]

    # The app's own commit runs them too.
    async with session_scope() as session:
        assert isinstance(session, SQLModelSession)
        session.add(Hero(id=3, name="Spider-Boy"))
        on_commit(callback)
        await session.commit()
    assert seen == [["Deadpond"], ["Deadpond", "Spider-Boy"]]


@pytest.mark.parametrize("method", ["exec", "execute"])
async def test_two_tasks_on_one_session_are_refused(sqlmodel_database: Database, method: str) -> None:
    async def read(session: SQLModelSession) -> None:
        await asyncio.sleep(0)
        if method == "exec":
            await session.exec(select(Hero))
        else:
            await session.execute(select(Hero))

    # SQLModel's execute() keeps its deprecation notice: the guard wraps SQLModel's method, not SQLAlchemy's.
    expected = pytest.warns(DeprecationWarning, match=r"session\.exec\(\)") if method == "execute" else nullcontext()
    with expected:
        async with session_scope() as session:
            assert isinstance(session, SQLModelSession)
            with pytest.raises(ConcurrentSessionUseError) as caught:
                await asyncio.gather(read(session), read(session))
    assert f"{method}()" in str(caught.value)


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_request_that_wrote_reads_from_the_primary(backend: Backend) -> None:
    async def endpoint(request: Request) -> Response:
        places = []
        async with session_scope(read_only=True):
            places.append(await where())
        session = current_sqlmodel_session()
        session.add(Hero(id=4, name="Tarantula"))
        await session.flush()
        async with session_scope(read_only=True) as read:
            places.append(await where())
            assert isinstance(read, SQLModelSession)
        return JSONResponse(places)

    replicated = Database(backend.url, replicas=REPLICAS, session_options={"class_": SQLModelSession})
    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=replicated, commit_on_success=True)
    try:
        async with client(app) as http:
            assert (await http.get("/")).json() == ["postgres", PRIMARY]
    finally:
        await replicated.dispose()
    assert await backend.names() == ["Tarantula"]


async def test_current_sqlmodel_session_names_the_class_to_set(backend: Backend) -> None:
    database = Database(backend.url)
    try:
        async with session_scope():
            await current_session().execute(text("SELECT 1"))
            with pytest.raises(UsageError) as caught:
                current_sqlmodel_session()
    finally:
        await database.dispose()
    assert str(caught.value) == NOT_A_SQLMODEL_SESSION.format(name="default", session_class="GuardedSession")


def test_a_missing_sqlmodel_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sqlmodel", None)  # what an import finds when it is not installed
    monkeypatch.delitem(sys.modules, "asgi_db_session.sqlmodel")
    with pytest.raises(ModuleNotFoundError) as caught:
        importlib.import_module("asgi_db_session.sqlmodel")
    assert str(caught.value) == MISSING_EXTRA.format(
        needed_by="asgi_db_session.sqlmodel", module="sqlmodel", extra="sqlmodel"
    )


SQLMODEL_PAGE = DOCS / "how-to" / "sqlmodel.md"

# What a user does with the page's example: serve it (here through its lifespan, on SQLite), make the
# table, create a hero and list the heroes.
PAGE_DRIVER = """
import asyncio

import httpx
from asgi_lifespan import LifespanManager
from sqlmodel import SQLModel

from asgi_db_session import get_database
from app import app


async def main() -> None:
    async with LifespanManager(app) as manager:
        async with get_database().engine.begin() as connection:
            await connection.run_sync(SQLModel.metadata.create_all)
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            created = await http.post("/heroes", json={"name": "Deadpond"})
            assert (created.status_code, created.json()) == (201, {"id": 1, "name": "Deadpond"}), created.text
            listed = await http.get("/heroes")
            assert listed.json() == [{"id": 1, "name": "Deadpond"}], listed.text


asyncio.run(main())
"""


def test_the_docs_example_runs(tmp_path: Path) -> None:
    """docs/how-to/sqlmodel.md's example (type-checked by tests/test_docs_code.py with the docs' other blocks)."""
    (example,) = blocks_run_by(SQLMODEL_PAGE, "tests/test_sqlmodel.py::test_the_docs_example_runs")
    (tmp_path / "app.py").write_text(example.code)
    (tmp_path / "run.py").write_text(PAGE_DRIVER)
    env = {key: value for key, value in os.environ.items() if not key.startswith("DATABASE_")}
    env["DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'heroes.db'}"
    ran = subprocess.run(
        [sys.executable, "-W", "error", "run.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    with closing(sqlite3.connect(tmp_path / "heroes.db")) as connection:  # committed: a second connection sees it
        assert connection.execute("SELECT id, name FROM hero").fetchall() == [(1, "Deadpond")]
