"""A real TCP proxy between a client and a server (PostgreSQL on 127.0.0.1:5432 by default) that a test switches,
at run time, into one network fault at a time.

The faults, on every connection through the proxy (those open at the switch and those made afterwards):

- ``Fault.NONE``: bytes pass both ways (the start, and what ``heal()`` returns to);
- ``Fault.BLACKHOLE``: sockets stay open, every byte is read and thrown away, both ways, and neither side learns
  that the other closed (as with a network that silently drops every packet);
- ``Fault.HALF_OPEN``: client -> server passes, server -> client is thrown away (the client sends its query,
  the server runs it, the answer never comes back);
- ``Fault.STALL``: bytes are held, both ways, and delivered in order when the fault ends (a partition that heals:
  TCP retransmits, nothing is lost, everything is late);
- ``Fault.RESET``: every connection is reset (RST: closed with ``SO_LINGER`` 0) on both sides at the switch, and
  every new one as soon as it is accepted.

A close that a fault keeps from one side is delivered with the held bytes when the fault ends. Bytes a blackhole
threw away are lost for good: a connection that lost some is out of step and of no use afterwards, as it would
be after a real blackhole that outlived TCP's retransmissions.

Use it from a test's event loop (``async with TcpProxy() as proxy``) or from a thread of its own
(``with TcpProxy().in_thread() as proxy``), for a test whose own loop blocks or that has none; the server
process under test connects to ``proxy.port``. ``set_fault()``, ``heal()`` and ``kill()`` may be called from
any thread.

``on_client_data``, if given, sees each client -> server chunk just before the proxy writes it to the server
(so not the chunks a fault throws away; the held ones when they are delivered), with its connection, and
says what to do with it: ``Action.FORWARD``; ``Action.FORWARD_THEN_DROP`` (write it, let the server read it
and then an orderly end of stream, and reset the client's side at once: the client gets none of the server's
answer); ``Action.DROP`` (reset both sides without writing it). Chunks are TCP reads: a PostgreSQL frontend
message may be split between two chunks, or share one with others. It runs on the proxy's event loop and must
not block.

benchmarks/faults.py runs its fault report through this same proxy, imported from here (as benchmarks/soak.py
imports tests/system/server.py): the proxy imports nothing of the project's, so neither side imports the other
in a circle.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import itertools
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import TracebackType

__all__ = ["Action", "ClientDataHook", "Fault", "ProxyConnection", "TcpProxy"]


class Fault(enum.Enum):
    NONE = "none"
    BLACKHOLE = "blackhole"
    HALF_OPEN = "half-open"
    STALL = "stall"
    RESET = "reset"


class Action(enum.Enum):
    FORWARD = "forward"
    FORWARD_THEN_DROP = "forward-then-drop"
    DROP = "drop"


class _Way(enum.Enum):
    """What a fault does to one direction of a connection."""

    PASS = "pass"
    HOLD = "hold"
    DROP = "drop"


# (client -> server, server -> client) under each fault.
_WAYS = {
    Fault.NONE: (_Way.PASS, _Way.PASS),
    Fault.BLACKHOLE: (_Way.DROP, _Way.DROP),
    Fault.HALF_OPEN: (_Way.PASS, _Way.DROP),
    Fault.STALL: (_Way.HOLD, _Way.HOLD),
    Fault.RESET: (_Way.DROP, _Way.DROP),
}
_RST_LINGER = struct.pack("ii", 1, 0)


def _reset(transport: asyncio.BaseTransport | None) -> None:
    """Close with an RST rather than a FIN: the peer's next read or write fails with ECONNRESET."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # OSError: already shut down by the peer; abort() below closes it all the same.
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
    assert isinstance(transport, asyncio.WriteTransport)
    transport.abort()


class _Direction:
    """One direction of a proxied connection: the bytes and the close a fault holds back."""

    def __init__(self) -> None:
        self.held = bytearray()
        self.close_pending = False


