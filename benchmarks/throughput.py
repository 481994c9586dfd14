"""Requests per second of each app on each route, apps interleaved round by round; the table and latest.json.

Each round visits every app (in an order rotated by one each round, so no app is always first or last
after a warm cache or a vacuum); for each app it runs the lifespan startup, measures every route it serves,
and runs the lifespan shutdown (so only one app holds database connections at a time). A route's figure
for an app is the median of its rounds; its ratio is the median of the per-round ratios against the
baseline measured in the same round (bare for /nodb, the hand-written app for the DB routes).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from .apps import APPS, OURS, PEERS, AppSpec, baseline_for
from .common import (
    NO_QUERY_ROUTES,
    NODB_ROUTE,
    ROUTES,
    EngineSettings,
    clean_inserted,
    database_url,
    git_state,
    prepare_table,
)
from .driver import Batch, Lifespan, run_batch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NODB_TARGET = 0.98
DB_TARGET = 0.97
# Same-framework pairs for the "ahead of every peer" check, besides asgi-db-session against each peer.
FRAMEWORK_TWINS = {"fastapi-depends": "asgi-db-session-fastapi"}
PACKAGES = (
    "asgi-db-session",
    "sqlalchemy",
    "asyncpg",
    "starlette",
    "fastapi",
    "fastapi-async-sqlalchemy",
    "advanced-alchemy",
    "uvicorn",
    "uvloop",
    "httptools",
)


class LeakCounter(logging.Handler):
    """Counts the pool's "garbage collector is trying to clean up non-checked-in connection" reports.

    A leaked connection (one an app never gave back to its pool) is reported once here instead of twice per
    connection on stderr; the count goes in the results.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "non-checked-in connection" in record.getMessage():
            self.count += 1


def install_leak_counter() -> LeakCounter:
    counter = LeakCounter()
    logger = logging.getLogger("sqlalchemy.pool")
    logger.addHandler(counter)
    logger.propagate = False
    warnings.filterwarnings("ignore", message=".*non-checked-in connection.*")
    return counter


class Target(Protocol):
    """One app, measured the same way in every round."""

    async def start(self) -> None: ...

    async def measure(self, route: str) -> Batch: ...

    async def stop(self) -> None: ...

    def cleanup(self) -> None: ...


class InProcessTarget:
    """Calls the app's ASGI callable directly; a warm-up batch precedes every timed batch."""

    def __init__(self, app: Any, args: argparse.Namespace) -> None:
        self.app = app
        self.args = args
        self.lifespan: Lifespan | None = None

    async def start(self) -> None:
        self.lifespan = Lifespan(self.app)
        await self.lifespan.startup()

    async def measure(self, route: str) -> Batch:
        assert self.lifespan is not None
        args = self.args
        requests = args.requests_nodb if route in NO_QUERY_ROUTES else args.requests_db
        state = self.lifespan.state
        per_task = not args.same_task
        warm = await run_batch(
            self.app, route, min(requests, args.warmup), args.concurrency, state, task_per_request=per_task
        )
        if warm.errors:
            return warm
        gc.collect()
        return await run_batch(self.app, route, requests, args.concurrency, state, task_per_request=per_task)

    async def stop(self) -> None:
        assert self.lifespan is not None
        await self.lifespan.shutdown()

    def cleanup(self) -> None:
        pass


@dataclass
class Cell:
    """One app on one route, per round (None where the round failed): requests/s and CPU µs per request."""

    rps: list[float | None] = field(default_factory=list)
    cpu: list[float | None] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def record(self, batch: Batch | None) -> None:
        self.rps.append(None if batch is None else batch.rps)
        self.cpu.append(None if batch is None else batch.cpu_us)

    def ok(self) -> list[float]:
        return [value for value in self.rps if value is not None]

    def cpu_ok(self) -> list[float]:
        return [value for value in self.cpu if value is not None]


@dataclass
class Run:
    routes: list[str]
    apps: list[str]
    cells: dict[str, dict[str, Cell]]
    unavailable: dict[str, str]
    seconds: float = 0.0


