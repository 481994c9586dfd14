"""An AsyncSession that refuses to be used by two tasks at once, and whose close() waits its turn.

SQLAlchemy detects overlapping operations only part of the time and then in its own terms ("This session is
provisioning a new connection", asyncpg's "another operation is in progress"); worse, the request's cleanup
can then fail the same way and never return the connection. This session fails the second operation up
front, before it touches the session, with an error that says what to do instead, so the first one finishes
undisturbed; close() waits for it.
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

# Every AsyncSession method that runs something on the sync Session (close() has its own wrapper below).
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
    _idle: asyncio.Event | None = None

    async def _run_guarded(self, method: _AsyncMethod, *args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        busy = self._busy_task
        if busy is task:  # the same task, one level down (run_sync's callback, say)
            return await method(self, *args, **kwargs)
        if busy is not None:
            raise ConcurrentSessionUseError(CONCURRENT_USE.format(method=method.__name__))
        self._busy_task = task
        try:
            return await method(self, *args, **kwargs)
        finally:
            self._busy_task = None
            idle, self._idle = self._idle, None
            if idle is not None:
                idle.set()

    async def close(self) -> None:
        """Wait until no other task is running an operation on this session, then close it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_WAIT_SECONDS
        while self._busy_task is not None and self._busy_task is not asyncio.current_task():
            if self._idle is None:
                self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise ConcurrentSessionUseError(CONCURRENT_USE.format(method="close")) from None
        await self._run_guarded(AsyncSession.close)

    async def commit(self) -> None:
        """Commit, then run the on_commit callbacks that the commit made due."""
        await self._run_guarded(AsyncSession.commit)
        if has_due_hooks(self) and not hooks_deferred.get():
            await run_due_hooks(self)


def _guard(name: str) -> _AsyncMethod:
    method: _AsyncMethod = getattr(AsyncSession, name)

    @functools.wraps(method)
    async def guarded(self: GuardedSession, *args: Any, **kwargs: Any) -> Any:
        return await self._run_guarded(method, *args, **kwargs)

    return guarded


for _name in _GUARDED_METHODS:
    if hasattr(AsyncSession, _name):  # delete_all() and merge_all() came with SQLAlchemy 2.1
        setattr(GuardedSession, _name, _guard(_name))
