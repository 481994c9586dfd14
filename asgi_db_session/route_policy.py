"""session_policy(): what one endpoint's requests do with their session, overriding the middleware.

The middleware runs before the router, so it cannot know the endpoint when the request starts; the session is
lazy, though, and is created in the endpoint or below it. Two ways bring the endpoint's policy to it:

- where the framework names the endpoint in the ASGI scope, or in a context of its own (Starlette, FastAPI,
  Litestar, Quart; see _routes), the policy is read from there when the session is created, and so also
  applies to sessions made by the endpoint's dependencies, which these frameworks run after routing;
- everywhere, a marked function is wrapped: when it is called, the request takes its policy, if the
  session is not created yet (BlackSheep, Django, raw ASGI apps).
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar, cast

from ._context import follow_route_policy
from ._routes import POLICY_ATTRIBUTE, SessionPolicy, statement_timeout_ms
from .exceptions import POLICY_CANNOT_MARK, POLICY_WITHOUT_SESSION

__all__ = [
    "session_policy",
]


_Endpoint = TypeVar("_Endpoint", bound=Callable[..., Any])


def session_policy(
    *,
    session: bool = True,
    read_only: bool = False,
    commit_on_success: bool | None = None,
    statement_timeout: float | timedelta | None = None,
    replay_conflicts: bool | None = None,
) -> Callable[[_Endpoint], _Endpoint]:
    """Mark an endpoint (function or HTTPEndpoint class) with its own session policy, for every database.

    - ``session=False``: the endpoint needs no database; ``current_session()`` in it raises NoSessionError
      (a ``session_scope()`` it opens on purpose still works).
    - ``read_only=True``: its session runs a read-only transaction (enforced by PostgreSQL; other databases
      do not enforce it), on a replica when the database has replicas.
    - ``commit_on_success=True`` or ``False``: overrides the middleware's ``commit_on_success``.
    - ``statement_timeout=0.5`` (seconds, or a ``timedelta``): PostgreSQL cancels any statement of its
      sessions that runs longer, with ``SET LOCAL statement_timeout`` at the start of each transaction (so it
      holds behind PgBouncer in transaction mode, and ends with the transaction); the client gets a 503 with
      ``Retry-After``, nothing of the transaction is committed. Over ``DATABASE_STATEMENT_TIMEOUT`` in either
      direction; other databases than PostgreSQL ignore it (docs/how-to/timeouts.md).
    - ``replay_conflicts=True``: a request that lost a race (40001, 40P01) is run again by ``ReplayConflicts``,
      which then needs to wrap the app (``ReplayConflicts(app, only_marked=True)`` replays only such
      endpoints); ``False``: never run again, even under a ``ReplayConflicts`` that replays every request.

    On Starlette, FastAPI and Litestar it works above or below the route decorator; on other frameworks put it
    directly on the function (below the route decorator), as it returns a wrapper that applies the policy when
    the endpoint is called (docs/how-to/route-policy-frameworks.md).
    """
    milliseconds = statement_timeout_ms(statement_timeout)
    if not session and (read_only or commit_on_success is not None or milliseconds is not None):
        raise ValueError(POLICY_WITHOUT_SESSION)

    def mark(endpoint: _Endpoint) -> _Endpoint:
        name = getattr(endpoint, "__qualname__", None) or repr(endpoint)
        policy = SessionPolicy(
            session,
            read_only,
            commit_on_success,
            name,
            statement_timeout=milliseconds,
            replay_conflicts=replay_conflicts,
        )
        try:
            setattr(endpoint, POLICY_ATTRIBUTE, policy)
        except AttributeError:
            raise TypeError(POLICY_CANNOT_MARK.format(name=name)) from None
        return _following(endpoint, policy)

    return mark


def _following(endpoint: _Endpoint, policy: SessionPolicy) -> _Endpoint:
    """``endpoint``, wrapped to hand its policy to the request when called; a class or a generator unchanged.

    functools.wraps copies the marker (the function's __dict__) and keeps the signature that frameworks read
    for their dependencies and parameters (through __wrapped__); the wrapper is async when the endpoint is,
    as frameworks decide from that whether to await it or run it in a thread.
    """
    follow = follow_route_policy  # a closure variable, not a global: the wrapper runs in the endpoint's globals
    if inspect.iscoroutinefunction(endpoint):

        async def following_async(*args: Any, **kwargs: Any) -> Any:
            follow(policy)
            return await endpoint(*args, **kwargs)

        wrapper: Callable[..., Any] = following_async
    elif inspect.isfunction(endpoint) and not (
        inspect.isgeneratorfunction(endpoint) or inspect.isasyncgenfunction(endpoint)
    ):

        def following(*args: Any, **kwargs: Any) -> Any:
            follow(policy)
            return endpoint(*args, **kwargs)

        wrapper = following
    else:
        return endpoint
    # A string annotation (from __future__ import annotations) is resolved in the function's __globals__, and
    # some frameworks (FastAPI before it unwrapped, 0.110 among them) read those of the function they were
    # given: the wrapper takes the endpoint's module globals, so they find the endpoint's names.
    rebuilt = types.FunctionType(
        wrapper.__code__, endpoint.__globals__, wrapper.__name__, wrapper.__defaults__, wrapper.__closure__
    )
    return cast(_Endpoint, functools.wraps(endpoint)(rebuilt))
