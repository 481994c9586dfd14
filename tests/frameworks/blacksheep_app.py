"""A BlackSheep app: the routes of tests/frameworks/__init__.py, DBSessionMiddleware wrapped around the app object.

BlackSheep's own middlewares wrap request handlers, not the ASGI app: they never see the lifespan scope, and
they run on BlackSheep's Request rather than on ASGI messages. BlackSheep has no background-task mechanism.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from blacksheep import Application, Request, Response, Router, StreamedContent, text
from blacksheep.exceptions import BadRequest

from asgi_db_session import Database, DBSessionMiddleware

from . import service

__all__ = ["make_app"]


def name_of(request: Request) -> str:
    return request.query["name"][0]


def make_app(database: Database) -> DBSessionMiddleware:
    # A router of its own: BlackSheep's module-level decorators (blacksheep.get, ...) share one default router.
    router = Router()

    @router.get("/nodb")
    async def nodb() -> Response:
        return text("no database")

    @router.post("/write")
    async def write(request: Request) -> Response:
        return text(await service.write(name_of(request)), status=201)

    @router.post("/reject")
    async def reject(request: Request) -> Response:
        await service.add_item(name_of(request))
        raise BadRequest("rejected")

    @router.post("/crash")
    async def crash(request: Request) -> Response:
        await service.add_item(name_of(request))
        raise RuntimeError("the endpoint failed after writing")

    @router.post("/duplicate")
    async def duplicate(request: Request) -> Response:
        await service.add_item(name_of(request))
        return text("saved?", status=201)

    @router.get("/stream")
    async def stream(request: Request) -> Response:
        name = name_of(request)

        async def body() -> AsyncIterator[bytes]:
            yield b"start\n"
            await service.add_item(name)
            yield f"{await service.count_items()}\n".encode()

        return Response(200, None, StreamedContent(b"text/plain", body))

    @router.get("/sleep")
    async def sleep() -> Response:
        await service.sleep_in_database()
        return text("slept")

    return DBSessionMiddleware(Application(router=router), database=database, commit_on_success=True)
