"""Litestar: wrap the app object. Serve with ``uvicorn examples.frameworks.litestar_app:app``."""

from __future__ import annotations

from litestar import Litestar, get
from sqlalchemy import text

from asgi_db_session import DBSessionMiddleware, current_session


async def count_tables() -> int:
    """A service function: it reaches the request's session without being handed it."""
    count: int = (await current_session().execute(text("SELECT count(*) FROM information_schema.tables"))).scalar_one()
    return count


@get("/")
async def tables() -> dict[str, int]:
    return {"tables": await count_tables()}


# Around the app object, not in Litestar(middleware=[...]): Litestar answers the lifespan scope before its
# middleware runs, so a middleware in that list would never see startup or shutdown.
app = DBSessionMiddleware(Litestar([tables]), commit_on_success=True)
