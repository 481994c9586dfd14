"""``/metrics``: the database's connection pool metrics (OpenTelemetry's ``db.client.connection.*``) for Prometheus.

The demos hand the Database a MeterProvider of their own, read by OpenTelemetry's Prometheus exporter; the
endpoint renders what it holds in Prometheus' text format. The provider is not made the global one: the tests
build many demo apps in one process, and a process can set its global provider only once.
"""

from __future__ import annotations

import functools

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response


@functools.cache
def meter_provider() -> MeterProvider:
    """The demos' MeterProvider: one per process, as its Prometheus reader registers with prometheus_client's
    default registry, which takes it once."""
    return MeterProvider(metric_readers=[PrometheusMetricReader()])


async def metrics(request: Request) -> Response:
    """Every metric of the provider, collected now, in Prometheus' text format."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
