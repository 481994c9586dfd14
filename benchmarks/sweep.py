"""How the cost of a request grows with concurrency and with queries per request: asgi_db_session against the
hand-written app, with the bare app for reference. ``python benchmarks/sweep.py [--quick]``.

For every concurrency (1, 8, 32, 128, 512) and number of queries per request (1, 10, 100: the route
``/queries/N``, N SELECTs by primary key in one session), each app serves a batch of requests in-process
(``driver.run_batch``: a task per request, as under a server) and the CPU time the process spent on the
batch is divided by its requests. The figure that has to stay flat is the **added cost**: asgi_db_session's
CPU µs per request minus the hand-written app's (``async with session_factory()`` in the endpoint) in the
batch next to it; a per-request cost that grew with concurrency (a lock, a list scanned per request) or with
queries (work per statement) would show there. ``/nodb`` on the bare app and on asgi_db_session gives the
middleware's own fixed cost, with no session, for reference.

A round starts the three apps' lifespans, warms them up (every pooled connection opened and its statement
prepared), then measures every point: the two apps compared there run back to back, which of them goes first
alternating from point to point and round to round, so that the machine's drift falls on both alike. Every
engine has the same pool (``--pool-size``, 20; the two database apps hold up to twice that many connections
during a round): above it, requests wait for a connection, as they would in production. Results:
``results/sweep.json`` (every batch's figure) and ``results/sweep.png``.

CPU time per request is noisier than the instruction counts of ``instructions.py`` (a few per cent, from
the shared machine), so at 100 queries a request costs ~10 ms and the added cost, tens of µs, sits inside
that noise: read the 100-query line for a trend, not for its value.
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
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.apps import APPS, BARE, HANDWRITTEN, OURS
from benchmarks.common import (
    NODB_ROUTE,
    SWEEP_QUERY_COUNTS,
    EngineSettings,
    database_url,
    prepare_table,
    queries_path,
)
from benchmarks.driver import Batch, Lifespan, run_batch
from benchmarks.throughput import (
    environment,
    event_loop,
    install_leak_counter,
    log,
    median,
    quartiles,
    write_results,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CONCURRENCIES = (1, 8, 32, 128, 512)
APP_KEYS = (BARE, HANDWRITTEN, OURS)
# Apps measured at every (concurrency, queries) point; bare and ours also on /nodb (queries = 0).
DB_APPS = (HANDWRITTEN, OURS)
NODB = 0


@dataclass
class Config:
    rounds: int
    concurrencies: tuple[int, ...]
    query_counts: tuple[int, ...]
    query_budget: int
    """Statements per timed batch: a batch of N-query requests has query_budget / N requests..."""
    min_batch: int
    """...but at least this many, and at least the concurrency (every worker gets a request)."""
    pairs: int
    """Batches of each app per point and round, alternating with the other app's (A B B A ...)."""
    nodb_requests: int
    pool_size: int
    quick: bool

    def requests(self, concurrency: int, queries: int) -> int:
        if queries == NODB:
            return max(self.nodb_requests, concurrency)
        return max(self.query_budget // queries, self.min_batch, concurrency)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "concurrencies": list(self.concurrencies),
            "query_counts": list(self.query_counts),
            "query_budget": self.query_budget,
            "min_batch": self.min_batch,
            "pairs": self.pairs,
            "nodb_requests": self.nodb_requests,
            "pool_size": self.pool_size,
            "quick": self.quick,
        }


@dataclass
class Series:
    """One app at one point: requests/s and CPU µs per request, per batch (None: the batch failed)."""

    rps: list[float | None] = field(default_factory=list)
    cpu_us: list[float | None] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def record(self, batch: Batch, round_number: int) -> None:
        if batch.errors:
            self.rps.append(None)
            self.cpu_us.append(None)
            self.problems.append(f"round {round_number}: {batch.errors}/{batch.requests} failed: {batch.first_error}")
        else:
            self.rps.append(batch.rps)
            self.cpu_us.append(batch.cpu_us)


