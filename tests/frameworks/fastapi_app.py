"""A FastAPI app: the routes of tests/frameworks/__init__.py, DBSessionMiddleware added with add_middleware."""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations at run time.

from collections.abc import AsyncIterator

from fastapi import BackgroundTasks, FastAPI, HTTPException
from fastapi.responses import PlainTextResponse, StreamingResponse

from asgi_db_session import Database, DBSessionMiddleware

from . import service

__all__ = ["make_app"]


def make_app(database: Database) -> FastAPI:
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)

    @app.get("/nodb", response_class=PlainTextResponse)
    async def nodb() -> str:
        return "no database"

    @app.post("/write", status_code=201, response_class=PlainTextResponse)
    async def write(name: str) -> str:
        return await service.write(name)

    @app.post("/reject")
    async def reject(name: str) -> None:
        await service.add_item(name)
        raise HTTPException(400, "rejected")

    @app.post("/crash")
    async def crash(name: str) -> None:
        await service.add_item(name)
        raise RuntimeError("the endpoint failed after writing")

    @app.post("/duplicate", status_code=201, response_class=PlainTextResponse)
    async def duplicate(name: str) -> str:
        await service.add_item(name)
        return "saved?"

    @app.get("/stream")
    async def stream(name: str) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"start\n"
            await service.add_item(name)
            yield f"{await service.count_items()}\n".encode()

        return StreamingResponse(body(), media_type="text/plain")

    @app.post("/background", status_code=202, response_class=PlainTextResponse)
    async def background(name: str, tasks: BackgroundTasks) -> str:
        tasks.add_task(service.add_item, name)
        return "accepted"

    @app.get("/sleep", response_class=PlainTextResponse)
    async def sleep() -> str:
        await service.sleep_in_database()
        return "slept"

    return app
