"""Run a coroutine to its end whatever cancellations reach the task awaiting it; then re-raise the last one.

For a session's commit and close (see _session.py): a plain ``await session.close()`` in ``finally`` is not
enough: under ``task.cancel()`` the first await inside it raises CancelledError, and under an anyio cancel
scope the cancellation is delivered again at every await, so the connection never gets back to the pool clean
(sqlalchemy #8145, #12077). This module knows nothing of sessions.

The coroutine runs in a task of its own, which the caller waits for through ``_wait_for``: a ``_Waiter`` that a
cancellation of the caller cannot get past, so the caller returns only once the coroutine is over, and then
re-raises the cancellation. A task of its own also keeps the coroutine's own timeouts (``asyncio.timeout``)
apart from the caller's cancellation.
"""

from __future__ import annotations

import asyncio
import contextvars
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar

import anyio

T = TypeVar("T")


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
    failed: Exception | None = None
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
            except Exception as exc:
                # ``task`` failed, and its error was handed in here with the frames it was raised through, which
                # task.result() would leave out (the caller, and the error mapping, see where it came from).
                failed = exc
        if failed is not None:
            raise failed
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


def shielded(work: Coroutine[Any, Any, T]) -> Awaitable[T]:
    """Await ``work`` to its end, whatever cancellations arrive meanwhile; then re-raise the last of them.

    A task of its own, so that the work's own timeouts cancel only it. (Driving the work in the caller's task,
    a _Waiter for each future it waits on, costs more CPU per request under concurrency: asyncio's C task steps
    a task of its own on real futures faster; measured in benchmarks/README.md, "Reading the results".)
    """
    return _wait_for(asyncio.get_running_loop().create_task(work))


@types.coroutine
def _resume(work: Coroutine[Any, Any, T], waiting_on: Any) -> Generator[Any, Any, T]:
    """``work``, already run up to its first suspension on ``waiting_on``, driven on from there by a task."""
    while True:
        try:
            sent = yield waiting_on
        except GeneratorExit:
            work.close()
            raise
        except BaseException as exc:  # the task hands what woke it in: the future's error, or a cancellation
            try:
                waiting_on = work.throw(exc)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
        else:
            try:
                waiting_on = work.send(sent)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]


async def _returning(value: T) -> T:
    return value


async def _resumed(work: Coroutine[Any, Any, T], waiting_on: Any) -> T:
    # A coroutine for the task: Python 3.12 and newer take no generator-based coroutine as a task's.
    return await _resume(work, waiting_on)


def shielded_starting_now(work: Coroutine[Any, Any, T]) -> Awaitable[T]:
    """``shielded(work)``, whose first step runs at once, in the caller's task, instead of a turn of the loop later.

    For a session's close after its response was sent: with the connection's rollback on the wire a turn
    sooner, the connection is back in the pool a turn sooner, where the next request on the same keep-alive
    connection may already be waiting for one (benchmarks/README.md). The first step runs to the work's first
    suspension, which no cancellation can interrupt (the caller's task is running it, not awaiting); the rest
    runs in a task of its own, as ``shielded`` runs all of it. Only for work that starts no timeout of its own
    before that first suspension (``asyncio.timeout`` would take the caller's task for the one to cancel):
    a close, which waits for no pool connection, not a commit, which may.
    """
    context = contextvars.copy_context()  # what the first step sets stays out of the caller's context
    try:
        waiting_on = context.run(work.send, None)
    except StopIteration as stop:
        return _returning(stop.value)
    task = asyncio.get_running_loop().create_task(_resumed(work, waiting_on), context=context)
    return _wait_for(task)
