"""HTTP requests through DBSessionMiddleware: one lazy session per request, and the transaction policy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_db_session import (
    CommitFailedError,
    Database,
    DBSessionMiddleware,
    ErrorResponse,
    NoSessionError,
    current_session,
)
from asgi_db_session._types import Message, Receive, Scope, Send

from .asgi import Channel, http_scope
from .conftest import Backend, client
from .models import TABLE, Item

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


@pytest.mark.parametrize(("status", "kept"), [(399, ["a"]), (400, [])], ids=["399-commits", "400-rolls-back"])
async def test_commit_on_success_rolls_back_from_status_400_exactly(
    backend: Backend, database: Database, status: int, kept: list[str]
) -> None:
    """The line is at 400 itself: "below 400 commits" and "400 or above rolls back", on both sides of it."""
    async with client(make_app(database, commit_on_success=True)) as http:
        assert (await http.get("/add", params={"id": 1, "name": "a", "status": status})).status_code == status
    assert await backend.names() == kept


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


async def test_a_request_that_never_asks_creates_no_session_and_no_connection(database: Database) -> None:
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("no database here")

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    async with client(app) as http:
        assert (await http.get("/")).text == "no database here"
    # Neither a session factory nor an engine was needed, so neither exists.
    assert database._sessionmaker is None
    assert database._engine is None


async def test_the_commit_happens_before_the_response_starts(backend: Backend, database: Database) -> None:
    """The row is visible to another connection at the moment the server receives http.response.start."""
    seen_at_start: list[list[str]] = []

    async def recording_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            seen_at_start.append(await backend.names())

    app = make_app(database, commit_on_success=True)
    scope = http_scope("/add")
    scope["query_string"] = b"id=1&name=early"
    await app(scope, Channel([{"type": "http.request", "body": b""}]).receive, recording_send)
    assert seen_at_start == [["early"]]


async def test_an_exception_rolls_back_and_propagates(backend: Backend, database: Database) -> None:
    async def endpoint(request: Request) -> Response:
        current_session().add(Item(id=1, name="doomed"))
        await current_session().flush()
        raise LookupError("boom")

    for commit_on_success in (False, True):
        app = Starlette(routes=[Route("/", endpoint)])
        app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=commit_on_success)
        async with client(app) as http:
            with pytest.raises(LookupError, match="boom"):
                await http.get("/")
        async with client(app, raise_app_exceptions=False) as http:
            assert (await http.get("/")).status_code == 500
    assert await backend.names() == []


def failing_commit_app(database: Database, item: Item, background_ran: list[bool], **options: Any) -> Starlette:
    """An app that answers 201 while leaving ``item`` for the middleware's commit, where it fails."""

    async def endpoint(request: Request) -> Response:
        # autoflush is off: the bad row reaches the database only in the middleware's commit.
        current_session().add(item)
        response = JSONResponse({"created": True}, status_code=201, headers={"x-app": "yes"})
        response.set_cookie("session", "abc")
        response.background = BackgroundTask(lambda: background_ran.append(True))
        return response

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True, **options)
    return app


