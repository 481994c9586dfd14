"""Per-request query counts and database time: for the app, a Server-Timing header, and an N+1 warning.

Counting is off unless a middleware turns it on (``count_queries``, ``server_timing`` or
``warn_over_queries``): it adds two engine events to every statement. The events run in the task that
executes the statement, so a ContextVar per database finds the request (or block) to charge.
"""

from __future__ import annotations

import logging
import time
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, ExecutionContext

from ._routes import route_template
from ._types import Scope
from .exceptions import NOT_COUNTING, UsageError

__all__ = [
    "QueryStats",
    "query_stats",
]


_logger = logging.getLogger("asgi_db_session")

_vars: dict[str, ContextVar[QueryStats | None]] = {}
_STARTED = "_asgi_db_session_started"
# The names whose statements each engine counts already.
_counted: weakref.WeakKeyDictionary[Engine, set[str]] = weakref.WeakKeyDictionary()


@dataclass(slots=True)
class QueryStats:
    """What one request has run on one database so far: statements sent, and seconds spent waiting on them."""

    statements: int = 0
    seconds: float = 0.0

    def server_timing(self, name: str) -> bytes:
        """This as a Server-Timing entry: ``db;dur=1.23;desc="4 queries"`` (``db-<name>`` beyond the default)."""
        metric = "db" if name == "default" else f"db-{name}"
        plural = "query" if self.statements == 1 else "queries"
        return f'{metric};dur={self.seconds * 1000:.2f};desc="{self.statements} {plural}"'.encode("latin-1")


def _stats_var(name: str) -> ContextVar[QueryStats | None]:
    """The ContextVar holding the counts of the current request for database ``name``."""
    var = _vars.get(name)
    if var is None:
        var = _vars.setdefault(name, ContextVar(f"asgi_db_session.queries:{name}", default=None))
    return var


def query_stats(name: str = "default") -> QueryStats:
    """The statements and database time of the current request on database ``name``, up to now."""
    stats = _stats_var(name).get()
    if stats is None:
        raise UsageError(NOT_COUNTING.format(name=name))
    return stats


def _count_queries_on(engine: Engine, name: str) -> None:
    """Charge every statement that ``engine`` runs to the current request's QueryStats for ``name``.

    Once per engine and name, however many Databases of that name are built on the engine (a session-scoped
    engine and an app per test): a second set of listeners would count every statement twice. Two names on one
    engine each get their own; a statement is charged to every name whose request or block it runs in.
    """
    names = _counted.get(engine)
    if names is None:
        names = _counted[engine] = set()
    if name in names:
        return
    names.add(name)
    var = _stats_var(name)

    def before(conn: Connection, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        stats = var.get()
        if stats is not None:
            stats.statements += 1
            setattr(context, _STARTED, time.perf_counter())

    def after(conn: Connection, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        _charge(var, context)

    def failed(exception_context: Any) -> None:
        # A failed statement took time too (a lock wait that timed out, say).
        context: ExecutionContext | None = exception_context.execution_context
        if context is not None:
            _charge(var, context)

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    event.listen(engine, "handle_error", failed)


def _charge(var: ContextVar[QueryStats | None], context: Any) -> None:
    started = getattr(context, _STARTED, None)
    stats = var.get()
    if started is not None and stats is not None:
        stats.seconds += time.perf_counter() - started
        setattr(context, _STARTED, None)


def _warn_if_over(scope: Scope, name: str, stats: QueryStats, limit: int) -> None:
    """Log a warning naming the route when one request ran more than ``limit`` statements."""
    if stats.statements > limit:
        _logger.warning(
            "%s %s ran %d statements on database %r (more than %d): an N+1 query pattern? "
            "Load related rows together (selectinload, a join) instead of one query per row.",
            scope.get("method", "WEBSOCKET"),
            route_template(scope),
            stats.statements,
            name,
            limit,
        )
