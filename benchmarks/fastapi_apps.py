"""The two FastAPI apps: (3) the classic ``Depends(get_db)`` yield dependency, and asgi_db_session on FastAPI.

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at decoration
time, and ``Db`` below is local to its builder, where a string annotation could not be resolved.
"""

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.types import ASGIApp

from .common import EngineSettings, insert_one, read_one, read_ten, session_factory, stream_chunks

OK = b"ok"
TEXT = "text/plain"


def _disposing(engine: AsyncEngine) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await engine.dispose()

    return lifespan


def build_fastapi_depends(settings: EngineSettings) -> ASGIApp:
    from fastapi import Depends, FastAPI

    engine = settings.create_engine()
    factory = session_factory(engine)

    async def get_db() -> AsyncIterator[AsyncSession]:
        async with factory() as session:
            yield session

    Db = Annotated[AsyncSession, Depends(get_db)]
    app = FastAPI(lifespan=_disposing(engine))

    @app.get("/nodb")
    async def nodb_() -> PlainTextResponse:
        return PlainTextResponse(OK)

    @app.get("/session")
    async def session_(db: Db) -> PlainTextResponse:
        return PlainTextResponse(OK)

    @app.get("/read")
    async def read(db: Db) -> PlainTextResponse:
        return PlainTextResponse(await read_one(db))

    @app.post("/insert")
    async def insert(db: Db) -> PlainTextResponse:
        body = await insert_one(db)
        await db.commit()
        return PlainTextResponse(body)

    @app.get("/stream")
    async def stream(db: Db) -> StreamingResponse:
        # Since FastAPI 0.118 a yield dependency is closed after the response is sent, so the body may use it.
        return StreamingResponse(stream_chunks(db), media_type=TEXT)

    @app.get("/ten")
    async def ten(db: Db) -> PlainTextResponse:
        return PlainTextResponse(await read_ten(db))

    return app


def build_asgi_db_session_fastapi(settings: EngineSettings) -> ASGIApp:
    from fastapi import FastAPI

    from asgi_db_session import DBSessionMiddleware, current_session

    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, engine=settings.create_engine(), commit_on_success=False)

    @app.get("/nodb")
    async def nodb_() -> PlainTextResponse:
        return PlainTextResponse(OK)

    @app.get("/session")
    async def session_() -> PlainTextResponse:
        current_session()
        return PlainTextResponse(OK)

    @app.get("/read")
    async def read() -> PlainTextResponse:
        return PlainTextResponse(await read_one(current_session()))

    @app.post("/insert")
    async def insert() -> PlainTextResponse:
        db = current_session()
        body = await insert_one(db)
        await db.commit()
        return PlainTextResponse(body)

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            async for chunk in stream_chunks(current_session()):
                yield chunk

        return StreamingResponse(body(), media_type=TEXT)

    @app.get("/ten")
    async def ten() -> PlainTextResponse:
        return PlainTextResponse(await read_ten(current_session()))

    return app
