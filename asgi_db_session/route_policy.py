"""session_policy(): what one endpoint's requests do with their session, overriding the middleware.

The marker is an attribute on the endpoint. The middleware runs before the router, so it cannot know the
endpoint when the request starts; the session is lazy, though, and is created in the endpoint or below it,
after the router has put the endpoint into the ASGI scope (``scope["endpoint"]``, Starlette and FastAPI
alike). The policy is read there, once, when the session is created.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ._types import Scope

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])

_ATTRIBUTE = "__asgi_db_session_policy__"


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """An endpoint's own session policy; see ``session_policy``."""

    session: bool = True
    read_only: bool = False
    commit_on_success: bool | None = None
    endpoint: str = "?"


def session_policy(
    *, session: bool = True, read_only: bool = False, commit_on_success: bool | None = None
) -> Callable[[Endpoint], Endpoint]:
    """Mark an endpoint (function or HTTPEndpoint class) with its own session policy, for every database.

    - ``session=False``: the endpoint needs no database; ``current_session()`` in it raises NoSessionError
      (a ``session_scope()`` it opens on purpose still works).
    - ``read_only=True``: its session runs a read-only transaction (enforced by PostgreSQL; other databases
      do not enforce it), on a replica when the database has replicas.
    - ``commit_on_success=True`` or ``False``: overrides the middleware's ``commit_on_success``.

    Works above or below ``@app.get(...)``: it marks the function itself and returns it unchanged.
    """
    if not session and (read_only or commit_on_success is not None):
        raise ValueError(
            "session_policy(session=False) takes no read_only= or commit_on_success=: there is no session."
        )

    def mark(endpoint: Endpoint) -> Endpoint:
        name = getattr(endpoint, "__qualname__", None) or repr(endpoint)
        policy = SessionPolicy(session, read_only, commit_on_success, name)
        try:
            setattr(endpoint, _ATTRIBUTE, policy)
        except AttributeError:
            raise TypeError(
                f"session_policy() cannot mark {name}: it takes no attributes (a bound method or a "
                "functools.partial?). Mark the function itself, or the HTTPEndpoint class."
            ) from None
        return endpoint

    return mark


def policy_of(scope: Scope) -> SessionPolicy | None:
    """The policy of the endpoint the router chose for this request, if it has one."""
    endpoint = scope.get("endpoint")
    return None if endpoint is None else getattr(endpoint, _ATTRIBUTE, None)
