"""The sync Session of databases with replicas: it notes in its ``info`` when it has written.

A request that wrote must read its own write: a later read-only block in the same request then stays on the
primary instead of a replica that may not have replayed the write yet (see ScopeState.after_write).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import TextClause, event
from sqlalchemy.orm import ORMExecuteState, Session

from ._context import WROTE
from .commit_hooks import HookSession


class WriteTrackingSession(HookSession):
    """Sets ``info[WROTE]`` on a flush that sent changes, and on any statement that is not a plain SELECT."""


@event.listens_for(WriteTrackingSession, "after_flush")
def _flushed(session: Session, flush_context: Any) -> None:
    session.info[WROTE] = True


@event.listens_for(WriteTrackingSession, "do_orm_execute")
def _executed(state: ORMExecuteState) -> None:
    if state.is_select:
        return
    statement = state.statement
    # Raw SQL that starts as a plain read is one; any other counts as a write: the primary is the safe side.
    if isinstance(statement, TextClause) and statement.text.lstrip()[:6].upper() in _READ_PREFIXES:
        return
    state.session.info[WROTE] = True


_READ_PREFIXES = frozenset({"SELECT", "SHOW"})
