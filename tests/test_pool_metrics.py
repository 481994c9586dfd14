"""OpenTelemetry's connection pool metrics (``db.client.connection.*``), read with the SDK's in-memory reader while
real requests run against the test PostgreSQL server.

Each test gives its Database a MeterProvider of its own (``meter_provider=``) and a name of its own, which is the
pool name its metrics carry. What happens with the global provider (none configured, one configured,
``DATABASE_METRICS``) is tested in a child process (tests/pool_metrics_child.py), since OpenTelemetry lets a
process set its global provider only once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_db_session import Database, DatabaseSettings, DBSessionMiddleware, current_session, session_scope
from asgi_db_session._pool_metrics import POOL_NAME, STATE

from .conftest import PG_URL, client

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("postgresql_dsn")]

REPLICAS = [PG_URL.rsplit("/", 1)[0] + "/postgres", PG_URL.rsplit("/", 1)[0] + "/template1"]
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Metered:
    """A MeterProvider and the in-memory reader that collects its metrics."""

    provider: MeterProvider
    reader: InMemoryMetricReader

    def collect(self) -> Metrics:
        return Metrics(self.reader)


class Metrics:
    """What one collection holds: each metric's points."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        self.points: dict[str, list[Any]] = {}
        data = reader.get_metrics_data()
        for resource_metrics in data.resource_metrics if data is not None else ():
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    self.points.setdefault(metric.name, []).extend(metric.data.data_points)

    def value(self, name: str, pool: str, state: str | None = None) -> float | None:
        """A counter's value for ``pool`` (and ``state``); None when it has no point for them."""
        wanted = {POOL_NAME: pool} if state is None else {POOL_NAME: pool, STATE: state}
        for point in self.points.get(name, []):
            assert isinstance(point, NumberDataPoint)
            if dict(point.attributes or {}) == wanted:
                return point.value
        return None

    def histogram(self, name: str, pool: str) -> HistogramDataPoint:
        for point in self.points.get(name, []):
            assert isinstance(point, HistogramDataPoint)
            if dict(point.attributes or {}) == {POOL_NAME: pool}:
                return point
        raise AssertionError(f"no {name} point for the pool {pool!r}: {self.points.get(name)}")

    def pools(self, name: str) -> set[str]:
        return {str(dict(point.attributes or {})[POOL_NAME]) for point in self.points.get(name, [])}


@pytest.fixture
def metered() -> Iterator[Metered]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield Metered(provider, reader)
    provider.shutdown()


@pytest.fixture
async def one_connection(metered: Metered, request: pytest.FixtureRequest) -> AsyncIterator[Database]:
    """A Database of one connection (no overflow, a pool timeout of 0.5 s), metered by ``metered``; named after
    the test."""
    database = Database(
        settings=DatabaseSettings(url=PG_URL, pool_size=1, max_overflow=0, pool_timeout=0.5),
        name=f"metrics-{request.node.name}",
        meter_provider=metered.provider,
    )
    yield database
    await database.dispose()


def sleeping_app(database: Database) -> Starlette:
    """``/?seconds=S`` holds its connection for S seconds in the database, and answers how long its statement
    took, as the app measured it."""

    async def endpoint(request: Request) -> Response:
        session = current_session(database.name)
        await session.connection()  # the checkout (and its pre-ping) before the clock starts
        started = time.perf_counter()
        await session.execute(text("SELECT pg_sleep(:s)"), {"s": float(request.query_params["seconds"])})
        return JSONResponse({"db_time": time.perf_counter() - started})

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, database=database)
    return app


