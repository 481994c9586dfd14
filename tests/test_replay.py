"""ReplayConflicts: an HTTP request run again after a real deadlock or serialization failure, only before its
response started, only with its body kept; two concurrent requests coordinated with asyncio events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from asgi_db_session import Database, DBSessionMiddleware, ReplayConflicts, current_session, on_commit
from asgi_db_session._types import ASGIApp, Message, Receive, Scope, Send
from asgi_db_session.exceptions import REPLAY_BODY_SIZE, RETRY_ATTEMPTS

from .conftest import client
from .test_retry import DOCTORS, FAST_DEADLOCK_CHECK, ROWS, WAIT, assert_winner_once_victim_replayed, fetch, tables

pytestmark = pytest.mark.anyio


@pytest.fixture
async def pg(postgresql_dsn: str) -> AsyncIterator[Database]:
    async with tables(postgresql_dsn) as db:
        yield db


class DeadlockApp:
    """POST /append with the letter as the body: appends it to both rows, in opposite orders for "a" and "b",
    each request holding its first row's lock before the other asks for it (on the first run of each)."""

    def __init__(self, database: Database, *, stream: bool = False) -> None:
        self.locked = {1: asyncio.Event(), 2: asyncio.Event()}
        self.runs: list[str] = []
        self.committed: list[tuple[str, int]] = []
        self.stream = stream
        app = Starlette(routes=[Route("/append", self.append, methods=["POST"])])
        app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
        self.app: ASGIApp = app

    async def write(self, letter: str) -> None:
        first, second = (1, 2) if letter == "a" else (2, 1)
        session = current_session("retry")
        self.runs.append(letter)
        run = self.runs.count(letter)
        on_commit(lambda: self.committed.append((letter, run)), "retry")
        await session.execute(text(FAST_DEADLOCK_CHECK))
        await session.execute(text(f"UPDATE {ROWS} SET value = value || '{letter}' WHERE id = {first}"))
        self.locked[first].set()
        await asyncio.wait_for(self.locked[second].wait(), WAIT)
        await session.execute(text(f"UPDATE {ROWS} SET value = value || '{letter}' WHERE id = {second}"))

    async def append(self, request: Request) -> PlainTextResponse | StreamingResponse:
        letter = (await request.body()).decode()
        if not self.stream:
            await self.write(letter)
            return PlainTextResponse(letter)

        async def body() -> AsyncIterator[bytes]:
            yield b"started"
            await self.write(letter)
            yield letter.encode()

        return StreamingResponse(body())


def wrapped(app: ASGIApp, attempts: int = 3, max_body_size: int = 64 * 1024) -> ReplayConflicts:
    # Outside DBSessionMiddleware, as app.add_middleware(ReplayConflicts) after it would put it.
    return ReplayConflicts(app, attempts=attempts, max_body_size=max_body_size, backoff=0.01, max_backoff=0.05)


async def post_both(app: DeadlockApp) -> list[httpx.Response]:
    async with client(app.app) as http:
        both = asyncio.gather(http.post("/append", content=b"a"), http.post("/append", content=b"b"))
        # Bounded: a replay that waited for a body nobody will send again would hang (generous: a loaded machine).
        responses = await asyncio.wait_for(both, WAIT)
    return list(responses)


async def test_deadlocked_requests_are_replayed_into_a_serial_outcome(pg: Database) -> None:
    deadlock = DeadlockApp(pg)
    deadlock.app = wrapped(deadlock.app)
    responses = await post_both(deadlock)
    assert [(response.status_code, response.text) for response in responses] == [(200, "a"), (200, "b")]
    rows = await fetch(f"SELECT value FROM {ROWS} ORDER BY id")
    assert rows in ([("ab",), ("ab",)], [("ba",), ("ba",)])
    # The victim ran twice, reading its body again; its first run's callback never ran.
    assert sorted(deadlock.runs) in (["a", "a", "b"], ["a", "b", "b"])
    victim = "a" if deadlock.runs.count("a") == 2 else "b"
    assert sorted(deadlock.committed) == sorted([(victim, 2), ("b" if victim == "a" else "a", 1)])


