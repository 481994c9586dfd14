"""ASGI type aliases, so the package does not import Starlette's types just to annotate."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeAlias

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]
# What the middleware accepts to wrap: any ASGI app, whatever types its framework gives the scope and messages.
# Litestar, Quart and django-stubs annotate them as TypedDicts, which a mapping of str to Any is not, so their
# apps would not type-check as ASGIApp.
AnyASGIApp: TypeAlias = Callable[..., Awaitable[None]]
