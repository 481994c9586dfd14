"""WebSocket connections through DBSessionMiddleware, driven with raw ASGI messages.

One session per connection, shared by every message of that connection; the transaction policy applied when
the connection ends; the session closed and its connection back in the pool once the client is gone.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import closing

import asyncpg
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from asgi_db_session import Database, DBSessionMiddleware, current_session
from asgi_db_session._types import ASGIApp

from .asgi import Channel, websocket_scope
from .conftest import Backend, database_named
from .models import Item

pytestmark = pytest.mark.anyio


class Connection:
    """One client connection: sends text frames and waits for the endpoint's reply to each."""

    def __init__(self, app: ASGIApp) -> None:
        self.channel = Channel([{"type": "websocket.connect"}])
        self.task = asyncio.create_task(self._call(app))

    async def _call(self, app: ASGIApp) -> None:
        await app(websocket_scope(), self.channel.receive, self.channel.send)

    async def _sent(self, count: int) -> None:
        """Wait until the app has sent ``count`` messages in all."""
        deadline = time.monotonic() + 5
        while len(self.channel.sent) < count:
            if self.task.done():
                self.task.result()  # raises what the app raised
                raise AssertionError(f"the app ended early: {self.channel.sent}")
            assert time.monotonic() < deadline, f"the app did not answer: {self.channel.sent}"
            await asyncio.sleep(0.002)

    async def accepted(self) -> None:
        await self._sent(1)
        assert self.channel.types() == ["websocket.accept"]

    async def ask(self, command: str) -> str:
        """Send ``command``; return the endpoint's reply."""
        count = len(self.channel.sent)
        self.channel.queue.put_nowait({"type": "websocket.receive", "text": command})
        await self._sent(count + 1)
        reply = self.channel.sent[count]
        assert reply["type"] == "websocket.send", reply
        return str(reply["text"])

    async def send_only(self, command: str) -> None:
        """Send ``command`` that makes the endpoint end (close or raise); wait for the call to end."""
        self.channel.queue.put_nowait({"type": "websocket.receive", "text": command})
        await asyncio.wait_for(asyncio.gather(self.task, return_exceptions=True), timeout=5)

    async def disconnect(self, code: int = 1000) -> None:
        """The client goes away; wait until the app's call has ended, and re-raise what it raised."""
        self.channel.queue.put_nowait({"type": "websocket.disconnect", "code": code})
        await asyncio.wait_for(self.task, timeout=5)


class Endpoint:
    """A WebSocket endpoint that runs text commands against ``current_session()`` and keeps the sessions."""

    def __init__(self) -> None:
        self.sessions: list[AsyncSession] = []

    async def handle(self, websocket: WebSocket) -> None:
        await websocket.accept()
        async for command in websocket.iter_text():
            verb, _, argument = command.partition(" ")
            session = current_session()
            self.sessions.append(session)
            if verb == "session":
                await session.execute(select(Item))  # takes a connection for the rest of the transaction
                await websocket.send_text(str(id(session)))
            elif verb == "add":
                item_id, name = argument.split()
                session.add(Item(id=int(item_id), name=name))
                await session.flush()
                await websocket.send_text("added")
            elif verb == "commit":
                await session.commit()
                await websocket.send_text("committed")
            elif verb == "close":
                await websocket.close(code=int(argument))
                return
            elif verb == "raise":
                raise RuntimeError("the endpoint failed")
            else:  # pragma: no cover - a typo in a test
                raise AssertionError(command)


