"""SQLModel's AsyncSession with the package's guard, ``on_commit()`` and read-your-writes: ``SQLModelSession``.

Give it as the session class, ``Database(session_options={"class_": SQLModelSession})`` or
``DBSessionMiddleware(app, session_options={"class_": SQLModelSession})``; ``current_sqlmodel_session()``
returns the request's session typed as one, for ``await session.exec(select(Hero))``. SQLModel's own
AsyncSession as ``class_`` would lose all three: it knows nothing of them. Importing this module imports
SQLModel (the ``sqlmodel`` extra).
"""

from __future__ import annotations

from ._context import current_session
from ._extras import require
from ._session import _GUARDED_METHODS, GuardedSession, HookSession, _guard
from .exceptions import NOT_A_SQLMODEL_SESSION, UsageError

require("sqlmodel", extra="sqlmodel", needed_by="asgi_db_session.sqlmodel")

# After the check, so that a missing SQLModel names the extra.
from sqlmodel.ext.asyncio.session import AsyncSession as _SQLModelAsyncSession  # noqa: E402
from sqlmodel.orm.session import Session as _SQLModelSyncSession  # noqa: E402

__all__ = [
    "SQLModelSession",
    "current_sqlmodel_session",
]


class _SQLModelHookSession(HookSession, _SQLModelSyncSession):
    """SQLModel's sync Session, whose ``exec()`` the async ``exec()`` runs, holding the on_commit() hooks."""


class SQLModelSession(GuardedSession, _SQLModelAsyncSession):
    """SQLModel's AsyncSession (``exec()``) as a GuardedSession: a second task's operation is refused with
    ConcurrentSessionUseError, ``on_commit()`` callbacks run after the commit, and with replicas a request
    that wrote reads from the primary."""

    sync_session_class = _SQLModelHookSession
    sync_session: _SQLModelHookSession


# GuardedSession's guarded methods wrap SQLAlchemy's AsyncSession; what SQLModel's class defines itself
# (exec(), and execute() with its deprecation notice) is guarded here, so that it keeps SQLModel's behaviour.
for _name in (*_GUARDED_METHODS, "exec"):
    if _name in vars(_SQLModelAsyncSession):
        setattr(SQLModelSession, _name, _guard(getattr(_SQLModelAsyncSession, _name)))


def current_sqlmodel_session(name: str = "default") -> SQLModelSession:
    """``current_session(name)``, typed as the SQLModelSession it is when the database's class_ is one.

    UsageError when the database's sessions are of another class (``session_options`` does not name
    SQLModelSession): its ``exec()`` would be missing, or would run without the guard.
    """
    session = current_session(name)
    if not isinstance(session, SQLModelSession):
        raise UsageError(NOT_A_SQLMODEL_SESSION.format(name=name, session_class=type(session).__name__))
    return session
