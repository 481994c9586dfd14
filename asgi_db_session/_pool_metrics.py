"""Connection pool metrics of OpenTelemetry's semantic conventions for database clients.

``db.client.connection.*``: the connections by state, the pool's limits, the requests waiting for a
connection, the timeouts, and how long a connection took to create, to obtain and was held. Recorded only
for the engines this module is handed (``Database`` decides, see ``metrics_provider``); OpenTelemetry is
imported only then.

What each measurement hangs on, and why there:

- The counts and limits are observable instruments whose callbacks read the pool (``checkedin()``,
  ``checkedout()``, ``size()``) when the reader collects: nothing per request. They read ``engine.pool`` at
  each collection, so a pool that ``dispose()`` replaced is the one reported.
- Waiting, timeouts and wait time: SQLAlchemy has no event for a checkout that waits or gives up, so the
  pool's public ``connect()`` (what the engine calls for every connection it takes) is wrapped on the pool
  instance. Wrapping ``connect()`` rather than the queue's private ``_do_get()`` keeps to a documented method,
  and counts all a request waits for: the queue, a new connection, the pre-ping. ``recreate()`` is wrapped
  too, since ``Engine.dispose()`` replaces the pool with what it returns and an instance attribute would
  otherwise be lost with the old pool. The engine is never given a ``ConnectionEvents`` listener (such as
  ``engine_disposed``): any of them makes SQLAlchemy dispatch engine events at every statement.
- Use time: the ``checkin`` pool event, against the time of the checkout kept in the entry's ``record_info``.
- Create time: the ``connect`` pool event, against the entry's ``last_connect_time``, which the pool sets
  just before it calls the driver.
"""

from __future__ import annotations

import os
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry, Pool, PoolProxiedConnection, QueuePool

from ._extras import require

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Counter, Histogram, MeterProvider, Observation
    from sqlalchemy.engine import Engine

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
# The conventions give no buckets for these histograms; these are the ones they give db.client.operation.duration
# (seconds), which the SDK's defaults (made for milliseconds) would otherwise squeeze into their first bucket.
BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
METER_NAME = "asgi_db_session"
# Where a checked-out connection's pool entry keeps the time of its checkout, for the use time at its checkin.
_CHECKED_OUT = "asgi_db_session.checked_out_at"


def _provider_configured() -> bool:
    """Whether an application configured a MeterProvider: set one, or named one in OTEL_PYTHON_METER_PROVIDER.

    Without either, OpenTelemetry's API hands out a proxy that records nothing until a provider is set; this
    package then records nothing either, and pays nothing, not even the import.
    """
    named = bool(os.environ.get("OTEL_PYTHON_METER_PROVIDER"))
    if "opentelemetry.metrics" not in sys.modules and not (named and find_spec("opentelemetry") is not None):
        return False
    from opentelemetry import metrics

    provider = metrics.get_meter_provider()
    try:
        # The API has no public way to ask whether a provider was set: until then it returns this proxy.
        from opentelemetry.metrics._internal import _ProxyMeterProvider
    except ImportError:  # pragma: no cover - an API that moved it; the no-op check still applies
        return not isinstance(provider, metrics.NoOpMeterProvider)
    return not isinstance(provider, metrics.NoOpMeterProvider | _ProxyMeterProvider)


def metrics_provider(setting: bool | None, given: MeterProvider | None) -> MeterProvider | None:
    """The MeterProvider to record an engine's pool metrics with, or None for none.

    ``setting`` is ``DATABASE_METRICS``: False never records; True always does, through ``given`` or else the
    global provider (through OpenTelemetry's proxy, so that a provider set later is used from then on); None
    (the default) records through ``given`` when there is one, else through the global provider when an
    application configured one.
    """
    if setting is False:
        return None
    if given is not None:
        return given
    if setting is None and not _provider_configured():
        return None
    require("opentelemetry.metrics", extra="opentelemetry", needed_by="DATABASE_METRICS=true (pool metrics)")
    from opentelemetry import metrics

    return metrics.get_meter_provider()


class _Engine:
    """One metered engine: its pool's name and the measurements that are not read from the pool."""

    __slots__ = ("__weakref__", "attributes", "engine", "idle", "pending", "used")

    def __init__(self, engine: Engine, pool_name: str) -> None:
        self.engine = weakref.ref(engine)
        self.attributes = {POOL_NAME: pool_name}
        self.idle = {POOL_NAME: pool_name, STATE: "idle"}
        self.used = {POOL_NAME: pool_name, STATE: "used"}
        # Requests inside the pool's connect(), waiting for a connection.
        self.pending = 0


