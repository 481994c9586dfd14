"""``python -m tests.pool_metrics_child``: pool metrics and OpenTelemetry's global MeterProvider, which a process
can set only once; run by tests/test_pool_metrics.py in a process of its own. Prints ``ok`` when every check
passed: without a configured provider nothing is imported, wrapped or listened to; ``DATABASE_METRICS=true``
meters an engine made before the provider was set, recorded from then on; a provider configured before the engine
is made meters it by default; ``DATABASE_METRICS=false`` never does.
"""

from __future__ import annotations

import asyncio
import os
import sys

from sqlalchemy import text

from asgi_db_session import Database, session_scope

URL = os.environ.get("TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


async def use(database: Database) -> None:
    async with session_scope(database.name) as session:
        await session.execute(text("SELECT 1"))


def metered(database: Database) -> bool:
    pool = database.engine.sync_engine.pool
    wrapped = "connect" in vars(pool)
    assert wrapped == bool(pool.dispatch.checkin), "the wrapper and the checkin listener come together"
    return wrapped


def use_count(reader: object, pool: str) -> int:
    from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

    assert isinstance(reader, InMemoryMetricReader)
    data = reader.get_metrics_data()
    assert data is not None
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name == "db.client.connection.use_time":
                    for point in metric.data.data_points:
                        assert isinstance(point, HistogramDataPoint)
                        if (point.attributes or {}).get("db.client.connection.pool.name") == pool:
                            return point.count
    return 0


def set_provider() -> object:
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return reader


async def main() -> None:
    # No provider configured: OpenTelemetry is not even imported, and the pool is left as it is.
    plain = Database(URL, name="plain")
    await use(plain)
    assert not metered(plain)
    assert "opentelemetry" not in sys.modules, "imported though no provider was configured"
    # An application that configures only tracing imports the API; still no meter provider.
    import opentelemetry.metrics  # noqa: F401

    still_plain = Database(URL, name="still-plain")
    await use(still_plain)
    assert not metered(still_plain)

    # DATABASE_METRICS=true before any provider: metered through OpenTelemetry's proxy, recorded once one is set.
    os.environ["DATABASE_METRICS"] = "true"
    early = Database(URL, name="early")
    await use(early)
    assert metered(early)
    del os.environ["DATABASE_METRICS"]

    reader = set_provider()
    await use(early)
    assert use_count(reader, "early") == 1

    # A provider configured before the engine is made: metered by default.
    configured = Database(URL)
    await use(configured)
    assert metered(configured)
    assert use_count(reader, "default") == 1

    # DATABASE_METRICS=false: never, provider or not.
    os.environ["DATABASE_METRICS"] = "false"
    off = Database(URL, name="off")
    await use(off)
    assert not metered(off)

    for database in (plain, still_plain, early, configured, off):
        await database.dispose()
    print("ok")


if __name__ == "__main__":
    asyncio.run(main())
