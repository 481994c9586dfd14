"""A connection whose server has become read-only is thrown away, as a lost one is (asyncpg only).

A failover can leave the pool holding connections to a server that no longer takes writes: an old primary
fenced with ``default_transaction_read_only``, or a pooler or proxy address that now leads to a standby. Each
write there fails with SQLSTATE 25006 (read_only_sql_transaction), and the connection would fail the same way
for every request that checks it out. Told apart from a lost connection, it would also be answered 500.

So on a connection the package did not open read-only (a read-only route's transaction, a replica's), 25006
counts as a disconnect: SQLAlchemy invalidates the connection, and the rest of the pool with it (its other
connections lead to the same server), and the request is answered 503 with ``Retry-After``
(error_responses.py: an invalidated connection). New connections go where the URL leads now: with several
hosts and ``target_session_attrs=read-write``, to the new primary.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Dialect

__all__ = ["discard_read_only_servers"]

_READ_ONLY_SQL_TRANSACTION = "25006"


class _IsDisconnect:
    """A dialect's ``is_disconnect``, also true for 25006 on a connection that was not opened read-only.

    A wrapper of the dialect's method rather than a ``handle_error`` listener: any engine listener makes
    SQLAlchemy look for listeners at every statement, and this one is asked only when a statement failed.
    """

    __slots__ = ("_is_disconnect",)

    def __init__(self, is_disconnect: Any) -> None:
        self._is_disconnect = is_disconnect

    def __call__(self, error: Any, connection: Any, cursor: Any) -> bool:
        if self._is_disconnect(error, connection, cursor):
            return True
        # SQLAlchemy's asyncpg adapter copies the SQLSTATE onto its error (2.1); 2.0 passes asyncpg's own.
        state = getattr(error, "sqlstate", None) or getattr(error.__cause__, "sqlstate", None)
        # readonly: the dialect's flag for a transaction begun READ ONLY (postgresql_readonly), where 25006 is
        # the app's own write in a read-only transaction, not a server that changed under the pool.
        return state == _READ_ONLY_SQL_TRANSACTION and connection is not None and not connection.readonly


def discard_read_only_servers(dialect: Dialect) -> None:
    """Make ``dialect`` (an asyncpg engine's own) take 25006 for a lost connection; once per dialect."""
    if not isinstance(vars(dialect).get("is_disconnect"), _IsDisconnect):
        # setattr: mypy refuses an assignment to a method.
        setattr(dialect, "is_disconnect", _IsDisconnect(dialect.is_disconnect))  # noqa: B010
