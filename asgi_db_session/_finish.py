"""Commit and close a scope's session so that a cancellation cannot stop either halfway.

A plain ``await session.close()`` in ``finally`` is not enough: under ``task.cancel()`` the first await
inside it raises CancelledError, and under an anyio cancel scope the cancellation is delivered again at
every await, so the connection never gets back to the pool clean (sqlalchemy #8145, #12077).

The cleanup runs in a task of its own, which the caller waits for through ``_wait_for``: a ``_Waiter`` that a
cancellation of the caller cannot get past, so the caller returns only once the cleanup is over, and then
re-raises the cancellation. A task of its own also keeps the cleanup's own timeouts (``asyncio.timeout``)
apart from the caller's cancellation.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar

import anyio
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import SessionTransaction

from ._guarded_session import GuardedSession
from .commit_hooks import has_due_hooks, hooks_deferred, run_due_hooks

T = TypeVar("T")

logger = logging.getLogger("asgi_db_session")

CLEANUP_FAILED = (
    "Rolling back and closing a session at the end of its scope failed; its connection was discarded, and "
    "whatever the session had not committed is lost (the database rolls it back)."
)


class _Waiter:
    """What the task waits on in place of the cleanup's own future: woken by that future, never cancelling it.

    It speaks asyncio's protocol for future-like objects (``_asyncio_future_blocking``, ``_loop``,
    ``add_done_callback``, ``cancel``): the task registers its wake-up on the real future, so a normal wake-up
    costs nothing extra. ``task.cancel()`` calls ``cancel()`` here instead of on the real future, which moves
    the task's wake-up off the real future onto one already cancelled: the task wakes with CancelledError at
    once, and ``_wait_for`` waits again. If the real future is done already and its wake-up on its way,
    ``cancel()`` says no, and the task delivers the cancellation with that wake-up.
    """

    __slots__ = ("_asyncio_future_blocking", "_context", "_future", "_loop", "_wake_up")

    _wake_up: Callable[[Any], object]
    _context: contextvars.Context | None

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self._future = future
        self._loop = future.get_loop()  # the task checks that the future is of its own loop
        self._asyncio_future_blocking = True  # the task sets it back to False: "I am waiting on it"

    def add_done_callback(
        self, wake_up: Callable[[Any], object], *, context: contextvars.Context | None = None
    ) -> None:
        self._wake_up = wake_up
        self._context = context
        self._future.add_done_callback(wake_up, context=context)

    def cancel(self, msg: Any = None) -> bool:
        # The task calls add_done_callback() first. Once the wake-up is gone from the future (moved by an
        # earlier cancel(), or scheduled as the future completed), say no: the task then keeps the
        # cancellation and delivers it when it wakes.
        if not self._future.remove_done_callback(self._wake_up):
            return False
        cancelled: asyncio.Future[None] = self._loop.create_future()
        cancelled.cancel(msg)
        cancelled.add_done_callback(self._wake_up, context=self._context)
        return True


def _enter_shield() -> anyio.CancelScope:
    # An anyio cancel scope re-delivers its cancellation on every turn of the loop while the task waits; a
    # shielded scope stops that. Entered only once a cancellation has arrived: it costs more than the rest.
    shield = anyio.CancelScope(shield=True)
    shield.__enter__()
    return shield


@types.coroutine
def _wait_for(task: asyncio.Task[T]) -> Generator[Any, Any, T]:
    """Wait until ``task`` is done, whatever cancellations reach the waiting task; then re-raise the last one.

    The waiting task waits on a ``_Waiter`` of ``task``: a cancellation wakes it with CancelledError, which is
    kept, and it waits again. ``task``'s own error, if it fails, wins over a kept cancellation.
    """
    cancelled: BaseException | None = None
    shield: anyio.CancelScope | None = None
    try:
        while not task.done():
            try:
                yield _Waiter(task)
            except asyncio.CancelledError as exc:
                # ``task``'s own cancellation reaches the caller through its result below, as any outcome does.
                if not task.cancelled():
                    cancelled = exc
                    if shield is None:
                        shield = _enter_shield()
            except Exception:
                pass  # ``task`` failed, and its error was handed in here: the caller gets it from its result
        result = task.result()
    except GeneratorExit:  # the waiting task itself is being thrown away (its loop closed): leave the shield
        shield = None
        raise
    finally:
        if shield is not None:
            shield.__exit__(None, None, None)
    if cancelled is not None:
        raise cancelled
    return result


async def _close(session: AsyncSession) -> None:
    """close(): roll back whatever is still open and give the connection back; if that fails, log and discard.

    Never raises: the scope's own outcome (the app's exception, or the response already sent) is what the
    caller must hear of, and nothing of the transaction was committed either way.
    """
    transaction = session.sync_session.get_transaction()
    try:
        await session.close()
    except Exception:
        logger.warning(CLEANUP_FAILED, exc_info=True)
        _discard(transaction)


def _discard(transaction: SessionTransaction | None) -> None:
    # SQLAlchemy invalidates a connection itself only when it recognises the error as a disconnect; any other
    # failure of the rollback (a backend killed while idle shows as "another operation is in progress") leaves
    # it checked out with its transaction open on the server. The session has let go of its transaction by
    # now, so the connections are reached through the transaction taken before close(). Only those it took
    # from an engine (autoclose): one it was given (the testing plugin's) is its owner's. Outside a greenlet,
    # invalidate() aborts the socket at once: the server ends the backend and rolls its transaction back (the
    # pool logs, rather than raises, a failure to close it).
    for connection, _, _, autoclose in set(getattr(transaction, "_connections", {}).values()):
        if autoclose and not connection.invalidated and not connection.closed:
            connection.invalidate()


async def _commit_then_close(session: AsyncSession) -> None:
    token = hooks_deferred.set(True)  # the callbacks run after the shield, in finish()
    try:
        if session.in_transaction():
            await session.commit()
    finally:
        hooks_deferred.reset(token)
        await _close(session)


async def _commit_deferring_hooks(session: AsyncSession) -> None:
    token = hooks_deferred.set(True)  # the callbacks run after the shield, in commit()
    try:
        await session.commit()
    finally:
        hooks_deferred.reset(token)


def _shielded(cleanup: Coroutine[Any, Any, None]) -> Awaitable[None]:
    # A task of its own, so that its own timeouts cancel only it. (Driving the cleanup itself in the caller's
    # task, a _Waiter for each future it waits on, counted fewer instructions under callgrind but cost ~5% more
    # CPU per request at concurrency 32: asyncio's C task steps a task of its own on real futures faster.)
    return _wait_for(asyncio.get_running_loop().create_task(cleanup))


async def finish(session: AsyncSession, *, commit: bool) -> None:
    """Commit (when ``commit`` and a transaction is open), then close, shielded from cancellation.

    A failed commit is raised; a failed close (its rollback) is logged and its connection discarded.
    """
    if not session.in_transaction() and getattr(session, "_busy_task", None) is None:
        # Nothing begun, so no connection: close() only forgets the session's objects. It does no IO and so
        # never yields to the loop, leaving a cancellation nothing to interrupt: no shield needed. Our own
        # session class is closed on its sync Session directly: with no IO there is nothing for the greenlet
        # that AsyncSession.close() would start to wait on.
        if type(session) is GuardedSession:
            session.sync_session.close()
        else:
            await session.close()
        return
    await _shielded(_commit_then_close(session) if commit else _close(session))
    if commit and has_due_hooks(session):
        await run_due_hooks(session)


async def commit(session: AsyncSession) -> None:
    """Commit, shielded from cancellation: a commit is never left half-sent on the connection.

    Then the on_commit callbacks that the commit made due, outside the shield.
    """
    await _shielded(_commit_deferring_hooks(session))
    if has_due_hooks(session):
        await run_due_hooks(session)
