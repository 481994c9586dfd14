"""A ready-made health-check endpoint: 200 when the database answers within a bound, 503 otherwise."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .database import get_database
from .exceptions import HEALTH_TIMEOUT, DatabaseUnavailableError

__all__ = [
    "health_endpoint",
]


_logger = logging.getLogger("asgi_db_session")


def health_endpoint(name: str = "default", *, timeout: float = 2.0) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint that runs ``SELECT 1`` on database ``name``: ``Route("/healthz", health_endpoint())``.

    Answers ``200 {"database": "ok"}``, or ``503 {"database": "unavailable"}`` with ``Retry-After`` when the
    database does not answer within ``timeout`` seconds. The reason goes to the ``asgi_db_session`` logger
    at WARNING (password masked), not into the response, which a load balancer or anyone on the internet may
    read. The check takes its own connection, outside any request session, so that it works for routes the
    middleware does not cover.
    """
    if timeout <= 0:
        raise ValueError(HEALTH_TIMEOUT.format(timeout=timeout))

    async def health(request: Request) -> Response:
        try:
            await get_database(name).check(timeout=timeout)
        except DatabaseUnavailableError as exc:
            # One line per failed check, though the driver's text may hold a newline.
            _logger.warning("Health check of database %r failed: %s", name, str(exc).replace("\n", " "))
            return JSONResponse({"database": "unavailable"}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"database": "ok"})

    return health
