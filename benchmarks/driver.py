"""An in-process ASGI client: the lifespan protocol, and batches of HTTP requests at a given concurrency.

It plays the server's part the way uvicorn does for HTTP/1.1 (ASGI spec 2.3): ``receive()`` gives the empty
request body once, then blocks until the response is complete and answers ``http.disconnect``, so a
StreamingResponse's disconnect listener behaves as under a real server.

``keep_alive=True`` also moves on as uvicorn does on a keep-alive connection: the worker (the connection)
starts its next request as soon as the response is complete, while the finished request's ASGI call may
still be running (a middleware cleaning up after the response, a background task). Without it the worker
waits for the call to return, which hides what a request does after its response: the next request never
competes with it, for the pool or for the loop.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp

from .common import EXPECTED_BODY, METHODS

Message = MutableMapping[str, Any]

ASGI = {"version": "3.0", "spec_version": "2.3"}
_REQUEST_HEADERS = [(b"host", b"bench"), (b"user-agent", b"benchmarks"), (b"accept", b"*/*")]


class LifespanError(RuntimeError):
    pass


class Lifespan:
    """Runs an app's lifespan: ``await startup()`` before the requests, ``await shutdown()`` after them."""

    def __init__(self, app: ASGIApp, timeout: float = 30.0) -> None:
        self.app = app
        self.timeout = timeout
        self.state: dict[str, Any] = {}
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _receive(self) -> Message:
        return await self._to_app.get()

    async def _send(self, message: Message) -> None:
        await self._from_app.put(message)

    async def _reply(self, expected: str) -> None:
        assert self._task is not None
        getter = asyncio.ensure_future(self._from_app.get())
        done, _ = await asyncio.wait({getter, self._task}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            if self._task in done:
                self._task.result()  # raises what the app raised
                raise LifespanError(f"the app returned from lifespan before sending {expected}")
            raise LifespanError(f"no {expected} within {self.timeout}s")
        message = getter.result()
        if message["type"] != expected:
            raise LifespanError(f"{message['type']}: {message.get('message', '')}")

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}

        async def run() -> None:
            await self.app(scope, self._receive, self._send)

        self._task = asyncio.create_task(run())
        await self._to_app.put({"type": "lifespan.startup"})
        await self._reply("lifespan.startup.complete")

    async def shutdown(self) -> None:
        await self._to_app.put({"type": "lifespan.shutdown"})
        try:
            await self._reply("lifespan.shutdown.complete")
        finally:
            assert self._task is not None
            await asyncio.wait_for(self._task, self.timeout)


class Exchange:
    """One request's receive/send pair; records the status and the body."""

    __slots__ = ("_asked", "_complete", "_done", "chunks", "responded", "status")

    def __init__(self, responded: asyncio.Future[None] | None = None) -> None:
        self._asked = False
        self._done = False
        self._complete: asyncio.Event | None = None
        self.status = 0
        self.chunks: list[bytes] = []
        # Set once the response is complete (keep-alive mode): the connection may send its next request.
        self.responded = responded

    async def receive(self) -> Message:
        if not self._asked:
            self._asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if not self._done:
            # Like a server: nothing more to read until the response is over (or the client leaves).
            if self._complete is None:
                self._complete = asyncio.Event()
            await self._complete.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        message_type = message["type"]
        if message_type == "http.response.body":
            body = message.get("body", b"")
            if body:
                self.chunks.append(body)
            if not message.get("more_body", False):
                self._done = True
                if self._complete is not None:
                    self._complete.set()
                if self.responded is not None and not self.responded.done():
                    self.responded.set_result(None)
        elif message_type == "http.response.start":
            self.status = message["status"]

    def problem(self, expected: bytes) -> str | None:
        """What is wrong with the response, or None."""
        if not self._done:
            return f"response not completed (status {self.status})"
        if self.status != 200:
            return f"status {self.status}: {b''.join(self.chunks)[:200]!r}"
        body = b"".join(self.chunks)
        if body != expected:
            return f"body {body[:200]!r}, expected {expected!r}"
        return None


