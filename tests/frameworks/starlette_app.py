"""A Starlette app: the routes of tests/frameworks/__init__.py, DBSessionMiddleware in its middleware list."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_db_session import Database, DBSessionMiddleware

from . import service

__all__ = ["make_app"]


async def nodb(request: Request) -> Response:
    return PlainTextResponse("no database")


async def write(request: Request) -> Response:
    return PlainTextResponse(await service.write(request.query_params["name"]), status_code=201)


async def reject(request: Request) -> Response:
    await service.add_item(request.query_params["name"])
    raise HTTPException(400, "rejected")


async def crash(request: Request) -> Response:
    await service.add_item(request.query_params["name"])
    raise RuntimeError("the endpoint failed after writing")


async def duplicate(request: Request) -> Response:
    await service.add_item(request.query_params["name"])
    return PlainTextResponse("saved?", status_code=201)


async def stream(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield b"start\n"
        await service.add_item(request.query_params["name"])
        yield f"{await service.count_items()}\n".encode()

    return StreamingResponse(body(), media_type="text/plain")


async def background(request: Request) -> Response:
    task = BackgroundTask(service.add_item, request.query_params["name"])
    return PlainTextResponse("accepted", status_code=202, background=task)


async def sleep(request: Request) -> Response:
    await service.sleep_in_database()
    return PlainTextResponse("slept")


def make_app(database: Database) -> Starlette:
    routes = [
        Route("/nodb", nodb),
        Route("/write", write, methods=["POST"]),
        Route("/reject", reject, methods=["POST"]),
        Route("/crash", crash, methods=["POST"]),
        Route("/duplicate", duplicate, methods=["POST"]),
        Route("/stream", stream),
        Route("/background", background, methods=["POST"]),
        Route("/sleep", sleep),
    ]
    middleware = [Middleware(DBSessionMiddleware, database=database, commit_on_success=True)]
    return Starlette(routes=routes, middleware=middleware)
