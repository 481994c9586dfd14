"""run_in_transaction(): a unit of work run again when the server ended it for losing a race, and only then.

A serialization failure (SQLSTATE 40001) or a deadlock (40P01) means the server rolled the whole transaction
back: nothing of it was saved, and running it again from the start, in a new transaction, may succeed. Every
other error is raised at once: the work may be wrong, or (a connection lost at COMMIT) its outcome unknown.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession

from .error_responses import _DEADLOCK_DETECTED, _SERIALIZATION_FAILURE, _sqlstate
from .exceptions import RETRY_ATTEMPTS, RETRY_BACKOFF
from .scope import session_scope

__all__ = [
    "IsolationLevel",
    "run_in_transaction",
]

_T = TypeVar("_T")

IsolationLevel = Literal["SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED"]
"""The isolation levels ``run_in_transaction()`` can run its transactions at (the engine's default without)."""

_logger = logging.getLogger("asgi_db_session")


def _lost_race(error: BaseException) -> str | None:
    """The SQLSTATE of a serialization failure or deadlock that the server answered, else None.

    Only an answer from the server says the transaction was rolled back: an invalidated connection carries no
    such certainty, whatever it says, so it is never one.
    """
    if not isinstance(error, sa_exc.DBAPIError) or error.connection_invalidated:
        return None
    state = _sqlstate(error)
    return state if state in (_SERIALIZATION_FAILURE, _DEADLOCK_DETECTED) else None


def _check_bounds(call: str, attempts: int, backoff: float, max_backoff: float) -> None:
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ValueError(RETRY_ATTEMPTS.format(call=call, attempts=attempts))
    if not 0 <= backoff <= max_backoff:
        raise ValueError(RETRY_BACKOFF.format(call=call, backoff=backoff, max_backoff=max_backoff))


async def _pause(failed: int, backoff: float, max_backoff: float) -> None:
    """The wait after attempt ``failed`` (1 for the first): random, so that the transactions that clashed do not
    meet again in step, under a bound that doubles with each attempt up to ``max_backoff``."""
    await asyncio.sleep(random.uniform(0, min(max_backoff, backoff * 2 ** (failed - 1))))


async def run_in_transaction(
    work: Callable[[AsyncSession], Awaitable[_T]],
    name: str = "default",
    *,
    attempts: int = 3,
    isolation_level: IsolationLevel | None = None,
    backoff: float = 0.05,
    max_backoff: float = 1.0,
) -> _T:
    """Run ``await work(session)`` in a transaction of its own and commit it; run it again, in a new session,
    when the server ended the transaction with a serialization failure (40001) or a deadlock (40P01).

    Each attempt is a ``session_scope(name, commit=True)``: a new session, what ``current_session(name)``
    returns inside ``work``, committed when ``work`` returns, rolled back when it raises; ``on_commit``
    callbacks registered in an attempt that failed never run. ``isolation_level`` sets each attempt's
    transaction (``"SERIALIZABLE"`` for the strongest guarantee); None keeps the engine's.

    At most ``attempts`` runs in all. Before the n-th retry it waits a random time between 0 and
    ``min(max_backoff, backoff * 2 ** (n - 1))`` seconds, so that the transactions that clashed do not
    meet again in step. The last attempt's error is raised as it came (inside a request, the middleware
    answers it 503 with ``Retry-After``).

    Never retried: any other error, whether ``work`` raised it or the commit did. A connection lost during
    the COMMIT leaves the outcome unknown (the server may have committed), so it is raised, not run again.
    ``work`` must not commit by itself (the retry would redo what was saved) and should do nothing outside
    the database that it cannot do twice: register that with ``on_commit``.

    Inside a request the work has its own session and transaction, apart from the request's session: it does
    not see what the request wrote and has not committed, and its commit stands even if the request then fails.
    """
    _check_bounds("run_in_transaction", attempts, backoff, max_backoff)
    attempt = 1
    while True:
        try:
            async with session_scope(name, commit=True) as session:
                if isolation_level is not None:
                    await session.connection(execution_options={"isolation_level": isolation_level})
                return await work(session)
        except sa_exc.DBAPIError as error:
            state = _lost_race(error)
            if state is None or attempt >= attempts:
                raise
            _logger.info(
                "Running a unit of work again after SQLSTATE %s (attempt %d of %d failed)", state, attempt, attempts
            )
        await _pause(attempt, backoff, max_backoff)
        attempt += 1
