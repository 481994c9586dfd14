"""A bare ASGI app (no framework): the routes of tests/frameworks/__init__.py, DBSessionMiddleware around it."""

from __future__ import annotations

from urllib.parse import parse_qs

from asgi_db_session import Database, DBSessionMiddleware
from asgi_db_session._types import ASGIApp, Receive, Scope, Send

from . import service

__all__ = ["make_app"]


async def respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return  # no lifespan of its own: it returns without answering, which the middleware copes with
    name = parse_qs(scope["query_string"].decode()).get("name", [""])[0]
    path = scope["path"]
    if path == "/nodb":
        await respond(send, 200, b"no database")
    elif path == "/write":
        await respond(send, 201, (await service.write(name)).encode())
    elif path == "/reject":
        await service.add_item(name)
        await respond(send, 400, b"rejected")
    elif path == "/crash":
        await service.add_item(name)
        raise RuntimeError("the endpoint failed after writing")
    elif path == "/duplicate":
        await service.add_item(name)
        await respond(send, 201, b"saved?")
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"start\n", "more_body": True})
        await service.add_item(name)
        await send({"type": "http.response.body", "body": f"{await service.count_items()}\n".encode()})
    elif path == "/sleep":
        await service.sleep_in_database()
        await respond(send, 200, b"slept")
    else:
        await respond(send, 404, b"not found")


def make_app(database: Database) -> ASGIApp:
    return DBSessionMiddleware(app, database=database, commit_on_success=True)
