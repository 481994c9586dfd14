"""The notes example (examples/notes): its API on both backends, and ``python -m examples.notes`` as a real server."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, closing
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.pool import QueuePool
from starlette.applications import Starlette

from asgi_db_session import Database
from examples.notes import create_app

from .asgi import Channel
from .conftest import Backend, client

pytestmark = pytest.mark.anyio

REPO_ROOT = Path(__file__).resolve().parents[1]
ROWS = "SELECT id, title, body FROM notes ORDER BY id"


async def _wait_for_lifespan(channel: Channel, prefix: str) -> None:
    async with asyncio.timeout(10):
        while not any(kind.startswith(prefix) for kind in channel.types()):
            channel.sent_event.clear()
            await channel.sent_event.wait()


@asynccontextmanager
async def running(app: Starlette) -> AsyncIterator[Channel]:
    """Run the app's lifespan startup, then the block, then (if startup succeeded) its shutdown, as a server does."""
    channel = Channel([{"type": "lifespan.startup"}])
    scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, channel.receive, channel.send))
    try:
        await _wait_for_lifespan(channel, "lifespan.startup.")
        yield channel
        if channel.types() == ["lifespan.startup.complete"]:
            channel.queue.put_nowait({"type": "lifespan.shutdown"})
            await _wait_for_lifespan(channel, "lifespan.shutdown.")
            await asyncio.wait_for(task, timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _run(coroutine: Coroutine[Any, Any, None]) -> None:
    # In a thread of its own: fixtures may be set up from inside the test's running event loop.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coroutine).result()


async def _admin(dsn: str, *statements: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def notes_pg_database(postgresql_dsn: str) -> Iterator[str]:
    """A PostgreSQL database for this test run: the app's table is always "notes", so two runs against one
    server would otherwise drop each other's."""
    name = f"adbs_notes_{os.getpid()}"
    _run(_admin(postgresql_dsn, f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}"))
    yield name
    _run(_admin(postgresql_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
async def notes_db(backend: Backend, request: pytest.FixtureRequest) -> Backend:
    """``backend``, in a database of this run's own, without a notes table."""
    if backend.name == "postgresql":
        name = request.getfixturevalue("notes_pg_database")
        backend = replace(
            backend,
            url=make_url(backend.url).set(database=name).render_as_string(hide_password=False),
            dsn=make_url(backend.dsn).set(database=name).render_as_string(hide_password=False),
        )
    await backend.execute("DROP TABLE IF EXISTS notes")
    return backend


@pytest.fixture
async def http(notes_db: Backend) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the notes app on ``notes_db``, started (so its table is created) and shut down around the test."""
    app = create_app(notes_db.url)
    database: Database = app.state.database
    async with running(app) as channel:
        assert channel.types() == ["lifespan.startup.complete"], channel.sent
        async with client(app) as http:
            yield http
        pool = database.engine.pool
        assert isinstance(pool, QueuePool)
        assert pool.checkedout() == 0, "a request did not give its connection back"
    assert channel.types()[-1] == "lifespan.shutdown.complete"


async def test_create_get_and_list(http: httpx.AsyncClient, notes_db: Backend) -> None:
    created = await http.post("/notes", json={"title": "  Groceries ", "body": "milk, eggs"})
    assert created.status_code == 201
    note = created.json()
    assert note == {"id": note["id"], "title": "Groceries", "body": "milk, eggs", "created_at": note["created_at"]}
    assert datetime.fromisoformat(note["created_at"]).utcoffset() is not None

    fetched = await http.get(f"/notes/{note['id']}")
    assert fetched.status_code == 200
    assert fetched.json() == note  # created_at included: it round-trips through the database unchanged
    listed = await http.get("/notes")
    assert listed.status_code == 200
    assert listed.json() == [note]
    assert await notes_db.fetch(ROWS) == [(note["id"], "Groceries", "milk, eggs")]


async def test_body_may_be_left_out(http: httpx.AsyncClient, notes_db: Backend) -> None:
    created = await http.post("/notes", json={"title": "Title only"})
    assert created.status_code == 201
    assert await notes_db.fetch(ROWS) == [(created.json()["id"], "Title only", "")]


async def test_list_is_in_creation_order(http: httpx.AsyncClient) -> None:
    for title in ("one", "two", "three"):
        assert (await http.post("/notes", json={"title": title, "body": ""})).status_code == 201
    assert [note["title"] for note in (await http.get("/notes")).json()] == ["one", "two", "three"]


async def test_missing_note_is_404(http: httpx.AsyncClient) -> None:
    for response in (await http.get("/notes/404"), await http.delete("/notes/404")):
        assert response.status_code == 404
        assert response.json() == {"detail": "Note 404 does not exist."}
    assert (await http.get("/notes/not-a-number")).status_code == 404


async def test_delete(http: httpx.AsyncClient, notes_db: Backend) -> None:
    first = (await http.post("/notes", json={"title": "first", "body": "a"})).json()
    second = (await http.post("/notes", json={"title": "second", "body": "b"})).json()

    deleted = await http.delete(f"/notes/{first['id']}")
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert (await http.get(f"/notes/{first['id']}")).status_code == 404
    assert (await http.get("/notes")).json() == [second]
    assert await notes_db.fetch(ROWS) == [(second["id"], "second", "b")]


@pytest.mark.parametrize(
    ("payload", "errors"),
    [
        ({"body": "no title"}, {"title"}),
        ({"title": "   ", "body": "blank title"}, {"title"}),
        ({"title": "x" * 201, "body": ""}, {"title"}),
        ({"title": "fine", "body": 42}, {"body"}),
        ({"title": None, "body": ["not", "text"]}, {"title", "body"}),
        (["not", "an", "object"], {"request"}),
    ],
)
async def test_invalid_input_is_422_and_writes_nothing(
    http: httpx.AsyncClient, notes_db: Backend, payload: object, errors: set[str]
) -> None:
    response = await http.post("/notes", json=payload)
    assert response.status_code == 422
    assert set(response.json()["detail"]) == errors
    assert await notes_db.fetch(ROWS) == []


async def test_malformed_json_is_422(http: httpx.AsyncClient, notes_db: Backend) -> None:
    response = await http.post("/notes", content=b'{"title": ', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert set(response.json()["detail"]) == {"request"}
    assert await notes_db.fetch(ROWS) == []


async def test_health(http: httpx.AsyncClient) -> None:
    response = await http.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_health_is_503_when_the_database_is_down() -> None:
    # Port 1 on localhost refuses connections at once.
    app = create_app("postgresql+asyncpg://postgres@127.0.0.1:1/test")
    async with client(app) as http:
        response = await http.get("/health")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable"}


async def test_database_url_from_the_environment_is_logged_without_its_password(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://notes:s3cret-pw@127.0.0.1:1/notes")
    app = create_app()
    with caplog.at_level(logging.INFO, logger="examples.notes"):
        async with running(app) as channel:
            pass
    assert channel.sent[0]["type"] == "lifespan.startup.failed"  # the database is unreachable
    assert "s3cret-pw" not in channel.sent[0]["message"]
    assert "s3cret-pw" not in caplog.text
    assert "postgresql+asyncpg://notes:***@127.0.0.1:1/notes (from DATABASE_URL)" in caplog.text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def server_log(tmp_path: Path) -> Iterator[IO[bytes]]:
    with (tmp_path / "server.log").open("wb") as log:
        yield log


async def _wait_until_serving(http: httpx.AsyncClient, server: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(30):
        while server.returncode is None:
            try:
                if (await http.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            await asyncio.sleep(0.05)
    raise AssertionError(f"the server exited with status {server.returncode} before it answered")


async def test_python_m_examples_notes_serves_over_http(tmp_path: Path, server_log: IO[bytes]) -> None:
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("DATABASE_")}
    env.update(
        HOST="127.0.0.1",
        PORT=str(port),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )
    # No DATABASE_URL: the app's default, ./notes.db, lands in the working directory, tmp_path.
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "examples.notes", cwd=tmp_path, env=env, stdout=server_log, stderr=server_log
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10, trust_env=False) as http:
            await _wait_until_serving(http, server)
            created = await http.post("/notes", json={"title": "over HTTP", "body": "really"})
            assert created.status_code == 201
            fetched = await http.get(f"/notes/{created.json()['id']}")
            assert fetched.status_code == 200
            assert fetched.json() == created.json()
        server.terminate()
        await asyncio.wait_for(server.wait(), timeout=15)
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
        server_log.flush()
        log = (tmp_path / "server.log").read_text()
        print(log)  # shown by pytest when the test fails

    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal so the exit status reports it.
    assert server.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete." in log
    assert "Traceback" not in log
    assert "Notes database: sqlite+aiosqlite:///./notes.db" in log
    with closing(sqlite3.connect(tmp_path / "notes.db")) as connection:
        assert connection.execute(ROWS).fetchall() == [(created.json()["id"], "over HTTP", "really")]
