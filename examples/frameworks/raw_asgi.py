"""A bare ASGI app: wrap it. Serve with ``uvicorn examples.frameworks.raw_asgi:app``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sqlalchemy import text

from asgi_db_session import DBSessionMiddleware, current_session

Message = MutableMapping[str, Any]


async def count_tables() -> int:
    """A service function: it reaches the request's session without being handed it."""
    count: int = (await current_session().execute(text("SELECT count(*) FROM information_schema.tables"))).scalar_one()
    return count


async def tables(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] != "http":
        return  # no lifespan of its own: DBSessionMiddleware answers it, checking and disposing the database
    body = str(await count_tables()).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


app = DBSessionMiddleware(tables, commit_on_success=True)