class _Instruments:
    """The instruments of one MeterProvider, and the engines whose pools they report."""

    def __init__(self, provider: MeterProvider) -> None:
        meter = provider.get_meter(METER_NAME)
        self.engines: list[_Engine] = []
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            callbacks=[self._counts],
            unit="{connection}",
            description="The number of connections that are currently in state described by the state attribute",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.max",
            callbacks=[self._max],
            unit="{connection}",
            description="The maximum number of open connections allowed",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.idle.max",
            callbacks=[self._idle_max],
            unit="{connection}",
            description="The maximum number of idle open connections allowed",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.pending_requests",
            callbacks=[self._pending],
            unit="{request}",
            description="The number of current pending requests for an open connection",
        )
        self.timeouts: Counter = meter.create_counter(
            "db.client.connection.timeouts",
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to obtain a connection from "
            "the pool",
        )
        self.create_time: Histogram = meter.create_histogram(
            "db.client.connection.create_time",
            unit="s",
            description="The time it took to create a new connection",
            explicit_bucket_boundaries_advisory=BUCKETS,
        )
        self.wait_time: Histogram = meter.create_histogram(
            "db.client.connection.wait_time",
            unit="s",
            description="The time it took to obtain an open connection from the pool",
            explicit_bucket_boundaries_advisory=BUCKETS,
        )
        self.use_time: Histogram = meter.create_histogram(
            "db.client.connection.use_time",
            unit="s",
            description="The time between borrowing a connection and returning it to the pool",
            explicit_bucket_boundaries_advisory=BUCKETS,
        )

    def _pools(self) -> Iterator[tuple[_Engine, Pool]]:
        alive = [metered for metered in self.engines if metered.engine() is not None]
        self.engines[:] = alive
        for metered in alive:
            engine = metered.engine()
            if engine is not None:
                yield metered, engine.pool

    def _counts(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        for metered, pool in self._pools():
            if isinstance(pool, QueuePool):
                yield Observation(pool.checkedin(), metered.idle)
                yield Observation(pool.checkedout(), metered.used)

    def _max(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        for metered, pool in self._pools():
            # QueuePool has no public reader of its overflow limit; recreate() reads this attribute too.
            max_overflow: int = getattr(pool, "_max_overflow", -1)
            if isinstance(pool, QueuePool) and max_overflow != -1:  # -1 (or a size of 0): no limit to report
                yield Observation(pool.size() + max_overflow, metered.attributes)

    def _idle_max(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        for metered, pool in self._pools():
            if isinstance(pool, QueuePool) and pool.size() > 0:  # a size of 0 keeps any number
                yield Observation(pool.size(), metered.attributes)

    def _pending(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        for metered, _pool in self._pools():
            yield Observation(metered.pending, metered.attributes)


# One set of instruments per MeterProvider: a second set of the same names would be refused as duplicates.
_instruments: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
# The engines already metered, so that a second Database on one engine does not meter it twice.
_metered: weakref.WeakKeyDictionary[Engine, _Engine] = weakref.WeakKeyDictionary()


def record_pool_metrics(engine: AsyncEngine, pool_name: str, provider: MeterProvider) -> None:
    """Record ``engine``'s pool metrics under ``pool_name`` with ``provider``; once per engine."""
    sync_engine = engine.sync_engine
    if sync_engine in _metered:
        return
    instruments = _instruments.get(provider)
    if instruments is None:
        instruments = _instruments[provider] = _Instruments(provider)
    metered = _metered[sync_engine] = _Engine(sync_engine, pool_name)
    instruments.engines.append(metered)
    _meter_checkouts(sync_engine.pool, metered, instruments)
    attributes = metered.attributes
    use_time = instruments.use_time
    create_time = instruments.create_time

    def on_checkin(dbapi_connection: Any, entry: ConnectionPoolEntry) -> None:
        info = entry.record_info
        checked_out = None if info is None else info.pop(_CHECKED_OUT, None)
        if checked_out is not None:
            use_time.record(time.perf_counter() - checked_out, attributes)

    def on_connect(dbapi_connection: Any, entry: ConnectionPoolEntry) -> None:
        # Set by the pool (wall clock) just before it calls the driver.
        started: float | None = getattr(entry, "last_connect_time", None)
        if started:
            create_time.record(max(time.time() - started, 0.0), attributes)

    # Pool events set on the engine stay with every pool that dispose() puts in place.
    event.listen(sync_engine, "checkin", on_checkin)
    event.listen(sync_engine, "connect", on_connect)


def _meter_checkouts(pool: Pool, metered: _Engine, instruments: _Instruments) -> None:
    """Wrap ``pool.connect()`` (and ``recreate()``, which the engine's dispose() replaces the pool with)."""
    connect: Callable[[], PoolProxiedConnection] = pool.connect
    recreate: Callable[[], Pool] = pool.recreate
    attributes = metered.attributes
    timeouts = instruments.timeouts
    wait_time = instruments.wait_time

    def metered_connect() -> PoolProxiedConnection:
        metered.pending += 1
        started = time.perf_counter()
        try:
            connection = connect()
        except sa_exc.TimeoutError:
            timeouts.add(1, attributes)
            raise
        finally:
            metered.pending -= 1
        now = time.perf_counter()
        wait_time.record(now - started, attributes)
        info = connection.record_info
        if info is not None:
            info[_CHECKED_OUT] = now
        return connection

    def metered_recreate() -> Pool:
        new_pool = recreate()
        _meter_checkouts(new_pool, metered, instruments)
        return new_pool

    # setattr: mypy refuses an assignment to a method.
    setattr(pool, "connect", metered_connect)  # noqa: B010
    setattr(pool, "recreate", metered_recreate)  # noqa: B010
