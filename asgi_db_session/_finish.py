"""Commit and close a scope's session so that a cancellation cannot stop either halfway.

A plain ``await session.close()`` in ``finally`` is not enough: under ``task.cancel()`` the first await
inside it raises CancelledError, and under an anyio cancel scope the cancellation is delivered again at
every await, so the connection never gets back to the pool clean (sqlalchemy #8145, #12077).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import anyio
from sqlalchemy.ext.asyncio import AsyncSession

from .commit_hooks import has_due_hooks, hooks_deferred, run_due_hooks

T = TypeVar("T")


async def run_to_completion(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` in its own task and wait until it is done, even if this task is cancelled meanwhile.

    A cancellation that arrives while waiting is re-raised once ``coro`` has finished, so the caller never
    returns (and the server never moves on) before the cleanup is over. Once one has arrived, an anyio shield
    keeps an outer cancel scope from re-delivering its cancellation on every turn of the loop below; it is
    entered only then, as it costs more than the rest of this function on every request.
    """
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError as exc:
        if task.done():
            raise
        cancelled = exc
    with anyio.CancelScope(shield=True):
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError as exc:
                if task.done():
                    raise
                cancelled = exc
    task.result()  # the cleanup's own error, if it failed, comes first
    raise cancelled


async def _commit_then_close(session: AsyncSession, commit: bool) -> None:
    hooks_deferred.set(True)  # this runs in a task of its own: the setting ends with it
    try:
        if commit and session.in_transaction():
            await session.commit()
    finally:
        # close() rolls back whatever is still open and returns the connection to the pool.
        await session.close()


async def finish(session: AsyncSession, *, commit: bool) -> None:
    """Commit (when ``commit`` and a transaction is open), then close, shielded from cancellation."""
    if not session.in_transaction() and getattr(session, "_busy_task", None) is None:
        # Nothing begun, so no connection: close() only forgets the session's objects. It does no IO and so
        # never yields to the loop, leaving a cancellation nothing to interrupt: no task needed to shield it.
        await session.close()
        return
    await run_to_completion(_commit_then_close(session, commit))
    if commit and has_due_hooks(session):
        await run_due_hooks(session)


async def commit(session: AsyncSession) -> None:
    """Commit, shielded from cancellation: a commit is never left half-sent on the connection.

    Then the on_commit callbacks that the commit made due, outside the shield.
    """
    await run_to_completion(_commit_deferring_hooks(session))
    if has_due_hooks(session):
        await run_due_hooks(session)


async def _commit_deferring_hooks(session: AsyncSession) -> None:
    hooks_deferred.set(True)  # in run_to_completion's task of its own: the setting ends with it
    await session.commit()
