"""A soak run under uvicorn: many keep-alive requests leave no session, connection or memory behind.

tests/system/server_app.py runs with tracemalloc on, and counts its sessions (open: created and not yet closed;
alive: not yet freed) and its pool's connections, invalidations and checkouts. The pool has fewer
connections than there are clients, so requests also wait for a connection; the pool timeout is short, so a
connection that was never given back would turn into errors within seconds instead of a slow test.
benchmarks/soak.py is the long version (RSS over 200,000 requests).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from ..conftest import PG_URL
from .server import (
    BackendSampler,
    RawLoad,
    backends,
    cpu_seconds,
    drop_table,
    free_port,
    fresh_table,
    log_problems,
    serve,
    uvicorn_command,
)

pytestmark = pytest.mark.anyio

TABLE = f"adbs_soak_{os.getpid()}"
# The count. With httpx as the load client a request cost the 2-core machine about as much CPU in the
# client as in the server (traced by tracemalloc, ~2 ms), and 20,000 took 66-150 s; RawLoad's bare HTTP/1.1
# client costs a few tens of microseconds a request. ADBS_SOAK_REQUESTS sets another count (more for a longer run).
REQUESTS = int(os.environ.get("ADBS_SOAK_REQUESTS", "20000"))
WARM_UP = min(2_000, REQUESTS // 2)  # the caches (SQLAlchemy's compiled statements, asyncpg's prepared ones) fill up
CONCURRENCY = 16
POOL_SIZE = 4
MOST_TRACED_GROWTH = 1024 * 1024  # bytes of Python memory the app may gain between WARM_UP and the end


@pytest.fixture
async def table(postgresql_dsn: str) -> AsyncIterator[str]:
    await fresh_table(postgresql_dsn, TABLE)
    yield TABLE
    await drop_table(postgresql_dsn, TABLE)


async def test_keep_alive_soak(postgresql_dsn: str, table: str, tmp_path: Path) -> None:
    env = {
        "SERVER_APP_TABLE": table,
        "SERVER_APP_TRACEMALLOC": "1",
        "DATABASE_POOL_SIZE": str(POOL_SIZE),
        "DATABASE_MAX_OVERFLOW": "0",
        "DATABASE_POOL_TIMEOUT": "5",
    }
    port = free_port()
    # What CI runs, whether or not uvloop and httptools are installed (the bench extra brings them): the same
    # server code path, and a wall time that does not depend on what else is in the virtualenv.
    command = [*uvicorn_command(port), "--loop", "asyncio", "--http", "h11"]
    log_path = tmp_path / "server.log"
    started = time.monotonic()
    async with (
        serve(command, database_url=PG_URL, admin_dsn=postgresql_dsn, log_path=log_path, port=port, env=env) as server,
        RawLoad(server, CONCURRENCY) as load,
        httpx.AsyncClient(timeout=10, trust_env=False) as http,
    ):
        statuses = await load.run(WARM_UP)
        warm = await server.quiet_stats(http)
        warm_backends = len(await backends(postgresql_dsn, server.application_name))
        warm_cpu = cpu_seconds(server.process.pid)

        sampler = BackendSampler(postgresql_dsn, server.application_name)
        async with sampler.sampling():
            statuses += await load.run(REQUESTS - WARM_UP)
        end = await server.quiet_stats(http)
        end_backends = len(await backends(postgresql_dsn, server.application_name))
        server_cpu = cpu_seconds(server.process.pid) - warm_cpu
    elapsed = time.monotonic() - started

    growth = end["traced_bytes"] - warm["traced_bytes"]
    print(
        f"{REQUESTS} requests in {elapsed:.1f} s (server CPU after warm-up {server_cpu:.1f} s); "
        f"traced memory {warm['traced_bytes']} -> {end['traced_bytes']} ({growth:+d} bytes); "
        f"RSS {warm['rss_bytes']} -> {end['rss_bytes']}; sessions peak {end['sessions_peak']}; "
        f"backends {warm_backends}, {sampler.fewest}..{sampler.most}, {end_backends}"
    )
    assert statuses == {200: REQUESTS}
    assert end["sessions_created"] == REQUESTS
    # Never more sessions at once than requests in flight, and none left open or unfreed at the end.
    assert end["sessions_peak"] <= CONCURRENCY
    assert (end["sessions_open"], end["sessions_alive"]) == (0, 0)
    assert growth < MOST_TRACED_GROWTH
    # The pool opened its connections during the warm-up and kept them: none was thrown away or replaced.
    assert warm_backends == sampler.fewest == sampler.most == end_backends == POOL_SIZE
    assert (end["connects"], end["invalidations"]) == (POOL_SIZE, 0)
    assert end["checkedout"] == 0
    assert log_problems(server.log()) == []
