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
from .exceptions import POLICY_CANNOT_MARK, POLICY_WITHOUT_SESSION

__all__ = [
    "session_policy",
]


_Endpoint = TypeVar("_Endpoint", bound=Callable[..., Any])

_ATTRIBUTE = "__asgi_db_session_policy__"


@dataclass(frozen=True, slots=True)
class _SessionPolicy:
    """An endpoint's own session policy; see ``session_policy``."""

    session: bool = True
    read_only: bool = False
    commit_on_success: bool | None = None
    endpoint: str = "?"


def session_policy(
    *, session: bool = True, read_only: bool = False, commit_on_success: bool | None = None
) -> Callable[[_Endpoint], _Endpoint]:
    """Mark an endpoint (function or HTTPEndpoint class) with its own session policy, for every database.

    - ``session=False``: the endpoint needs no database; ``current_session()`` in it raises NoSessionError
      (a ``session_scope()`` it opens on purpose still works).
    - ``read_only=True``: its session runs a read-only transaction (enforced by PostgreSQL; other databases
      do not enforce it), on a replica when the database has replicas.
    - ``commit_on_success=True`` or ``False``: overrides the middleware's ``commit_on_success``.

    Works above or below ``@app.get(...)``: it marks the function itself and returns it unchanged.
    """
    if not session and (read_only or commit_on_success is not None):
        raise ValueError(POLICY_WITHOUT_SESSION)

    def mark(endpoint: _Endpoint) -> _Endpoint:
        name = getattr(endpoint, "__qualname__", None) or repr(endpoint)
        policy = _SessionPolicy(session, read_only, commit_on_success, name)
        try:
            setattr(endpoint, _ATTRIBUTE, policy)
        except AttributeError:
            raise TypeError(POLICY_CANNOT_MARK.format(name=name)) from None
        return endpoint

    return mark


def _policy_of(scope: Scope) -> _SessionPolicy | None:
    """The policy of the endpoint the router chose for this request, if it has one."""
    endpoint = scope.get("endpoint")
    return None if endpoint is None else getattr(endpoint, _ATTRIBUTE, None)
