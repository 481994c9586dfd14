"""Django: async views (and anything they call) reach the request's session with current_session()."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from sqlalchemy import text

from asgi_db_session import current_session


async def count_tables() -> int:
    """A service function: it reaches the request's session without being handed it."""
    count: int = (await current_session().execute(text("SELECT count(*) FROM information_schema.tables"))).scalar_one()
    return count


async def tables(request: HttpRequest) -> JsonResponse:
    # An async view: it runs in the request's context. A sync view runs in a thread of Django's, where the
    # session (an AsyncSession) cannot be awaited.
    return JsonResponse({"tables": await count_tables()})
