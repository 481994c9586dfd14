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

from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction

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
    """The AsyncSession class of every session the package makes, unless ``session_options`` names another.

    On top of AsyncSession it refuses an operation from a second task while another task's runs (with
    ConcurrentSessionUseError, instead of SQLAlchemy's errors or a stuck connection), lets ``close()`` wait for
    that operation, and runs the ``on_commit()`` callbacks after a commit: ``commit()``, the end of
    ``async with session.begin():``, or the package's own commit. A session class of your own
    (``session_options={"class_": MySession}``) must derive from it for ``on_commit()``, the guard and
    read-your-writes with replicas to keep working.
    """

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

    # SQLAlchemy's own idiom, ``async with session.begin():``, commits through the transaction object, not
    # commit(): its begin, commit and rollback are guarded too, and its commit runs the due callbacks.
    def begin(self) -> AsyncSessionTransaction:
        """A transaction that commits at the end of ``async with``; then the on_commit callbacks run."""
        return _GuardedTransaction(self)

    def begin_nested(self) -> AsyncSessionTransaction:
        """A savepoint; its release is no commit: on_commit callbacks wait for the outermost transaction's."""
        return _GuardedTransaction(self, nested=True)

    def get_transaction(self) -> AsyncSessionTransaction | None:
        transaction = self.sync_session.get_transaction()
        if transaction is None:
            return None
        return _GuardedTransaction._retrieve_proxy_for_target(transaction, async_session=self)

    def get_nested_transaction(self) -> AsyncSessionTransaction | None:
        transaction = self.sync_session.get_nested_transaction()
        if transaction is None:
            return None
        return _GuardedTransaction._retrieve_proxy_for_target(transaction, async_session=self)


class _GuardedTransaction(AsyncSessionTransaction):
    """A GuardedSession's transaction: begun, committed and rolled back under the session's guard."""

    __slots__ = ()

    session: GuardedSession

    async def start(self, is_ctxmanager: bool = False) -> AsyncSessionTransaction:
        await (_guarded_begin_nested if self.nested else _guarded_begin)(self.session, self, is_ctxmanager)
        return self

    async def commit(self) -> None:
        await _guarded_transaction_commit(self.session, self)
        await _run_due_hooks(self.session)

    async def rollback(self) -> None:
        await _guarded_transaction_rollback(self.session, self)

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        if type_ is not None:
            await _guarded_exit_rollback(self.session, self, type_, value, traceback)
            return
        await _guarded_exit_commit(self.session, self, type_, value, traceback)
        await _run_due_hooks(self.session)


async def _run_due_hooks(session: GuardedSession) -> None:
    # Due only after the outermost transaction committed: a savepoint's release makes none due.
    if has_due_hooks(session) and not hooks_deferred.get():
        await run_due_hooks(session)


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


def _transaction_step(name: str, step: _AsyncMethod) -> _AsyncMethod:
    """``step`` of AsyncSessionTransaction, under the guard of its session; ``name`` is what the error says."""

    async def run(session: GuardedSession, transaction: AsyncSessionTransaction, *args: Any) -> Any:
        return await step(transaction, *args)

    run.__name__ = name
    return _guard(run)


_guarded_close = _guard(AsyncSession.close)
_guarded_commit = _guard(AsyncSession.commit)
_guarded_begin = _transaction_step("begin", AsyncSessionTransaction.start)
_guarded_begin_nested = _transaction_step("begin_nested", AsyncSessionTransaction.start)
_guarded_transaction_commit = _transaction_step("commit", AsyncSessionTransaction.commit)
_guarded_transaction_rollback = _transaction_step("rollback", AsyncSessionTransaction.rollback)
# Leaving ``async with session.begin():`` commits, or rolls back after an exception.
_guarded_exit_commit = _transaction_step("commit", AsyncSessionTransaction.__aexit__)
_guarded_exit_rollback = _transaction_step("rollback", AsyncSessionTransaction.__aexit__)

for _name in _GUARDED_METHODS:
    if hasattr(AsyncSession, _name):  # delete_all() and merge_all() came with SQLAlchemy 2.1
        setattr(GuardedSession, _name, _guard(getattr(AsyncSession, _name)))
