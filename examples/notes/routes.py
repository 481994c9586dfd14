"""HTTP endpoints: translate requests into service calls and results into JSON."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_db_session import Database

from . import services
from .metrics import metrics
from .models import Note, as_utc

MALFORMED_JSON = "the body is not valid JSON"


def note_json(note: Note) -> dict[str, Any]:
    created_at = as_utc(note.created_at).isoformat()
    return {"id": note.id, "title": note.title, "body": note.body, "created_at": created_at}


async def list_notes(request: Request) -> Response:
    return JSONResponse([note_json(note) for note in await services.list_notes()])


async def create_note(request: Request) -> Response:
    try:
        data = await request.json()
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays or objects nested too deep to parse
        return JSONResponse({"detail": {"request": f"{MALFORMED_JSON}: {exc}"}}, status_code=400)
    note = await services.create_note(data)
    return JSONResponse(note_json(note), status_code=201)


async def get_note(request: Request) -> Response:
    note = await services.get_note(request.path_params["note_id"])
    return JSONResponse(note_json(note))


async def delete_note(request: Request) -> Response:
    await services.delete_note(request.path_params["note_id"])
    return Response(status_code=204)


async def health(request: Request) -> Response:
    database: Database = request.app.state.database
    if await database.ping():
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unavailable"}, status_code=503)


async def note_not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse({"detail": str(exc)}, status_code=404)


async def invalid_note(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, services.InvalidNoteError)
    return JSONResponse({"detail": exc.errors}, status_code=422)


routes = [
    Route("/notes", list_notes, methods=["GET"]),
    Route("/notes", create_note, methods=["POST"]),
    Route("/notes/{note_id:int}", get_note, methods=["GET"]),
    Route("/notes/{note_id:int}", delete_note, methods=["DELETE"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]

# Raised by the services; the responses they become are 4xx, so the middleware rolls the request back.
exception_handlers = {
    services.NoteNotFoundError: note_not_found,
    services.InvalidNoteError: invalid_note,
}