Key = tuple[str, int, int]  # app, concurrency, queries (0: /nodb)


async def warm_up(app: Any, state: dict[str, Any], pool_size: int) -> None:
    """Open every pooled connection and prepare the statement on each; run the code paths once."""
    path = queries_path(1)
    batch = await run_batch(app, path, 4 * pool_size, pool_size, state)
    if batch.errors:
        raise RuntimeError(f"warm-up failed: {batch.first_error}")


async def measure(config: Config) -> dict[Key, Series]:
    url = database_url()
    await prepare_table(url)
    settings = EngineSettings(url=url, pool_size=config.pool_size, pool_timeout=120.0)
    apps = {key: APPS[key].build(settings) for key in APP_KEYS}
    series: dict[Key, Series] = {}
    points = [
        (concurrency, queries) for concurrency in config.concurrencies for queries in (NODB, *config.query_counts)
    ]
    for number in range(config.rounds):
        started = time.perf_counter()
        lifespans = {key: Lifespan(app) for key, app in apps.items()}
        try:
            for key, lifespan in lifespans.items():
                await lifespan.startup()
                if key in DB_APPS:
                    await warm_up(apps[key], lifespan.state, config.pool_size)
                else:
                    await run_batch(apps[key], NODB_ROUTE, 1000, 32, lifespan.state)
            for index, (concurrency, queries) in enumerate(points):
                # The two apps of a point run back to back, the first one alternating from point to point and
                # round to round: a drift of the machine's speed then falls on both alike.
                pair = [HANDWRITTEN, OURS] if queries != NODB else [BARE, OURS]
                if (index + number) % 2:
                    pair.reverse()
                path = NODB_ROUTE if queries == NODB else queries_path(queries)
                # Once per point, not per batch: from reset counters, the collector's full collections would
                # fall only in the batches of an app that crosses its thresholds within one batch (paired.py).
                gc.collect()
                for _ in range(config.pairs):  # A B, B A, A B, ...: each app's k-th batch pairs with the other's
                    for key in pair:
                        batch = await run_batch(
                            apps[key],
                            path,
                            config.requests(concurrency, queries),
                            concurrency,
                            lifespans[key].state,
                            limit=300,
                        )
                        series.setdefault((key, concurrency, queries), Series()).record(batch, number + 1)
                    pair.reverse()
        finally:
            for lifespan in lifespans.values():
                await lifespan.shutdown()
        log(f"round {number + 1}/{config.rounds} done in {time.perf_counter() - started:.0f}s")
    return series


# ---- summary --------------------------------------------------------------------------------------------------


def paired(mine: Series, theirs: Series, how: Callable[[float, float, float, float], float]) -> list[float]:
    """``how(my_cpu, their_cpu, my_rps, their_rps)`` for every pair of batches that both succeeded."""
    return [
        how(cpu_a, cpu_b, rps_a, rps_b)
        for cpu_a, cpu_b, rps_a, rps_b in zip(mine.cpu_us, theirs.cpu_us, mine.rps, theirs.rps, strict=False)
        if cpu_a is not None and cpu_b is not None and rps_a is not None and rps_b
    ]


