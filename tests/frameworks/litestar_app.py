"""A Litestar app: the routes of tests/frameworks/__init__.py, DBSessionMiddleware wrapped around the app object.

Not in ``Litestar(middleware=[...])``: Litestar answers the lifespan scope before its middleware stack, so a
middleware there would never see startup or shutdown (no check at startup, no engine disposed at shutdown).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar, Request, Response, get, post
from litestar.background_tasks import BackgroundTask
from litestar.exceptions import HTTPException
from litestar.response import Stream

from asgi_db_session import Database, DBSessionMiddleware

from . import service

__all__ = ["make_app"]


def name_of(request: Request[Any, Any, Any]) -> str:
    # Not a "name: str" parameter: Litestar 2.25 deprecates query parameters declared that way, and the
    # declaration it asks for instead (FromQuery) is new in 2.25.
    name: str = request.query_params["name"]
    return name


def make_app(database: Database) -> DBSessionMiddleware:
    @get("/nodb")
    async def nodb() -> str:
        return "no database"

    @post("/write", status_code=201)
    async def write(request: Request[Any, Any, Any]) -> str:
        return await service.write(name_of(request))

    @post("/reject")
    async def reject(request: Request[Any, Any, Any]) -> None:
        await service.add_item(name_of(request))
        raise HTTPException(status_code=400, detail="rejected")

    @post("/crash")
    async def crash(request: Request[Any, Any, Any]) -> None:
        await service.add_item(name_of(request))
        raise RuntimeError("the endpoint failed after writing")

    @post("/duplicate", status_code=201)
    async def duplicate(request: Request[Any, Any, Any]) -> str:
        await service.add_item(name_of(request))
        return "saved?"

    @get("/stream")
    async def stream(request: Request[Any, Any, Any]) -> Stream:
        name = name_of(request)

        async def body() -> AsyncIterator[bytes]:
            yield b"start\n"
            await service.add_item(name)
            yield f"{await service.count_items()}\n".encode()

        return Stream(body(), media_type="text/plain")

    @post("/background", status_code=202)
    async def background(request: Request[Any, Any, Any]) -> Response[str]:
        return Response("accepted", status_code=202, background=BackgroundTask(service.add_item, name_of(request)))

    @get("/sleep")
    async def sleep() -> str:
        await service.sleep_in_database()
        return "slept"

    # logging_config=None: Litestar would otherwise configure logging for the whole process (the test run).
    app = Litestar([nodb, write, reject, crash, duplicate, stream, background, sleep], logging_config=None)
    return DBSessionMiddleware(app, database=database, commit_on_success=True)
