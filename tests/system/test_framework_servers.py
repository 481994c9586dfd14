"""Every framework under every server: the compatibility table of docs/how-to/frameworks.md, one test per cell.

Each server (uvicorn, hypercorn, granian) is started once, as a process on a free port of 127.0.0.1, on
tests/frameworks/served.py: every framework's app under its own path prefix, each with its own DBSessionMiddleware,
and the lifespan fanned out to all of them. Per framework, one round: a write the middleware commits (201, the
row seen through a second connection) and a 4xx it rolls back. At the end the server is stopped with SIGTERM: it
must exit by itself, every app's engine disposed by its middleware at the lifespan shutdown (Django's lifespan
answered by the middleware): one "Pool disposed" line per app (DATABASE_ECHO_POOL), no backend left on
PostgreSQL, and nothing wrong in its log.

The in-process tests of the whole contract on each framework are tests/test_frameworks.py.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import asyncpg
import httpx
import pytest

from ..conftest import PG_URL
from ..frameworks.registry import FRAMEWORKS, Framework
from .server import (
    Server,
    backends,
    drop_table,
    free_port,
    granian_command,
    hypercorn_command,
    log_problems,
    serve,
    uvicorn_command,
)

pytestmark = pytest.mark.anyio

APP = "tests.frameworks.served:app"
SERVERS: dict[str, Callable[[int], list[str]]] = {
    "uvicorn": lambda port: uvicorn_command(port, app=APP),
    "hypercorn": lambda port: hypercorn_command(port, app=APP),
    "granian": lambda port: granian_command(port, app=APP),
}
CREATE_TABLE = "CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL UNIQUE)"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    # Module-scoped, for the module-scoped server below: one process per server for all of its frameworks.
    return "asyncio"


@dataclass
class Served:
    server: Server
    table: str  # the table every app writes to


@pytest.fixture(scope="module", params=list(SERVERS))
async def served(
    request: pytest.FixtureRequest, postgresql_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Served]:
    """The server of that name on tests/frameworks/served.py; once stopped: exited 0, engine disposed, clean log."""
    name: str = request.param
    table = f"adbs_framework_servers_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(postgresql_dsn)
    try:
        await connection.execute(CREATE_TABLE.format(table=table))
    finally:
        await connection.close()
    port = free_port()
    try:
        async with serve(
            SERVERS[name](port),
            database_url=PG_URL,
            admin_dsn=postgresql_dsn,
            log_path=tmp_path_factory.mktemp(name) / "server.log",
            port=port,
            env={"FRAMEWORKS_TABLE": table, "DATABASE_CHECK_ON_STARTUP": "true", "DATABASE_ECHO_POOL": "true"},
            ready_path="/starlette/nodb",
        ) as running:
            # The startup check of every app's middleware has run: each pool holds its connection.
            assert len(await backends(postgresql_dsn, running.application_name)) == len(FRAMEWORKS)
            yield Served(running, table)
        # uvicorn re-raises the SIGTERM it handled once it has shut down; the others exit 0. Killed, it would be -9.
        assert running.process.returncode in (0, -signal.SIGTERM)
        log = running.log()
        assert log.count("Pool disposed") == len(FRAMEWORKS), "an app's engine was not disposed at shutdown"
        assert running.backends_left == []
        assert log_problems(log) == []
    finally:
        await drop_table(postgresql_dsn, table)


@pytest.mark.parametrize("framework", FRAMEWORKS, ids=[framework.name for framework in FRAMEWORKS])
async def test_a_write_is_committed_and_a_4xx_rolled_back(
    served: Served, framework: Framework, postgresql_dsn: str
) -> None:
    server = served.server
    written, rejected = f"written-{uuid.uuid4().hex[:8]}", f"rejected-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=server.base_url + framework.prefix, timeout=10, trust_env=False) as http:
        response = await http.post("/write", params={"name": written})
        assert (response.status_code, response.text) == (201, "one session")
        assert (await http.post("/reject", params={"name": rejected})).status_code == 400
    connection = await asyncpg.connect(postgresql_dsn)
    try:
        rows = await connection.fetch(f"SELECT name FROM {served.table} WHERE name = ANY($1)", [written, rejected])
    finally:
        await connection.close()
    assert [row[0] for row in rows] == [written]
