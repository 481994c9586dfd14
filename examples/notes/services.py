"""What the notes API does, independent of HTTP: validation, and an error for a note that does not exist.

Input is checked here, before the database sees it, so that what the database would refuse (a NUL in text on
PostgreSQL, an id beyond its integer column) is a 4xx for the client rather than a database error and a 500.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from . import repositories
from .models import NOTE_ID_MAX, TITLE_MAX_LENGTH, Note


class NoteNotFoundError(LookupError):
    def __init__(self, note_id: int) -> None:
        super().__init__(f"Note {note_id} does not exist.")
        self.note_id = note_id


class InvalidNoteError(ValueError):
    """The input for a note was rejected; ``errors`` maps each offending field to what is wrong with it."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        super().__init__("; ".join(f"{field}: {message}" for field, message in errors.items()))
        self.errors = dict(errors)


def text_problem(text: str) -> str | None:
    """What makes ``text`` impossible to store, or None: a NUL (PostgreSQL refuses it in text columns) or a
    lone surrogate (JSON's ``"\\ud800"``: it has no UTF-8 encoding, so no driver can send it)."""
    if "\x00" in text:
        return "must not contain the NUL character (\\u0000)"
    try:
        text.encode()
    except UnicodeEncodeError:
        return "must not contain a lone surrogate (\\ud800-\\udfff): it is not a character"
    return None


async def create_note(data: object) -> Note:
    """Create a note from ``{"title": str, "body": str}``; ``body`` may be left out. A title already taken
    raises the database's unique violation (IntegrityError) at the flush."""
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
    elif problem := text_problem(title):
        errors["title"] = problem
    if not isinstance(body, str):
        errors["body"] = "must be a string"
    elif problem := text_problem(body):
        errors["body"] = problem
    if errors:
        raise InvalidNoteError(errors)
    return await repositories.add_note(title, body)


async def list_notes() -> Sequence[Note]:
    return await repositories.list_notes()


async def get_note(note_id: int) -> Note:
    if not 0 < note_id <= NOTE_ID_MAX:
        raise NoteNotFoundError(note_id)  # no note has it, and PostgreSQL would refuse it in the query
    note = await repositories.get_note(note_id)
    if note is None:
        raise NoteNotFoundError(note_id)
    return note


async def delete_note(note_id: int) -> None:
    await repositories.delete_note(await get_note(note_id))
