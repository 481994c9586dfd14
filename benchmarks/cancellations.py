"""Pool connections replaced per 100 cancelled requests: asgi_db_session beside its peers.

    python benchmarks/cancellations.py [--cancels 100] [--batch 10] [--apps a,b,...] [--output PATH]

Every app is the throughput benchmark's own (``apps.py``, ``fastapi_apps.py``), on an engine of its own with the
same settings, in a database of this script's own (``adbs_bench_cancel``, created on the server of
``BENCH_DATABASE_URL`` and dropped at the end), so that the table lock below stalls no one else. Requests are
driven in-process, each in a task of its own, ``--batch`` at a time, and cancelled in two places:

- **mid-statement**: ``GET /read`` while its ``SELECT`` waits on the server for a lock that this script holds on
  ``bench_items``; the lock is released 1 s after the cancellation, so a statement still waiting then is one the
  cancellation did not stop ("orphaned");
- **between statements**: ``GET /stream`` once its first chunk's ``SELECT`` is done and the client stops reading
  (``send`` of the first body chunk never returns): the request's transaction is open, no statement is running;

and in two ways: ``task.cancel()`` on the request's task (once, as a server does), and ``cancel()`` of an anyio
cancel scope around the app (an outer timeout middleware; anyio delivers it again at every await until the scope
is left). The pool's "connect" and "invalidate" events count the connections each app throws away and opens.

Reported per 100 cancellations: **replaced** (connections invalidated, so the pool opens new ones), **out**
(connections still checked out the moment the cancelled ASGI calls had all returned: cleanup left to later, or
never), **orphaned** (mid-statement only), and at the end of each run the connections never given back and those
the garbage collector had to reclaim ("non-checked-in connection" warnings). For mid-statement cancels also
**stopped in**: for each statement the cancellation stopped, the time from the cancellation until its backend no
longer runs it (gone from ``pg_stat_activity``, or no longer active there), polled every few milliseconds; the
median and the maximum. Results go to ``benchmarks/results/cancellations.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:
    # Run as a script: import from the repository root, and keep this folder off sys.path.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != _here]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.types import ASGIApp

from benchmarks.apps import APPS, HANDWRITTEN, OURS, _middleware_routes
from benchmarks.common import (
    EXPECTED_BODY,
    EngineSettings,
    database_url,
    drop_database,
    prepare_table,
    recreate_database,
)
from benchmarks.driver import Lifespan, Message, one_request, request_scope
from benchmarks.throughput import RESULTS_DIR, environment, write_results

DATABASE = "adbs_bench_cancel"
OURS_URL = "asgi-db-session-url"
DEFAULT_APPS = (HANDWRITTEN, "fastapi-depends", "fastapi-async-sqlalchemy", "advanced-alchemy", OURS, OURS_URL)
KINDS = {"mid": "/read", "between": "/stream"}
WAYS = ("task", "anyio")
ORPHAN_SECONDS = 1.0  # how long after the cancellation the lock stays held
POLL_SECONDS = 0.005  # how often pg_stat_activity is read while cancelled statements are watched
REACH_SECONDS = 10.0  # how long a request may take to get to where it is cancelled
SETTLE_SECONDS = 3.0  # how long the pool gets to see every connection back at the end of a run


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RecordedSettings(EngineSettings):
    """The benchmark's engine settings; every engine made from them is kept, for the pool events."""

    engines: list[AsyncEngine] = field(default_factory=list, compare=False, repr=False)

    def create_engine(self) -> AsyncEngine:
        engine = super().create_engine()
        self.engines.append(engine)
        return engine


def build_asgi_db_session_url(settings: EngineSettings) -> ASGIApp:
    """asgi_db_session configured as its README shows (a URL, as from DATABASE_URL), not with engine=: the
    Database then makes the engine itself, and also ends a statement whose request was cut off."""
    from asgi_db_session import Database, DatabaseSettings, DBSessionMiddleware, current_session

    database = Database(
        settings=DatabaseSettings(
            url=settings.url,
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_pre_ping=settings.pool_pre_ping,
            pool_timeout=settings.pool_timeout,
        )
    )
    if isinstance(settings, RecordedSettings):
        settings.engines.append(database.engine)

    def get_session(request: Request) -> AsyncSession:
        return current_session()

    app = Starlette(routes=_middleware_routes(get_session, commit=True))
    app.add_middleware(DBSessionMiddleware, database=database)
    return app


BUILDERS: dict[str, Callable[[EngineSettings], ASGIApp]] = {
    **{key: spec.build for key, spec in APPS.items() if spec.serves_db},
    OURS_URL: build_asgi_db_session_url,
}


