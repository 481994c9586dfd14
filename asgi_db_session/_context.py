"""Where a scope's session lives: one ContextVar per database name, holding a mutable scope state.

The ContextVar holds a ``ScopeState`` rather than the session itself, so that a session created lazily in a
child context (a streaming body's task group, a threadpool endpoint, a background task) is the one every
other part of the request sees, and the one the middleware closes.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

from .exceptions import NO_SCOPE, SCOPE_ENDED, NoSessionError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from .database import Database

_vars: dict[str, ContextVar[ScopeState | None]] = {}


def scope_var(name: str) -> ContextVar[ScopeState | None]:
    """The ContextVar for database ``name``; one per name for the life of the process."""
    var = _vars.get(name)
    if var is None:
        var = _vars.setdefault(name, ContextVar(f"asgi_db_session:{name}", default=None))
    return var


class ScopeState:
    """One scope's session: created on first use, then given up exactly once by ``end()``."""

    __slots__ = ("commit_on_success", "database", "ended", "session")

    def __init__(self, database: Database, commit_on_success: bool, session: AsyncSession | None = None) -> None:
        self.database = database
        # The policy of this scope: a session_scope() opened inside it follows it unless told otherwise.
        self.commit_on_success = commit_on_success
        self.session = session
        self.ended = False

    def open(self) -> AsyncSession:
        """The scope's session, created now if this is the first call."""
        session = self.session
        if session is None:
            if self.ended:
                raise NoSessionError(SCOPE_ENDED.format(name=self.database.name))
            session = self.session = self.database.new_session()
        return session

    def end(self) -> AsyncSession | None:
        """Close the scope to new use and hand over its session (None if none was created) for closing."""
        session, self.session = self.session, None
        self.ended = True
        return session


def current_session(name: str = "default") -> AsyncSession:
    """The session of the innermost active scope for database ``name``.

    Inside a request handled by DBSessionMiddleware that is the request's session, created on this first
    call; inside ``session_scope(name)`` it is that block's session. Raises NoSessionError elsewhere.
    """
    var = _vars.get(name)
    state = None if var is None else var.get()
    if state is None:
        raise NoSessionError(NO_SCOPE.format(name=name))
    session = state.session
    return session if session is not None else state.open()
