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

T = TypeVar("T")


async def run_to_completion(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` in its own task and wait until it is done, even if this task is cancelled meanwhile.

    A cancellation that arrives while waiting is re-raised once ``coro`` has finished, so the caller never
    returns (and the server never moves on) before the cleanup is over. The anyio shield keeps an outer
    cancel scope from re-delivering its cancellation on every turn of the loop below.
    """
    task = asyncio.ensure_future(coro)
    cancelled: asyncio.CancelledError | None = None
    with anyio.CancelScope(shield=True):
        while True:
            try:
                result = await asyncio.shield(task)
            except asyncio.CancelledError as exc:
                if task.done():
                    raise
                cancelled = exc
            else:
                break
    if cancelled is not None:
        raise cancelled
    return result


async def _commit_then_close(session: AsyncSession, commit: bool) -> None:
    try:
        if commit and session.in_transaction():
            await session.commit()
    finally:
        # close() rolls back whatever is still open and returns the connection to the pool.
        await session.close()


async def finish(session: AsyncSession, *, commit: bool) -> None:
    """Commit (when ``commit`` and a transaction is open), then close, shielded from cancellation."""
    await run_to_completion(_commit_then_close(session, commit))


async def commit(session: AsyncSession) -> None:
    """Commit, shielded from cancellation: a commit is never left half-sent on the connection."""
    await run_to_completion(session.commit())
