"""One SQLAlchemy AsyncSession per request for Starlette and FastAPI, reached from any layer.

``app.add_middleware(DBSessionMiddleware)`` (DATABASE_URL from the environment), then ``current_session()``
in a router, service or repository.
"""

from ._context import current_session
from ._session import GuardedSession
from .commit_hooks import on_commit
from .database import Database, get_database
from .error_responses import ErrorResponse, default_error_response
from .exceptions import (
    AsgiDbSessionError,
    CommitFailedError,
    CommitOutcomeUnknownError,
    ConcurrentSessionUseError,
    DatabaseUnavailableError,
    NoSessionError,
    UnknownDatabaseError,
    UsageError,
)
from .middleware import DBSessionMiddleware
from .query_insight import QueryStats, query_stats
from .replay import ReplayConflicts
from .retry import run_in_transaction
from .route_policy import session_policy
from .scope import session_scope
from .settings import DatabaseSettings

__version__ = "0.1.0"

__all__ = [
    "AsgiDbSessionError",
    "CommitFailedError",
    "CommitOutcomeUnknownError",
    "ConcurrentSessionUseError",
    "DBSessionMiddleware",
    "Database",
    "DatabaseSettings",
    "DatabaseUnavailableError",
    "ErrorResponse",
    "GuardedSession",
    "NoSessionError",
    "QueryStats",
    "ReplayConflicts",
    "UnknownDatabaseError",
    "UsageError",
    "__version__",
    "current_session",
    "default_error_response",
    "get_database",
    "on_commit",
    "query_stats",
    "run_in_transaction",
    "session_policy",
    "session_scope",
]
