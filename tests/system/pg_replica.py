"""A primary and a streaming hot standby of this test run's own, for the read replica tests.

Both are throwaway clusters made with Debian's postgresql-common tools, like tests/system/pg_cluster.py's (whose
helpers this uses): on free ports of 127.0.0.1, ``trust`` authentication, ``fsync = off``. The primary also
accepts replication connections from 127.0.0.1; the standby is a ``pg_basebackup -R`` of it (``-R`` writes
``primary_conninfo`` and ``standby.signal``), streaming the primary's WAL and answering read-only queries.
Both are dropped at the end of the session. The shared server on 5432 is never touched.

The fixture yields once the standby is in recovery and has replayed a row written on the primary. Without
``pg_createcluster`` or ``pg_basebackup`` the tests are skipped, with the reason shown; with ``CI`` set they
fail instead. Creating the clusters needs the right to run them as the ``postgres`` user (root does).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from .pg_cluster import (
    COMMAND_TIMEOUT,
    DATABASE,
    PG_HBA,
    SETTINGS,
    Cluster,
    _config,
    _create_configured,
    _create_database,
    _drop_cluster,
    _execute,
    _free_port,
    _in_thread,
    _installed_version,
    _run,
)

# Replication connections (pg_basebackup, the standby's WAL receiver) from this machine only, no password.
REPLICATION_HBA = """\
local   replication   all                  trust
host    replication   all   127.0.0.1/32   trust
"""
PRIMARY_SETTINGS = """
# Added by asgi_db_session's tests/system/pg_replica.py.
wal_level = replica
max_wal_senders = 4
"""
# Any standby is synchronous (there is one): a commit waits for the standby's flush (synchronous_commit = on).
SYNCHRONOUS = "ALTER SYSTEM SET synchronous_standby_names = '*'"
# hot_standby is on by default; named so that the config says what the cluster is for.
STANDBY_SETTINGS = """
# Added by asgi_db_session's tests/system/pg_replica.py.
hot_standby = on
"""
# Roles the tests can connect to the standby as, to tell apart two replica URLs of the same server. Made on the
# primary (roles are replicated like everything else) as superusers: the cluster is a throwaway one.
READERS = ("adbs_reader_a", "adbs_reader_b")
MARKER = "adbs_replica_marker"
REPLAY_TIMEOUT = 30.0


@dataclass(frozen=True)
class ReplicaSet:
    """A primary and its hot standby, with URLs for the middleware and DSNs for asyncpg."""

    primary: Cluster
    standby: Cluster
    setup_seconds: float
    """How long creating both clusters and waiting for the first replayed row took."""

    @property
    def primary_url(self) -> str:
        return self.primary.url

    @property
    def standby_url(self) -> str:
        return self.standby.url

    def standby_url_as(self, role: str) -> str:
        """The standby's SQLAlchemy URL, connecting as ``role`` (one of ``READERS``)."""
        return f"postgresql+asyncpg://{role}@127.0.0.1:{self.standby.port}/{DATABASE}"

    async def wait_until_replayed(self, timeout: float = REPLAY_TIMEOUT) -> None:  # noqa: ASYNC109
        """Return once the standby has replayed everything the primary has written so far."""
        await wait_until_replayed(self.primary.dsn, self.standby.dsn, timeout)

    @asynccontextmanager
    async def replay_paused(self) -> AsyncIterator[None]:
        """Inside the block the standby receives WAL but applies none of it: it sees no new write."""
        await _execute_async(self.standby.dsn, "SELECT pg_wal_replay_pause()")
        try:
            yield
        finally:
            await _execute_async(self.standby.dsn, "SELECT pg_wal_replay_resume()")


async def _execute_async(dsn: str, sql: str) -> None:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def wait_until_replayed(primary_dsn: str, standby_dsn: str, timeout: float = REPLAY_TIMEOUT) -> None:  # noqa: ASYNC109
    """Return once the standby at ``standby_dsn`` has replayed the primary's WAL up to its position now."""
    primary = await asyncpg.connect(primary_dsn, timeout=10)
    try:
        target = await primary.fetchval("SELECT pg_current_wal_lsn()")
    finally:
        await primary.close()
    standby = await asyncpg.connect(standby_dsn, timeout=10)
    try:
        async with asyncio.timeout(timeout):
            while True:
                if await standby.fetchval("SELECT pg_last_wal_replay_lsn() >= $1", target):
                    return
                await asyncio.sleep(0.01)
    finally:
        await standby.close()


