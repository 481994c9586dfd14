"""What the notes API does, independent of HTTP: validation, and an error for a note that does not exist."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from . import repositories
from .models import TITLE_MAX_LENGTH, Note


class NoteNotFoundError(LookupError):
    def __init__(self, note_id: int) -> None:
        super().__init__(f"Note {note_id} does not exist.")
        self.note_id = note_id


class InvalidNoteError(ValueError):
    """The input for a note was rejected; ``errors`` maps each offending field to what is wrong with it."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        super().__init__("; ".join(f"{field}: {message}" for field, message in errors.items()))
        self.errors = dict(errors)


async def create_note(data: object) -> Note:
    """Create a note from ``{"title": str, "body": str}``; ``body`` may be left out."""
    if not isinstance(data, Mapping):
        raise InvalidNoteError({"request": 'expected a JSON object such as {"title": "...", "body": "..."}'})
    title = data.get("title")
    title = title.strip() if isinstance(title, str) else ""
    body = data.get("body", "")
    errors: dict[str, str] = {}
    if not title:
        errors["title"] = "required: a non-empty string"
    elif len(title) > TITLE_MAX_LENGTH:
        errors["title"] = f"at most {TITLE_MAX_LENGTH} characters"
    if not isinstance(body, str):
        errors["body"] = "must be a string"
    if errors:
        raise InvalidNoteError(errors)
    return await repositories.add_note(title, body)


async def list_notes() -> Sequence[Note]:
    return await repositories.list_notes()


async def get_note(note_id: int) -> Note:
    note = await repositories.get_note(note_id)
    if note is None:
        raise NoteNotFoundError(note_id)
    return note


async def delete_note(note_id: int) -> None:
    await repositories.delete_note(await get_note(note_id))