def make_app(database: Database, endpoint: Endpoint, *, commit_on_success: bool | None = None) -> Starlette:
    app = Starlette(routes=[WebSocketRoute("/ws", endpoint.handle)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=commit_on_success)
    return app


def application_name(database: Database) -> str | None:
    assert database.settings is not None
    return database.settings.application_name


async def assert_connection_returned(backend: Backend, database: Database, endpoint: Endpoint) -> None:
    """The connection's session is closed, its connection back in the pool, and no transaction left open.

    Call it first thing once the connection's ASGI call has ended: the cleanup must be over by then.
    """
    assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert endpoint.sessions, "the endpoint never used a session"
    assert not [session for session in endpoint.sessions if session.in_transaction()]
    if backend.name == "postgresql":
        connection = await asyncpg.connect(backend.dsn)
        try:
            states = [
                row[0]
                for row in await connection.fetch(
                    "SELECT coalesce(state, '') FROM pg_stat_activity WHERE application_name = $1",
                    application_name(database),
                )
            ]
        finally:
            await connection.close()
        assert states, "the connection never reached the database"
        assert set(states) == {"idle"}, states
    else:
        with closing(sqlite3.connect(backend.dsn, timeout=0)) as connection:
            connection.execute("BEGIN IMMEDIATE")  # fails at once if a transaction of ours kept the write lock
            connection.execute("ROLLBACK")


@pytest.fixture
async def database(backend: Backend) -> AsyncIterator[Database]:
    """The Database under test; on PostgreSQL its connections carry an application_name of their own."""
    async with database_named(backend, "adbs-ws") as db:
        yield db


# --- one session per connection -----------------------------------------------------------------------------


async def test_one_session_per_connection(backend: Backend, database: Database) -> None:
    endpoint = Endpoint()
    app = make_app(database, endpoint)
    first, second = Connection(app), Connection(app)
    await first.accepted()
    await second.accepted()

    first_ids = [await first.ask("session"), await first.ask("session")]
    second_ids = [await second.ask("session"), await second.ask("session")]
    first_ids.append(await first.ask("session"))

    assert len(set(first_ids)) == 1, "messages of one connection saw different sessions"
    assert len(set(second_ids)) == 1
    assert first_ids[0] != second_ids[0], "two connections shared a session"
    # The sessions themselves (kept alive by the endpoint, so their ids cannot be reused): two in all.
    assert len({id(session) for session in endpoint.sessions}) == 2
    # Each open connection holds its session's database connection until it ends.
    assert database.engine.pool.checkedout() == 2  # type: ignore[attr-defined]

    await first.disconnect()
    assert database.engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    await second.disconnect()
    await assert_connection_returned(backend, database, endpoint)


# --- the manual policy --------------------------------------------------------------------------------------


async def test_manual_policy_rolls_back_what_was_not_committed(backend: Backend, database: Database) -> None:
    endpoint = Endpoint()
    connection = Connection(make_app(database, endpoint))
    await connection.accepted()
    assert await connection.ask("add 1 committed") == "added"
    assert await connection.ask("commit") == "committed"
    assert await connection.ask("add 2 left-open") == "added"
    assert database.engine.pool.checkedout() == 1  # type: ignore[attr-defined]

    await connection.disconnect()
    await assert_connection_returned(backend, database, endpoint)
    assert await backend.names() == ["committed"]


# --- commit_on_success --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["client disconnects", "app closes with 1000"])
async def test_commit_on_success_commits_a_connection_that_ends_normally(
    backend: Backend, database: Database, ending: str
) -> None:
    endpoint = Endpoint()
    connection = Connection(make_app(database, endpoint, commit_on_success=True))
    await connection.accepted()
    assert await connection.ask("add 1 a") == "added"
    assert await connection.ask("add 2 b") == "added"
    assert await backend.names() == []  # nothing is committed before the end

    if ending == "client disconnects":
        await connection.disconnect(1000)
    else:
        await connection.send_only("close 1000")
        connection.task.result()
        assert connection.channel.sent[-1] == {"type": "websocket.close", "code": 1000, "reason": ""}
    await assert_connection_returned(backend, database, endpoint)
    assert await backend.names() == ["a", "b"]


# 1005 and 1001 end normally (a close without a code; going away); 1006 is what a server reports when the TCP
# connection dropped.
@pytest.mark.parametrize(("code", "kept"), [(1005, ["a"]), (1001, ["a"]), (1006, [])])
async def test_commit_on_success_follows_the_clients_close_code(
    backend: Backend, database: Database, code: int, kept: list[str]
) -> None:
    endpoint = Endpoint()
    connection = Connection(make_app(database, endpoint, commit_on_success=True))
    await connection.accepted()
    assert await connection.ask("add 1 a") == "added"
    await connection.disconnect(code)
    await assert_connection_returned(backend, database, endpoint)
    assert await backend.names() == kept


@pytest.mark.parametrize("code", [1011, 1008])
async def test_commit_on_success_rolls_back_when_the_app_closes_with_an_error_code(
    backend: Backend, database: Database, code: int
) -> None:
    endpoint = Endpoint()
    connection = Connection(make_app(database, endpoint, commit_on_success=True))
    await connection.accepted()
    assert await connection.ask("add 1 a") == "added"

    await connection.send_only(f"close {code}")
    connection.task.result()
    assert connection.channel.sent[-1]["code"] == code
    await assert_connection_returned(backend, database, endpoint)
    assert await backend.names() == []


async def test_commit_on_success_rolls_back_when_the_endpoint_raises(backend: Backend, database: Database) -> None:
    endpoint = Endpoint()
    connection = Connection(make_app(database, endpoint, commit_on_success=True))
    await connection.accepted()
    assert await connection.ask("add 1 a") == "added"

    await connection.send_only("raise")
    with pytest.raises(RuntimeError, match="the endpoint failed"):
        connection.task.result()  # the error reaches the server, which closes the socket with 1011
    await assert_connection_returned(backend, database, endpoint)
    assert await backend.names() == []
