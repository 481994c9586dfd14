"""What became of a COMMIT whose answer was lost (PostgreSQL through asyncpg).

When the connection dies after COMMIT was sent and before its answer arrived, the server may have committed
(the answer died on the way) or not (the COMMIT never got there): the error alone cannot tell. PostgreSQL
can, by the transaction's id: ``pg_xact_status()`` on another connection says ``committed``, ``aborted`` or
``in progress``. So the package's sessions read the id just before COMMIT, when the transaction wrote (a
transaction that wrote nothing has no id, and nothing to lose), and, if the COMMIT's answer is lost, ask.

An id means that transaction only on the server that gave it out, and only until that server starts again: a
crash or a promoted standby hands out again the ids whose records never reached its disk, which are those of
the transactions under way at the crash (a synchronous standby included: what it receives is what was flushed,
and a transaction's records are flushed at its COMMIT). Asked there, ``pg_xact_status()`` answers for another
transaction. So the id is read with the server's start time (``pg_postmaster_start_time()``), and a server that
started at another time is not asked: the outcome is then unknown.

The question goes over a connection of its own (a NullPool engine to the same URL, through the same PgBouncer
if there is one): the pool may be full, or full of connections that died with this one. It is bounded in time
(``DATABASE_COMMIT_OUTCOME_TIMEOUT``). A backend that still runs the transaction (``in progress``) has either
not finished the COMMIT yet or never received it and waits for a client that is gone (behind a network that
dropped the connection silently it could wait for hours): after a short grace the backend that holds the id
is ended, which settles the outcome either way; nobody else can be using it, since its client is this
connection, which is dead.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool
from sqlalchemy.util import await_only

logger = logging.getLogger("asgi_db_session")

Outcome = Literal["committed", "aborted"]

SERVER_RESTARTED = (
    "the server asked is not the one that ran the transaction: that one started at {then}, this one at {now} "
    "(in seconds since 1970; a restart or a failover since), and it may have given the same id to another "
    "transaction"
)

# How long a backend may stay "in progress" with the transaction before it is ended (see the module docstring).
IN_PROGRESS_GRACE_SECONDS = 0.25
# Pauses between questions while the backend finishes, and between connection attempts while the server is away.
POLL_SECONDS = 0.02
RECONNECT_SECONDS = 0.2

# pg_current_xact_id_if_assigned() and pg_xact_status() came with PostgreSQL 13; the txid_ forms before. The id
# and the server's start in one text ("<id> <start>"), NULL when the transaction has no id: one value to fetch.
_STARTED = "extract(epoch FROM pg_postmaster_start_time())::text"
_READ_ID = f"SELECT pg_current_xact_id_if_assigned()::text || ' ' || {_STARTED}"
_READ_ID_BEFORE_13 = f"SELECT txid_current_if_assigned()::text || ' ' || {_STARTED}"
_READ_STARTED = text(f"SELECT {_STARTED}")
_STATUS = text("SELECT pg_xact_status(CAST(:xid AS xid8))")
_STATUS_BEFORE_13 = text("SELECT txid_status(CAST(:xid AS bigint))")
# backend_xid is the 32-bit form of the id (without the epoch): unique among running transactions.
_END_BACKEND = text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_xid = CAST(:xid32 AS xid)")


def answer_may_be_lost(error: sa_exc.DBAPIError) -> bool:
    """Whether ``error``, raised by COMMIT, leaves its outcome open: the connection ended while COMMIT was under
    way (class 08, a socket error), rather than before it was sent or with an answer from the server.

    Any error the server sent in answer to COMMIT says it did not commit: a refusal (a deferred constraint, a
    serialization failure), or the FATAL of a backend terminated or shut down (57P01...), which PostgreSQL
    sends only before a commit or instead of its own work, never between a commit and its CommandComplete (a
    commit waiting for a synchronous standby that gets terminated sends no error at all: the connection just
    closes, which stays open here)."""
    orig = error.orig
    cause = getattr(orig, "__cause__", None)
    if isinstance(cause, asyncpg.InterfaceError | asyncpg.InternalClientError):
        # asyncpg refused to send it: a connection it knew closed ("connection is closed"), a stuck protocol.
        return False
    for candidate in (orig, cause):
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str):
            return state.startswith("08")
    return True


@dataclass(frozen=True, slots=True)
class LostCommit:
    """A COMMIT whose answer was lost: the transaction's id, the start of the server that gave it out, and the
    reader that can learn its outcome."""

    reader: CommitOutcomeReader
    # Both None: not read, as DATABASE_COMMIT_OUTCOME_CHECK is off.
    transaction_id: str | None
    server_started: str | None

    @classmethod
    def of(cls, reader: CommitOutcomeReader, transaction: str) -> LostCommit:
        """From what ``CommitOutcomeReader.transaction()`` read."""
        transaction_id, _, server_started = transaction.partition(" ")
        return cls(reader, transaction_id, server_started)


class CommitOutcomeReader:
    """Reads a transaction's id before COMMIT, and learns its outcome after a lost answer; one per engine."""

    def __init__(self, url: URL, connect_args: dict[str, Any], *, check: bool, timeout: float) -> None:
        self._url = url
        self._connect_args = connect_args
        self.check = check  # False: no id read, no question asked; a lost answer is reported as unknown
        self.timeout = timeout
        self._side_engine: AsyncEngine | None = None

    @staticmethod
    def transaction(session: Session) -> str | None:
        """``session``'s transaction as ``"<id> <server start>"``, None if it has no id (it wrote nothing) or
        is not on asyncpg; in the session's greenlet. Raises what a statement would if it cannot be read.

        Asked of asyncpg directly: through SQLAlchemy's execution the question would cost a good part of what the
        whole request costs.
        """
        connection = session.connection()
        dialect = connection.dialect
        if dialect.driver != "asyncpg":  # a session bound elsewhere (session_scope(session_options={"bind": ...}))
            return None
        version = dialect.server_version_info
        query = _READ_ID_BEFORE_13 if version is not None and version < (13,) else _READ_ID
        driver_connection: Any = connection.connection.driver_connection
        try:
            transaction: str | None = await_only(driver_connection.fetchval(query))
        except Exception:
            logger.debug("reading the transaction's id before COMMIT failed; reading it again", exc_info=True)
            # A broken connection, or an error that leaves the transaction aborted (the server refused the query,
            # asyncpg's command timeout cancelled it): COMMIT would then end the transaction as ROLLBACK and
            # report success. Through SQLAlchemy, the question fails the commit as any statement's error would
            # (and a broken connection is invalidated); it succeeds only if the transaction is still whole.
            transaction = connection.exec_driver_sql(query).scalar()
        return transaction

    async def outcome(self, xid: str, server_started: str) -> tuple[Outcome | None, str]:
        """What the server says became of transaction ``xid``, or None with the reason it could not be learned.

        ``server_started``: the start of the server that gave out the id, as read with it; a server that
        started at another time is not asked."""
        failures: list[str] = []
        try:
            async with asyncio.timeout(self.timeout):
                return await self._ask(xid, server_started, failures)
        except TimeoutError:
            last = f": {failures[-1]}" if failures else ""
            return None, f"no answer within {self.timeout:g} s{last}"
        except Exception as exc:  # nothing expected; the outcome stays unknown, which the caller reports
            return None, f"{type(exc).__name__}: {exc}"

    async def _ask(self, xid: str, server_started: str, failures: list[str]) -> tuple[Outcome | None, str]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        ended_backend = False
        while True:
            try:
                async with self._engine().connect() as connection:
                    now_started = (await connection.execute(_READ_STARTED)).scalar()
                    if now_started != server_started:
                        return None, SERVER_RESTARTED.format(then=server_started, now=now_started)
                    version = connection.dialect.server_version_info
                    status_query = _STATUS_BEFORE_13 if version is not None and version < (13,) else _STATUS
                    while True:
                        status = (await connection.execute(status_query, {"xid": int(xid)})).scalar()
                        if status == "committed" or status == "aborted":
                            return status, status
                        if status is None:
                            # Too old for the server to remember, which a transaction of a moment ago is not: the
                            # server is another one (a failover to a replica that had not received it, say).
                            return None, "the server does not know the transaction"
                        if not ended_backend and loop.time() - started >= IN_PROGRESS_GRACE_SECONDS:
                            ended_backend = True
                            await connection.execute(_END_BACKEND, {"xid32": int(xid) % 2**32})
                        await asyncio.sleep(POLL_SECONDS)
            except sa_exc.DBAPIError as exc:
                if not answer_may_be_lost(exc):
                    # The server refused the question itself (an id "in the future": another server).
                    return None, f"{type(exc.orig).__name__}: {str(exc.orig).splitlines()[0]}"
                failures.append(f"{type(exc.orig).__name__}: {str(exc.orig).splitlines()[0]}")
            except OSError as exc:
                # Refused, reset, or a connect timeout: the server may be on its way back (a restart), when
                # the answer is still there to read (the transaction status survives a restart).
                failures.append(f"{type(exc).__name__}: {exc}")
            logger.debug("asking the outcome of transaction %s failed (%s); asking again", xid, failures[-1])
            await asyncio.sleep(RECONNECT_SECONDS)

    def _engine(self) -> AsyncEngine:
        engine = self._side_engine
        if engine is None:
            # AUTOCOMMIT: the questions need no transaction, and leave no COMMIT of their own to be lost.
            engine = self._side_engine = create_async_engine(
                self._url, poolclass=NullPool, connect_args=self._connect_args, isolation_level="AUTOCOMMIT"
            )
        return engine

    async def close(self) -> None:
        """Close the side engine, if one was made."""
        if self._side_engine is not None:
            await self._side_engine.dispose()
