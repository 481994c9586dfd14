"""on_commit(): work that must happen only for data that was really saved (an email, a queued job).

A callback registered with ``on_commit`` waits on the sync session (``HookSession``) until its transaction
ends. The sync session events below sort it: a commit makes it due, the end of the transaction without one
drops it, and the rollback of a savepoint drops what was registered inside that savepoint. Due callbacks run
after the commit has returned, outside the commit's cancellation shield and the session's own transaction,
each in a fresh session of its own (``current_session()`` inside the callback), which commits when the
callback returns normally.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from ._context import ScopeState, scope_var
from .exceptions import NO_SCOPE, ON_COMMIT_NEEDS_GUARDED_SESSION, NoSessionError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from .database import Database

CommitCallback = Callable[[], Awaitable[None] | None]

logger = logging.getLogger("asgi_db_session")

# Set while the package commits a session inside its cancellation shield: the commit's own task must not run
# the callbacks (a slow one could not be cancelled there); the code that awaited the shield runs them after.
hooks_deferred: ContextVar[bool] = ContextVar("asgi_db_session.hooks_deferred", default=False)


@dataclass(frozen=True, slots=True)
class _Hook:
    callback: CommitCallback
    database: Database
    # The innermost transaction open when the hook was registered (None: none was): a rollback of it, or of
    # a savepoint around it, means the hook's data was not saved.
    transaction: SessionTransaction | None


class HookSession(Session):
    """The sync Session behind the package's sessions: the one whose transaction events move hooks along.

    The hooks live in attributes of its own rather than in ``info``: ``info`` is made on first access, and
    reading it at every transaction's end would make one dict per request that registers no hook.
    """

    # Callbacks waiting for the transaction to end, and callbacks whose commit happened.
    _hooks_waiting: list[_Hook] | None = None
    _hooks_due: list[_Hook] | None = None


def on_commit(callback: CommitCallback, name: str = "default") -> None:
    """Run ``callback`` once the transaction of ``current_session(name)`` has committed; never after a rollback.

    Callbacks run in the order they were registered, right after the commit returns: after the app's own
    ``await session.commit()``, or after the middleware's commit (before the response starts, with
    ``commit_on_success``). Each gets a fresh session through ``current_session(name)`` that commits when the
    callback returns. A callback that raises is logged and the next one still runs: the data is saved
    already, and the response should say so. ``callback`` may be a plain function or a coroutine function.
    """
    var = scope_var(name)
    state = var.get()
    if state is None:
        raise NoSessionError(NO_SCOPE.format(name=name))
    session = state.session if state.session is not None else state.open()
    sync_session = session.sync_session
    # A HookSession is always under a GuardedSession, which runs the callbacks: Database refuses other pairs.
    if not isinstance(sync_session, HookSession):
        raise TypeError(
            ON_COMMIT_NEEDS_GUARDED_SESSION.format(
                name=name, session_class=type(session).__name__, sync_class=type(sync_session).__name__
            )
        )
    transaction = sync_session.get_nested_transaction() or sync_session.get_transaction()
    hook = _Hook(callback, state.database, transaction)
    sync_session._hooks_waiting = [*(sync_session._hooks_waiting or ()), hook]


@event.listens_for(HookSession, "after_commit")
def _commit_made_hooks_due(session: HookSession) -> None:
    waiting = session._hooks_waiting
    # SQLAlchemy sends after_commit for a savepoint's release too (it is then still the session's current
    # transaction): nothing is saved until the outermost transaction commits.
    if waiting and not session.in_nested_transaction():
        session._hooks_waiting = None
        session._hooks_due = [*(session._hooks_due or ()), *waiting]


@event.listens_for(HookSession, "after_soft_rollback")
def _savepoint_rollback_dropped_hooks(session: HookSession, previous_transaction: SessionTransaction) -> None:
    waiting = session._hooks_waiting
    if not waiting or not previous_transaction.nested:
        return  # the outermost transaction's end is handled below

    def inside_rolled_back(hook: _Hook) -> bool:
        transaction = hook.transaction
        while transaction is not None:
            if transaction is previous_transaction:
                return True
            transaction = transaction.parent
        return False

    waiting[:] = [hook for hook in waiting if not inside_rolled_back(hook)]


@event.listens_for(HookSession, "after_transaction_end")
def _uncommitted_end_dropped_hooks(session: HookSession, transaction: SessionTransaction) -> None:
    # A commit has moved its hooks on (after_commit comes first): what still waits when the outermost
    # transaction ends was rolled back, or closed without a commit.
    if session._hooks_waiting is not None and transaction.parent is None and not transaction.nested:
        session._hooks_waiting = None


def has_due_hooks(session: AsyncSession) -> bool:
    """Whether a commit of ``session`` left callbacks to run: a cheap check for the commit paths."""
    return bool(getattr(session.sync_session, "_hooks_due", None))


async def run_due_hooks(session: AsyncSession) -> None:
    """Run the callbacks that the last commit of ``session`` made due, in order, each in a fresh session."""
    sync_session = cast(HookSession, session.sync_session)  # has_due_hooks() said so
    due, sync_session._hooks_due = sync_session._hooks_due or [], None
    for hook in due:
        await _run_hook(hook)


async def _run_hook(hook: _Hook) -> None:
    # Imported here: _finish imports this module, and the hook's own session closes through _finish.
    from ._finish import finish

    database = hook.database
    var = scope_var(database.name)
    state = ScopeState(database, True)
    token = var.set(state)
    failed = False
    try:
        try:
            result = hook.callback()
            if inspect.isawaitable(result):
                await result
        except BaseException:  # a cancelled callback's half-done work is not saved either
            failed = True
            raise
        finally:
            var.reset(token)
            session = state.end()
            if session is not None:
                await finish(session, commit=not failed)
    except Exception:
        logger.exception("on_commit callback %r failed; the data it was registered for is saved", hook.callback)
