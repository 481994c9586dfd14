"""A Quart app: the routes of tests/frameworks/__init__.py, DBSessionMiddleware wrapped around the app object.

Quart's background tasks (``app.add_background_task``) run after the request has ended, so they open a session of
their own with ``session_scope()``; current_session() inside that block is the block's session.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from quart import Quart, abort, request

from asgi_db_session import Database, DBSessionMiddleware, session_scope

from . import service

__all__ = ["make_app"]


async def add_in_a_scope_of_its_own(name: str) -> None:
    async with session_scope(commit=True):
        await service.add_item(name)


def make_app(database: Database) -> DBSessionMiddleware:
    app = Quart(__name__)

    @app.get("/nodb")
    async def nodb() -> str:
        return "no database"

    @app.post("/write")
    async def write() -> tuple[str, int]:
        return await service.write(request.args["name"]), 201

    @app.post("/reject")
    async def reject() -> str:
        await service.add_item(request.args["name"])
        abort(400)

    @app.post("/crash")
    async def crash() -> str:
        await service.add_item(request.args["name"])
        raise RuntimeError("the endpoint failed after writing")

    @app.post("/duplicate")
    async def duplicate() -> tuple[str, int]:
        await service.add_item(request.args["name"])
        return "saved?", 201

    @app.get("/stream")
    async def stream() -> tuple[AsyncIterator[bytes], int, dict[str, str]]:
        name = request.args["name"]

        async def body() -> AsyncIterator[bytes]:
            yield b"start\n"
            await service.add_item(name)
            yield f"{await service.count_items()}\n".encode()

        return body(), 200, {"content-type": "text/plain"}

    @app.post("/background")
    async def background() -> tuple[str, int]:
        app.add_background_task(add_in_a_scope_of_its_own, request.args["name"])
        return "accepted", 202

    @app.get("/sleep")
    async def sleep() -> str:
        await service.sleep_in_database()
        return "slept"

    return DBSessionMiddleware(app, database=database, commit_on_success=True)