class PoolCounts:
    def __init__(self, engine: AsyncEngine) -> None:
        self.connects = 0
        self.invalidations = 0
        event.listen(engine.sync_engine, "connect", self._connect)
        event.listen(engine.sync_engine, "invalidate", self._invalidate)

    def _connect(self, dbapi_connection: Any, record: Any) -> None:
        self.connects += 1

    def _invalidate(self, dbapi_connection: Any, record: Any, exception: BaseException | None) -> None:
        self.invalidations += 1


class Stalled:
    """receive/send of one request whose client stops reading after the response's first body chunk."""

    def __init__(self) -> None:
        self.stalled = asyncio.Event()
        self._asked = False

    async def receive(self) -> Message:
        if not self._asked:
            self._asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client says nothing more
        raise AssertionError("unreachable")

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("more_body", False):
            self.stalled.set()
            await asyncio.Event().wait()  # a client that does not read: the send never completes


@dataclass
class Run:
    """One app, one kind of cancellation, one way of cancelling."""

    app: str
    kind: str
    way: str
    cancels: int = 0
    replaced: int = 0
    new_connections: int = 0
    out_at_return: int = 0
    orphaned: int = 0
    transaction_open: int = 0
    never_returned: int = 0
    gc_reclaimed: int = 0
    loop_errors: int = 0
    seconds: float = 0.0
    stop_seconds: list[float] = field(default_factory=list)
    skipped: str | None = None
    problems: list[str] = field(default_factory=list)

    def per_100(self, count: int) -> float | None:
        return None if self.skipped or not self.cancels else round(100 * count / self.cancels, 1)

    def stopped(self) -> dict[str, Any]:
        """How soon the statements a cancellation stopped were gone: count, median and max in seconds."""
        times = sorted(self.stop_seconds)
        return {
            "count": len(times),
            "median_seconds": round(statistics.median(times), 3) if times else None,
            "max_seconds": round(times[-1], 3) if times else None,
            "poll_seconds": POLL_SECONDS,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "kind": self.kind,
            "way": self.way,
            "cancels": self.cancels,
            "replaced_per_100": self.per_100(self.replaced),
            "new_connections_per_100": self.per_100(self.new_connections),
            "out_at_return_per_100": self.per_100(self.out_at_return),
            "orphaned_per_100": self.per_100(self.orphaned) if self.kind == "mid" else None,
            "transaction_open_per_100": self.per_100(self.transaction_open) if self.kind == "between" else None,
            "counts": {
                "replaced": self.replaced,
                "new_connections": self.new_connections,
                "out_at_return": self.out_at_return,
                "orphaned": self.orphaned,
                "transaction_open": self.transaction_open,
                "never_returned": self.never_returned,
                "gc_reclaimed": self.gc_reclaimed,
                "loop_errors": self.loop_errors,
            },
            "stopped": self.stopped() if self.kind == "mid" else None,
            "seconds": round(self.seconds, 2),
            "skipped": self.skipped,
            "problems": self.problems[:5],
        }


async def probe(app: ASGIApp, path: str, state: dict[str, Any]) -> str | None:
    """One request to ``path``, in a task of its own as under a server (a peer's ContextVar left set must not
    leak into the requests that follow); what is wrong with its response, or None."""
    try:
        exchange = await asyncio.create_task(one_request(app, path, state))
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return exchange.problem(EXPECTED_BODY[path])


async def our_backends(monitor: asyncpg.Connection, condition: str, *args: Any) -> int:
    """How many backends of the benchmark's database (not the monitor's, nor ``args``' pids) match ``condition``."""
    count: int = await monitor.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() "
        f"AND NOT (pid = ANY($2::int[])) AND {condition}",
        DATABASE,
        list(args),
    )
    return count


async def waiting_pids(monitor: asyncpg.Connection, locker_pid: int) -> list[int]:
    """The backends of the benchmark's database whose statement waits for the locker's lock."""
    rows = await monitor.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() AND pid <> $2 "
        "AND wait_event_type = 'Lock'",
        DATABASE,
        locker_pid,
    )
    return [row["pid"] for row in rows]


async def watch_statements(monitor: asyncpg.Connection, pids: list[int], cancelled_at: float, run: Run) -> None:
    """Until ``ORPHAN_SECONDS`` after the cancellation: when each of ``pids`` stops running its statement (its
    row gone from pg_stat_activity or no longer active), as seconds after ``cancelled_at``, into ``run``."""
    running = set(pids)
    deadline = cancelled_at + ORPHAN_SECONDS
    while running and time.monotonic() < deadline:
        rows = await monitor.fetch(
            "SELECT pid FROM pg_stat_activity WHERE pid = ANY($1::int[]) AND state = 'active'", list(running)
        )
        now = time.monotonic()
        still = {row["pid"] for row in rows}
        run.stop_seconds.extend(now - cancelled_at for _ in running - still)
        running = still
        await asyncio.sleep(POLL_SECONDS)


