"""A request's connection goes back to the pool as soon as its ASGI call ends, not a turn of the loop later.

Under a server with keep-alive connections, the next request on a connection starts as soon as the previous
response is complete, while the previous call still rolls back and closes its session: with as many
connections in the pool as clients, that next request waits for a connection whenever the rollback has not
even started (benchmarks/README.md, "Under a real server"). The rollback is run shielded from cancellation,
in a task of its own; its first step must still run in the same turn of the loop as the end of the call.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest
from sqlalchemy import event, text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_db_session import Database, DBSessionMiddleware, current_session
from asgi_db_session._shield import shielded_starting_now
from asgi_db_session._types import Message

from .asgi import http_scope

pytestmark = pytest.mark.anyio


async def read(request: Request) -> Response:
    value = await current_session().scalar(text("SELECT 1"))
    return PlainTextResponse(str(value))


async def test_the_rollback_starts_in_the_turn_of_the_loop_that_ends_the_response(database: Database) -> None:
    app = Starlette(routes=[Route("/read", read)])
    app.add_middleware(DBSessionMiddleware, database=database)
    events: list[str] = []
    event.listen(database.engine.sync_engine, "rollback", lambda connection: events.append("rollback"))
    loop = asyncio.get_running_loop()

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            events.append("response complete")
            # What a server does once the response is complete (read the next request) runs in a later turn
            # of the loop; by then the connection's rollback must be on its way.
            loop.call_soon(events.append, "next turn")

    await app(http_scope("/read"), receive, send)
    assert events == ["response complete", "rollback", "next turn"]
    assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


flag: contextvars.ContextVar[str] = contextvars.ContextVar("flag", default="caller's")


async def test_the_first_step_runs_at_once_the_rest_whatever_cancels_the_caller() -> None:
    steps: list[str] = []
    resume = asyncio.get_running_loop().create_future()

    async def work() -> str:
        flag.set("work's")
        steps.append(f"first step sees {flag.get()}")
        await resume
        steps.append(f"rest sees {flag.get()}")
        return "done"

    awaitable = shielded_starting_now(work())
    assert steps == ["first step sees work's"]  # before anything was awaited
    assert flag.get() == "caller's"  # the work's context is its own

    async def caller() -> Any:
        return await awaitable

    task = asyncio.create_task(caller())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(0)
    assert not task.done()  # the cancellation waits for the work
    resume.set_result(None)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert steps == ["first step sees work's", "rest sees work's"]


async def test_work_that_never_waits_returns_and_errors_reach_the_caller() -> None:
    async def immediate() -> int:
        return 7

    assert await shielded_starting_now(immediate()) == 7

    async def failing_later() -> None:
        await asyncio.sleep(0)
        raise LookupError("from the rest")

    with pytest.raises(LookupError, match="from the rest"):
        await shielded_starting_now(failing_later())

    async def failing_at_once() -> None:
        raise KeyError("from the first step")

    with pytest.raises(KeyError, match="from the first step"):
        await shielded_starting_now(failing_at_once())
