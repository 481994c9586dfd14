"""Quart: wrap the app object. Serve with ``hypercorn examples.frameworks.quart_app:asgi_app``."""

from __future__ import annotations

from quart import Quart
from sqlalchemy import text

from asgi_db_session import DBSessionMiddleware, current_session, session_scope

app = Quart(__name__)


async def count_tables() -> int:
    """A service function: it reaches the request's session without being handed it."""
    count: int = (await current_session().execute(text("SELECT count(*) FROM information_schema.tables"))).scalar_one()
    return count


async def refresh_statistics() -> None:
    # A Quart background task runs after its request has ended: it opens a session of its own, which
    # current_session() returns inside the block (in count_tables(), say).
    async with session_scope(commit=True) as session:
        await session.execute(text("ANALYZE"))


@app.get("/")
async def tables() -> dict[str, int]:
    return {"tables": await count_tables()}


@app.post("/statistics")
async def statistics() -> tuple[str, int]:
    app.add_background_task(refresh_statistics)
    return "accepted", 202


# Around the app object (Quart's asgi_app would do as well, app.asgi_app = DBSessionMiddleware(app.asgi_app), which
# mypy reports as an assignment to a method): the middleware sees Quart's lifespan and every request.
asgi_app = DBSessionMiddleware(app, commit_on_success=True)