async def test_a_unique_violation_at_commit_becomes_a_409_and_nothing_of_the_app_response_leaks(
    backend: Backend, database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    await backend.execute(f"INSERT INTO {TABLE} (id, name) VALUES (1, 'taken')")
    background_ran: list[bool] = []
    app = failing_commit_app(database, Item(id=2, name="taken"), background_ran)
    async with client(app) as http:  # an answered failure is not raised to the server
        response = await http.get("/")
    assert response.status_code == 409
    assert response.text.startswith("Conflict")
    assert "x-app" not in response.headers
    assert "set-cookie" not in response.headers
    assert background_ran == [], "a background task ran for data that was not saved"
    assert await backend.names() == ["taken"]
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert "GET / answered 409: IntegrityError" in caplog.records[0].getMessage()


async def test_an_unmapped_commit_failure_becomes_a_500_and_is_raised_to_the_server(
    backend: Backend, database: Database
) -> None:
    background_ran: list[bool] = []
    # No name: a NOT NULL violation, which the default mapping leaves to be a 500.
    app = failing_commit_app(database, Item(id=2), background_ran)
    async with client(app, raise_app_exceptions=False) as http:
        response = await http.get("/")
    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert "x-app" not in response.headers
    assert "set-cookie" not in response.headers
    assert background_ran == []
    assert await backend.names() == []

    async with client(failing_commit_app(database, Item(id=3), background_ran)) as http:
        with pytest.raises(CommitFailedError, match="client got 500 instead of the app's 201") as caught:
            await http.get("/")
    assert isinstance(caught.value.__cause__, IntegrityError)


async def test_the_error_mapping_can_be_replaced(backend: Backend, database: Database) -> None:
    def teapot(error: BaseException) -> ErrorResponse | None:
        return ErrorResponse(418, "short and stout", (("X-Reason", type(error).__name__),))

    app = failing_commit_app(database, Item(id=2), [], error_response=teapot)
    async with client(app) as http:
        response = await http.get("/")
    assert (response.status_code, response.text) == (418, "short and stout")
    assert response.headers["x-reason"] == "IntegrityError"


async def test_a_database_error_escaping_the_app_is_mapped_before_the_response_starts(
    backend: Backend, database: Database
) -> None:
    await backend.execute(f"INSERT INTO {TABLE} (id, name) VALUES (1, 'taken')")

    async def endpoint(request: Request) -> Response:
        current_session().add(Item(id=2, name="taken"))
        await current_session().flush()  # raises IntegrityError in the app
        raise AssertionError("not reached")  # pragma: no cover

    for commit_on_success in (False, True):
        app = Starlette(routes=[Route("/", endpoint)])
        app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=commit_on_success)
        async with client(app) as http:
            assert (await http.get("/")).status_code == 409
    assert await backend.names() == ["taken"]


async def test_an_app_that_swallows_the_commit_error_still_reports_it(backend: Backend, database: Database) -> None:
    async def swallowing_app(scope: Scope, receive: Receive, send: Send) -> None:
        current_session().add(Item(id=2))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        except CommitFailedError:
            await send({"type": "http.response.body", "body": b"dropped"})

    app = DBSessionMiddleware(swallowing_app, database=database, commit_on_success=True)
    channel = Channel([{"type": "http.request", "body": b""}])
    with pytest.raises(CommitFailedError):
        await app(http_scope(), channel.receive, channel.send)
    assert [message.get("status") for message in channel.sent] == [500, None]
    assert channel.sent[-1]["body"] == b"Internal Server Error"


async def test_a_streaming_body_uses_the_session_until_its_last_chunk(backend: Backend, database: Database) -> None:
    async def endpoint(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for number in range(3):
                current_session().add(Item(id=number, name=f"streamed-{number}"))
                await current_session().flush()
                count = await current_session().scalar(select(func.count()).select_from(Item))
                yield f"{count}\n".encode()

        return StreamingResponse(body())

    for commit_on_success, expected in ((False, []), (True, ["streamed-0", "streamed-1", "streamed-2"])):
        app = Starlette(routes=[Route("/", endpoint)])
        app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=commit_on_success)
        async with client(app) as http:
            assert (await http.get("/")).text == "1\n2\n3\n"
        assert await backend.names() == expected


