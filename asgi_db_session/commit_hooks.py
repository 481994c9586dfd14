"""on_commit(): work that must happen only for data that was really saved (an email, a queued job).

A callback registered with ``on_commit`` waits on the session (see ``HookSession`` in _session.py) until its
transaction ends: a commit makes it due, a rollback drops it. It is held as a runner of its own, which runs it
after the commit has returned, outside the commit's cancellation shield and the session's own transaction, in a
fresh scope (``current_session()`` inside the callback) that commits when the callback returns normally.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from ._context import ScopeState, opened, scope_var
from ._session import HookSession, holds_hooks
from .exceptions import NO_SCOPE, ON_COMMIT_NEEDS_GUARDED_SESSION, NoSessionError

if TYPE_CHECKING:
    from .database import Database

__all__ = ["CommitCallback", "on_commit"]

CommitCallback = Callable[[], Awaitable[None] | None]
"""What ``on_commit()`` takes: a plain function, or a coroutine function, of no arguments."""

_logger = logging.getLogger("asgi_db_session")


def on_commit(callback: CommitCallback, name: str = "default") -> None:
    """Run ``callback`` once the transaction of ``current_session(name)`` has committed; never after a rollback.

    Callbacks run in the order they were registered, right after the commit returns: after the app's own
    ``await session.commit()``, or after the middleware's commit (before the response starts, with
    ``commit_on_success``). Each gets a fresh session through ``current_session(name)`` that commits when the
    callback returns. A callback that raises is logged and the next one still runs: the data is saved
    already, and the response should say so. ``callback`` may be a plain function or a coroutine function.
    """
    state = scope_var(name).get()
    if state is None:
        raise NoSessionError(NO_SCOPE.format(name=name))
    session = state.session if state.session is not None else state.open()
    sync_session = session.sync_session
    # A session holding hooks (HookSession, a class of sync_session_class()) is always under a GuardedSession,
    # which runs the callbacks: Database refuses other pairs.
    if not holds_hooks(type(sync_session)):
        raise TypeError(
            ON_COMMIT_NEEDS_GUARDED_SESSION.format(
                name=name, session_class=type(session).__name__, sync_class=type(sync_session).__name__
            )
        )
    cast(HookSession, sync_session)._hold_until_commit(functools.partial(_run, state.database, callback))


async def _run(database: Database, callback: CommitCallback) -> None:
    """The runner of one callback: in a scope of its own, committed when the callback returns normally."""
    try:
        # A cancelled callback's half-done work is not saved either: the scope rolls back on any exception.
        async with opened(ScopeState(database, True)):
            result = callback()
            if inspect.isawaitable(result):
                await result
    except Exception:
        _logger.exception("on_commit callback %r failed; the data it was registered for is saved", callback)
