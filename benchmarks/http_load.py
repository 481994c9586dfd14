"""HTTP mode: each app runs under uvicorn (httptools, uvloop) in a subprocess on 127.0.0.1, loaded with wrk.

A server is started for its app at the beginning of each round and stopped (lifespan shutdown, engine
disposed) at its end, like the in-process runner, so only one app holds database connections at a time.
Each server start first gets one correctness request per route (status and body checked with httpx) and a
warm-up: wrk cycling through every route but /stream for ``--http-warmup`` seconds. Each route is then
loaded for ``--duration`` seconds; any non-2xx response or socket error marks the route as failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from .apps import APPS
from .common import EXPECTED_BODY, INSERT_FIRST_ID, METHODS, ROUTES, EngineSettings
from .driver import Batch

ROOT = Path(__file__).resolve().parent.parent
_RPS = re.compile(r"Requests/sec:\s*([\d.]+)")
_TOTAL = re.compile(r"(\d+) requests in")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s*(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
# Each server start gets its own /insert id range, so servers never collide on a primary key.
_ID_RANGE = 10_000_000


def check_tools() -> str | None:
    """Why HTTP mode cannot run here, or None."""
    if shutil.which("wrk") is None:
        return "HTTP mode needs wrk: apt-get install wrk"
    try:
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        return f"HTTP mode needs the bench extra: pip install -e '.[bench]' ({exc})"
    return None


def uvicorn_command(port: int) -> list[str]:
    """The server every HTTP measurement runs: uvicorn on ``benchmarks.server:create_app`` (BENCH_APP in the
    environment names the app), one worker, uvloop and httptools where installed, no access log."""
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "benchmarks.server:create_app",
        "--app-dir",
        str(ROOT),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--lifespan",
        "on",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    try:
        import uvloop  # noqa: F401

        command += ["--loop", "uvloop"]
    except ImportError:
        pass
    try:
        import httptools  # noqa: F401

        command += ["--http", "httptools"]
    except ImportError:
        pass
    return command


def _lua(paths: list[str]) -> str:
    """A wrk script that cycles through ``paths`` with each route's method."""
    entries = ", ".join(f'{{"{METHODS.get(path, "GET")}", "{path}"}}' for path in paths)
    return (
        f"local routes = {{{entries}}}\n"
        "local i = 0\n"
        "request = function()\n"
        "  i = i % #routes + 1\n"
        "  return wrk.format(routes[i][1], routes[i][2])\n"
        "end\n"
    )


