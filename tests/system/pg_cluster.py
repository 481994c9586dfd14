"""A throwaway PostgreSQL cluster of this test run's own, for tests that stop or restart the whole server.

The shared server on 5432 serves other test runs at the same time and must never be restarted, so the restart
tests get a cluster of their own: created with Debian's postgresql-common tools (``pg_createcluster``) on a
free port, listening on 127.0.0.1 only with ``trust`` authentication (but for one role, ``PASSWORD_ROLE``, that
logs in with a SCRAM password), and dropped at the end of the session.

Without ``pg_createcluster`` the tests that need it are skipped, with the reason shown; with ``CI`` set they
fail instead. Creating the cluster needs the right to run the server as the ``postgres`` user (root does).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest

DATABASE = "adbs_faults"
# Only connections from this machine, over TCP to 127.0.0.1 or the cluster's own Unix socket, no password.
PG_HBA = """\
# Written by asgi_db_session's tests/system/pg_cluster.py: a throwaway cluster, reachable from this machine only.
local   all   all                  trust
host    all   all   127.0.0.1/32   trust
"""
# A role that logs in with a password (SCRAM), for the wrong-password tests; listed first, as the first line that
# matches a connection decides. Every other role still gets in without one.
PASSWORD_ROLE = "adbs_app"
# With characters a URL must encode ("/", "@", "~"), and no dictionary word a message could hold by chance.
ROLE_PASSWORD = "Lk5/Wn2@Jd~q"
PASSWORD_HBA = f"""\
host    all   {PASSWORD_ROLE}   127.0.0.1/32   scram-sha-256
"""
# Appended to postgresql.conf (the last setting wins). Throwaway data: a clean (fast) shutdown still writes
# everything out, and without fsync the cluster starts and restarts sooner.
SETTINGS = """
# Added by asgi_db_session's tests/system/pg_cluster.py.
listen_addresses = '127.0.0.1'
ssl = off
fsync = off
"""
# Seconds a pg_ctlcluster call (start, stop, restart) may take before the test gives up on it.
COMMAND_TIMEOUT = 60.0


@dataclass(frozen=True)
class Cluster:
    """One PostgreSQL cluster made by pg_createcluster: ``version``/``name``, listening on 127.0.0.1:``port``."""

    version: str
    name: str
    port: int

    @property
    def dsn(self) -> str:
        """libpq-style DSN, for asyncpg."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def url(self) -> str:
        """SQLAlchemy URL, for the middleware."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def url_as(self, user: str, password: str) -> str:
        """SQLAlchemy URL that logs in as ``user`` with ``password`` (percent-encoded into the URL)."""
        return f"postgresql+asyncpg://{user}:{quote(password, safe='')}@127.0.0.1:{self.port}/{DATABASE}"

    def ctl(self, action: str, *options: str) -> list[str]:
        """The pg_ctlcluster command line for ``action`` (start, stop, restart) on this cluster."""
        return ["pg_ctlcluster", "--skip-systemctl-redirect", self.version, self.name, action, *options]

    async def run(self, action: str, *options: str) -> None:
        """Run ``pg_ctlcluster <action>`` without blocking the event loop (requests keep running meanwhile)."""
        process = await asyncio.create_subprocess_exec(
            *self.ctl(action, *options), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await asyncio.wait_for(process.communicate(), timeout=COMMAND_TIMEOUT)
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(self.ctl(action, *options))} failed: {output.decode(errors='replace')}")

    async def restart(self) -> None:
        """Fast restart: every session is terminated, open transactions roll back; returns once it accepts again."""
        await self.run("restart", "-m", "fast")


def _installed_version() -> str:
    """The PostgreSQL major version to create the cluster with: PG_CLUSTER_VERSION, else the newest installed."""
    chosen = os.environ.get("PG_CLUSTER_VERSION")
    if chosen:
        return chosen
    root = Path("/usr/lib/postgresql")
    versions = sorted(
        (entry.name for entry in root.iterdir() if (entry / "bin" / "initdb").exists()) if root.is_dir() else (),
        key=lambda name: float(name) if name.replace(".", "", 1).isdigit() else 0.0,
    )
    if not versions:
        pytest.fail(f"pg_createcluster is installed but no PostgreSQL server is under {root}: install one")
    return versions[-1]


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stdout}{result.stderr}")


def _in_thread(coroutine: Coroutine[Any, Any, None]) -> None:
    # A session fixture may be set up while the tests' event loop runs: asyncio.run in a thread of its own.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coroutine).result()


def _execute(dsn: str, *statements: str) -> None:
    """Run ``statements`` one after another on a connection of their own, from any thread or fixture."""

    async def execute() -> None:
        connection = await asyncpg.connect(dsn, timeout=10)
        try:
            for statement in statements:
                await connection.execute(statement)
        finally:
            await connection.close()

    _in_thread(execute())


def _create_database(cluster: Cluster) -> None:
    _execute(f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres", f"CREATE DATABASE {DATABASE}")


def _create_password_role(cluster: Cluster) -> None:
    _execute(
        cluster.dsn,
        # password_encryption is scram-sha-256 by default (PostgreSQL 14+); named for older servers.
        "SET password_encryption = 'scram-sha-256'",
        f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{ROLE_PASSWORD}'",
    )


class _Shared:
    """The one cluster of this process. Every test module that imports ``pg_cluster`` has a session fixture of
    its own, and all of them get this cluster: created by the first, dropped after the last has finished."""

    cluster: Cluster | None = None
    config: Path | None = None
    holders = 0


def _config(cluster: Cluster) -> Path:
    """The cluster's configuration directory (postgresql-common's layout)."""
    return Path(os.environ.get("PG_CLUSTER_CONF_ROOT", "/etc/postgresql")) / cluster.version / cluster.name


def _create_configured(cluster: Cluster, hba: str, settings: str) -> Path:
    """pg_createcluster (not started) with ``hba`` as its pg_hba.conf and ``settings`` appended to its
    postgresql.conf; the configuration directory."""
    _run(
        [
            "pg_createcluster",
            "--quiet",
            "--start-conf=manual",
            "--port",
            str(cluster.port),
            cluster.version,
            cluster.name,
            "--",
            "--no-sync",
        ]
    )
    config = _config(cluster)
    (config / "pg_hba.conf").write_text(hba)
    with (config / "postgresql.conf").open("a") as conf:
        conf.write(settings)
    return config


def _create_cluster() -> tuple[Cluster, Path]:
    version = _installed_version()
    cluster = Cluster(version, f"adbs_restart_{os.getpid()}", _free_port())
    config = _config(cluster)
    try:
        _create_configured(cluster, PASSWORD_HBA + PG_HBA, SETTINGS)
        _run(cluster.ctl("start"))
        _create_database(cluster)
        _create_password_role(cluster)
    except BaseException:
        _drop_cluster(cluster, config)
        raise
    return cluster, config


def _drop_cluster(cluster: Cluster, config: Path) -> None:
    if config.exists():  # also after a creation that failed halfway
        _run(["pg_dropcluster", "--stop", cluster.version, cluster.name])


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """A running cluster of this session's own, on a free port; dropped (stopped first) at the end."""
    if shutil.which("pg_createcluster") is None:
        reason = "pg_createcluster (Debian's postgresql-common) is not installed, so no throwaway cluster to restart"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the restart tests must run: apt-get install postgresql-common")
        pytest.skip(reason)
    if _Shared.cluster is None:
        _Shared.cluster, _Shared.config = _create_cluster()
    cluster, config = _Shared.cluster, _Shared.config
    assert config is not None
    _Shared.holders += 1
    try:
        yield cluster
    finally:
        _Shared.holders -= 1
        if _Shared.holders == 0:
            _Shared.cluster = _Shared.config = None
            _drop_cluster(cluster, config)
