"""Run an app (tests/system/server_app.py by default) under a real server in a subprocess: uvicorn, gunicorn with
uvicorn workers, hypercorn or granian.

Used by tests/system/test_server.py, test_startup_process.py, test_soak.py and benchmarks/soak.py.
Everything listens on and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import asyncpg
import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
APP = "tests.system.server_app:app"
# The README's quick start: app.add_middleware(DBSessionMiddleware), everything from DATABASE_*.
README_APP = "tests.system.readme_app:app"
CREATE_TABLE = "CREATE TABLE IF NOT EXISTS {table} (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL)"
# Server log lines that mean something went wrong, whatever the test was about: a traceback, an error logged
# by uvicorn or gunicorn, any warning (SQLAlchemy's "garbage collector is trying to clean up non-checked-in
# connection" among them), an event loop mix-up after a fork.
LOG_PROBLEM = re.compile(r"Traceback|ERROR|Error:|Exception|Warning|non-checked-in|different loop")
# Lines of that kind that the servers themselves print on a clean run.
LOG_NOISE = re.compile(
    # uvicorn's --workers supervisor does not close its listening socket before it exits.
    r"ResourceWarning: unclosed <socket\.socket .*laddr=\('127\.0\.0\.1', \d+\)>"
    r"|^ResourceWarning: Enable tracemalloc to get the object allocation traceback$"
    # gunicorn's uvicorn worker closes a listening socket twice when it shuts down (logged at INFO).
    r"|\[INFO\] Error while closing socket \[Errno 9\] Bad file descriptor$"
    # asyncpg, when the server ends a backend whose connection was thrown away because an anyio cancel scope
    # cut its graceful close short: the cancelled query's future gets the error and nobody is left to read
    # it ("Future exception was never retrieved"). The connection is gone from the pool already; no leak.
    r"|^ConnectionError: unexpected connection_lost\(\) call$"
)


def kill_group(process: asyncio.subprocess.Process) -> None:
    """SIGKILL ``process`` and its process group (started with ``start_new_session=True``): a supervisor
    killed alone would leave its workers running, holding the port and the output pipe."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def uvicorn_command(port: int, *, workers: int | None = None, app: str = APP, lifespan: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    if workers is not None:
        command += ["--workers", str(workers)]
    if lifespan is not None:
        command += ["--lifespan", lifespan]
    return command


def hypercorn_command(port: int, *, app: str = APP, workers: int | None = None) -> list[str]:
    command = [sys.executable, "-m", "hypercorn", app, "--bind", f"127.0.0.1:{port}"]
    return command if workers is None else [*command, "--workers", str(workers)]


def granian_command(port: int, *, app: str = APP, workers: int | None = None) -> list[str]:
    command = [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port), app]
    return command if workers is None else [*command, "--workers", str(workers)]


def gunicorn_command(port: int, *, workers: int, preload: bool) -> list[str]:
    command = [sys.executable, "-m", "gunicorn", APP, "--bind", f"127.0.0.1:{port}", "--workers", str(workers)]
    command += ["--worker-class", "uvicorn_worker.UvicornWorker", "--graceful-timeout", "10"]
    major, minor = (int(part) for part in version("gunicorn").split(".")[:2])
    if (major, minor) >= (25, 1):
        # Not the control socket in ~/.gunicorn/ that gunicorn 25.1+ opens by default, which two servers share.
        command.append("--no-control-socket")
    return [*command, "--preload"] if preload else command


def new_application_name() -> str:
    """A PostgreSQL application_name that only this server's connections carry."""
    return f"adbs-server-{uuid.uuid4().hex[:12]}"


