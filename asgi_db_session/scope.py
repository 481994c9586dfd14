"""session_scope(): a new session for a block of code, inside or outside a request."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from types import TracebackType
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from ._context import ScopeState, enter, leave, scope_var
from ._lazy_loads import log_lazy_load
from ._routes import statement_timeout_ms
from .database import get_database
from .exceptions import SCOPE_SESSION_CLASS

__all__ = [
    "session_scope",
]


# What makes a session the package's kind (the guard, the on_commit hooks): the database decides, not a block.
_CLASS_OPTIONS = ("class_", "sync_session_class")


class _SessionScope(AbstractAsyncContextManager[AsyncSession]):
    __slots__ = ("_commit", "_name", "_read_only", "_session_options", "_state", "_statement_timeout", "_token")

    def __init__(
        self,
        name: str,
        commit: bool | None,
        read_only: bool | None,
        session_options: Mapping[str, Any] | None,
        statement_timeout: int | None = None,
    ) -> None:
        self._name = name
        self._commit = commit
        self._read_only = read_only
        self._session_options = session_options
        self._statement_timeout = statement_timeout

    async def __aenter__(self) -> AsyncSession:
        var = scope_var(self._name)
        outer = var.get()
        # Inside a request, the request's database wins over the registry: it is the one this app runs on.
        if outer is not None:
            if outer.asgi_scope is not None:
                outer.apply_route_policy()  # the endpoint's policy, which this block follows by default
            database, policy, read_only = outer.database, outer.commit_on_success, outer.read_only
            statement_timeout = outer.statement_timeout
        else:
            database = get_database(self._name)
            policy, read_only, statement_timeout = database.commit_on_success, False, None
        if self._read_only is not None:
            read_only = self._read_only
        if self._statement_timeout is not None:
            statement_timeout = self._statement_timeout
        state = self._state = ScopeState(database, policy if self._commit is None else self._commit)
        state.outer = outer
        state.read_only = read_only
        if statement_timeout is not None:
            state.statement_timeout = statement_timeout
        if self._session_options is not None:
            state.session_options = self._session_options
        session = state.open()
        self._token = enter(state)
        return session

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            log_lazy_load(exc, f"session_scope({self._name!r})")
        await leave(self._state, self._token, clean=exc_type is None)


def session_scope(
    name: str = "default",
    *,
    commit: bool | None = None,
    read_only: bool | None = None,
    session_options: Mapping[str, Any] | None = None,
    statement_timeout: float | timedelta | None = None,
) -> AbstractAsyncContextManager[AsyncSession]:
    """Open a NEW session for the block, and make it what ``current_session(name)`` returns inside it.

    Works in scripts, workers and tests (the database must exist: a ``Database`` created, or the middleware
    added) and inside requests, where each of several concurrent tasks (``asyncio.gather``) opens its own.
    On leaving the block the session commits when ``commit`` is true and no exception is propagating, rolls
    back otherwise, and is always closed. ``commit=None`` follows the scope around the block: inside a
    request, the middleware's ``commit_on_success``; elsewhere, the database's.

    ``read_only=True`` makes the block's transactions READ ONLY (PostgreSQL enforces it) and sends them to a
    replica when the database has replicas, unless the request already wrote: then to the primary, which
    has that write. ``None`` follows the scope around the block (a ``session_policy(read_only=True)`` route).

    ``session_options`` are this block's own session arguments (``autoflush``, ``expire_on_commit``, ``bind``,
    ``info``...) over the database's; the session stays of the database's class (``class_`` is refused).

    ``statement_timeout`` (seconds, or a ``timedelta``): PostgreSQL cancels any statement of the block's session
    that runs longer (``SET LOCAL statement_timeout`` in each of its transactions; the error is SQLSTATE 57014,
    and the block rolls back). ``None`` follows the scope around the block (a
    ``session_policy(statement_timeout=...)`` route), else the connection's own. Other databases ignore it.
    """
    milliseconds = statement_timeout_ms(statement_timeout)
    if session_options is not None:
        for option in _CLASS_OPTIONS:
            if option in session_options:
                raise ValueError(SCOPE_SESSION_CLASS.format(option=option))
        session_options = dict(session_options)  # the caller's later changes do not reach the block
    return _SessionScope(name, commit, read_only, session_options, milliseconds)
