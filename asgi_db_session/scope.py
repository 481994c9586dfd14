"""session_scope(): a new session for a block of code, inside or outside a request."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from types import TracebackType

from sqlalchemy.ext.asyncio import AsyncSession

from ._context import ScopeState, scope_var
from ._finish import finish
from .database import get_database


class _SessionScope(AbstractAsyncContextManager[AsyncSession]):
    __slots__ = ("_commit", "_name", "_state", "_token")

    def __init__(self, name: str, commit: bool | None) -> None:
        self._name = name
        self._commit = commit

    async def __aenter__(self) -> AsyncSession:
        var = scope_var(self._name)
        outer = var.get()
        # Inside a request, the request's database wins over the registry: it is the one this app runs on.
        database = outer.database if outer is not None else get_database(self._name)
        session = database.new_session()
        self._state = ScopeState(database, session)
        self._token = var.set(self._state)
        return session

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        scope_var(self._name).reset(self._token)
        session = self._state.end()
        assert session is not None
        commit = self._state.database.commit_on_success if self._commit is None else self._commit
        await finish(session, commit=commit and exc_type is None)


def session_scope(name: str = "default", *, commit: bool | None = None) -> AbstractAsyncContextManager[AsyncSession]:
    """Open a NEW session for the block, and make it what ``current_session(name)`` returns inside it.

    Works in scripts, workers and tests (the database must exist: a ``Database`` created, or the middleware
    added) and inside requests, where each of several concurrent tasks (``asyncio.gather``) opens its own.
    On leaving the block the session commits when ``commit`` is true (default: the database's
    ``commit_on_success``) and no exception is propagating, rolls back otherwise, and is always closed.
    """
    return _SessionScope(name, commit)
