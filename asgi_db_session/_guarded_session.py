"""An AsyncSession that refuses to be used by two tasks at once, and whose close() waits its turn.

SQLAlchemy detects overlapping operations only part of the time and then in its own terms ("This session is
provisioning a new connection", asyncpg's "another operation is in progress"); worse, the request's cleanup
can then fail the same way and never return the connection. This session fails the second operation up
front, before it touches the session, with an error that says what to do instead, so the first one finishes
undisturbed; close() waits for it.

Every guarded method is one coroutine of its own (made by ``_guard`` below) that checks and sets the busy
task and awaits AsyncSession's method directly: a query pays one extra coroutine frame, not two.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from .commit_hooks import HookSession, has_due_hooks, hooks_deferred, run_due_hooks
from .exceptions import CONCURRENT_USE, ConcurrentSessionUseError

# How long close() waits for another task's operation on the session before giving up with an error.
CLOSE_WAIT_SECONDS = 30.0

_AsyncMethod = Callable[..., Coroutine[Any, Any, Any]]

# C from Python 3.12 on; a short Python function before.
_current_task = asyncio.current_task

# Every AsyncSession method that runs something on the sync Session (close() and commit() add to the guard).
_GUARDED_METHODS = (
    "connection",
    "delete",
    "delete_all",
    "execute",
    "flush",
    "get",
    "get_one",
    "invalidate",
    "merge",
    "merge_all",
    "refresh",
    "reset",
    "rollback",
    "run_sync",
    "scalar",
    "scalars",
    "stream",
    "stream_scalars",
)


class GuardedSession(AsyncSession):
    """The session class the middleware's sessions use unless ``session_options`` names another."""

    sync_session_class = HookSession

    _busy_task: asyncio.Task[Any] | None = None
    # Set (to a future) by a close() that waits for another task's operation; that operation completes it.
    _idle: asyncio.Future[None] | None = None

    async def _wait_idle(self) -> None:
        """Wait until no other task runs an operation on this session (at most CLOSE_WAIT_SECONDS).

        asyncio.wait() rather than wait_for(): from Python 3.12 on, wait_for() times out by cancelling the
        task it runs in, which the cleanup's shield (_finish._wait_for) would take for a cancellation from outside.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_WAIT_SECONDS
        while self._busy_task is not None and self._busy_task is not _current_task():
            idle = self._idle
            if idle is None:
                idle = self._idle = loop.create_future()
            done, _ = await asyncio.wait((idle,), timeout=max(0.0, deadline - loop.time()))
            if not done:
                raise ConcurrentSessionUseError(CONCURRENT_USE.format(method="close"))

    async def close(self) -> None:
        """Wait until no other task is running an operation on this session, then close it."""
        if self._busy_task is not None:
            await self._wait_idle()
        await _guarded_close(self)

    async def commit(self) -> None:
        """Commit, then run the on_commit callbacks that the commit made due."""
        await _guarded_commit(self)
        if has_due_hooks(self) and not hooks_deferred.get():
            await run_due_hooks(self)


def _guard(method: _AsyncMethod) -> _AsyncMethod:
    """``method`` of AsyncSession, refusing a second task while one runs an operation on the session."""
    name = method.__name__

    @functools.wraps(method)
    async def guarded(self: GuardedSession, *args: Any, **kwargs: Any) -> Any:
        task = _current_task()
        busy = self._busy_task
        if busy is None:
            self._busy_task = task
            try:
                return await method(self, *args, **kwargs)
            finally:
                self._busy_task = None
                idle = self._idle
                if idle is not None:
                    self._idle = None
                    if not idle.done():
                        idle.set_result(None)
        if busy is task:  # the same task, one level down (scalars() runs execute(), say)
            return await method(self, *args, **kwargs)
        raise ConcurrentSessionUseError(CONCURRENT_USE.format(method=name))

    return guarded


_guarded_close = _guard(AsyncSession.close)
_guarded_commit = _guard(AsyncSession.commit)

for _name in _GUARDED_METHODS:
    if hasattr(AsyncSession, _name):  # delete_all() and merge_all() came with SQLAlchemy 2.1
        setattr(GuardedSession, _name, _guard(getattr(AsyncSession, _name)))