def _binaries_or_skip() -> None:
    missing = [name for name in ("pg_createcluster", "pg_basebackup") if shutil.which(name) is None]
    if missing:
        reason = f"{' and '.join(missing)} not installed (Debian: apt-get install postgresql), so no replica to test"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the replica tests must run")
        pytest.skip(reason)


def _data_directory(cluster: Cluster) -> Path:
    """The cluster's data directory, as pg_lsclusters reports it."""
    output = subprocess.run(
        ["pg_lsclusters", "--no-header", cluster.version, cluster.name],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=True,
    ).stdout.split()
    return Path(output[5])


def _create_standby(standby: Cluster, primary: Cluster, config: Path) -> None:
    """A base backup of the running primary, next to its data directory, made a cluster by pg_createcluster.

    pg_createcluster takes an existing data directory when its configuration files are in it, and moves them
    to ``config``: cheaper than an initdb whose data would be thrown away for the backup.
    """
    primary_data = _data_directory(primary)
    data = primary_data.parent / standby.name
    _run(
        [
            "pg_basebackup",
            "--host=127.0.0.1",
            f"--port={primary.port}",
            "--username=postgres",
            f"--pgdata={data}",
            "--write-recovery-conf",  # standby.signal, and primary_conninfo in postgresql.auto.conf
            "--wal-method=stream",
            "--checkpoint=fast",
            "--no-sync",
        ]
    )
    (data / "postgresql.conf").write_text(f"port = {standby.port}\n{SETTINGS}{STANDBY_SETTINGS}")
    (data / "pg_hba.conf").write_text(PG_HBA + REPLICATION_HBA)
    (data / "pg_ident.conf").write_text("")
    if os.geteuid() == 0:  # made as root: hand it to the primary's owner (postgres), the owner it will run as
        owner = primary_data.stat()
        for root, directories, files in os.walk(data):
            for name in [*directories, *files]:
                os.chown(os.path.join(root, name), owner.st_uid, owner.st_gid)
        os.chown(data, owner.st_uid, owner.st_gid)
    try:
        _run(
            [
                "pg_createcluster",
                "--quiet",
                "--start-conf=manual",
                f"--datadir={data}",
                "--port",
                str(standby.port),
                standby.version,
                standby.name,
            ]
        )
    finally:
        if not config.exists():  # not a cluster yet, so pg_dropcluster would not remove it
            shutil.rmtree(data, ignore_errors=True)


def _prepare_primary(primary: Cluster) -> None:
    async def prepare() -> None:
        connection = await asyncpg.connect(primary.dsn, timeout=10)
        try:
            for role in READERS:
                await connection.execute(f"CREATE ROLE {role} LOGIN SUPERUSER")
            await connection.execute(f"CREATE TABLE {MARKER} (id INTEGER PRIMARY KEY)")
        finally:
            await connection.close()

    _in_thread(prepare())


async def _wait_for_standby(standby_cluster: Cluster, primary: Cluster) -> None:
    """Until the standby answers, is in recovery, and sees a row written on the primary after the backup."""
    async with asyncio.timeout(REPLAY_TIMEOUT):
        while True:
            try:
                standby = await asyncpg.connect(standby_cluster.dsn, timeout=5)
            except (OSError, asyncpg.CannotConnectNowError):
                await asyncio.sleep(0.05)
                continue
            break
        try:
            if not await standby.fetchval("SELECT pg_is_in_recovery()"):
                raise RuntimeError("the standby is not in recovery: pg_basebackup -R did not make it a standby")
            await _execute_async(primary.dsn, f"INSERT INTO {MARKER} VALUES (1)")
            while True:
                if await standby.fetchval(f"SELECT count(*) FROM {MARKER}"):
                    return
                await asyncio.sleep(0.01)
        finally:
            await standby.close()


async def _wait_until_synchronous(primary: Cluster) -> None:
    """Until the primary's reloaded configuration counts its standby as synchronous."""
    connection = await asyncpg.connect(primary.dsn, timeout=10)
    try:
        async with asyncio.timeout(REPLAY_TIMEOUT):
            while True:
                if await connection.fetchval("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"):
                    return
                await asyncio.sleep(0.01)
    finally:
        await connection.close()


