"""The FastAPI application factory: routes call the notes services; nothing passes a session around."""

from __future__ import annotations

from datetime import datetime

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import func, select

from asgi_db_session import DBSessionMiddleware
from asgi_db_session.fastapi import SessionDep
from asgi_db_session.health import health_endpoint

from ..notes import services
from ..notes.app import notes_database, notes_lifespan
from ..notes.metrics import metrics
from ..notes.models import TITLE_MAX_LENGTH, Note, as_utc
from ..notes.routes import MALFORMED_JSON, invalid_note, note_not_found


class NoteIn(BaseModel):
    title: str = Field(min_length=1, max_length=TITLE_MAX_LENGTH)
    body: str = ""

    @field_validator("title", "body")
    @classmethod
    def storable(cls, text: str) -> str:
        problem = services.text_problem(text)
        if problem is not None:
            raise ValueError(problem)
        return text


class NoteOut(BaseModel):
    id: int
    title: str
    body: str
    created_at: datetime

    @classmethod
    def of(cls, note: Note) -> NoteOut:
        return cls(id=note.id, title=note.title, body=note.body, created_at=as_utc(note.created_at))


async def invalid_request(request: Request, exc: Exception) -> Response:
    """400 for a body that is not JSON at all, 422 for the rest, in the Starlette demo's shape: ``{"detail":
    {field: message}}``. FastAPI's own 422 echoes the input back, and an input with a lone surrogate cannot
    be encoded into a response (a 500)."""
    assert isinstance(exc, RequestValidationError)
    errors: dict[str, str] = {}
    for error in exc.errors():
        if error["type"] == "json_invalid":
            reason = error.get("ctx", {}).get("error", "")
            return JSONResponse({"detail": {"request": f"{MALFORMED_JSON}: {reason}"}}, status_code=400)
        location = error["loc"]
        errors.setdefault(str(location[-1]) if len(location) > 1 else "request", error["msg"])
    return JSONResponse({"detail": errors}, status_code=422)


def create_app(database_url: str | None = None) -> FastAPI:
    """The app on ``database_url``, else on ``DATABASE_URL``, else on SQLite in ``./notes.db``."""
    database, source = notes_database(database_url)
    app = FastAPI(
        title="notes",
        lifespan=notes_lifespan(database, source),
        exception_handlers={
            RequestValidationError: invalid_request,
            # The services check input again for their other callers: " " passes NoteIn but is no title.
            services.InvalidNoteError: invalid_note,
            services.NoteNotFoundError: note_not_found,
        },
    )
    app.add_middleware(DBSessionMiddleware, database=database)
    app.add_route("/health", health_endpoint(), methods=["GET"])
    app.add_route("/metrics", metrics, methods=["GET"], include_in_schema=False)

    @app.post("/notes", status_code=201)
    async def create_note(note: NoteIn) -> NoteOut:
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
        return NoteOut.of(await services.get_note(note_id))

    @app.delete("/notes/{note_id}", status_code=204)
    async def delete_note(note_id: int) -> Response:
        await services.delete_note(note_id)
        return Response(status_code=204)

    return app