@pytest.mark.parametrize("replay", [None, {"attempts": 1}, {"max_body_size": 0}], ids=["off", "once", "big-body"])
async def test_without_a_replay_the_loser_gets_503(pg: Database, replay: dict[str, int] | None) -> None:
    """No wrapper, one attempt only, or a body larger than the wrapper keeps: the deadlock's victim is answered
    503 with Retry-After, and the other request's write stands alone."""
    deadlock = DeadlockApp(pg)
    if replay is not None:
        deadlock.app = wrapped(deadlock.app, **replay)
    responses = await post_both(deadlock)
    assert sorted(response.status_code for response in responses) == [200, 503]
    refused = next(response for response in responses if response.status_code == 503)
    assert refused.headers["retry-after"] == "1"
    winner = next(response.text for response in responses if response.status_code == 200)
    assert await fetch(f"SELECT value FROM {ROWS} ORDER BY id") == [(winner,), (winner,)]
    assert len(deadlock.runs) == 2


async def test_a_started_streaming_response_is_never_replayed(pg: Database) -> None:
    deadlock = DeadlockApp(pg, stream=True)
    deadlock.app = wrapped(deadlock.app)
    async with client(deadlock.app, raise_app_exceptions=False) as http:
        responses = await asyncio.gather(
            http.post("/append", content=b"a"), http.post("/append", content=b"b"), return_exceptions=True
        )
    assert len(deadlock.runs) == 2
    # The winner's stream completes; the victim's was cut short after its start (or broke the client).
    whole = [r for r in responses if isinstance(r, httpx.Response) and r.text in ("starteda", "startedb")]
    assert len(whole) == 1
    winner = whole[0].text.removeprefix("started")
    assert await fetch(f"SELECT value FROM {ROWS} ORDER BY id") == [(winner,), (winner,)]


async def test_a_serialization_failure_at_the_middlewares_commit_is_replayed(pg: Database) -> None:
    """SERIALIZABLE write skew where both requests have written before either commits: the middleware's commit
    of the second fails with 40001, before its response starts."""
    wrote = {1: asyncio.Event(), 2: asyncio.Event()}
    runs: list[int] = []

    async def go_off_call(request: Request) -> PlainTextResponse:
        doctor = int(request.path_params["doctor"])
        runs.append(doctor)
        session = current_session("retry")
        await session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
        on_call = await session.scalar(text(f"SELECT count(*) FROM {DOCTORS} WHERE on_call"))
        if on_call is None or on_call < 2:
            return PlainTextResponse("stays")
        await session.execute(text(f"UPDATE {DOCTORS} SET on_call = false WHERE id = {doctor}"))
        wrote[doctor].set()
        await asyncio.wait_for(wrote[3 - doctor].wait(), WAIT)
        return PlainTextResponse("off call")

    app = Starlette(routes=[Route("/doctors/{doctor}/off-call", go_off_call, methods=["POST"])])
    app.add_middleware(DBSessionMiddleware, database=pg, commit_on_success=True)
    async with client(wrapped(app)) as http:
        responses = await asyncio.gather(http.post("/doctors/1/off-call"), http.post("/doctors/2/off-call"))
    assert sorted((response.status_code, response.text) for response in responses) == [
        (200, "off call"),
        (200, "stays"),
    ]
    assert await fetch(f"SELECT count(*) FROM {DOCTORS} WHERE on_call") == [(1,)]
    assert_winner_once_victim_replayed(runs)


async def test_websockets_and_lifespan_pass_through_with_their_own_scope() -> None:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    async def receive() -> Message:
        raise AssertionError("not called")  # pragma: no cover

    async def send(message: Message) -> None:
        raise AssertionError("not called")  # pragma: no cover

    replay = ReplayConflicts(app)
    for scope_type in ("websocket", "lifespan"):
        scope: Scope = {"type": scope_type}
        await replay(scope, receive, send)
        assert seen[-1] is scope


def test_wrong_bounds_are_refused_with_the_fix() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("never called")  # pragma: no cover

    with pytest.raises(ValueError, match="attempts") as caught:
        ReplayConflicts(app, attempts=0)
    assert str(caught.value) == RETRY_ATTEMPTS.format(call="ReplayConflicts", attempts=0)
    with pytest.raises(ValueError, match="max_body_size") as caught:
        ReplayConflicts(app, max_body_size=-1)
    assert str(caught.value) == REPLAY_BODY_SIZE.format(size=-1)