class ProxyConnection:
    """One client connection through the proxy and its own connection to the server."""

    def __init__(self, proxy: TcpProxy, number: int, client: asyncio.Transport) -> None:
        self.proxy = proxy
        self.number = number  # 1, 2, ... in the order the proxy accepted them
        self._client: asyncio.Transport | None = client
        self._server: asyncio.Transport | None = None
        self._connecting = True  # until the connection to the server is made (or has failed)
        self._early: list[bytes] = []  # client bytes to forward once it is made
        self._close_when_connected = False  # the client went before it was
        self._to_server = _Direction()
        self._to_client = _Direction()
        self._muted = False  # FORWARD_THEN_DROP: nothing more reaches the client
        self.closed = False

    # --- what the two sides do ---------------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        way = _WAYS[self.proxy.fault][0]
        if way is _Way.PASS:
            self._write_server(data)
        elif way is _Way.HOLD:
            self._to_server.held += data

    def from_server(self, data: bytes) -> None:
        way = _WAYS[self.proxy.fault][1]
        if self._muted or way is _Way.DROP:
            return
        if way is _Way.HOLD:
            self._to_client.held += data
        elif self._client is not None:
            self._client.write(data)

    def client_closed(self) -> None:
        self._client = None
        if _WAYS[self.proxy.fault][0] is _Way.PASS:
            self._close_server()
        else:
            self._to_server.close_pending = True
        self._forget_if_done()

    def server_closed(self) -> None:
        self._server = None
        if _WAYS[self.proxy.fault][1] is _Way.PASS or self._muted:
            self._close_client()
        else:
            self._to_client.close_pending = True
        self._forget_if_done()

    def server_connected(self, transport: asyncio.Transport) -> None:
        if self.closed:
            _reset(transport)
            return
        self._server = transport
        self._connecting = False
        early, self._early = self._early, []
        for chunk in early:
            self._write_server(chunk)
        if self._close_when_connected and self._server is not None:
            self._server.close()

    # --- what the proxy does to it ------------------------------------------------------------------------------

    def kill(self) -> None:
        """Reset both sides now (RST), whatever the fault; nothing held is delivered."""
        self.closed = True
        client, server = self._client, self._server
        self._client = self._server = None
        _reset(client)
        _reset(server)
        self.proxy._connections.discard(self)

    def deliver(self) -> None:
        """After a switch of fault: what is held or pending in a direction that now passes goes through."""
        to_server, to_client = _WAYS[self.proxy.fault]
        if to_server is _Way.PASS:
            held, self._to_server.held = bytes(self._to_server.held), bytearray()
            if held:
                self._write_server(held)
            if self._to_server.close_pending and not self.closed:
                self._close_server()
        if to_client is _Way.PASS and not self.closed:
            held, self._to_client.held = bytes(self._to_client.held), bytearray()
            if held and self._client is not None and not self._muted:
                self._client.write(held)
            if self._to_client.close_pending:
                self._close_client()
        self._forget_if_done()

    # --- helpers ------------------------------------------------------------------------------------------------

    def _write_server(self, data: bytes) -> None:
        if self.closed:
            return
        if self._server is None:
            self._early.append(data)
            return
        action = Action.FORWARD if self.proxy.on_client_data is None else self.proxy.on_client_data(self, data)
        if action is Action.DROP:
            self.kill()
            return
        self._server.write(data)
        if action is Action.FORWARD_THEN_DROP:
            self._muted = True
            client, self._client = self._client, None
            _reset(client)
            # A FIN once the chunk is written: the server reads (and runs) it before it sees the end.
            self._server.close()

    def _close_server(self) -> None:
        if self._server is not None:
            self._server.close()
        elif self._connecting:
            self._close_when_connected = True

    def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _forget_if_done(self) -> None:
        if self._client is None and self._server is None and not self._connecting:
            self.closed = True
            self.proxy._connections.discard(self)