async def cancel_round(app: ASGIApp, engine: AsyncEngine, run: Run, batch: int, dsn: str, monitor: Any) -> None:
    """``batch`` requests, each cancelled where ``run.kind`` says; adds to ``run``'s counts."""
    locker: asyncpg.Connection | None = None
    if run.kind == "mid":
        locker = await asyncpg.connect(dsn)
        await locker.execute("BEGIN; LOCK TABLE bench_items IN ACCESS EXCLUSIVE MODE")
    try:
        scopes = [anyio.CancelScope() for _ in range(batch)]
        exchanges = [Stalled() for _ in range(batch)]

        async def call(index: int) -> None:
            scope = request_scope(KINDS[run.kind], {})
            exchange = exchanges[index]
            if run.way == "anyio":
                with scopes[index]:  # an outer middleware's cancel scope around the app
                    await app(scope, exchange.receive, exchange.send)
            else:
                await app(scope, exchange.receive, exchange.send)

        tasks = [asyncio.create_task(call(index)) for index in range(batch)]
        locker_pid = [] if locker is None else [locker.get_server_pid()]
        deadline = time.monotonic() + REACH_SECONDS
        while True:
            if run.kind == "mid":
                reached = await our_backends(monitor, "wait_event_type = 'Lock'", *locker_pid)
            else:
                reached = sum(exchange.stalled.is_set() for exchange in exchanges)
            ended = [task for task in tasks if task.done()]
            if reached >= batch or ended or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        if reached < batch:
            failure = next((task.exception() for task in ended if not task.cancelled()), None)
            run.problems.append(
                f"{reached} of {batch} requests got to the point of cancellation"
                + (f"; one failed: {type(failure).__name__}: {failure}" if failure else "")
            )
        if run.kind == "between":
            run.transaction_open += await our_backends(monitor, "state = 'idle in transaction'")
        pids = [] if locker is None else await waiting_pids(monitor, locker.get_server_pid())
        cancelled_at = time.monotonic()
        for task, scope in zip(tasks, scopes, strict=True):
            if run.way == "anyio":
                scope.cancel()
            else:
                task.cancel()
        watcher = asyncio.create_task(watch_statements(monitor, pids, cancelled_at, run)) if pids else None
        done, pending = await asyncio.wait(tasks, timeout=REACH_SECONDS)
        if pending:
            run.problems.append(f"{len(pending)} cancelled requests had not ended {REACH_SECONDS} s later")
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=REACH_SECONDS)
        run.cancels += len(tasks)
        run.out_at_return += engine.pool.checkedout()  # type: ignore[attr-defined]
        if watcher is not None:
            await watcher
        if locker is not None:
            await asyncio.sleep(max(0.0, cancelled_at + ORPHAN_SECONDS - time.monotonic()))
            run.orphaned += await our_backends(monitor, "wait_event_type = 'Lock'", *locker_pid)
    finally:
        if locker is not None:
            await locker.close()  # ends its transaction: the lock goes


