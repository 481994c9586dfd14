"""For FastAPI users who prefer injection: dependencies that return the request's session.

``current_session()`` works in FastAPI as it is; these only spell it as a dependency, so that a path
operation can declare the session in its signature. Importing this module imports FastAPI (the ``fastapi``
extra).
"""

from __future__ import annotations

from typing import Annotated, Any

from sqlalchemy.ext.asyncio import AsyncSession

from ._context import current_session
from ._extras import require

require("fastapi", extra="fastapi", needed_by="asgi_db_session.fastapi")

from fastapi import Depends  # noqa: E402  (after the check, so that a missing FastAPI names the extra)

__all__ = [
    "SessionDep",
    "session_dependency",
]


# The dependencies are async although they do no IO: FastAPI runs a plain ``def`` dependency in its
# threadpool, a thread hop per request for reading a ContextVar.


async def _default_session() -> AsyncSession:
    return current_session()


def session_dependency(name: str = "default") -> Any:
    """``Depends(...)`` returning the request's session of database ``name``: the same object that
    ``current_session(name)`` returns everywhere else in the request."""

    async def request_session() -> AsyncSession:
        return current_session(name)

    return Depends(request_session)


SessionDep = Annotated[AsyncSession, Depends(_default_session)]
"""``async def create(session: SessionDep): ...``: the request's session of the default database."""