def routes_of(spec: AppSpec, routes: Sequence[str]) -> list[str]:
    return [route for route in routes if spec.serves_db or route == NODB_ROUTE]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _start(target: Target, key: str, unavailable: dict[str, str]) -> bool:
    try:
        await target.start()
    except Exception as exc:
        unavailable[key] = f"lifespan startup failed: {type(exc).__name__}: {exc}"
        return False
    return True


async def _stop(target: Target, key: str) -> None:
    try:
        await target.stop()
    except Exception as exc:
        log(f"  {key}: lifespan shutdown failed: {type(exc).__name__}: {exc}")


async def _measure_cell(target: Target, route: str, cell: Cell, number: int) -> None:
    if cell.problems:
        # It failed in an earlier round: a broken route is reported, not measured again.
        cell.record(None)
        return
    try:
        batch = await target.measure(route)
    except Exception as exc:
        cell.record(None)
        cell.problems.append(f"round {number + 1}: {type(exc).__name__}: {exc}")
        return
    if batch.errors:
        cell.record(None)
        cell.problems.append(f"round {number + 1}: {batch.errors}/{batch.requests} failed; first: {batch.first_error}")
    else:
        cell.record(batch)


async def run_rounds(
    targets: dict[str, Target],
    apps: list[str],
    routes: list[str],
    rounds: int,
    unavailable: dict[str, str],
    between_rounds: Callable[[], Coroutine[Any, Any, object]],
    *,
    route_major: bool = False,
) -> Run:
    """Measure every app on every route once per round, the apps' order rotated by one each round.

    ``route_major``: within a round, each route visits every app in turn (each app started for the route and
    stopped after it), so that the batches whose ratio is taken run seconds apart rather than a whole app's
    set of routes apart, and share more of the machine's drift. Otherwise each app is started once per round
    and runs all its routes (HTTP mode: a server start per route would cost more than it saves).
    """
    cells = {route: {key: Cell() for key in apps} for route in routes}
    started = time.perf_counter()
    for number in range(rounds):
        t0 = time.perf_counter()
        shift = number % len(apps)
        order = apps[shift:] + apps[:shift]
        visits = (
            [(key, [route]) for route in routes for key in order if route in routes_of(APPS[key], routes)]
            if route_major
            else [(key, routes_of(APPS[key], routes)) for key in order]
        )
        for key, app_routes in visits:
            if key in unavailable:
                continue
            target = targets[key]
            if not await _start(target, key, unavailable):
                continue
            try:
                for route in app_routes:
                    await _measure_cell(target, route, cells[route][key], number)
            finally:
                await _stop(target, key)
        await between_rounds()
        log(f"round {number + 1}/{rounds} done in {time.perf_counter() - t0:.1f}s")
    return Run(routes, apps, cells, unavailable, time.perf_counter() - started)