async def measure(key: str, kind: str, way: str, args: argparse.Namespace, url: str, dsn: str) -> Run:
    run = Run(key, kind, way)
    settings = RecordedSettings(url=url, pool_size=args.batch, max_overflow=0, pool_timeout=REACH_SECONDS)
    try:
        app = BUILDERS[key](settings)
    except ImportError as exc:
        run.skipped = f"not installed: {exc}"
        return run
    if len(settings.engines) != 1:
        run.skipped = f"the app made {len(settings.engines)} engines"
        return run
    engine = settings.engines[0]
    counts = PoolCounts(engine)
    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()

    def count_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Futures and tasks whose error nobody read: a driver's connection that died under a cancellation.
        run.loop_errors += 1

    loop.set_exception_handler(count_loop_error)
    started = time.monotonic()
    monitor = await asyncpg.connect(dsn)
    lifespan = Lifespan(app)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            await lifespan.startup()
            problem = await probe(app, KINDS[kind], lifespan.state)
            if problem is not None:
                run.skipped = f"{KINDS[kind]} fails: {problem}"
            else:
                # Fill the pool, so that a connection opened later replaces one thrown away.
                await asyncio.gather(*(probe(app, "/read", lifespan.state) for _ in range(args.batch)))
                connects = counts.connects
                invalidations = counts.invalidations
                for _ in range(max(1, args.cancels // args.batch)):
                    await cancel_round(app, engine, run, args.batch, dsn, monitor)
                pool: Any = engine.pool
                deadline = time.monotonic() + SETTLE_SECONDS
                while pool.checkedout() and time.monotonic() < deadline:
                    gc.collect()
                    await asyncio.sleep(0.05)
                run.never_returned = pool.checkedout()
                run.replaced = counts.invalidations - invalidations
                run.new_connections = counts.connects - connects
            gc.collect()
            await asyncio.sleep(0.3)  # the orphan cancels, and closes scheduled by the collection, run
            await lifespan.shutdown()
        run.gc_reclaimed = sum("non-checked-in" in str(warning.message) for warning in caught)
    except Exception as exc:
        run.problems.append(f"{type(exc).__name__}: {exc}")
        if lifespan._task is not None and not lifespan._task.done():
            lifespan._task.cancel()
            await asyncio.gather(lifespan._task, return_exceptions=True)
    finally:
        await monitor.close()
        loop.set_exception_handler(handler)
        await engine.dispose()
    run.seconds = time.monotonic() - started
    return run


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


def table(runs: list[Run], apps: Sequence[str]) -> str:
    """Markdown: per app, replaced (out at return, orphaned) per 100 cancellations, for each kind and way."""
    by = {(run.app, run.kind, run.way): run for run in runs}
    header = ["app"] + [f"{kind} / {way}" for kind in KINDS for way in WAYS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for app in apps:
        cells = [app]
        for kind in KINDS:
            for way in WAYS:
                run = by.get((app, kind, way))
                if run is None or run.skipped:
                    cells.append("n/a")
                    continue
                if run.problems:  # requests failed before their cancellation: nothing to count
                    cells.append("fails")
                    continue
                extra = [f"out {_cell(run.per_100(run.out_at_return))}"]
                if kind == "mid":
                    extra.append(f"orphaned {_cell(run.per_100(run.orphaned))}")
                cells.append(f"**{_cell(run.per_100(run.replaced))}** ({', '.join(extra)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def problems(runs: list[Run]) -> str:
    """One line per run that was skipped or failed, with the reason."""
    return "\n".join(
        f"- {run.app}, {run.kind} / {run.way}: {run.skipped or run.problems[0].splitlines()[0]}"
        for run in runs
        if run.skipped or run.problems
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--cancels", type=int, default=100, help="cancellations per app, kind and way")
    parser.add_argument("--batch", type=int, default=10, help="requests cancelled at once (also the pool size)")
    parser.add_argument("--apps", default=",".join(DEFAULT_APPS), help="comma-separated app keys")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "cancellations.json", help="results file")
    args = parser.parse_args(argv)
    args.apps = [key.strip() for key in args.apps.split(",") if key.strip()]
    unknown = [key for key in args.apps if key not in BUILDERS]
    if unknown:
        parser.error(f"unknown apps {unknown}; known: {sorted(BUILDERS)}")
    return args


async def amain(args: argparse.Namespace) -> int:
    # The garbage collector's reclaims are counted from their warnings; SQLAlchemy's pool also logs each one as
    # an error, which with no logging configured would print a paragraph per connection.
    logging.getLogger("sqlalchemy.pool").addHandler(logging.NullHandler())
    base = make_url(database_url())
    server_dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    url = base.set(database=DATABASE).render_as_string(hide_password=False)
    dsn = base.set(drivername="postgresql", database=DATABASE).render_as_string(hide_password=False)
    await recreate_database(server_dsn, DATABASE)
    runs: list[Run] = []
    try:
        await prepare_table(url)
        for key in args.apps:
            for kind in KINDS:
                for way in WAYS:
                    run = await measure(key, kind, way, args, url, dsn)
                    runs.append(run)
                    shown = run.skipped or (
                        f"replaced {run.replaced}, new {run.new_connections}, out {run.out_at_return}, "
                        f"orphaned {run.orphaned}, open {run.transaction_open}, never back {run.never_returned}, "
                        f"gc {run.gc_reclaimed}, loop errors {run.loop_errors} of {run.cancels} in {run.seconds:.1f} s"
                    )
                    if kind == "mid" and not run.skipped:
                        stopped = run.stopped()
                        shown += (
                            f"; {stopped['count']} stopped, median {stopped['median_seconds']} s, "
                            f"max {stopped['max_seconds']} s"
                        )
                    log(f"{key:26} {kind:8} {way:6} {shown}" + (f"; problems: {run.problems}" if run.problems else ""))
    finally:
        await drop_database(server_dsn, DATABASE)
    print(table(runs, args.apps))
    print(problems(runs))
    payload = {
        "benchmark": "cancellations",
        "config": {"cancels": args.cancels, "batch": args.batch, "orphan_seconds": ORPHAN_SECONDS, "routes": KINDS},
        "environment": environment("asyncio"),
        "runs": [run.as_dict() for run in runs],
    }
    write_results(args.output, payload)
    log(f"results written to {args.output}")
    # A peer that fails is a finding; this package failing is an error.
    return 1 if any(run.problems for run in runs if run.app in (OURS, OURS_URL)) else 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
