"""The notes example (examples/notes): its API on both backends, and ``python -m examples.notes`` as a real server."""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, closing
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.pool import QueuePool
from starlette.applications import Starlette

from asgi_db_session import get_database
from examples.fastapi_notes import create_app as create_fastapi_app
from examples.notes import create_app

from ..asgi import Channel
from ..conftest import Backend, client

pytestmark = pytest.mark.anyio

REPO_ROOT = Path(__file__).resolve().parents[2]
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


@asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a demo app, started (so its table is created) and shut down around the block."""
    database = get_database()  # the one create_app() has just made
    async with running(app) as channel:
        assert channel.types() == ["lifespan.startup.complete"], channel.sent
        async with client(app) as http:
            yield http
        pool = database.engine.pool
        assert isinstance(pool, QueuePool)
        assert pool.checkedout() == 0, "a request did not give its connection back"
    assert channel.types()[-1] == "lifespan.shutdown.complete"


@pytest.fixture
async def http(notes_db: Backend) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the Starlette notes app on ``notes_db``."""
    async with serving(create_app(notes_db.url)) as http:
        yield http


DEMOS: dict[str, Callable[[str], Starlette]] = {"starlette": create_app, "fastapi": create_fastapi_app}


@pytest.fixture(params=sorted(DEMOS))
async def any_demo(notes_db: Backend, request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    """A client of each demo (Starlette, FastAPI) on ``notes_db``: what both must answer alike."""
    async with serving(DEMOS[request.param](notes_db.url)) as http:
        yield http


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


def error_fields(response: httpx.Response) -> set[str]:
    """The fields a 422 names: the Starlette demo's ``{"detail": {field: message}}``, or FastAPI's list of errors."""
    detail = response.json()["detail"]
    if isinstance(detail, dict):
        return set(detail)
    return {str(error["loc"][-1]) if len(error["loc"]) > 1 else "request" for error in detail}


async def test_a_note_reads_back_as_it_was_created(any_demo: httpx.AsyncClient) -> None:
    created = await any_demo.post("/notes", json={"title": "Groceries", "body": "milk"})
    assert created.status_code == 201
    assert datetime.fromisoformat(created.json()["created_at"]).utcoffset() is not None
    assert (await any_demo.get(f"/notes/{created.json()['id']}")).json() == created.json()
    assert (await any_demo.get("/notes")).json() == [created.json()]


async def test_the_same_title_twice_is_409_and_saves_nothing(any_demo: httpx.AsyncClient, notes_db: Backend) -> None:
    first = await any_demo.post("/notes", json={"title": "Groceries", "body": "milk"})
    assert first.status_code == 201
    second = await any_demo.post("/notes", json={"title": " Groceries ", "body": "bread"})
    assert second.status_code == 409
    # The package's default mapping of a unique violation, as the client reads it.
    assert second.text == "Conflict: the request clashes with data saved meanwhile; nothing was saved."
    assert await notes_db.fetch(ROWS) == [(first.json()["id"], "Groceries", "milk")]
    # The failed INSERT left nothing behind in the connection it ran on.
    assert (await any_demo.post("/notes", json={"title": "Bread"})).status_code == 201
    assert [row[1] for row in await notes_db.fetch(ROWS)] == ["Groceries", "Bread"]


@pytest.mark.parametrize(
    "body",
    [b'{"title": ', b"\xff\xfe", b'{"title": "a"} trailing', b"[" * 100_000],
    ids=["truncated", "not-utf-8", "trailing-data", "nested-too-deep"],
)
async def test_malformed_json_is_400(any_demo: httpx.AsyncClient, notes_db: Backend, body: bytes) -> None:
    response = await any_demo.post("/notes", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert await notes_db.fetch(ROWS) == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (rb'{"title": "a\u0000b"}', "title"),
        (rb'{"title": "fine", "body": "a\u0000"}', "body"),
        (rb'{"title": "\ud800"}', "title"),
        (rb'{"title": "fine", "body": "\udfff"}', "body"),
    ],
    ids=["nul-title", "nul-body", "lone-surrogate-title", "lone-surrogate-body"],
)
async def test_text_the_database_cannot_store_is_422(
    any_demo: httpx.AsyncClient, notes_db: Backend, body: bytes, field: str
) -> None:
    # PostgreSQL refuses NUL in text, and no database takes a lone surrogate (it has no UTF-8 encoding).
    response = await any_demo.post("/notes", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert error_fields(response) == {field}
    assert await notes_db.fetch(ROWS) == []


@pytest.mark.parametrize(
    "payload",
    [
        {"body": "no title"},
        {"title": 5},
        {"title": "   "},
        {"title": "x" * 201},
        {"title": "ok", "body": 5},
        ["x"],
        "x",
    ],
)
async def test_missing_or_wrong_fields_are_422(any_demo: httpx.AsyncClient, notes_db: Backend, payload: object) -> None:
    response = await any_demo.post("/notes", json=payload)
    assert response.status_code == 422
    assert await notes_db.fetch(ROWS) == []


@pytest.mark.parametrize("note_id", ["0", "2147483647", "2147483648", "99999999999999999999999"])
async def test_an_id_no_note_has_is_404(any_demo: httpx.AsyncClient, note_id: str) -> None:
    # 2**31 and above do not fit PostgreSQL's integer column; the demos answer 404 without asking it.
    for method in ("GET", "DELETE"):
        response = await any_demo.request(method, f"/notes/{note_id}")
        assert response.status_code == 404
        assert response.json() == {"detail": f"Note {note_id} does not exist."}


def old_table(backend: Backend) -> str:
    """The notes table as the demo made it before its title was unique."""
    key = "SERIAL PRIMARY KEY" if backend.name == "postgresql" else "INTEGER PRIMARY KEY"
    return f"CREATE TABLE notes (id {key}, title VARCHAR(200), body TEXT, created_at TIMESTAMP WITH TIME ZONE)"


@pytest.mark.parametrize("demo", sorted(DEMOS))
async def test_a_notes_table_without_the_unique_title_stops_the_startup(notes_db: Backend, demo: str) -> None:
    # As an earlier version of the demo made it: there the 409 the demos page shows would be a second 201.
    await notes_db.execute(old_table(notes_db))
    app = DEMOS[demo](notes_db.url)
    try:
        async with running(app) as channel:
            pass
    finally:
        await get_database().dispose()  # a server exits after a failed startup; this test goes on
    assert channel.sent[0]["type"] == "lifespan.startup.failed"
    assert "has no unique constraint on title" in channel.sent[0]["message"]
    assert "Drop the table" in channel.sent[0]["message"]


async def test_a_notes_table_with_a_unique_index_on_title_will_do(notes_db: Backend) -> None:
    await notes_db.execute(old_table(notes_db))
    await notes_db.execute("CREATE UNIQUE INDEX notes_title ON notes (title)")
    async with serving(create_app(notes_db.url)) as http:
        assert (await http.post("/notes", json={"title": "once"})).status_code == 201
        assert (await http.post("/notes", json={"title": "once"})).status_code == 409


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


def _demo_env(**extra: str) -> dict[str, str]:
    """The environment without DATABASE_*, HOST or PORT, with the repository importable."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("DATABASE_") and key not in ("HOST", "PORT")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


async def _wait_until_serving(http: httpx.AsyncClient, server: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(60):
        while server.returncode is None:
            try:
                if (await http.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            await asyncio.sleep(0.05)
    raise AssertionError(f"the server exited with status {server.returncode} before it answered")


async def _serve_and_use(command: list[str], port: int, cwd: Path, env: dict[str, str]) -> str:
    """Run ``command`` as a server, create and fetch a note on ``port`` over HTTP, stop it with SIGTERM; its log."""
    log_path = cwd / "server.log"
    with log_path.open("wb") as log:
        server = await asyncio.create_subprocess_exec(*command, cwd=cwd, env=env, stdout=log, stderr=log)
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
            print(log_path.read_text())  # shown by pytest when the test fails
    log_text = log_path.read_text()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal so the exit status reports it.
    assert server.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete." in log_text
    assert "Traceback" not in log_text
    return log_text


def _saved_over_http(database: Path) -> None:
    with closing(sqlite3.connect(database)) as connection:
        assert [row[1:] for row in connection.execute(ROWS)] == [("over HTTP", "really")]


async def test_python_m_examples_notes_serves_on_host_and_port_from_the_environment(tmp_path: Path) -> None:
    port = _free_port()
    env = _demo_env(HOST="127.0.0.1", PORT=str(port))
    # No DATABASE_URL: the app's default, ./notes.db, lands in the working directory, tmp_path.
    log = await _serve_and_use([sys.executable, "-m", "examples.notes"], port, tmp_path, env)
    assert "Notes database: sqlite+aiosqlite:///./notes.db" in log
    _saved_over_http(tmp_path / "notes.db")


@pytest.mark.parametrize("module", ["examples.notes", "examples.fastapi_notes"])
async def test_python_m_demo_serves_on_the_port_given(tmp_path: Path, module: str) -> None:
    port = _free_port()
    log = await _serve_and_use(
        [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port)], port, tmp_path, _demo_env()
    )
    assert f"http://127.0.0.1:{port}" in log
    assert "Notes database: sqlite+aiosqlite:///./notes.db" in log
    _saved_over_http(tmp_path / "notes.db")


def _dev_venv(tmp_path: Path) -> Path:
    """A VENV for ./dev that is already set up: its python runs this test run's interpreter, so ./dev installs
    nothing (the install itself is pip's business, and slow)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    (venv / ".installed-demo").touch()  # ./dev's stamp: the demo extra is installed
    return venv


@pytest.mark.parametrize("command", ["demo", "demo-fastapi"])
async def test_dev_demo_serves_on_the_port_given(tmp_path: Path, command: str) -> None:
    port = _free_port()
    venv = _dev_venv(tmp_path)
    # ./dev runs in the repository: the database goes to tmp_path instead of the default ./notes.db there.
    env = _demo_env(VENV=str(venv), PYTHON=sys.executable, DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'dev.db'}")
    log = await _serve_and_use([str(REPO_ROOT / "dev"), command, "--port", str(port)], port, tmp_path, env)
    assert f"http://127.0.0.1:{port}" in log
    _saved_over_http(tmp_path / "dev.db")


BAD_ARGUMENTS = [["--bogus"], ["8001"], ["--port"], ["--port", "abc"], ["--port", "0"], ["--port", "70000"]]


@pytest.mark.parametrize("module", ["examples.notes", "examples.fastapi_notes"])
@pytest.mark.parametrize("arguments", BAD_ARGUMENTS, ids=" ".join)
def test_python_m_demo_rejects_a_bad_argument_with_usage(tmp_path: Path, module: str, arguments: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=tmp_path,
        env=_demo_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "usage:" in result.stderr
    assert "--port PORT" in result.stderr
    assert not (tmp_path / "notes.db").exists()


@pytest.mark.parametrize("command", ["demo", "demo-fastapi"])
@pytest.mark.parametrize("arguments", BAD_ARGUMENTS, ids=" ".join)
def test_dev_demo_rejects_a_bad_argument_before_installing(tmp_path: Path, command: str, arguments: list[str]) -> None:
    venv = tmp_path / "venv"
    result = subprocess.run(
        [str(REPO_ROOT / "dev"), command, *arguments],
        env=_demo_env(VENV=str(venv)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert f"usage: ./dev {command} [--host HOST] [--port PORT]" in result.stderr
    assert not venv.exists()  # rejected before ./dev made (or installed into) a venv


def test_dev_suggests_port_for_a_bare_number(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(REPO_ROOT / "dev"), "demo", "8001"],
        env=_demo_env(VENV=str(tmp_path / "venv")),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--port 8001" in result.stderr
