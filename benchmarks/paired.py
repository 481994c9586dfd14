"""Two apps, many short batches back to back: a paired comparison that settles differences of a few per cent.

    python benchmarks/paired.py [--apps handwritten,asgi-db-session] [--routes /read,/insert] [--pairs 20]

``run.py`` takes one ratio per round, and on a shared machine single rounds of a querying route swing by
±20%, so five rounds cannot tell 0.95 from 1.00. Here both apps run at once (lifespans started, pools
warmed up), and for each route they serve ``--pairs`` pairs of batches, A B, B A, A B, ...: the two batches
of a pair run within a second or two of each other, so they share the machine's drift, and the order
alternates so that neither always runs first. Printed per route: the median, quartiles and range of the
paired ratios (B's requests/s over A's, and A's CPU per request over B's: above 1 B is faster on both), and
the same two ratios over all pairs together (A's total time over B's): the garbage collector's full
collections cost tens of milliseconds each and come once every batch or two, a lump that the median of
per-pair ratios can miss or double, while the totals count each one once. Then, per app, the CPU time per
request and the part of it the collector took (``gc.callbacks``), with its collections by generation.
Results: ``results/paired.json``.
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
import gc
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.apps import APPS, HANDWRITTEN, OURS
from benchmarks.common import (
    NO_QUERY_ROUTES,
    NODB_ROUTE,
    ROUTES,
    EngineSettings,
    clean_inserted,
    database_url,
    prepare_table,
)
from benchmarks.driver import Lifespan, run_batch
from benchmarks.throughput import environment, event_loop, log, median, quartiles, write_results

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class CollectorClock:
    """Time the garbage collector spends, and collections it runs, while installed (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]  # by generation: young, middle, full
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1

    def __enter__(self) -> CollectorClock:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._callback)


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    q1, q3 = quartiles(values)
    low, high = (min(values), max(values)) if values else (None, None)
    return {"median": median(values), "q1": q1, "q3": q3, "min": low, "max": high}


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    url = database_url()
    await prepare_table(url)
    settings = EngineSettings(url=url, pool_size=args.concurrency, max_overflow=0)
    first, second = args.apps
    apps = {key: APPS[key].build(settings) for key in args.apps}
    lifespans = {key: Lifespan(app) for key, app in apps.items()}
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for lifespan in lifespans.values():
        await lifespan.startup()
    try:
        for route in args.routes:
            for key, app in apps.items():  # every pooled connection opened, every code path run once
                warm = await run_batch(app, route, 4 * args.concurrency, args.concurrency, lifespans[key].state)
                if warm.errors:
                    raise SystemExit(f"{key} {route}: warm-up failed: {warm.first_error}")
            rps: list[float] = []
            cpu: list[float] = []
            # Over all pairs: the collector's full collections come once every few batches and cost tens of
            # milliseconds each, a lump that a median of per-pair ratios can leave out or count twice.
            seconds = dict.fromkeys(args.apps, 0.0)
            cpu_seconds = dict.fromkeys(args.apps, 0.0)
            collectors = {key: CollectorClock() for key in args.apps}
            requests = args.requests_nodb if route in NO_QUERY_ROUTES else args.requests
            # Once per route, not before every batch: gc.collect() resets the collector's counters, and a batch
            # that starts from zero runs a full collection only once it has run more than 10 collections of
            # the middle generation (CPython's default thresholds). Of two apps that run 10 and 12 of those per
            # batch, only the second would ever pay for one (~50 ms here, ~5% of a batch). Left running, the
            # collector lands each full collection in whichever batch gets there, in proportion to how fast
            # each app does, as in a server that runs one app for hours.
            gc.collect()
            for number in range(args.pairs):
                order = [first, second] if number % 2 == 0 else [second, first]
                batches = {}
                for key in order:
                    if args.gc == "off":
                        gc.collect()
                        gc.disable()
                    try:
                        with collectors[key]:
                            batch = await run_batch(apps[key], route, requests, args.concurrency, lifespans[key].state)
                    finally:
                        gc.enable()
                    if batch.errors:
                        raise SystemExit(f"{key} {route}: {batch.errors} failed; first: {batch.first_error}")
                    batches[key] = batch
                    seconds[key] += batch.seconds
                    cpu_seconds[key] += batch.cpu_seconds or 0.0
                rps.append(batches[second].rps / batches[first].rps)
                a_cpu, b_cpu = batches[first].cpu_us, batches[second].cpu_us
                if a_cpu is not None and b_cpu:
                    cpu.append(a_cpu / b_cpu)
            await clean_inserted(url)
            results[route] = {"requests": requests, "rps_ratios": rps, "cpu_ratios": cpu, **_spread(rps)}
            results[route]["cpu"] = _spread(cpu)
            results[route]["total_rps_ratio"] = seconds[first] / seconds[second]
            cpu_total = cpu_seconds[first] / cpu_seconds[second] if cpu_seconds[second] else None
            results[route]["total_cpu_ratio"] = cpu_total
            total_requests = requests * args.pairs
            results[route]["collector"] = {
                key: {
                    "us_per_request": clock.seconds / total_requests * 1e6,
                    "cpu_us_per_request": cpu_seconds[key] / total_requests * 1e6,
                    "collections_per_1000_requests": [n * 1000 / total_requests for n in clock.collections],
                }
                for key, clock in collectors.items()
            }
            row = results[route]
            print(
                f"{route:<8} {second} / {first}: median {row['median']:.3f}  quartiles {row['q1']:.3f}..{row['q3']:.3f}"
                f"  range {row['min']:.3f}..{row['max']:.3f}  cpu median {row['cpu']['median']:.3f}"
                f"  all pairs: throughput {row['total_rps_ratio']:.3f} cpu {row['total_cpu_ratio'] or 0:.3f}",
                flush=True,
            )
            for key, figures in row["collector"].items():
                young, middle, full = figures["collections_per_1000_requests"]
                print(
                    f"         {key}: CPU {figures['cpu_us_per_request']:.0f} us/request, of it in the garbage "
                    f"collector {figures['us_per_request']:.0f} us; collections per 1,000 requests: "
                    f"{young:.0f} young, {middle:.1f} middle, {full:.2f} full",
                    flush=True,
                )
    finally:
        for lifespan in lifespans.values():
            await lifespan.shutdown()
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            "apps": args.apps,
            "pairs": args.pairs,
            "requests": args.requests,
            "requests_nodb": args.requests_nodb,
            "concurrency": args.concurrency,
            "gc": args.gc,
        },
        "environment": environment(args.loop_name),
        "routes": results,
        "seconds": time.perf_counter() - started,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Paired comparison of two apps: many short batches back to back, alternating order.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--apps", default=f"{HANDWRITTEN},{OURS}", help="A,B: ratios are B over A")
    parser.add_argument("--routes", default="/read,/insert", help=f"comma-separated, of {', '.join(ROUTES)}")
    parser.add_argument("--pairs", type=int, default=20, help="pairs of batches per route")
    parser.add_argument("--requests", type=int, default=1000, help="requests per batch on querying routes")
    parser.add_argument("--requests-nodb", type=int, default=10000, help="requests per batch on /nodb, /session")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (and pool_size)")
    parser.add_argument(
        "--gc",
        choices=("on", "off"),
        default="on",
        help="off: the garbage collector is disabled during each batch (collected between batches), which "
        "leaves the work the code does and takes out what its allocations make the collector do",
    )
    parser.add_argument("--no-uvloop", action="store_true", help="asyncio's own event loop")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "paired.json", help="results file")
    args = parser.parse_args(argv)
    args.apps = [a.strip() for a in args.apps.split(",") if a.strip()]
    args.routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if len(args.apps) != 2 or any(a not in APPS for a in args.apps):
        parser.error(f"--apps takes two of {', '.join(APPS)}")
    both_serve_db = all(APPS[a].serves_db for a in args.apps)
    bad = [r for r in args.routes if r not in ROUTES or (r != NODB_ROUTE and not both_serve_db)]
    if bad:
        parser.error(f"route(s) {', '.join(bad)} not served by both apps")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    loop_factory, args.loop_name = event_loop(uvloop_wanted=not args.no_uvloop)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        payload = runner.run(_measure(args))
    write_results(args.output, payload)
    log(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
