"""Instructions per request of a real server: uvicorn under callgrind, loaded over HTTP at a concurrency.

``python benchmarks/http_instructions.py [--apps ...] [--routes ...] [--concurrency 32] [--small K1] [--large K2]``

Throughput over HTTP on a small machine moves by tens of per cent from round to round (wrk, the server and
PostgreSQL share the cores), which hides the few per cent that separate the apps. Here the server process
(uvicorn, one worker, uvloop and httptools, exactly as ``run.py --http`` starts it) runs under
``valgrind --tool=callgrind``, and this process sends it K requests over ``--concurrency`` keep-alive
connections, then stops it (SIGINT: lifespan shutdown, engine disposed). A second server gets K2 requests; both
pay the same start-up, the same connections and the same shutdown, so

    instructions per request = (Ir(K2) - Ir(K1)) / (K2 - K1)

is what one request costs the server: HTTP parsing, the event loop, the app, the driver. The client's work is
not counted. Under callgrind the server is slower than the client, so requests queue on its connections and
the figure is that of a busy server, the case where the overhead matters.

Where objects happen to land in memory moves these counts by a few per cent, the same code in the same process
(benchmarks/README.md, "The same server in other memory layouts"), so ``--repeat N`` runs each server in N
layouts: run ``r`` (from 0) starts after a start-up of its own that allocates ``layout_size(r)`` strings and
makes ``layout_types(r)`` classes before anything is imported (``sitecustomize``), run 0 as it is; the table gives
the median over the layouts.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != _here]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.apps import BARE, FLOORS, HANDWRITTEN, OURS
from benchmarks.common import (
    EXPECTED_BODY,
    INSERT_FIRST_ID,
    METHODS,
    NO_QUERY_ROUTES,
    NODB_ROUTE,
    ROUTES,
    EngineSettings,
    clean_inserted,
    database_url,
    git_state,
    prepare_table,
)
from benchmarks.http_load import uvicorn_command
from benchmarks.instructions import (
    callgrind_total,
    check_counting_args,
    counted_env,
    layouts_record,
    pairs,
    per_request_counts,
    render,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_APPS = (BARE, *FLOORS, HANDWRITTEN, OURS)
DEFAULT_ROUTES = (NODB_ROUTE, "/read")
# Each server gets its own /insert id range, so that two servers running side by side never collide.
_ID_STRIDE = 1_000_000
# Under callgrind, imports and the first requests run some fifty times slower than natively.
_START_LIMIT = 600.0


@dataclass(frozen=True)
class Job:
    app: str
    route: str
    requests: int
    repeat: int
    port: int
    insert_base: int


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-1500:]


async def _wait_listening(port: int, process: asyncio.subprocess.Process, log: Path) -> None:
    """Until the server accepts connections; no request is sent, so none is counted before the load."""
    deadline = time.monotonic() + _START_LIMIT
    while True:
        if process.returncode is not None:
            raise RuntimeError(f"uvicorn exited ({process.returncode}): {_tail(log)}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not listen within {_START_LIMIT:.0f}s") from None
            await asyncio.sleep(0.5)
        else:
            writer.close()
            await writer.wait_closed()
            return


async def _load(port: int, route: str, requests: int, concurrency: int) -> None:
    """``requests`` requests on ``concurrency`` keep-alive connections, each response checked."""
    import httpx

    method = METHODS.get(route, "GET")
    expected = EXPECTED_BODY[route]
    remaining = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=_START_LIMIT) as client:

        async def worker() -> None:
            for _ in remaining:
                response = await client.request(method, route)
                if response.status_code != 200 or response.content != expected:
                    raise RuntimeError(f"{route}: status {response.status_code}, body {response.content[:200]!r}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


@dataclass(frozen=True)
class Setup:
    """What every server of a run shares."""

    settings: EngineSettings
    concurrency: int
    workdir: Path
    same_heap: tuple[str, ...] = ()
    """App keys whose modules every server imports first (server.py's BENCH_SAME_HEAP); empty: none."""
    server_gc: str = "on"
    """server.py's BENCH_SERVER_GC: "on", or "freeze"."""


async def _measure(job: Job, setup: Setup) -> int:
    """Instructions the server executed from its start to its exit, serving ``job.requests`` requests."""
    out = setup.workdir / f"callgrind.{job.app}.{job.route.strip('/')}.{job.requests}.{job.repeat}.out"
    log = setup.workdir / f"server.{job.app}.{job.route.strip('/')}.{job.requests}.{job.repeat}.log"
    env = {
        **counted_env(job.repeat, setup.workdir),
        **setup.settings.to_env(),
        "BENCH_APP": job.app,
        "BENCH_INSERT_BASE": str(job.insert_base),
        "PYTHONWARNINGS": "ignore",
        # Every wait that is bounded in real time is ~50 times longer under callgrind: a rollback after the
        # response would outlast the cleanup's bound, a request behind it the pool's, and each would end in
        # an error instead of a count.
        "BENCH_CLEANUP_TIMEOUT": str(_START_LIMIT),
        **({"BENCH_SAME_HEAP": ",".join(setup.same_heap)} if setup.same_heap else {}),
        **({"BENCH_SERVER_GC": setup.server_gc} if setup.server_gc != "on" else {}),
    }
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *uvicorn_command(job.port)]
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            *command, cwd=ROOT, env=env, stdout=log_file, stderr=log_file, stdin=asyncio.subprocess.DEVNULL
        )
    try:
        await _wait_listening(job.port, process, log)
        await _load(job.port, job.route, job.requests, setup.concurrency)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), _START_LIMIT)
            except TimeoutError:
                process.kill()
                await process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"{job}: uvicorn exited {process.returncode}: {_tail(log)}")
    return callgrind_total(out, str(job))