# ---- summary ---------------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def quartiles(values: Sequence[float]) -> tuple[float | None, float | None]:
    """First and third quartiles (the value itself for one value)."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (None, None)
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def ratio_rounds(run: Run, route: str, key: str, against: str, metric: str = "rps") -> list[float]:
    """Per-round ratios of ``key`` to ``against`` on ``route``, over the rounds where both succeeded.

    ``rps``: app requests/s over theirs. ``cpu``: their CPU per request over the app's, which reads the same
    way (below 1: the app is slower), and is what the throughput ratio would be if both were CPU-bound.
    """
    mine, theirs = run.cells[route].get(key), run.cells[route].get(against)
    if mine is None or theirs is None:
        return []
    first, second = (theirs.cpu, mine.cpu) if metric == "cpu" else (mine.rps, theirs.rps)
    return [a / b for a, b in zip(first, second, strict=False) if a is not None and b is not None and b > 0]


def cell_status(run: Run, route: str, key: str) -> str | None:
    """Why a cell has no figure (or a partial one), None when every round succeeded."""
    if key in run.unavailable:
        return f"n/a: {run.unavailable[key]}"
    if not APPS[key].serves_db and route != NODB_ROUTE:
        return "-"
    cell = run.cells[route][key]
    if cell.problems:
        prefix = "n/a" if not cell.ok() else "errors"
        return f"{prefix}: {cell.problems[0]}" + (
            f" (+{len(cell.problems) - 1} more)" if len(cell.problems) > 1 else ""
        )
    return None


def summarize(run: Run) -> dict[str, dict[str, dict[str, Any]]]:
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for route in run.routes:
        base = baseline_for(route)
        summary[route] = {}
        for key in run.apps:
            cell = run.cells[route][key]
            ok = cell.ok()
            ratios = ratio_rounds(run, route, key, base)
            summary[route][key] = {
                "median_rps": median(ok),
                "min_rps": min(ok) if ok else None,
                "max_rps": max(ok) if ok else None,
                "baseline": base,
                "ratio": median(ratios),
                "ratio_min": min(ratios) if ratios else None,
                "ratio_max": max(ratios) if ratios else None,
                "median_cpu_us": median(cell.cpu_ok()),
                "cpu_ratio": median(ratio_rounds(run, route, key, base, "cpu")),
                "status": cell_status(run, route, key),
            }
    return summary


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else format(value, pattern)


def _spread(row: dict[str, Any]) -> str:
    low, high = row.get("ratio_min"), row.get("ratio_max")
    return "" if low is None or high is None else f"[{low:.3f}..{high:.3f}]"


def render_tables(run: Run, summary: dict[str, dict[str, dict[str, Any]]], header: str) -> str:
    lines = [header, ""]
    width = max(len(key) for key in run.apps)
    for route in run.routes:
        base = baseline_for(route)
        lines.append(f"{route}  (ratios: medians of per-round ratios against {base}, [slowest..fastest round])")
        columns = f"{'req/s':>9}  {'min':>9}  {'max':>9}  {'ratio':>6}  {'spread':>13}  {'cpu µs':>7}  {'cpu ratio':>9}"
        lines.append(f"  {'app':<{width}}  {columns}  note")
        for key in run.apps:
            row = summary[route][key]
            status = row["status"]
            if status == "-":
                continue
            lines.append(
                f"  {key:<{width}}  {_fmt(row['median_rps'], ',.0f'):>9}  {_fmt(row['min_rps'], ',.0f'):>9}  "
                f"{_fmt(row['max_rps'], ',.0f'):>9}  {_fmt(row['ratio'], '.3f'):>6}  {_spread(row):>13}  "
                f"{_fmt(row['median_cpu_us'], ',.1f'):>7}  {_fmt(row['cpu_ratio'], '.3f'):>9}  {status or ''}"
            )
        lines.append("")
    return "\n".join(lines)


def check_targets(run: Run, summary: dict[str, dict[str, dict[str, Any]]]) -> tuple[str, list[dict[str, Any]]]:
    """The project's targets, one line each: what was required, what was measured, whether it holds."""
    checks: list[dict[str, Any]] = []

    def add(route: str, mine: str, theirs: str, required: float) -> None:
        ratios = ratio_rounds(run, route, mine, theirs)
        value = median(ratios)
        cpu = median(ratio_rounds(run, route, mine, theirs, "cpu"))
        checks.append(
            {
                "route": route,
                "app": mine,
                "against": theirs,
                "required": required,
                "throughput_ratio": value,
                # The slowest and fastest round's ratio: how far one round can be trusted on this machine.
                "throughput_ratio_min": min(ratios) if ratios else None,
                "throughput_ratio_max": max(ratios) if ratios else None,
                "rounds_compared": len(ratios),
                "cpu_ratio": cpu,
                "holds": value is not None and value >= required,
                "holds_on_cpu": cpu is not None and cpu >= required,
            }
        )

    if OURS in run.apps:
        for route in run.routes:
            base = baseline_for(route)
            if base in run.apps:
                add(route, OURS, base, NODB_TARGET if route == NODB_ROUTE else DB_TARGET)
        for route in run.routes:
            for peer in PEERS:
                if peer not in run.apps:
                    continue
                add(route, OURS, peer, 1.0)
                twin = FRAMEWORK_TWINS.get(peer)
                if twin in run.apps:
                    add(route, twin, peer, 1.0)
    width = max((len(f"{c['route']}: {c['app']} / {c['against']}") for c in checks), default=0)
    lines = [
        "Targets (throughput ratio, and the same on CPU per request; peers: must be > 1)",
        f"  {'':<{width}}  {'need':>5}  {'ratio':>6}  {'[slowest..fastest round]':>24}  {'':6}  {'cpu':>6}",
    ]

    def verdict(holds: bool) -> str:
        return "holds" if holds else "MISSED"

    for c in checks:
        what = f"{c['route']}: {c['app']} / {c['against']}"
        lines.append(
            f"  {what:<{width}}  {c['required']:>5.2f}  {_fmt(c['throughput_ratio'], '.3f'):>6}  "
            f"{_spread({'ratio_min': c['throughput_ratio_min'], 'ratio_max': c['throughput_ratio_max']}):>24}  "
            f"{verdict(c['holds']):6}  {_fmt(c['cpu_ratio'], '.3f'):>6}  {verdict(c['holds_on_cpu'])}"
        )
    return "\n".join(lines), checks