class _ClientSide(asyncio.Protocol):
    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.connection: ProxyConnection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.connection = self.proxy._accepted(transport)

    def data_received(self, data: bytes) -> None:
        if self.connection is not None and not self.connection.closed:
            self.connection.from_client(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connection is not None and not self.connection.closed:
            self.connection.client_closed()


class _ServerSide(asyncio.Protocol):
    def __init__(self, connection: ProxyConnection) -> None:
        self.connection = connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.connection.server_connected(transport)

    def data_received(self, data: bytes) -> None:
        if not self.connection.closed:
            self.connection.from_server(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connection.closed:
            self.connection.server_closed()


ClientDataHook = Callable[[ProxyConnection, bytes], Action]


class TcpProxy:
    """Listens on a free port of 127.0.0.1 and forwards each connection to ``upstream_host:upstream_port``,
    through the fault set by ``set_fault()`` (``Fault.NONE`` at first)."""

    def __init__(
        self,
        upstream_port: int = 5432,
        upstream_host: str = "127.0.0.1",
        *,
        on_client_data: ClientDataHook | None = None,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.on_client_data = on_client_data
        self.fault = Fault.NONE
        self.port = 0  # the listening port, once started
        self.accepted = 0  # connections accepted so far
        self._connections: set[ProxyConnection] = set()
        self._numbers = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def open_connections(self) -> int:
        """Client connections the proxy holds now (open on at least one side)."""
        return len(self._connections)

    # --- in an event loop ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(lambda: _ClientSide(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and reset every connection through the proxy."""
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.kill()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.stop()

    # --- in a thread of its own ---------------------------------------------------------------------------------

    @contextmanager
    def in_thread(self) -> Iterator[TcpProxy]:
        """Run the proxy on an event loop in a thread of its own for the duration of the block."""
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                started.set_exception(exc)
                return
            started.set_result(None)
            loop.run_forever()
            loop.run_until_complete(self.stop())

        thread = threading.Thread(target=run, name=f"tcp-proxy-{id(self):x}", daemon=True)
        thread.start()
        try:
            started.result(timeout=10)
            yield self
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()

    # --- the switch (from any thread) ---------------------------------------------------------------------------

    def set_fault(self, fault: Fault) -> None:
        """Switch every connection (and every later one) to ``fault``; returns once it applies."""
        self._on_loop(lambda: self._switch(fault))

    def heal(self) -> None:
        """Back to ``Fault.NONE``: what a stall held is delivered, closes held back are passed on."""
        self.set_fault(Fault.NONE)

    def kill(self) -> None:
        """Reset (RST) every connection through the proxy now, without changing the fault."""
        self._on_loop(self._kill_all)

    # --- internals ----------------------------------------------------------------------------------------------

    def _on_loop(self, function: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the proxy is not running: use it in 'async with TcpProxy()' or 'with .in_thread()'")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            function()
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def call() -> None:
            try:
                function()
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

        loop.call_soon_threadsafe(call)
        done.result(timeout=10)

    def _switch(self, fault: Fault) -> None:
        self.fault = fault
        if fault is Fault.RESET:
            self._kill_all()
            return
        for connection in list(self._connections):
            connection.deliver()

    def _kill_all(self) -> None:
        for connection in list(self._connections):
            connection.kill()

    def _accepted(self, client: asyncio.Transport) -> ProxyConnection | None:
        self.accepted += 1
        connection = ProxyConnection(self, next(self._numbers), client)
        if self.fault is Fault.RESET:
            connection.kill()
            return None
        self._connections.add(connection)
        task = asyncio.get_running_loop().create_task(self._connect(connection))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return connection

    async def _connect(self, connection: ProxyConnection) -> None:
        assert self._loop is not None
        try:
            await self._loop.create_connection(lambda: _ServerSide(connection), *self.upstream)
        except OSError:
            connection.kill()  # the server refuses: so does the proxy