async def test_requests_waiting_on_an_exhausted_pool_are_pending_then_time_out(
    one_connection: Database, metered: Metered
) -> None:
    pool = one_connection.name
    async with client(sleeping_app(one_connection), raise_app_exceptions=False) as http:
        holder = asyncio.create_task(http.get("/", params={"seconds": 1.5}))
        async with asyncio.timeout(10):
            while one_connection.engine.pool.checkedout() == 0:  # type: ignore[attr-defined]
                assert not holder.done(), holder.result()
                await asyncio.sleep(0.01)
        waiting = [asyncio.create_task(http.get("/", params={"seconds": 0})) for _ in range(2)]
        await asyncio.sleep(0.25)  # both are in the pool's queue by now, and 0.5 s from their timeout

        during = metered.collect()
        assert during.value("db.client.connection.pending_requests", pool) == 2
        assert during.value("db.client.connection.count", pool, "used") == 1
        assert during.value("db.client.connection.count", pool, "idle") == 0
        assert during.value("db.client.connection.max", pool) == 1
        assert during.value("db.client.connection.idle.max", pool) == 1
        assert during.value("db.client.connection.timeouts", pool) is None

        statuses = [response.status_code for response in await asyncio.gather(*waiting)]
        assert statuses == [503, 503]  # the pool's timeout, answered as the documented 503
        after_timeouts = metered.collect()
        assert after_timeouts.value("db.client.connection.pending_requests", pool) == 0
        assert after_timeouts.value("db.client.connection.timeouts", pool) == 2
        assert after_timeouts.value("db.client.connection.count", pool, "used") == 1

        assert (await holder).status_code == 200

    after = metered.collect()
    assert after.value("db.client.connection.count", pool, "used") == 0
    assert after.value("db.client.connection.count", pool, "idle") == 1
    assert after.histogram("db.client.connection.wait_time", pool).count == 1  # only the checkout that got one
    assert after.histogram("db.client.connection.use_time", pool).count == 1
    assert after.histogram("db.client.connection.create_time", pool).count == 1


async def test_use_time_matches_the_requests_database_time(one_connection: Database, metered: Metered) -> None:
    pool = one_connection.name
    db_times = []
    started = time.perf_counter()
    async with client(sleeping_app(one_connection)) as http:
        for seconds in (0.05, 0.1, 0.2, 0.1, 0.05):
            response = await http.get("/", params={"seconds": seconds})
            assert response.status_code == 200
            db_times.append(response.json()["db_time"])
    elapsed = time.perf_counter() - started

    use_time = metered.collect().histogram("db.client.connection.use_time", pool)
    assert use_time.count == 5
    # Held for the statement, and then for the response and the ROLLBACK that gives the connection back (a few
    # milliseconds, more on a loaded machine); never longer than the requests took.
    assert sum(db_times) <= use_time.sum <= min(elapsed, sum(db_times) + 5 * 0.1), (db_times, use_time.sum)
    assert use_time.max >= max(db_times)
    assert use_time.min >= min(db_times)


async def test_a_pool_replaced_by_dispose_is_still_metered(one_connection: Database, metered: Metered) -> None:
    for _ in range(2):
        async with session_scope(one_connection.name) as session:
            await session.execute(text("SELECT 1"))
        await one_connection.dispose()  # Engine.dispose(): a new pool in place of the old one
    metrics = metered.collect()
    assert metrics.histogram("db.client.connection.use_time", one_connection.name).count == 2
    assert metrics.histogram("db.client.connection.create_time", one_connection.name).count == 2
    assert metrics.value("db.client.connection.count", one_connection.name, "idle") == 0


async def test_each_replica_has_a_pool_name_of_its_own(metered: Metered) -> None:
    database = Database(PG_URL, replicas=REPLICAS, name="metrics-replicated", meter_provider=metered.provider)
    try:
        for _ in range(2):  # each replica in turn
            async with session_scope("metrics-replicated", read_only=True) as session:
                await session.execute(text("SELECT 1"))
        async with session_scope("metrics-replicated") as session:
            await session.execute(text("SELECT 1"))
    finally:
        await database.dispose()
    metrics = metered.collect()
    names = {"metrics-replicated", "metrics-replicated/replica-0", "metrics-replicated/replica-1"}
    assert metrics.pools("db.client.connection.use_time") == names
    assert metrics.pools("db.client.connection.create_time") == names
    for name in names:
        assert metrics.histogram("db.client.connection.use_time", name).count == 1
        assert metrics.value("db.client.connection.max", name) == 15  # the default pool_size and max_overflow