def summarize(series: dict[Key, Series], config: Config) -> dict[str, Any]:
    cells = []
    for (app, concurrency, queries), s in sorted(series.items()):
        cpu = [v for v in s.cpu_us if v is not None]
        rps = [v for v in s.rps if v is not None]
        cells.append(
            {
                "app": app,
                "concurrency": concurrency,
                "queries": queries,
                "requests": config.requests(concurrency, queries),
                "median_cpu_us": median(cpu),
                "median_rps": median(rps),
                "batches": {"cpu_us": s.cpu_us, "rps": s.rps},
                "problems": s.problems,
            }
        )
    comparisons = []
    for concurrency in config.concurrencies:
        for queries in (NODB, *config.query_counts):
            mine_key, base = (OURS, concurrency, queries), BARE if queries == NODB else HANDWRITTEN
            mine, theirs = series.get(mine_key), series.get((base, concurrency, queries))
            if mine is None or theirs is None:
                continue
            added = paired(mine, theirs, lambda a, b, _ra, _rb: a - b)
            ratios = paired(mine, theirs, lambda _a, _b, ra, rb: ra / rb)
            cpu_ratios = paired(mine, theirs, lambda a, b, _ra, _rb: b / a)
            comparisons.append(
                {
                    "concurrency": concurrency,
                    "queries": queries,
                    "baseline": base,
                    "added_cpu_us": median(added),
                    "added_cpu_us_min": min(added) if added else None,
                    "added_cpu_us_max": max(added) if added else None,
                    "added_cpu_us_q1": quartiles(added)[0],
                    "added_cpu_us_q3": quartiles(added)[1],
                    "added_cpu_us_pairs": added,
                    "throughput_ratio": median(ratios),
                    "cpu_ratio": median(cpu_ratios),
                }
            )
    return {"cells": cells, "comparisons": comparisons}


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else format(value, pattern)


def render(summary: dict[str, Any], config: Config, header: str) -> str:
    cells = {(c["app"], c["concurrency"], c["queries"]): c for c in summary["cells"]}
    lines = [header, ""]
    lines.append(
        "CPU µs per request (median over batches) and asgi_db_session's added cost against the baseline "
        "(median of paired differences; min..max)"
    )
    lines.append(
        f"  {'queries':>7}  {'conc.':>5}  {'baseline':>9}  {'ours':>9}  {'added µs':>9}  "
        f"{'min..max':>17}  {'added %':>7}  {'req/s ratio':>11}  {'cpu ratio':>9}"
    )
    for comparison in summary["comparisons"]:
        queries, concurrency = comparison["queries"], comparison["concurrency"]
        base = cells.get((comparison["baseline"], concurrency, queries), {}).get("median_cpu_us")
        ours = cells.get((OURS, concurrency, queries), {}).get("median_cpu_us")
        added = comparison["added_cpu_us"]
        percent = None if added is None or not base else 100 * added / base
        spread = f"{_fmt(comparison['added_cpu_us_min'], '+.1f')}..{_fmt(comparison['added_cpu_us_max'], '+.1f')}"
        label = "/nodb" if queries == NODB else str(queries)
        lines.append(
            f"  {label:>7}  {concurrency:>5}  {_fmt(base, ',.1f'):>9}  {_fmt(ours, ',.1f'):>9}  "
            f"{_fmt(added, '+.1f'):>9}  {spread:>17}  {_fmt(percent, '+.1f'):>7}  "
            f"{_fmt(comparison['throughput_ratio'], '.3f'):>11}  {_fmt(comparison['cpu_ratio'], '.3f'):>9}"
        )
    problems = [(c["app"], c["concurrency"], c["queries"], c["problems"][0]) for c in summary["cells"] if c["problems"]]
    for app, concurrency, queries, problem in problems:
        lines.append(f"  {app} at concurrency {concurrency}, {queries} queries: {problem}")
    lines.append("")
    lines.append(
        "(/nodb: the middleware against the bare app, no session; the other rows against the hand-written app)"
    )
    return "\n".join(lines)


