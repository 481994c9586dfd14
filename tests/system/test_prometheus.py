"""The demo's ``/metrics`` scraped by a real Prometheus server, and a pool metric read back through its HTTP API.

Debian's ``prometheus`` binary (``./dev test`` installs the package, its system service left stopped) runs as a
child process with a config and a storage directory in the test's temporary directory, on a free port of
127.0.0.1, scraping the demo (``python -m examples.notes``, on SQLite in the same directory) every second.
Without the binary the test is skipped, with the reason shown; with ``CI`` set it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from .test_examples import _demo_env, _free_port, _wait_until_serving

pytestmark = pytest.mark.anyio

SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/usr/sbin", "/usr/local/bin"])
# What the OpenTelemetry exporter makes of db.client.connection.count and its attributes: dots become underscores,
# and a unit in braces ({connection}) adds no suffix.
QUERY = 'db_client_connection_count{db_client_connection_pool_name="default",db_client_connection_state="%s"}'


def prometheus_binary() -> str:
    found = shutil.which("prometheus", path=SEARCH_PATH)
    if found is None:
        reason = "prometheus is not installed (Debian: apt-get install prometheus; ./dev test installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the Prometheus test must run")
        pytest.skip(reason)
    return found


@asynccontextmanager
async def process(
    command: list[str], cwd: Path, log_name: str, env: dict[str, str] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``command`` running in ``cwd`` (its output in ``log_name`` there), stopped with SIGTERM at the end."""
    with (cwd / log_name).open("wb") as log:
        child = await asyncio.create_subprocess_exec(*command, cwd=cwd, env=env, stdout=log, stderr=log)
        try:
            yield child
        finally:
            if child.returncode is None:
                child.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(child.wait(), timeout=10)
                except TimeoutError:
                    child.kill()
                    await child.wait()


async def query(http: httpx.AsyncClient, expression: str) -> list[dict[str, Any]]:
    response = await http.get("/api/v1/query", params={"query": expression})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def test_prometheus_scrapes_the_demo_and_answers_its_pool_metrics(tmp_path: Path) -> None:
    binary = prometheus_binary()
    demo_port, prometheus_port = _free_port(), _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: notes\n"
        "    metrics_path: /metrics\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{demo_port}']\n",
        encoding="utf-8",
    )
    demo_env = _demo_env(DATABASE_URL=f"sqlite:///{tmp_path / 'notes.db'}")
    demo = [sys.executable, "-m", "examples.notes", "--port", str(demo_port)]
    prometheus = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{prometheus_port}",
    ]
    async with (
        process(demo, tmp_path, "demo.log", demo_env) as demo_process,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{demo_port}", timeout=10, trust_env=False) as app,
    ):
        await _wait_until_serving(app, demo_process)
        assert (await app.post("/notes", json={"title": "scraped"})).status_code == 201
        exposition = (await app.get("/metrics")).text
        assert 'db_client_connection_count{db_client_connection_pool_name="default"' in exposition, exposition

        async with (
            process(prometheus, tmp_path, "prometheus.log") as prometheus_process,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{prometheus_port}", timeout=5, trust_env=False) as api,
        ):
            idle: list[dict[str, Any]] = []
            async with asyncio.timeout(20):
                while not idle:
                    assert prometheus_process.returncode is None, (tmp_path / "prometheus.log").read_text()
                    with contextlib.suppress(httpx.TransportError):  # not listening yet
                        # Listening, its API answers 503 until its storage is open: /-/ready says when it is.
                        if (await api.get("/-/ready")).status_code == 200:
                            idle = await query(api, QUERY % "idle")
                    await asyncio.sleep(0.25)
            # The note's request left its connection in the pool: one idle, none used, as the demo's pool reads.
            assert [sample["value"][1] for sample in idle] == ["1"], idle
            used = await query(api, QUERY % "used")
            assert [sample["value"][1] for sample in used] == ["0"], used
            assert idle[0]["metric"]["job"] == "notes"
