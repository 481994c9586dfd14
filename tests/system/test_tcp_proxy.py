"""The fault proxy (tests/system/tcp_proxy.py) itself, with asyncpg clients of the real PostgreSQL through it:
each fault does to a connection what it says, heal() brings connections back, the client-data hook acts on the
frontend's bytes, and the proxy works from a thread of its own."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from ..polling import eventually
from .backends import backends_of
from .tcp_proxy import Action, Fault, ProxyConnection, TcpProxy

pytestmark = pytest.mark.anyio

TABLE = f"adbs_tcp_proxy_{os.getpid()}"
QUIET = 0.3  # how long a query through a fault must stay unanswered to count as hanging
# What asyncpg raises on a connection the proxy reset, depending on where the RST finds it.
CONNECTION_LOST = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)


def proxied(dsn: str, proxy: TcpProxy) -> str:
    return dsn.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/")


def new_application_name() -> str:
    return f"adbs-tcp-proxy-{uuid.uuid4().hex[:8]}"


async def connect(
    dsn: str, proxy: TcpProxy, application_name: str = "adbs-tcp-proxy", seconds: float = 5
) -> asyncpg.Connection:
    return await asyncpg.connect(
        proxied(dsn, proxy), timeout=seconds, server_settings={"application_name": application_name}
    )


@pytest.fixture
async def table(postgresql_dsn: str) -> AsyncIterator[str]:
    """An empty table for this module; dropped afterwards. Yields the DSN."""
    connection = await asyncpg.connect(postgresql_dsn)
    try:
        await connection.execute(f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (name TEXT)")
        yield postgresql_dsn
        await connection.execute(f"DROP TABLE {TABLE}")
    finally:
        await connection.close()


async def names(dsn: str) -> list[str]:
    connection = await asyncpg.connect(dsn)
    try:
        return sorted(row[0] for row in await connection.fetch(f"SELECT name FROM {TABLE}"))
    finally:
        await connection.close()


async def test_pass_through(postgresql_dsn: str) -> None:
    async with TcpProxy() as proxy:
        connection = await connect(postgresql_dsn, proxy)
        assert await connection.fetchval("SELECT 41 + 1") == 42
        assert proxy.open_connections == 1
        await connection.close()

        async def none_open() -> bool:
            return proxy.open_connections == 0

        await eventually(none_open, "no connection open through the proxy")
    assert proxy.accepted == 1


async def test_blackhole_keeps_sockets_open_and_drops_bytes(postgresql_dsn: str) -> None:
    application_name = new_application_name()

    async def backends_gone() -> bool:
        return await backends_of(postgresql_dsn, application_name) == 0

    async with TcpProxy() as proxy:
        connection = await connect(postgresql_dsn, proxy, application_name)
        proxy.set_fault(Fault.BLACKHOLE)
        with pytest.raises(TimeoutError):
            await connection.fetchval("SELECT 1", timeout=QUIET)
        # A connection made meanwhile gets no answer to its startup message either.
        with pytest.raises(TimeoutError):
            await connect(postgresql_dsn, proxy, seconds=QUIET)
        connection.terminate()
        await asyncio.sleep(0.1)
        # The client's close is kept from the server too: its backend stays, until the fault ends.
        assert await backends_of(postgresql_dsn, application_name) == 1
        proxy.heal()
        await eventually(backends_gone, "the proxied backends gone")
        connection = await connect(postgresql_dsn, proxy)
        assert await connection.fetchval("SELECT 1") == 1
        await connection.close()


async def test_half_open_runs_the_query_and_loses_the_answer(table: str) -> None:
    async with TcpProxy() as proxy:
        connection = await connect(table, proxy)
        proxy.set_fault(Fault.HALF_OPEN)
        with pytest.raises(TimeoutError):
            await connection.execute(f"INSERT INTO {TABLE} VALUES ('sent')", timeout=QUIET)

        async def inserted() -> bool:
            return await names(table) == ["sent"]

        await eventually(inserted, "the row inserted")  # the server ran it (autocommit): only its answer was lost
        connection.terminate()
        proxy.heal()


async def test_stall_delivers_everything_when_healed(postgresql_dsn: str) -> None:
    async with TcpProxy() as proxy:
        connection = await connect(postgresql_dsn, proxy)
        proxy.set_fault(Fault.STALL)
        query = asyncio.ensure_future(connection.fetchval("SELECT 'late'"))
        await asyncio.sleep(QUIET)
        assert not query.done()
        proxy.heal()
        assert await asyncio.wait_for(query, 5) == "late"
        assert await connection.fetchval("SELECT 2") == 2  # in step: nothing was lost
        await connection.close()


async def test_reset_ends_every_connection_until_healed(postgresql_dsn: str) -> None:
    async with TcpProxy() as proxy:
        connection = await connect(postgresql_dsn, proxy)
        proxy.set_fault(Fault.RESET)
        with pytest.raises(CONNECTION_LOST):
            await connection.fetchval("SELECT 1", timeout=5)
        connection.terminate()  # lost, but left to the collector it would warn of an unclosed connection
        with pytest.raises(CONNECTION_LOST):
            await connect(postgresql_dsn, proxy)
        assert proxy.open_connections == 0
        proxy.heal()
        connection = await connect(postgresql_dsn, proxy)
        assert await connection.fetchval("SELECT 1") == 1
        await connection.close()


@pytest.mark.parametrize(("action", "stored"), [(Action.FORWARD_THEN_DROP, ["hooked"]), (Action.DROP, [])])
async def test_client_data_hook(table: str, action: Action, stored: list[str]) -> None:
    """The hook sees the frontend's bytes: forward-then-drop lets the server run the statement and keeps its
    answer from the client; drop kills the connection before the server sees it."""
    seen: list[int] = []

    def on_client_data(connection: ProxyConnection, data: bytes) -> Action:
        if b"INSERT" in data:
            seen.append(connection.number)
            return action
        return Action.FORWARD

    application_name = new_application_name()

    async def backend_gone() -> bool:
        # Once the server has read the statement (or not) and then the end of the stream.
        return await backends_of(table, application_name) == 0

    async with TcpProxy(on_client_data=on_client_data) as proxy:
        connection = await connect(table, proxy, application_name)
        with pytest.raises(CONNECTION_LOST):
            await connection.execute(f"INSERT INTO {TABLE} VALUES ('hooked')", timeout=5)
        connection.terminate()
        assert seen == [1]
        await eventually(backend_gone, "the backend gone")
    assert await names(table) == stored


def test_in_a_thread_of_its_own(postgresql_dsn: str) -> None:
    """A test without an event loop of its own (or whose loop blocks) runs the proxy in a thread."""

    async def query(proxy: TcpProxy) -> object:
        connection = await connect(postgresql_dsn, proxy)
        try:
            return await connection.fetchval("SELECT 'through'", timeout=5)
        finally:
            connection.terminate()

    async def hangs(proxy: TcpProxy) -> bool:
        connection = await connect(postgresql_dsn, proxy)
        proxy.set_fault(Fault.BLACKHOLE)  # from this thread, while the proxy's loop runs in its own
        try:
            await connection.fetchval("SELECT 1", timeout=QUIET)
        except TimeoutError:
            return True
        finally:
            connection.terminate()
        return False

    with TcpProxy().in_thread() as proxy:
        assert asyncio.run(query(proxy)) == "through"
        assert asyncio.run(hangs(proxy))
        proxy.heal()
        assert asyncio.run(query(proxy)) == "through"