class HttpTarget:
    """One app served by uvicorn on its own port."""

    _starts = 0

    def __init__(self, key: str, settings: EngineSettings, args: argparse.Namespace, port: int) -> None:
        self.key = key
        self.settings = settings
        self.args = args
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.process: asyncio.subprocess.Process | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-http-{key}-"))
        self.log = self.workdir / "server.log"
        self.bad: dict[str, str] = {}
        self.scripts: dict[str, Path] = {}
        for path in ROUTES:
            script = self.workdir / f"{path.strip('/')}.lua"
            script.write_text(_lua([path]))
            self.scripts[path] = script
        warm = [path for path in ROUTES if path != "/stream" and (APPS[key].serves_db or path == "/nodb")]
        self.warmup_script = self.workdir / "warmup.lua"
        self.warmup_script.write_text(_lua(warm))

    def _server_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    async def start(self) -> None:
        HttpTarget._starts += 1
        env = {
            **os.environ,
            **self.settings.to_env(),
            "BENCH_APP": self.key,
            "BENCH_INSERT_BASE": str(INSERT_FIRST_ID + HttpTarget._starts * _ID_RANGE),
            "PYTHONWARNINGS": "ignore",
            "BENCH_SERVER_GC": self.args.server_gc,
        }
        command = uvicorn_command(self.port)
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *command, cwd=ROOT, env=env, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL
            )
        await self._wait_ready()
        await self._check_routes()
        if self.args.http_warmup > 0:
            await self._wrk(self.warmup_script, self.args.http_warmup)

    async def _wait_ready(self, limit: float = 30.0) -> None:
        import httpx

        assert self.process is not None
        deadline = time.monotonic() + limit
        async with httpx.AsyncClient(base_url=self.base, timeout=2.0) as client:
            while True:
                if self.process.returncode is not None:
                    raise RuntimeError(f"uvicorn exited ({self.process.returncode}): {self._server_tail()}")
                try:
                    await client.get("/nodb")
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"uvicorn did not answer within {limit}s: {self._server_tail()}") from None
                    await asyncio.sleep(0.1)
                else:
                    return

    async def _check_routes(self) -> None:
        import httpx

        async with httpx.AsyncClient(base_url=self.base, timeout=10.0) as client:
            for path in self.args.routes:
                if not (APPS[self.key].serves_db or path == "/nodb"):
                    continue
                response = await client.request(METHODS.get(path, "GET"), path)
                if response.status_code != 200 or response.content != EXPECTED_BODY[path]:
                    # Not fatal here: measure() reports it for that route.
                    self.bad[path] = f"status {response.status_code}, body {response.content[:200]!r}"

    async def _wrk(self, script: Path, seconds: int) -> str:
        args = self.args
        connections = max(args.concurrency, args.wrk_threads)
        command = [
            "wrk",
            f"-t{args.wrk_threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"{self.base}/",
        ]
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await process.communicate()
        text = out.decode(errors="replace")
        if process.returncode != 0:
            raise RuntimeError(f"wrk exited {process.returncode}: {text[-500:]}")
        return text

    def _server_cpu(self) -> float | None:
        """The server process's CPU seconds so far (user + system), from /proc; None where unavailable."""
        if self.process is None:
            return None
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        # After the command name: state is field 3, utime and stime are fields 14 and 15 (clock ticks).
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def measure(self, route: str) -> Batch:
        if route in self.bad:
            return Batch(1, 1.0, 1, self.bad[route])
        cpu_before = self._server_cpu()
        text = await self._wrk(self.scripts[route], self.args.duration)
        cpu_after = self._server_cpu()
        cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        rps = _RPS.search(text)
        total = _TOTAL.search(text)
        if rps is None or total is None:
            return Batch(1, 1.0, 1, f"could not read wrk's output: {text[-300:]}")
        requests = int(total.group(1))
        if not requests:
            # Not the app's failure, but no figure either: every request took longer than the whole load.
            return Batch(1, float(self.args.duration), 1, f"no response within the {self.args.duration}s of load")
        problems: list[str] = []
        failed = 0
        non_2xx = _NON_2XX.search(text)
        if non_2xx is not None and int(non_2xx.group(1)):
            failed += int(non_2xx.group(1))
            problems.append(f"{non_2xx.group(1)} non-2xx responses")
        sockets = _SOCKET.search(text)
        if sockets is not None and any(int(n) for n in sockets.groups()):
            # A response cut short is often counted twice by wrk (non-2xx and read error): keep the larger.
            failed = max(failed, sum(int(n) for n in sockets.groups()))
            connect, read, write, timeout = sockets.groups()
            problems.append(f"socket errors: connect {connect}, read {read}, write {write}, timeout {timeout}")
        if problems:
            tail = self._server_tail().strip().splitlines()
            detail = f"; server: {tail[-1][:300]}" if tail else ""
            return Batch(requests, float(self.args.duration), failed, "; ".join(problems) + detail)
        rate = float(rps.group(1))
        return Batch(requests, requests / rate if rate else 0.0, 0, None, cpu)

    def cleanup(self) -> None:
        """Remove the wrk scripts and the server log."""
        shutil.rmtree(self.workdir, ignore_errors=True)

    async def stop(self) -> None:
        process, self.process = self.process, None
        self.bad = {}
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.wait(), 20)
        except TimeoutError:
            process.kill()
            await process.wait()