def plot(summary: dict[str, Any], config: Config, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {(c["app"], c["concurrency"], c["queries"]): c for c in summary["cells"]}
    comparisons = {(c["concurrency"], c["queries"]): c for c in summary["comparisons"]}
    xs = list(config.concurrencies)
    colors = {NODB: "tab:gray", 1: "tab:blue", 10: "tab:orange", 100: "tab:green"}
    extra_colors = iter(["tab:red", "tab:purple", "tab:brown"])

    def color(queries: int) -> str:
        if queries not in colors:
            colors[queries] = next(extra_colors, "black")
        return colors[queries]

    def label(queries: int) -> str:
        return "/nodb (no session)" if queries == NODB else f"{queries} quer{'y' if queries == 1 else 'ies'}/request"

    figure, (absolute, added, ratio) = plt.subplots(1, 3, figsize=(17, 5.4))
    figure.suptitle(title, fontsize=11)

    for queries in (NODB, *config.query_counts):
        ours_app, base_app = OURS, BARE if queries == NODB else HANDWRITTEN
        for app, style in ((ours_app, "-"), (base_app, "--")):
            ys = [cells.get((app, x, queries), {}).get("median_cpu_us") for x in xs]
            if any(y is not None for y in ys):
                name = {OURS: "asgi_db_session", HANDWRITTEN: "hand-written", BARE: "bare"}[app]
                short = "/nodb" if queries == NODB else f"{queries} q."
                absolute.plot(xs, ys, style, marker="o", color=color(queries), label=f"{name}, {short}")
    absolute.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="CPU µs per request")
    bottom, top = absolute.get_ylim()
    absolute.set_ylim(bottom, top * 30)  # room for the legend above the lines
    absolute.set_title("CPU per request (solid: asgi_db_session; dashed: its baseline)", fontsize=10)
    absolute.legend(fontsize=7, loc="upper left", ncol=2)

    for queries in (NODB, *config.query_counts):
        points = [(x, comparisons.get((x, queries))) for x in xs]
        present = [(x, c) for x, c in points if c is not None and c["added_cpu_us"] is not None]
        if not present:
            continue
        x_values = [x for x, _ in present]
        y_values = [c["added_cpu_us"] for _, c in present]
        low = [max(0.0, c["added_cpu_us"] - c["added_cpu_us_q1"]) for _, c in present]
        high = [max(0.0, c["added_cpu_us_q3"] - c["added_cpu_us"]) for _, c in present]
        added.errorbar(
            x_values, y_values, yerr=[low, high], marker="o", capsize=3, color=color(queries), label=label(queries)
        )
    added.axhline(0, color="black", linewidth=0.8)
    for axes in (added, ratio):
        axes.axvline(config.pool_size, color="tab:gray", linewidth=0.8, linestyle="--")
    added.annotate(
        f"pool_size {config.pool_size}: above it,\nrequests queue for a connection",
        xy=(config.pool_size, 0.97),
        xycoords=("data", "axes fraction"),
        xytext=(4, 0),
        textcoords="offset points",
        va="top",
        fontsize=8,
        color="tab:gray",
    )
    added.set(xscale="log", xlabel="concurrency", ylabel="added CPU µs per request")
    added.set_title(
        "Added cost: asgi_db_session minus baseline, batch next to it\n(median; bars: middle half of the batch pairs)",
        fontsize=10,
    )
    added.legend(fontsize=8)

    for queries in (NODB, *config.query_counts):
        ys = [comparisons.get((x, queries), {}).get("throughput_ratio") for x in xs]
        if any(y is not None for y in ys):
            ratio.plot(xs, ys, marker="o", color=color(queries), label=label(queries))
    ratio.axhline(1.0, color="black", linewidth=0.8)
    ratio.axhline(0.97, color="tab:red", linewidth=0.8, linestyle=":", label="target for DB routes (0.97)")
    ratio.set(xscale="log", xlabel="concurrency", ylabel="requests/s, asgi_db_session / baseline")
    ratio.set_title("Throughput relative to the baseline (median of paired ratios)", fontsize=10)
    ratio.legend(fontsize=8)

    for axes in (absolute, added, ratio):
        axes.set_xticks(xs)
        axes.set_xticklabels([str(x) for x in xs])
        axes.grid(True, which="major", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---- command line ------------------------------------------------------------------------------------------------


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(item) for item in value.split(",") if item.strip())


