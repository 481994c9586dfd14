"""A PgBouncer of this test's own, in transaction mode, in front of the test PostgreSQL server.

Debian's ``pgbouncer`` binary (``./dev test`` installs the package) runs as a child process with a config
written to the test's temporary directory: it listens on a free port of 127.0.0.1 (no Unix socket), takes
any client without a password (``auth_type = any``: every database line names the server user), and logs to a
file there. The package's system service is never involved. Each test gets a fresh PgBouncer, so server
connections (and whatever prepared statements an earlier test left on them) are never shared between tests.

Without the binary the tests that need it are skipped, with the reason shown; with ``CI`` set they fail.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from ..conftest import PG_URL
from .server import free_port

# Debian installs it into /usr/sbin, which is not on every user's PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
DATABASE = "adbs"  # the name clients use; PgBouncer maps it to the real database
# Server connections PgBouncer keeps per database and user: fewer than the clients' pools, so that every server
# connection serves many client connections in turn (what transaction pooling is for, and what breaks
# per-connection state such as named prepared statements).
DEFAULT_POOL_SIZE = 8
MAX_CLIENT_CONN = 200
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def pgbouncer_binary() -> str:
    """The pgbouncer executable; skips the test (fails it under CI) when there is none."""
    found = shutil.which("pgbouncer", path=SEARCH_PATH)
    if found is None:
        reason = "pgbouncer is not installed (Debian: apt-get install pgbouncer; ./dev test installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the PgBouncer tests must run")
        pytest.skip(reason)
    return found


@dataclass(frozen=True)
class PgBouncer:
    """A running PgBouncer on 127.0.0.1:``port``, pooling ``DATABASE`` in transaction mode."""

    port: int
    log_path: Path
    config_path: Path

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the pooled database, for the middleware."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def dsn(self) -> str:
        """libpq-style DSN of the pooled database (use ``statement_cache_size=0`` with asyncpg)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def log(self) -> str:
        return _read(self.log_path)


def pgbouncer_config(port: int, upstream_url: str, *, pool_size: int = DEFAULT_POOL_SIZE) -> str:
    """pgbouncer.ini for a transaction-mode pool of ``upstream_url``'s database on 127.0.0.1:``port``."""
    upstream = make_url(upstream_url)
    target = [
        f"host={upstream.host or '127.0.0.1'}",
        f"port={upstream.port or 5432}",
        f"dbname={upstream.database}",
        f"user={upstream.username or 'postgres'}",
    ]
    if upstream.password:
        target.append(f"password={upstream.password}")
    lines = [
        "[databases]",
        f"{DATABASE} = {' '.join(target)}",
        "",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = any",
        "pool_mode = transaction",
        f"default_pool_size = {pool_size}",
        f"max_client_conn = {MAX_CLIENT_CONN}",
        "log_connections = 0",
        "log_disconnections = 0",
    ]
    if os.geteuid() == 0:
        # PgBouncer refuses to run as root; started as root, it switches to this user once it has read its config.
        lines.append(f"user = {_unprivileged_user()}")
    return "\n".join(lines) + "\n"


def _unprivileged_user() -> str:
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root, and neither a postgres nor a nobody user to run PgBouncer as")


def _write_config(directory: Path, config: str) -> tuple[Path, Path]:
    """Write pgbouncer.ini into ``directory`` (made if needed); its path, and the log's."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "pgbouncer.ini"
    config_path.write_text(config)
    return config_path, directory / "pgbouncer.log"


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


async def _wait_until_listening(process: asyncio.subprocess.Process, port: int, log_path: Path) -> None:
    async with asyncio.timeout(START_TIMEOUT):
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"pgbouncer exited with status {process.returncode}: {_read(log_path)}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            return


@asynccontextmanager
async def running_pgbouncer(
    directory: Path, upstream_url: str = PG_URL, *, port: int | None = None, pool_size: int = DEFAULT_POOL_SIZE
) -> AsyncIterator[PgBouncer]:
    """Start PgBouncer in front of ``upstream_url`` (config and log in ``directory``); stop it at the end.

    The block's end sends SIGTERM (PgBouncer's immediate shutdown: every connection is closed) and kills it
    if it has not exited within ``STOP_TIMEOUT``. Its log is printed, so a failing test shows it.
    """
    binary = pgbouncer_binary()
    port = free_port() if port is None else port
    config_path, log_path = _write_config(directory, pgbouncer_config(port, upstream_url, pool_size=pool_size))
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            binary, str(config_path), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
        )
    bouncer = PgBouncer(port, log_path, config_path)
    try:
        await _wait_until_listening(process, port, log_path)
        yield bouncer
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=STOP_TIMEOUT)
            except TimeoutError:
                process.kill()
                await process.wait()
        print(bouncer.log())
