"""The FastAPI version of the notes demo, on both databases."""

from __future__ import annotations

import pytest

from asgi_db_session import get_database
from examples.fastapi_notes import create_app
from examples.notes.models import Note

from .conftest import Backend, client
from .system.test_examples import notes_db, notes_pg_database, running

__all__ = ["notes_db", "notes_pg_database"]  # fixtures shared with the Starlette demo's tests

pytestmark = pytest.mark.anyio


async def test_fastapi_notes_create_list_count_and_404(notes_db: Backend) -> None:
    app = create_app(notes_db.url)
    async with running(app) as channel:  # the lifespan creates the table
        assert channel.types() == ["lifespan.startup.complete"]
        async with client(app) as http:
            created = await http.post("/notes", json={"title": "fastapi", "body": "works"})
            assert created.status_code == 201
            assert (await http.post("/notes", json={"title": ""})).status_code == 422
            assert [note["title"] for note in (await http.get("/notes")).json()] == ["fastapi"]
            assert (await http.get("/notes/count")).json() == 1
            assert (await http.get("/notes/999")).status_code == 404
            assert (await http.delete("/notes/999")).status_code == 404
            assert (await http.get("/health")).json() == {"database": "ok"}
        assert get_database().engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    rows = await notes_db.fetch(f"SELECT title, body FROM {Note.__tablename__}")
    assert rows == [("fastapi", "works")]