def parse_args(argv: Sequence[str] | None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round, concurrency 1, 32, 512, smaller batches")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --quick: 1)")
    parser.add_argument("--concurrency", type=_ints, default=None, help="comma-separated (default 1,8,32,128,512)")
    parser.add_argument("--queries", type=_ints, default=SWEEP_QUERY_COUNTS, help="comma-separated (1,10,100)")
    parser.add_argument("--query-budget", type=int, default=None, help="statements per timed batch (3000; quick 1000)")
    parser.add_argument("--pool-size", type=int, default=20, help="pool_size of each engine (max_overflow 0)")
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "sweep.json", help="results file")
    parser.add_argument("--plot", type=Path, default=RESULTS_DIR / "sweep.png", help="PNG file")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG (matplotlib not needed)")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="measure nothing: table and plot from a results file"
    )
    args = parser.parse_args(argv)
    unknown = [count for count in args.queries if count not in SWEEP_QUERY_COUNTS]
    if unknown:
        parser.error(f"the apps serve /queries/N for N in {SWEEP_QUERY_COUNTS}, not {unknown}")
    quick = args.quick
    config = Config(
        rounds=args.rounds or (1 if quick else 3),
        concurrencies=args.concurrency or ((1, 32, 512) if quick else CONCURRENCIES),
        query_counts=args.queries,
        query_budget=args.query_budget or (1000 if quick else 3000),
        min_batch=20 if quick else 50,
        pairs=1 if quick else 2,
        nodb_requests=3000 if quick else 10000,
        pool_size=args.pool_size,
        quick=quick,
    )
    if min(config.rounds, config.pool_size, *config.concurrencies) < 1:
        parser.error("--rounds, --pool-size and every concurrency must be at least 1")
    return config, args


def _title(config: Config, environment_info: dict[str, Any]) -> str:
    return (
        f"asgi_db_session vs hand-written `async with session_factory()`, in-process, "
        f"{config.rounds} round(s), pool_size {config.pool_size}, "
        f"{environment_info['cpus']} CPUs, Python {environment_info['python']}, {environment_info['loop']}"
    )


def replot(args: argparse.Namespace) -> int:
    """The table and the plot of an earlier run, from its results file (quartiles recomputed from its pairs)."""
    payload = json.loads(args.from_json.read_text())
    raw = payload["config"]
    config = Config(
        rounds=raw["rounds"],
        concurrencies=tuple(raw["concurrencies"]),
        query_counts=tuple(raw["query_counts"]),
        query_budget=raw["query_budget"],
        min_batch=raw["min_batch"],
        pairs=raw["pairs"],
        nodb_requests=raw["nodb_requests"],
        pool_size=raw["pool_size"],
        quick=raw["quick"],
    )
    summary = {"cells": payload["cells"], "comparisons": payload["comparisons"]}
    for comparison in summary["comparisons"]:
        comparison["added_cpu_us_q1"], comparison["added_cpu_us_q3"] = quartiles(comparison["added_cpu_us_pairs"])
    print(render(summary, config, f"Sweep from {args.from_json} ({payload['created']})"))
    if not args.no_plot:
        plot(summary, config, args.plot, _title(config, payload["environment"]))
        log(f"plot written to {args.plot}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    config, args = parse_args(argv)
    loop_factory, loop_name = event_loop(uvloop_wanted=not args.no_uvloop)
    if args.from_json is not None:
        return replot(args)
    leaks = install_leak_counter()
    started = time.perf_counter()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        series = runner.run(measure(config))
    seconds = time.perf_counter() - started
    summary = summarize(series, config)
    header = (
        f"Sweep, in-process ASGI: {config.rounds} round(s), concurrency {', '.join(map(str, config.concurrencies))}, "
        f"{', '.join(map(str, config.query_counts))} queries per request, pool_size {config.pool_size}, "
        f"loop {loop_name}; {seconds:.0f}s"
    )
    print(render(summary, config, header))
    if leaks.count:
        print(f"\n{leaks.count} pooled connection(s) were never returned and got reclaimed by the garbage collector.")
    payload = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config.as_dict(),
        "environment": environment(loop_name),
        **summary,
        "leaked_connections": leaks.count,
        "seconds": seconds,
    }
    write_results(args.output, payload)
    log(f"results written to {args.output}")
    if not args.no_plot:
        title = _title(config, payload["environment"])
        plot(summary, config, args.plot, title)
        log(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
