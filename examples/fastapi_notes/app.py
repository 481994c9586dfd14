"""The FastAPI application factory: routes call the notes services; nothing passes a session around."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from asgi_db_session import Database, DBSessionMiddleware, get_database
from asgi_db_session.fastapi import SessionDep
from asgi_db_session.health import health_endpoint

from ..notes import services
from ..notes.models import TITLE_MAX_LENGTH, Base, Note


class NoteIn(BaseModel):
    title: str = Field(min_length=1, max_length=TITLE_MAX_LENGTH)
    body: str = ""


class NoteOut(BaseModel):
    id: int
    title: str
    body: str
    created_at: datetime

    @classmethod
    def of(cls, note: Note) -> NoteOut:
        return cls(id=note.id, title=note.title, body=note.body, created_at=note.created_at)


def create_app(database_url: str | None = None) -> FastAPI:
    """The app on ``database_url``, else on ``DATABASE_URL`` (the Database reads it from the environment)."""
    Database(database_url, commit_on_success=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with get_database().engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        yield

    app = FastAPI(title="notes", lifespan=lifespan)
    app.add_middleware(DBSessionMiddleware, database=get_database())
    app.add_route("/health", health_endpoint(), methods=["GET"])

    @app.post("/notes", status_code=201)
    async def create_note(note: NoteIn) -> NoteOut:
        # FastAPI validated the input already; the service checks it again for its other callers.
        return NoteOut.of(await services.create_note(note.model_dump()))

    @app.get("/notes")
    async def list_notes() -> list[NoteOut]:
        return [NoteOut.of(note) for note in await services.list_notes()]

    @app.get("/notes/count")
    async def count_notes(session: SessionDep) -> int:
        # For those who like the session in the signature: the same session the services use.
        return int(await session.scalar(select(func.count()).select_from(Note)) or 0)

    @app.get("/notes/{note_id}")
    async def get_note(note_id: int) -> NoteOut:
        try:
            return NoteOut.of(await services.get_note(note_id))
        except services.NoteNotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc

    @app.delete("/notes/{note_id}", status_code=204)
    async def delete_note(note_id: int) -> Response:
        try:
            await services.delete_note(note_id)
        except services.NoteNotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc
        return Response(status_code=204)

    return app