async def test_an_engine_given_as_it_is_is_metered_under_the_databases_name(metered: Metered) -> None:
    engine = create_async_engine(PG_URL, pool_size=2, max_overflow=0)
    database = Database(engine=engine, name="metrics-given", meter_provider=metered.provider)
    again = Database(engine=engine, name="metrics-given-again", meter_provider=metered.provider)  # one pool: once
    try:
        async with session_scope("metrics-given") as session:
            await session.execute(text("SELECT 1"))
    finally:
        await again.dispose()
        await database.dispose()
    metrics = metered.collect()
    assert metrics.pools("db.client.connection.max") == {"metrics-given"}
    assert metrics.value("db.client.connection.max", "metrics-given") == 2
    assert metrics.histogram("db.client.connection.use_time", "metrics-given").count == 1


async def test_database_metrics_false_records_nothing_even_with_a_provider(metered: Metered) -> None:
    database = Database(
        settings=DatabaseSettings(url=PG_URL, metrics=False), name="metrics-off", meter_provider=metered.provider
    )
    try:
        async with session_scope("metrics-off") as session:
            await session.execute(text("SELECT 1"))
        pool = database.engine.sync_engine.pool
        assert "connect" not in vars(pool)
        assert not pool.dispatch.checkin
    finally:
        await database.dispose()
    assert metered.collect().points == {}


def test_the_global_meter_provider_in_a_process_of_its_own() -> None:
    """Without a configured provider nothing is imported, wrapped or listened to; with one, the pool is metered;
    ``DATABASE_METRICS`` overrides either way."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.pool_metrics_child"],
        cwd=ROOT,
        env={**os.environ, "TEST_DATABASE_URL": PG_URL},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_the_setting_decides_before_any_provider_is_looked_for() -> None:
    """In this process no global MeterProvider is ever set (the child process test sets one): the default finds
    none configured, ``DATABASE_METRICS=true`` records through OpenTelemetry's global proxy, false through none,
    and a provider given always wins over the default."""
    from opentelemetry import metrics

    from asgi_db_session._pool_metrics import metrics_provider

    given = MeterProvider()
    assert metrics_provider(None, None) is None
    assert metrics_provider(True, None) is metrics.get_meter_provider()
    assert metrics_provider(False, given) is None
    assert metrics_provider(None, given) is given
    assert metrics_provider(True, given) is given


async def test_a_pool_without_a_size_reports_no_count_or_limits_but_its_waits(metered: Metered) -> None:
    """A NullPool (an engine given as it is) opens a connection per checkout and keeps none: it has no idle or used
    count, no maximum, no idle maximum to report; what a request waited and held it still is."""
    from sqlalchemy.pool import NullPool

    engine = create_async_engine(PG_URL, poolclass=NullPool)
    database = Database(engine=engine, name="metrics-nullpool", meter_provider=metered.provider)
    try:
        async with session_scope(database.name) as session:
            await session.execute(text("SELECT 1"))
        metrics = metered.collect()
        for name in ("db.client.connection.count", "db.client.connection.max", "db.client.connection.idle.max"):
            assert database.name not in metrics.pools(name), name
        assert metrics.value("db.client.connection.pending_requests", database.name) == 0
        assert metrics.histogram("db.client.connection.use_time", database.name).count == 1
    finally:
        await database.dispose()


def test_database_metrics_true_is_checked_at_construction() -> None:
    """``DATABASE_METRICS=true`` needs the extra, found (here: installed) when the Database is made, not later."""
    database = Database(settings=DatabaseSettings(url=PG_URL, metrics=True), name="metrics-true")
    assert database.settings is not None
    assert database.settings.metrics is True