# ---- environment and results file -----------------------------------------------------------------------------


def environment(loop: str) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loop": loop,
        "git": git_state(),
        "packages": versions,
    }


def write_results(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


# ---- command line -----------------------------------------------------------------------------------------------


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput of asgi_db_session against a bare app, a hand-written app and its peers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds; every app is measured once per round")
    parser.add_argument(
        "--requests-nodb", type=int, default=10000, help="timed requests per round on /nodb and /session (no query)"
    )
    parser.add_argument("--requests-db", type=int, default=500, help="timed requests per round on each querying route")
    parser.add_argument("--warmup", type=int, default=64, help="untimed requests before each timed batch")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--routes", type=_csv, default=list(ROUTES), help="comma-separated routes")
    default_apps = [key for key, spec in APPS.items() if spec.in_default_run]
    parser.add_argument("--apps", type=_csv, default=default_apps, help="comma-separated apps")
    parser.add_argument("--pool-size", type=int, default=None, help="engine pool_size (default: --concurrency)")
    parser.add_argument("--max-overflow", type=int, default=0, help="engine max_overflow")
    parser.add_argument("--pool-pre-ping", action="store_true", help="pool_pre_ping=True on every engine")
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop")
    parser.add_argument(
        "--same-task", action="store_true", help="in-process: run requests in the worker's task, not one task each"
    )
    parser.add_argument("--output", type=Path, default=None, help="results file (default: results/latest.json)")
    http = parser.add_argument_group("HTTP mode (uvicorn in a subprocess, loaded with wrk)")
    http.add_argument("--http", action="store_true", help="measure over HTTP instead of in-process")
    http.add_argument("--duration", type=int, default=2, help="seconds of wrk load per route and round")
    http.add_argument("--http-warmup", type=int, default=1, help="seconds of untimed wrk load per server start")
    http.add_argument("--wrk-threads", type=int, default=1, help="wrk threads")
    http.add_argument("--port", type=int, default=18431, help="first port the servers listen on (127.0.0.1)")
    http.add_argument(
        "--server-gc",
        choices=("on", "off"),
        default="on",
        help="off: each server disables the garbage collector once its app is built (what the collector costs)",
    )
    args = parser.parse_args(argv)
    unknown = [key for key in args.apps if key not in APPS]
    if unknown:
        parser.error(f"unknown app(s) {', '.join(unknown)}; known: {', '.join(APPS)}")
    bad_routes = [route for route in args.routes if route not in ROUTES]
    if bad_routes:
        parser.error(f"unknown route(s) {', '.join(bad_routes)}; known: {', '.join(ROUTES)}")
    args.routes = [route for route in ROUTES if route in args.routes]
    if args.pool_size is None:
        args.pool_size = args.concurrency
    if min(args.rounds, args.requests_nodb, args.requests_db, args.concurrency) < 1:
        parser.error("--rounds, --requests-* and --concurrency must be at least 1")
    # Keep the baselines in: every ratio needs them.
    needed = {baseline_for(route) for route in args.routes}
    args.apps = [key for key in APPS if key in set(args.apps) | needed]
    return args


def engine_settings(args: argparse.Namespace) -> EngineSettings:
    return EngineSettings(
        url=database_url(),
        pool_size=args.pool_size,
        max_overflow=args.max_overflow,
        pool_pre_ping=args.pool_pre_ping,
    )


async def _measure(args: argparse.Namespace, loop_name: str) -> dict[str, Any]:
    leaks = install_leak_counter()
    settings = engine_settings(args)
    await prepare_table(settings.url)
    unavailable: dict[str, str] = {}
    targets: dict[str, Target] = {}
    if args.http:
        from .http_load import HttpTarget, check_tools

        problem = check_tools()
        if problem is not None:
            raise SystemExit(problem)
        for index, key in enumerate(args.apps):
            targets[key] = HttpTarget(key, settings, args, port=args.port + index)
    else:
        for key in args.apps:
            try:
                targets[key] = InProcessTarget(APPS[key].build(settings), args)
            except Exception as exc:
                unavailable[key] = f"{type(exc).__name__}: {exc}"
    for key, reason in unavailable.items():
        log(f"{key}: n/a ({reason})")

    async def between_rounds() -> None:
        await clean_inserted(settings.url)

    try:
        run = await run_rounds(
            targets, args.apps, args.routes, args.rounds, unavailable, between_rounds, route_major=not args.http
        )
    finally:
        for target in targets.values():
            target.cleanup()
    summary = summarize(run)
    mode = "HTTP (uvicorn + wrk)" if args.http else "in-process ASGI"
    if args.http:
        size = f"{args.duration}s of wrk load per route and round, {args.wrk_threads} wrk thread(s)"
        if args.server_gc == "off":
            size += ", the servers' garbage collector off"
    else:
        size = f"{args.requests_nodb} requests on /nodb and /session, {args.requests_db} on the others, per round"
        size += ", each in its own task" if not args.same_task else ", in the workers' tasks"
    header = (
        f"{mode}: {args.rounds} rounds, {size}, concurrency {args.concurrency}, loop {loop_name}, "
        f"pool_size {settings.pool_size}, max_overflow {settings.max_overflow}, "
        f"pool_pre_ping {settings.pool_pre_ping}; {run.seconds:.0f}s"
    )
    tables = render_tables(run, summary, header)
    targets_text, checks = check_targets(run, summary)
    print(tables)
    print(targets_text)
    if leaks.count:
        print(f"\n{leaks.count} pooled connection(s) were never returned and got reclaimed by the garbage collector.")
    return {
        "mode": "http" if args.http else "in-process",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            "rounds": args.rounds,
            "requests_nodb": args.requests_nodb,
            "requests_db": args.requests_db,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
            "task_per_request": not args.same_task,
            "duration": args.duration if args.http else None,
            "server_gc": args.server_gc if args.http else None,
            "routes": run.routes,
            "apps": run.apps,
            "engine": settings.as_dict(),
        },
        "environment": environment(loop_name),
        "apps": {
            key: {"description": APPS[key].description, "unavailable": run.unavailable.get(key)} for key in run.apps
        },
        "rounds": {
            route: {key: {"rps": cell.rps, "cpu_us": cell.cpu, "problems": cell.problems} for key, cell in row.items()}
            for route, row in run.cells.items()
        },
        "summary": summary,
        "targets": checks,
        "leaked_connections": leaks.count,
        "seconds": run.seconds,
    }


def event_loop(*, uvloop_wanted: bool) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The loop factory for asyncio.Runner (None: asyncio's own) and its name: uvloop when wanted and installed."""
    if uvloop_wanted:
        try:
            import uvloop
        except ImportError:
            log("uvloop is not installed; using asyncio's event loop")
        else:
            return uvloop.new_event_loop, "uvloop"
    return None, "asyncio"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    loop_factory, loop_name = event_loop(uvloop_wanted=not args.no_uvloop)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        payload = runner.run(_measure(args, loop_name))
    output = args.output or RESULTS_DIR / ("latest-http.json" if args.http else "latest.json")
    write_results(output, payload)
    log(f"results written to {output}")
    return 0
