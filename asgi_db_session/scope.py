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
        if outer is not None:
            database, policy = outer.database, outer.commit_on_success
        else:
            database = get_database(self._name)
            policy = database.commit_on_success
        session = database.new_session()
        self._state = ScopeState(database, policy if self._commit is None else self._commit, session)
        self._token = var.set(self._state)
        return session

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        scope_var(self._name).reset(self._token)
        session = self._state.end()
        assert session is not None
        await finish(session, commit=self._state.commit_on_success and exc_type is None)


def session_scope(name: str = "default", *, commit: bool | None = None) -> AbstractAsyncContextManager[AsyncSession]:
    """Open a NEW session for the block, and make it what ``current_session(name)`` returns inside it.

    Works in scripts, workers and tests (the database must exist: a ``Database`` created, or the middleware
    added) and inside requests, where each of several concurrent tasks (``asyncio.gather``) opens its own.
    On leaving the block the session commits when ``commit`` is true and no exception is propagating, rolls
    back otherwise, and is always closed. ``commit=None`` follows the scope around the block: inside a
    request, the middleware's ``commit_on_success``; elsewhere, the database's.
    """
    return _SessionScope(name, commit)
