"""The sync Session of databases with replicas: it notes when it has written (``_wrote``).

A request that wrote must read its own write: a later read-only block in the same request then stays on the
primary instead of a replica that may not have replayed the write yet (see ScopeState.after_write).
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import TextClause, event
from sqlalchemy.orm import ORMExecuteState

from .commit_hooks import HookSession


class WriteTrackingSession(HookSession):
    """Sets ``_wrote`` on a flush that sent changes, and on any statement that is not a plain SELECT."""

    _wrote = False


@event.listens_for(WriteTrackingSession, "after_flush")
def _flushed(session: WriteTrackingSession, flush_context: Any) -> None:
    session._wrote = True


@event.listens_for(WriteTrackingSession, "do_orm_execute")
def _executed(state: ORMExecuteState) -> None:
    if state.is_select:
        return
    statement = state.statement
    # Raw SQL that starts as a plain read is one; any other counts as a write: the primary is the safe side.
    if isinstance(statement, TextClause) and statement.text.lstrip()[:6].upper() in _READ_PREFIXES:
        return
    # Registered on WriteTrackingSession, so the session is one.
    cast(WriteTrackingSession, state.session)._wrote = True


_READ_PREFIXES = frozenset({"SELECT", "SHOW"})