def create_replica_set(prefix: str = "adbs", *, synchronous: bool = False) -> ReplicaSet:
    """Create and start a primary and its standby, named ``<prefix>_primary_<pid>`` and ``<prefix>_standby_<pid>``;
    drop whatever was made when a step fails. ``synchronous``: every commit on the primary waits until the standby
    has flushed it (``synchronous_standby_names = '*'``), so that a commit the primary answered is on the standby.

    The caller drops it (``drop_replica_set``); ``pg_replica_set`` is the one a test session shares.
    """
    _binaries_or_skip()
    started = time.monotonic()
    version = _installed_version()
    primary = Cluster(version, f"{prefix}_primary_{os.getpid()}", _free_port())
    standby = Cluster(version, f"{prefix}_standby_{os.getpid()}", _free_port())
    try:
        _create_configured(primary, PG_HBA + REPLICATION_HBA, SETTINGS + PRIMARY_SETTINGS)
        _run(primary.ctl("start"))
        _create_database(primary)
        _prepare_primary(primary)
        _create_standby(standby, primary, _config(standby))
        _run(standby.ctl("start"))
        _in_thread(_wait_for_standby(standby, primary))
        if synchronous:
            # Only now: made synchronous before the standby streams, the primary's own set-up commits would wait.
            _execute(primary.dsn, SYNCHRONOUS, "SELECT pg_reload_conf()")
            _in_thread(_wait_until_synchronous(primary))
    except BaseException:
        _drop(primary, standby)
        raise
    replica_set = ReplicaSet(primary, standby, time.monotonic() - started)
    print(
        f"pg_replica_set: primary on {primary.port}, standby on {standby.port}, "
        f"ready in {replica_set.setup_seconds:.1f}s"
    )
    return replica_set


def drop_replica_set(replica_set: ReplicaSet) -> None:
    """Stop and remove both clusters of ``replica_set`` (whatever state a test left them in)."""
    _drop(replica_set.primary, replica_set.standby)


def _drop(primary: Cluster, standby: Cluster) -> None:
    for cluster in (standby, primary):  # the standby first: it would keep reconnecting to a stopped primary
        _drop_cluster(cluster, _config(cluster))


class _Shared:
    """The one replica set of this process. Each test module that imports ``pg_replica_set`` has a session
    fixture of its own; all of them get this set, created by the first and dropped after the last."""

    replica_set: ReplicaSet | None = None
    holders = 0


@pytest.fixture(scope="session")
def pg_replica_set() -> Iterator[ReplicaSet]:
    """A running primary and hot standby of this session's own; both dropped (stopped first) at the end."""
    _binaries_or_skip()
    if _Shared.replica_set is None:
        _Shared.replica_set = create_replica_set()
    replica_set = _Shared.replica_set
    _Shared.holders += 1
    try:
        yield replica_set
    finally:
        _Shared.holders -= 1
        if _Shared.holders == 0:
            _Shared.replica_set = None
            _drop(replica_set.primary, replica_set.standby)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:  # ended meanwhile
                continue
            if f"\nPPid:\t{pid}\n" in status:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """True while ``pid`` runs: neither gone nor a zombie that nobody has reaped yet."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def crash(cluster: Cluster) -> None:
    """kill -9 the cluster's postmaster and every backend at once, as a machine that fails would lose them.

    The postmaster is stopped first: a backend killed under a running postmaster would make it restart the
    cluster (crash recovery) instead of dying with it. Its SysV shared memory segment, which only a restart
    would reuse, is removed; the data directory stays, as a crashed server's does.
    """
    lines = (_data_directory(cluster) / "postmaster.pid").read_text().splitlines()
    postmaster = int(lines[0])
    os.kill(postmaster, signal.SIGSTOP)
    processes = [*_children(postmaster), postmaster]  # listed before the kill: init adopts the orphans after it
    for pid in processes:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while any(_alive(pid) for pid in processes):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the postmaster {postmaster} of {cluster.name} still runs after kill -9")
        time.sleep(0.01)
    shared_memory = lines[6].split() if len(lines) > 6 else []  # "key shmid"
    if len(shared_memory) == 2:
        subprocess.run(["ipcrm", "-m", shared_memory[1]], capture_output=True, timeout=COMMAND_TIMEOUT, check=False)