def request_scope(path: str, state: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": ASGI,
        "http_version": "1.1",
        "method": METHODS.get(path, "GET"),
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": _REQUEST_HEADERS,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        # Servers give each request a shallow copy of the lifespan state.
        "state": state.copy(),
    }


async def one_request(app: ASGIApp, path: str, state: dict[str, Any] | None = None) -> Exchange:
    exchange = Exchange()
    await app(request_scope(path, state or {}), exchange.receive, exchange.send)
    return exchange


@dataclass
class Batch:
    requests: int
    seconds: float
    errors: int
    first_error: str | None
    cpu_seconds: float | None = None
    """CPU time the serving process spent on the batch (user + system), when known."""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us(self) -> float | None:
        """CPU microseconds per request."""
        return None if self.cpu_seconds is None or not self.requests else self.cpu_seconds / self.requests * 1e6


async def run_batch(
    app: ASGIApp,
    path: str,
    requests: int,
    concurrency: int,
    state: dict[str, Any] | None = None,
    limit: float = 120.0,
    task_per_request: bool = True,
    keep_alive: bool = False,
) -> Batch:
    """``requests`` requests to ``path`` from ``concurrency`` workers; every response is checked.

    A batch still running after ``limit`` seconds is cut short and counted as failed. Each request runs in
    a new task, as under a server, unless ``task_per_request`` is false. ``keep_alive``: a worker sends its
    next request once the response is complete, not once the ASGI call has returned (see the module's doc);
    the batch ends when every call has returned.
    """
    expected = EXPECTED_BODY[path]
    lifespan_state = state or {}
    remaining = requests
    errors = 0
    first_error: str | None = None

    loop = asyncio.get_running_loop()
    create_task = loop.create_task
    # Calls whose response is complete and that have not returned yet (keep-alive mode).
    finishing: set[asyncio.Task[None]] = set()

    async def call(exchange: Exchange) -> None:
        await app(request_scope(path, lifespan_state), exchange.receive, exchange.send)

    def note(problem: str | None) -> None:
        nonlocal errors, first_error
        if problem is not None:
            errors += 1
            if first_error is None:
                first_error = problem

    def returned(exchange: Exchange, task: asyncio.Task[None]) -> None:
        finishing.discard(task)
        if exchange.responded is not None and not exchange.responded.done():
            exchange.responded.set_result(None)  # it returned without completing its response
        if task.cancelled():
            note("the request's task was cancelled")
        elif (exc := task.exception()) is not None:
            note(f"{type(exc).__name__}: {exc}")
        else:
            note(exchange.problem(expected))

    async def keep_alive_worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            exchange = Exchange(loop.create_future())
            task = create_task(call(exchange))
            finishing.add(task)
            task.add_done_callback(functools.partial(returned, exchange))
            assert exchange.responded is not None
            await exchange.responded

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            exchange = Exchange()
            try:
                if task_per_request:
                    # What servers do: uvicorn runs every request cycle in a task of its own.
                    await create_task(call(exchange))
                else:
                    await call(exchange)
            except Exception as exc:
                problem: str | None = f"{type(exc).__name__}: {exc}"
            else:
                problem = exchange.problem(expected)
            note(problem)

    workers = min(concurrency, requests)
    cpu_start = time.process_time()
    start = time.perf_counter()
    try:
        async with asyncio.timeout(limit):
            await asyncio.gather(*((keep_alive_worker if keep_alive else worker)() for _ in range(workers)))
            while finishing:
                await asyncio.wait(set(finishing))
    except TimeoutError:
        errors += max(remaining, 1)
        first_error = first_error or f"batch did not finish within {limit}s"
    seconds = time.perf_counter() - start
    return Batch(requests, seconds, errors, first_error, time.process_time() - cpu_start)
