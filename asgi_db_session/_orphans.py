"""Ending the server backend of a connection thrown away mid-statement by a cancellation (asyncpg only).

Under an anyio cancel scope the cancellation interrupts the driver's graceful close too, and the cancel
request it would have sent is lost: the statement runs on in the server, holding its locks, while the pool
opens a new connection in its place (before asyncpg 0.32 even the socket stayed open). A fresh task, outside
the cancelled scope, asks that same server to end the backend: the connection is thrown away already, so
ending it (not just its statement) also ends its transaction and locks.

Never a backend that waits for its synchronous standby (``wait_event = 'SyncRep'``): its COMMIT is written on
the primary already, and ending it there would leave the transaction committed on the primary and missing
from the standby, which a failover would then lose. Such a backend ends by itself once the standby confirms.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
from sqlalchemy import event, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

logger = logging.getLogger("asgi_db_session")

# One statement, so that the backend's wait is read just before it is ended (see the module's docstring).
_END_UNLESS_SYNC_REP = text(
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = :pid AND wait_event IS DISTINCT FROM 'SyncRep'"
)

# How long a connection invalidated by a cancellation gets to close by itself before its backend is ended.
ORPHAN_GRACE_SECONDS = 0.25


def server_ends_orphans(client_connection_check_interval: int | None) -> bool:
    """True when the server ends a cut-off statement's backend by itself: it checks that its client is there
    (client_connection_check_interval) and asyncpg (0.32+) closed the socket. Ending the backend from here as
    well would race the server, and asyncpg reports that as an unretrieved future error."""
    version = tuple(int(part) for part in asyncpg.__version__.split(".")[:2])
    return client_connection_check_interval is not None and version >= (0, 32)


class OrphanReaper:
    """Watches one engine's pool; ends the backend of each connection a cancellation made it throw away.

    It reaches the server on a NullPool engine of its own, to the engine's own URL (a replica's backend is
    ended on that replica): the pool is full of the app's connections, and a cancel must not wait for one.
    """

    def __init__(self, engine: AsyncEngine, url: URL, connect_args: dict[str, Any]) -> None:
        self._url = url
        self._connect_args = connect_args
        self._side_engine: AsyncEngine | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        event.listen(engine.sync_engine.pool, "invalidate", self._invalidated)

    def _invalidated(self, dbapi_connection: Any, record: Any, exception: BaseException | None) -> None:
        if not isinstance(exception, asyncio.CancelledError):
            return
        pid = dbapi_connection.driver_connection.get_server_pid()
        task = asyncio.get_running_loop().create_task(self._end_backend(pid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _end_backend(self, pid: int) -> None:
        # First let the driver's own close finish where it was not cut short (a plain task.cancel()): ending
        # the backend under it would race its cancel request and its goodbye to the server.
        await asyncio.sleep(ORPHAN_GRACE_SECONDS)
        try:
            if self._side_engine is None:
                # AUTOCOMMIT: no transaction around the one statement, so this connection is never seen idle in
                # one (by a check for leftover transactions, say), and it closes without a ROLLBACK.
                self._side_engine = create_async_engine(
                    self._url, poolclass=NullPool, connect_args=self._connect_args, isolation_level="AUTOCOMMIT"
                )
            async with self._side_engine.connect() as connection:
                await connection.execute(_END_UNLESS_SYNC_REP, {"pid": pid})
        except Exception:  # the server may be gone too; the statement then is as well
            logger.debug("could not end backend %d of a cancelled statement", pid, exc_info=True)

    async def close(self) -> None:
        """Wait for the backends being ended, then close the side engine."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._side_engine is not None:
            await self._side_engine.dispose()