async def create_table(dsn: str, table: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(CREATE_TABLE.format(table=table))
    finally:
        await connection.close()


async def drop_table(dsn: str, table: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        await connection.close()


@dataclass
class Backend:
    pid: int
    state: str
    query: str


async def backends(dsn: str, application_name: str) -> list[Backend]:
    """The PostgreSQL backends whose application_name is ``application_name``."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT pid, coalesce(state, ''), query FROM pg_stat_activity WHERE application_name = $1",
            application_name,
        )
    finally:
        await connection.close()
    return [Backend(row[0], row[1], row[2]) for row in rows]


async def backends_after_exit(dsn: str, application_name: str, seconds: float = 1.0) -> list[Backend]:
    """The backends of ``application_name`` once none is left, or after ``seconds``: a backend whose client
    has gone takes a moment to notice and leave pg_stat_activity."""
    deadline = time.monotonic() + seconds
    while True:
        left = await backends(dsn, application_name)
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.02)


async def terminate_backends(dsn: str, application_name: str) -> None:
    """End every backend of ``application_name``: a failed test must not leave one holding locks."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", application_name
        )
    finally:
        await connection.close()


class BackendSampler:
    """Counts the server's backends every 20 ms while ``sampling()`` runs: the fewest and most seen."""

    def __init__(self, dsn: str, application_name: str) -> None:
        self.dsn = dsn
        self.application_name = application_name
        self.fewest: int | None = None
        self.most = 0

    @asynccontextmanager
    async def sampling(self) -> AsyncIterator[None]:
        connection = await asyncpg.connect(self.dsn)
        stopped = asyncio.Event()

        async def sample() -> None:
            while not stopped.is_set():
                count: int = await connection.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", self.application_name
                )
                self.most = max(self.most, count)
                self.fewest = count if self.fewest is None else min(self.fewest, count)
                with suppress(TimeoutError):
                    await asyncio.wait_for(stopped.wait(), timeout=0.02)

        task = asyncio.create_task(sample())
        try:
            yield
        finally:
            stopped.set()
            try:
                await task
            finally:
                await connection.close()


@dataclass
class Server:
    """A running server process, its base URL and its log (stdout and stderr together)."""

    process: asyncio.subprocess.Process
    port: int
    log_path: Path
    application_name: str
    # The server's backends still on PostgreSQL after its process exited (set when serve() ends).
    backends_left: list[Backend] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stats(self, http: httpx.AsyncClient, **params: str) -> dict[str, Any]:
        response = await http.get(f"{self.base_url}/stats", params=params)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def quiet_stats(self, http: httpx.AsyncClient, seconds: float = 2) -> dict[str, Any]:
        """/stats (after a garbage collection) once no session is open or unfreed and no connection is out, or
        after ``seconds``.

        A client has its response before the server closes that request's session (and its last reference to
        the session goes when the middleware returns, a few turns of the loop later): right after a run the
        server may still be finishing its last requests.
        """
        deadline = time.monotonic() + seconds
        while True:
            stats = await self.stats(http, gc="1")
            quiet = stats["sessions_open"] == stats["sessions_alive"] == stats["checkedout"] == 0
            if quiet or time.monotonic() > deadline:
                return stats
            await asyncio.sleep(0.01)