async def _run_all(
    jobs: Sequence[Job], setup: Setup, parallel: int
) -> tuple[dict[Job, int], dict[tuple[str, str], str]]:
    gate = asyncio.Semaphore(max(1, parallel))
    counts: dict[Job, int] = {}
    failures: dict[tuple[str, str], str] = {}

    async def one(job: Job) -> None:
        async with gate:
            try:
                counts[job] = await _measure(job, setup)
            except Exception as exc:
                failures[(job.app, job.route)] = str(exc)
            else:
                print(
                    f"  {job.app} {job.route} x{job.requests} #{job.repeat + 1}: {counts[job]:,} Ir",
                    file=sys.stderr,
                    flush=True,
                )

    await asyncio.gather(*(one(job) for job in jobs))
    return counts, failures


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Instructions per request (callgrind) of uvicorn serving each app over HTTP.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--apps", default=",".join(DEFAULT_APPS), help="comma-separated apps (see run.py --help)")
    parser.add_argument(
        "--routes", default=",".join(DEFAULT_ROUTES), help=f"comma-separated routes, of {', '.join(ROUTES)}"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="keep-alive connections, and the pool size")
    parser.add_argument("--small", type=int, default=300, help="requests to the first server (K1)")
    parser.add_argument("--large", type=int, default=1500, help="requests to the second server (K2)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each (app, route), each in a memory layout of its own; the table gives the median",
    )
    parser.add_argument(
        "--same-heap",
        action="store_true",
        help="every server imports what each app of the run imports before building its own (server.py, "
        "BENCH_SAME_HEAP): the collector then walks heaps of the same size in all of them",
    )
    parser.add_argument(
        "--server-gc",
        choices=("on", "freeze"),
        default="on",
        help="freeze: each server moves what is alive once its app is built out of the collector's view "
        "(gc.freeze(), server.py)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="servers under callgrind at once")
    parser.add_argument("--port", type=int, default=18631, help="first port the servers listen on (127.0.0.1)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "http-instructions.json", help="results file")
    args = parser.parse_args(argv)
    check_counting_args(parser, args)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    todo = pairs(args.apps, args.routes)
    jobs = [
        Job(app, route, k, repeat, args.port + i, INSERT_FIRST_ID + _ID_STRIDE * (1 + i))
        for i, (repeat, (app, route), k) in enumerate(
            (repeat, pair, k) for repeat in range(args.repeat) for pair in todo for k in (args.small, args.large)
        )
    ]
    settings = EngineSettings(url=database_url(), pool_size=args.concurrency, pool_timeout=_START_LIMIT)
    querying = any(route not in NO_QUERY_ROUTES for route in args.routes)
    if querying:
        asyncio.run(prepare_table(settings.url))
    workdir = Path(tempfile.mkdtemp(prefix="bench-http-callgrind-"))
    started = time.perf_counter()
    print(f"{len(jobs)} servers under callgrind, {args.jobs} at a time, in {workdir}", file=sys.stderr, flush=True)
    same_heap = tuple(args.apps) if args.same_heap else ()
    setup = Setup(settings, args.concurrency, workdir, same_heap, args.server_gc)
    counts, failures = asyncio.run(_run_all(jobs, setup, args.jobs))
    if querying:
        asyncio.run(clean_inserted(settings.url))
    if not failures:
        shutil.rmtree(workdir, ignore_errors=True)
    by_key = {(job.app, job.route, job.repeat, job.requests): ir for job, ir in counts.items()}
    runs, per_request = per_request_counts(by_key, todo, args)
    header = (
        f"Instructions per request of the server (uvicorn under callgrind, (Ir(K2) - Ir(K1)) / (K2 - K1), "
        f"K1={args.small}, K2={args.large}), {args.concurrency} keep-alive connections"
        + (f", median of {args.repeat} memory layouts" if args.repeat > 1 else "")
        + (", every server holding every app's modules" if args.same_heap else "")
        + (", the collector's view frozen after start-up" if args.server_gc == "freeze" else "")
        + f"; {time.perf_counter() - started:.0f}s"
    )
    text, rows = render(per_request, args.routes, header) if per_request else ("no results", [])
    print(text)
    for (app, route), reason in failures.items():
        print(f"{app} {route}: n/a ({reason})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "server": " ".join(uvicorn_command(0)[1:]).replace("--port 0 ", ""),
        "small": args.small,
        "large": args.large,
        "concurrency": args.concurrency,
        "git": git_state(),
        "repeat": args.repeat,
        **layouts_record(args.repeat),
        "same_heap": list(same_heap),
        "server_gc": args.server_gc,
        "raw_ir": [
            {"app": j.app, "route": j.route, "requests": j.requests, "repeat": j.repeat, "ir": ir}
            for j, ir in counts.items()
        ],
        "runs": [{"app": app, "route": route, "instructions": values} for (app, route), values in runs.items()],
        "per_request": rows,
        "failures": {f"{app} {route}": reason for (app, route), reason in failures.items()},
    }
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results written to {args.output}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
