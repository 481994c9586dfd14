"""Raw ASGI drivers for the protocol edges that an HTTP client cannot reach (lifespan, WebSocket)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from asgi_db_session._types import ASGIApp, Message


class Channel:
    """Feeds ``incoming`` messages to the app one by one, then blocks; records what the app sends."""

    def __init__(self, incoming: Iterable[Message] = ()) -> None:
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        for message in incoming:
            self.queue.put_nowait(message)
        self.sent: list[Message] = []
        self.sent_event = asyncio.Event()

    async def receive(self) -> Message:
        return await self.queue.get()

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        self.sent_event.set()

    def types(self) -> list[str]:
        return [message["type"] for message in self.sent]


async def run_lifespan(app: ASGIApp, *, shutdown: bool = True) -> Channel:
    """Run the lifespan protocol: startup, then (if ``shutdown``) shutdown; return what the app sent."""
    channel = Channel([{"type": "lifespan.startup"}])
    if shutdown:
        channel.queue.put_nowait({"type": "lifespan.shutdown"})
    scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}

    async def call() -> None:
        await app(scope, channel.receive, channel.send)

    task = asyncio.create_task(call())
    if shutdown:
        await asyncio.wait_for(task, timeout=10)
    else:
        await asyncio.wait_for(channel.sent_event.wait(), timeout=10)  # the startup answer
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return channel


def http_scope(path: str = "/", method: str = "GET") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }


def websocket_scope(path: str = "/ws") -> dict[str, Any]:
    return {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "subprotocols": [],
        "state": {},
    }


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a database that hangs); yields
    its port."""
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