def server_env(dsn_url: str | None, application_name: str, extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its DATABASE_* and SERVER_APP_* variables, plus the server's
    (no DATABASE_URL when ``dsn_url`` is None)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DATABASE_", "SERVER_APP_"))}
    if dsn_url is not None:
        env["DATABASE_URL"] = dsn_url
    env.update(
        DATABASE_APPLICATION_NAME=application_name,
        # Show every warning the server's Python raises (SQLAlchemy's "non-checked-in connection" included).
        PYTHONWARNINGS="default",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    env.update(extra)
    return env


async def _wait_until_serving(server: Server, seconds: float, path: str) -> None:
    async with httpx.AsyncClient(timeout=5, trust_env=False) as http, asyncio.timeout(seconds):
        while server.process.returncode is None:
            try:
                if (await http.get(f"{server.base_url}{path}")).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            await asyncio.sleep(0.05)
    raise AssertionError(f"the server exited with status {server.process.returncode} before it answered")


@asynccontextmanager
async def serve(
    command: Sequence[str],
    *,
    database_url: str,
    admin_dsn: str,
    log_path: Path,
    port: int,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 30,
    show_log: bool = True,
    ready_path: str = "/stats",
    stop_signal: signal.Signals = signal.SIGTERM,
) -> AsyncIterator[Server]:
    """Start ``command`` (which must listen on ``port``), wait until ``ready_path`` answers 200, and stop it
    afterwards.

    The block's end sends ``stop_signal`` and waits for a graceful exit (lifespan shutdown); the server is
    killed if it has not exited by then, or when the block raises. Then the log is printed (pytest shows it
    when a test fails), the backends still there once the process has gone are noted in
    ``Server.backends_left``, and they are terminated through ``admin_dsn``, so that a failed test leaves no
    lock behind.
    """
    application_name = new_application_name()
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=REPO_ROOT,
            env=server_env(database_url, application_name, env or {}),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # a group of its own: workers (hypercorn's, granian's) are killed with it
        )
    server = Server(process, port, log_path, application_name)
    try:
        await _wait_until_serving(server, startup_timeout, ready_path)
        yield server
        process.send_signal(stop_signal)
        await asyncio.wait_for(process.wait(), timeout=20)
    finally:
        if process.returncode is None:
            kill_group(process)
            await process.wait()
        if show_log:
            print(server.log())
        server.backends_left = await backends_after_exit(admin_dsn, application_name)
        await terminate_backends(admin_dsn, application_name)


class Load:
    """``concurrency`` clients of ``server``, each with one keep-alive connection, that send requests in turn:
    every ``write_every``-th a POST /write, the others GET /read.

    One httpx client per connection rather than one client with a pool of them: httpx's pool costs about
    twice the CPU per request at 16 connections, and on a 2-core machine the client competes with the server.
    """

    def __init__(self, server: Server, concurrency: int, *, write_every: int = 4) -> None:
        self.write_every = write_every
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        self.clients = [
            httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=30, trust_env=False)
            for _ in range(concurrency)
        ]
        self.sent = 0

    async def __aenter__(self) -> Load:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for client in self.clients:
            await client.aclose()

    async def run(self, count: int) -> Counter[int]:
        """Send ``count`` requests; how many got each status."""
        statuses: Counter[int] = Counter()
        end = self.sent + count

        async def worker(http: httpx.AsyncClient) -> None:
            while self.sent < end:
                index = self.sent
                self.sent += 1
                if index % self.write_every == 0:
                    response = await http.post("/write")
                else:
                    response = await http.get("/read")
                statuses[response.status_code] += 1

        await asyncio.gather(*(worker(http) for http in self.clients))
        return statuses


async def fresh_table(dsn: str, table: str) -> None:
    """Create ``table`` if needed, and empty it."""
    await create_table(dsn, table)
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f"TRUNCATE {table}")
    finally:
        await connection.close()


def log_problems(log: str) -> list[str]:
    """The lines of a server log that show something went wrong."""
    return [line for line in log.splitlines() if LOG_PROBLEM.search(line) and not LOG_NOISE.search(line)]


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid`` (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time that process ``pid`` has used (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RawLoad:
    """What ``Load`` does (every ``write_every``-th request a POST /write, the others GET /read), from
    ``concurrency`` keep-alive connections, with a bare HTTP/1.1 client instead of httpx.

    It costs the machine a few tens of microseconds a request, where httpx costs about a millisecond: on a
    2-core machine the load client competes with the server and PostgreSQL for the cores, so a long soak run is
    mostly that client's time. Responses must carry Content-Length (uvicorn's do).
    """

    READ = b"GET /read HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    WRITE = b"POST /write HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"

    def __init__(self, server: Server, concurrency: int, *, write_every: int = 4, timeout: float = 30) -> None:
        self.port = server.port
        self.concurrency = concurrency
        self.write_every = write_every
        self.timeout = timeout
        self.connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.sent = 0

    async def __aenter__(self) -> RawLoad:
        for _ in range(self.concurrency):
            self.connections.append(await asyncio.open_connection("127.0.0.1", self.port))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for _reader, writer in self.connections:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise AssertionError(f"a response without Content-Length: {head!r}")
        await reader.readexactly(length)
        return status

    async def run(self, count: int) -> Counter[int]:
        """Send ``count`` requests; how many got each status."""
        statuses: Counter[int] = Counter()
        end = self.sent + count

        async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while self.sent < end:
                index = self.sent
                self.sent += 1
                request = self.WRITE if index % self.write_every == 0 else self.READ
                status = await asyncio.wait_for(self._exchange(reader, writer, request), self.timeout)
                statuses[status] += 1

        await asyncio.gather(*(worker(reader, writer) for reader, writer in self.connections))
        return statuses
