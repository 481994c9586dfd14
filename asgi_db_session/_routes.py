"""The route a request was sent to, per framework: the session_policy its endpoint carries, and its template.

Each framework keeps this in its own place, read here duck-typed, importing none of them:

- Starlette and FastAPI put the endpoint and the route into the ASGI scope: ``scope["endpoint"]``,
  ``scope["route"].path``.
- Litestar puts its route handler and the path template into the scope: ``scope["route_handler"]`` (the
  function is its ``fn``), ``scope["path_template"]``.
- Quart keeps the matched rule on its request, in a context of its own (``quart.request.url_rule``); it is
  read from there while the request runs, when Quart is loaded.
- Django keeps it on its request only (``request.resolver_match``): the path is resolved again, by Django's
  own ``resolve()``, when a warning needs the route's name.
- BlackSheep keeps only the matched route's values on its request, and a raw ASGI app has no router: no
  template, and the endpoint is known only when it is called (see route_policy.session_policy).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from ._types import Scope
from .exceptions import STATEMENT_TIMEOUT_INVALID

__all__ = [
    "POLICY_ATTRIBUTE",
    "SessionPolicy",
    "policy_of",
    "route_template",
    "statement_timeout_ms",
]


POLICY_ATTRIBUTE = "__asgi_db_session_policy__"
# Where the route's template is kept once read from a framework's own context, for the end of the request.
_ROUTE_KEY = "asgi_db_session.route"


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """An endpoint's own session policy; see ``session_policy``."""

    session: bool = True
    read_only: bool = False
    commit_on_success: bool | None = None
    endpoint: str = "?"
    # Milliseconds (statement_timeout_ms), as PostgreSQL's SET LOCAL takes them; None: no bound of its own.
    statement_timeout: int | None = field(default=None, kw_only=True)
    replay_conflicts: bool | None = field(default=None, kw_only=True)


# PostgreSQL's statement_timeout is an int of milliseconds.
_MAX_STATEMENT_TIMEOUT_MS = 2**31 - 1


def statement_timeout_ms(value: float | timedelta | None) -> int | None:
    """``statement_timeout=`` (seconds, or a timedelta) in whole milliseconds; ValueError or TypeError if invalid.

    Rounded to the nearest millisecond, but never to 0, which PostgreSQL takes as "no bound".
    """
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(STATEMENT_TIMEOUT_INVALID.format(value=value))
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(STATEMENT_TIMEOUT_INVALID.format(value=value))
    milliseconds = max(1, round(seconds * 1000))
    if milliseconds > _MAX_STATEMENT_TIMEOUT_MS:
        raise ValueError(STATEMENT_TIMEOUT_INVALID.format(value=value))
    return milliseconds


def policy_of(scope: Scope) -> SessionPolicy | None:
    """The policy of the endpoint the router chose for this request, where the framework lets it be found."""
    endpoint = scope.get("endpoint")
    if endpoint is not None:
        return getattr(endpoint, POLICY_ATTRIBUTE, None)
    handler = scope.get("route_handler")
    if handler is not None:
        # Marked above @get(...) the handler object carries it; below, the function it wraps.
        return getattr(handler, POLICY_ATTRIBUTE, None) or getattr(getattr(handler, "fn", None), POLICY_ATTRIBUTE, None)
    return _from_quart(scope)


def _from_quart(scope: Scope) -> SessionPolicy | None:
    quart = sys.modules.get("quart")
    if quart is None:
        return None
    if quart.has_request_context():
        rule = quart.request.url_rule
    elif quart.has_websocket_context():
        rule = quart.websocket.url_rule
    else:
        return None
    if rule is None:  # no route matched: a 404 or 405 on its way
        return None
    scope[_ROUTE_KEY] = rule.rule
    return getattr(quart.current_app.view_functions.get(rule.endpoint), POLICY_ATTRIBUTE, None)


def route_template(scope: Scope) -> str:
    """The route's path template where the framework tells it (``/notes/{id}``), else the request's path."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    template = scope.get("path_template") or scope.get(_ROUTE_KEY) or _from_django(scope)
    return template if isinstance(template, str) else str(scope.get("path", "?"))


def _from_django(scope: Scope) -> Any:
    urls = sys.modules.get("django.urls")
    if urls is None:
        return None
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    try:
        return urls.resolve(path.removeprefix(root) if root else path).route
    except Exception:  # Resolver404, or an app that is not Django's: the warning falls back to the path
        return None
