"""Data access for notes. No session is passed in: each function works in the session of the request (or
``session_scope()`` block) it runs in, found with ``current_session()``."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from asgi_db_session import current_session

from .models import Note


async def add_note(title: str, body: str) -> Note:
    session = current_session()
    note = Note(title=title, body=body)
    session.add(note)
    # The id is needed for the response, which is sent before the middleware commits.
    await session.flush()
    return note


async def get_note(note_id: int) -> Note | None:
    return await current_session().get(Note, note_id)


async def list_notes() -> Sequence[Note]:
    result = await current_session().scalars(select(Note).order_by(Note.id))
    return result.all()


async def delete_note(note: Note) -> None:
    await current_session().delete(note)