async def test_a_failed_commit_while_streaming_cuts_the_response_short(backend: Backend, database: Database) -> None:
    await backend.execute(f"INSERT INTO {TABLE} (id, name) VALUES (1, 'taken')")

    async def endpoint(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"first\n"
            current_session().add(Item(id=2, name="taken"))
            yield b"second\n"

        return StreamingResponse(body())

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    channel = Channel([{"type": "http.request", "body": b""}])
    with pytest.raises(CommitFailedError, match="after the response had started"):
        await app(http_scope(), channel.receive, channel.send)
    bodies = [message for message in channel.sent if message["type"] == "http.response.body"]
    # The chunks the app had sent went out, each with more to come; the final one never did: the response
    # does not look complete.
    assert [(message["body"], message.get("more_body")) for message in bodies] == [
        (b"first\n", True),
        (b"second\n", True),
    ]
    assert await backend.names() == ["taken"]


class HangUpAfterFirstChunk:
    """The server side of a client that hangs up once the first body chunk has reached it: ``receive`` gives
    the request, then ``http.disconnect`` as soon as a body chunk has been sent (what uvicorn, hypercorn and
    granian do when the socket closes)."""

    def __init__(self) -> None:
        self.channel = Channel([{"type": "http.request", "body": b""}])

    async def send(self, message: Message) -> None:
        await self.channel.send(message)
        if message["type"] == "http.response.body":
            self.channel.queue.put_nowait({"type": "http.disconnect"})


@pytest.mark.parametrize(
    ("backend", "cut"),
    [("postgresql", "between statements"), ("sqlite", "between statements"), ("postgresql", "mid-statement")],
    indirect=["backend"],
)
async def test_a_streaming_body_cut_off_by_a_hang_up_commits_nothing(
    backend: Backend, database: Database, cut: str
) -> None:
    """Starlette stops a streaming body when ``receive`` says the client has gone (ASGI spec below 2.4) and
    returns normally: the body's work, cut off in the middle, must be rolled back rather than committed, and
    quietly (a client that left is no error of the app's). Cut mid-statement (``pg_sleep``), the connection
    is thrown away; a commit would have raised PendingRollbackError to the server."""
    blocked = asyncio.Event()

    async def endpoint(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            current_session().add(Item(id=1, name="before-the-cut"))
            await current_session().flush()
            yield b"first\n"
            blocked.set()
            if cut == "mid-statement":
                await current_session().execute(text("SELECT pg_sleep(30)"))
            else:
                await asyncio.sleep(30)
            current_session().add(Item(id=2, name="after-the-cut"))
            yield b"second\n"

        return StreamingResponse(body())

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    server = HangUpAfterFirstChunk()
    await asyncio.wait_for(app(http_scope(), server.channel.receive, server.send), timeout=10)

    assert blocked.is_set()
    bodies = [message for message in server.channel.sent if message["type"] == "http.response.body"]
    assert [(message["body"], message.get("more_body")) for message in bodies] == [(b"first\n", True)]
    assert await backend.names() == []


async def test_background_tasks_share_the_request_session_and_follow_the_policy(
    backend: Backend, database: Database
) -> None:
    sessions: list[AsyncSession] = []

    async def in_background(name: str) -> None:
        sessions.append(current_session())
        current_session().add(Item(id=len(sessions), name=name))

    async def endpoint(request: Request) -> Response:
        sessions.append(current_session())
        status = int(request.query_params["status"])
        return PlainTextResponse("ok", status, background=BackgroundTask(in_background, f"bg-{status}"))

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    async with client(app) as http:
        await http.get("/", params={"status": 200})
        assert sessions[0] is sessions[1]
        sessions.clear()
        await http.get("/", params={"status": 404})
    assert await backend.names() == ["bg-200"]


async def test_a_sync_endpoint_in_the_threadpool_sees_the_request_session(database: Database) -> None:
    sessions: list[AsyncSession] = []

    def sync_endpoint(request: Request) -> Response:
        sessions.append(current_session())
        return PlainTextResponse("ok", background=BackgroundTask(lambda: sessions.append(current_session())))

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        await inner(scope, receive, send)
        sessions.append(current_session())

    inner = Starlette(routes=[Route("/", sync_endpoint)])
    app = DBSessionMiddleware(outer, database=database)
    async with client(app) as http:
        assert (await http.get("/")).status_code == 200
    assert len(sessions) == 3
    assert sessions[0] is sessions[1] is sessions[2]


async def test_other_scope_types_pass_through(database: Database) -> None:
    received: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        received.append(scope["type"])
        with pytest.raises(NoSessionError):
            current_session()

    app = DBSessionMiddleware(inner, database=database)
    await app({"type": "custom"}, Channel().receive, Channel().send)
    assert received == ["custom"]
