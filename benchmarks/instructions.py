"""Instructions per request under callgrind: a deterministic overhead figure.

``python benchmarks/instructions.py [--apps ...] [--routes ...] [--small K1] [--large K2]``

For every (app, route) pair a child process serves K1 sequential requests in-process, and another serves
K2; each runs under ``valgrind --tool=callgrind``, which counts the instructions executed (Ir). Both
children pay the same start-up (interpreter, imports, app build, lifespan), so

    instructions per request = (Ir(K2) - Ir(K1)) / (K2 - K1)

is the steady-state cost of one request: the ASGI app, the in-process client and the event loop. It does
not vary with machine load, which throughput does; the apps share everything but the code under test, so
the ratio of two apps' figures measures that code. The default routes never talk to the database: /nodb
never does, and /session creates (and closes) a session without running a statement, which checks out no
connection. The querying routes (``--routes /nodb,/session,/read,/insert``) count the client side of a
round trip to PostgreSQL too (the driver, SQLAlchemy, the loop's wake-ups); with requests one at a time the
count repeats to within a few hundred instructions in most runs, but a reply that arrives in two reads
instead of one now and then moves it by a few thousand: run twice (``--repeat 2``) before trusting a small
difference there.

Where objects happen to land in memory moves a count by a few per cent too (benchmarks/README.md, "The same server
in other memory layouts"), and any change to the code moves where they land: ``--repeat N`` runs each child in N
layouts (run ``r`` from 0 allocates ``layout_size(r)`` strings and makes ``layout_types(r)`` classes at start-up,
before anything is imported, which moves both where objects land and the type version tags that CPython's
attribute cache is indexed by; run 0 as it is), and the table gives the median. Compare two versions of the code
by their medians over the same layouts, never by one run each.
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
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from benchmarks.apps import APPS, BARE, FLOORS, HANDWRITTEN, OURS
from benchmarks.common import (
    INSERT_FIRST_ID,
    NO_QUERY_ROUTES,
    NODB_ROUTE,
    ROUTES,
    EngineSettings,
    clean_inserted,
    database_url,
    git_state,
    prepare_table,
)
from benchmarks.driver import Lifespan, run_batch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_APPS = (BARE, *FLOORS, HANDWRITTEN, OURS, "asgi-db-session-commit")
DEFAULT_ROUTES = NO_QUERY_ROUTES
# /insert children each start their ids here, this far apart, so that two children never collide.
_INSERT_ID_STRIDE = 1_000_000
NODB_TARGET = 1.03
_TOTALS = re.compile(rb"^(?:totals|summary):\s*(\d+)", re.MULTILINE)


# ---- the child: K requests, in-process, one at a time --------------------------------------------------------


async def _serve(app_key: str, route: str, requests: int, concurrency: int, keep_alive: bool) -> int:
    app = APPS[app_key].build(EngineSettings(url=database_url(), pool_size=max(EngineSettings.pool_size, concurrency)))
    lifespan = Lifespan(app)
    await lifespan.startup()
    # Everything alive now (modules, the app) leaves the collector's view: otherwise whether a full
    # collection of those ~200,000 objects falls between K1 and K2 moves the figure by thousands.
    gc.collect()
    gc.freeze()
    batch = await run_batch(app, route, requests, concurrency, lifespan.state, limit=3600, keep_alive=keep_alive)
    await lifespan.shutdown()
    if batch.errors:
        print(f"{app_key} {route}: {batch.errors} of {requests} failed; first: {batch.first_error}", file=sys.stderr)
        return 1
    return 0


def child(app_key: str, route: str, requests: int, loop: str, concurrency: int, keep_alive: bool) -> int:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_serve(app_key, route, requests, concurrency, keep_alive))


# ---- the parent -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    app: str
    route: str
    requests: int
    repeat: int = 0
    insert_base: int = INSERT_FIRST_ID
    """First id this child's /insert requests use: distinct per child, as children run side by side."""


def layout_size(repeat: int) -> int:
    """How many strings run ``repeat`` allocates at start-up, before any import: 0 for the first run."""
    return 0 if repeat == 0 else 100 * repeat + 37


def layout_types(repeat: int) -> int:
    """How many classes run ``repeat`` makes at start-up, before any import: 0 for the first run.

    Each class takes a type version tag, so every class made after them has another tag than in run 0. CPython
    caches attribute lookups on types in a table of 4,096 entries indexed by the type's tag and the name: which
    lookups of a request share an entry, and so miss the cache and search the class's MRO every time, depends on
    the tags. Moving the memory alone leaves the tags as they were (benchmarks/README.md, "Type version tags").
    """
    return 0 if repeat == 0 else 23 * repeat + 5


def layout_env(repeat: int, workdir: Path) -> dict[str, str]:
    """The environment that starts a Python process in run ``repeat``'s layout: a ``sitecustomize`` module (which
    Python imports at start-up, before anything else) that allocates ``layout_size(repeat)`` strings of its own
    and makes ``layout_types(repeat)`` classes, and keeps them. Empty for run 0."""
    size = layout_size(repeat)
    if not size:
        return {}
    folder = workdir / f"layout-{repeat}"
    folder.mkdir(exist_ok=True)
    # Children of the same layout start side by side: each finds the whole file or the previous one, never half.
    written = folder / f"sitecustomize.{os.getpid()}.{threading.get_ident()}.tmp"
    written.write_text(
        f"LAYOUT_PAD = [str(i) * {repeat} for i in range({size})]\n"
        f"LAYOUT_TYPES = [type(f'LayoutType{{i}}', (), {{}}) for i in range({layout_types(repeat)})]\n"
        # A lookup on each class gives it its version tag now, whatever type creation does.
        "for _type in LAYOUT_TYPES:\n"
        "    getattr(_type, 'layout', None)\n"
    )
    os.replace(written, folder / "sitecustomize.py")
    inherited = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(folder) if not inherited else f"{folder}{os.pathsep}{inherited}"}


def layouts_record(repeats: int) -> dict[str, list[int]]:
    """What a results file records of the layouts of ``repeats`` runs (their strings and their classes)."""
    return {
        "layout_sizes": [layout_size(repeat) for repeat in range(repeats)],
        "layout_types": [layout_types(repeat) for repeat in range(repeats)],
    }


def counted_env(repeat: int, workdir: Path) -> dict[str, str]:
    """The environment of a process whose instructions are counted: this one's, a fixed hash seed, and run
    ``repeat``'s memory layout (for the in-process children here and the servers of http_instructions.py)."""
    # A fixed hash seed makes dict and set layouts, and so the instruction counts, repeatable.
    return {**os.environ, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", **layout_env(repeat, workdir)}


def child_env(job: Job, workdir: Path) -> dict[str, str]:
    """The environment of ``job``'s child: ``counted_env`` of its repeat, and its /insert ids."""
    env = counted_env(job.repeat, workdir)
    if job.route == "/insert":
        env["BENCH_INSERT_BASE"] = str(job.insert_base)
    return env


def callgrind_ir(job: Job, loop: str, concurrency: int, keep_alive: bool, workdir: Path) -> int:
    """Instructions executed by a child serving ``job.requests`` requests."""
    out = workdir / f"callgrind.{job.app}.{job.route.strip('/')}.{job.requests}.{job.repeat}.out"
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        job.app,
        job.route,
        str(job.requests),
        "--loop",
        loop,
        "--concurrency",
        str(concurrency),
        *(["--keep-alive"] if keep_alive else []),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=child_env(job, workdir), cwd=ROOT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{job}: exit {result.returncode}: {result.stderr.strip()[-2000:]}")
    return callgrind_total(out, str(job))


def callgrind_total(out: Path, what: str) -> int:
    """The instructions (Ir) a callgrind output file counts in all."""
    match = _TOTALS.search(out.read_bytes())
    if match is None:
        raise RuntimeError(f"{what}: no totals line in {out}")
    return int(match.group(1))


def pairs(apps: Sequence[str], routes: Sequence[str]) -> list[tuple[str, str]]:
    return [(app, route) for route in routes for app in apps if APPS[app].serves_db or route == NODB_ROUTE]


def baseline_for(route: str) -> str:
    return BARE if route == NODB_ROUTE else HANDWRITTEN


def render(per_request: dict[tuple[str, str], float], routes: Sequence[str], header: str) -> tuple[str, list[Any]]:
    lines = [header, ""]
    rows: list[dict[str, Any]] = []
    width = max(len(app) for app, _ in per_request)
    for route in routes:
        base = baseline_for(route)
        base_value = per_request.get((base, route))
        lines.append(f"{route}  (ratio and overhead against {base})")
        lines.append(f"  {'app':<{width}}  {'instr/request':>13}  {'ratio':>6}  {'overhead':>9}")
        for (app, r), value in per_request.items():
            if r != route:
                continue
            ratio = value / base_value if base_value else None
            extra = value - base_value if base_value is not None else None
            rows.append({"app": app, "route": route, "instructions": value, "baseline": base, "ratio": ratio})
            ratio_text = "n/a" if ratio is None else f"{ratio:.3f}"
            extra_text = "n/a" if extra is None else f"{extra:+,.0f}"
            lines.append(f"  {app:<{width}}  {value:>13,.0f}  {ratio_text:>6}  {extra_text:>9}")
        lines.append("")
    ours, bare = per_request.get((OURS, NODB_ROUTE)), per_request.get((BARE, NODB_ROUTE))
    if ours is not None and bare:
        verdict = "holds" if ours / bare <= NODB_TARGET else "MISSED"
        lines.append(f"Target: /nodb {OURS} / {BARE} instructions <= {NODB_TARGET}: {ours / bare:.3f}  {verdict}")
    return "\n".join(lines), rows


def check_counting_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--apps`` and ``--routes`` as lists (each route's baseline app added), ``--small``, ``--large`` and
    ``--repeat`` checked: what every instruction-counting script takes."""
    args.apps = [a.strip() for a in args.apps.split(",") if a.strip()]
    args.routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    unknown = [a for a in args.apps if a not in APPS]
    if unknown:
        parser.error(f"unknown app(s) {', '.join(unknown)}; known: {', '.join(APPS)}")
    bad_routes = [r for r in args.routes if r not in ROUTES]
    if bad_routes:
        parser.error(f"unknown route(s) {', '.join(bad_routes)}; known: {', '.join(ROUTES)}")
    if not 0 < args.small < args.large:
        parser.error("need 0 < --small < --large")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    needed = {baseline_for(route) for route in args.routes}
    args.apps = [key for key in APPS if key in set(args.apps) | needed]


def per_request_counts(
    by_key: dict[tuple[str, str, int, int], int], todo: Sequence[tuple[str, str]], args: argparse.Namespace
) -> tuple[dict[tuple[str, str], list[float]], dict[tuple[str, str], float]]:
    """From the counts of whole runs, keyed (app, route, repeat, requests): each repeat's instructions per
    request, (Ir(K2) - Ir(K1)) / (K2 - K1), and their median, by (app, route)."""
    runs: dict[tuple[str, str], list[float]] = {}
    for app, route in todo:
        for repeat in range(args.repeat):
            small, large = by_key.get((app, route, repeat, args.small)), by_key.get((app, route, repeat, args.large))
            if small is not None and large is not None:
                runs.setdefault((app, route), []).append((large - small) / (args.large - args.small))
    return runs, {key: statistics.median(values) for key, values in runs.items()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Instructions per request (callgrind) of asgi_db_session against the bare and hand-written apps.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--apps", default=",".join(DEFAULT_APPS), help="comma-separated apps (see run.py --help)")
    parser.add_argument(
        "--routes", default=",".join(DEFAULT_ROUTES), help=f"comma-separated routes, of {', '.join(ROUTES)}"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each (app, route), each in a memory layout of its own; the table gives the median",
    )
    parser.add_argument("--small", type=int, default=200, help="requests in the first child (K1)")
    parser.add_argument("--large", type=int, default=1200, help="requests in the second child (K2)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="callgrind children run at once")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop of the children")
    parser.add_argument(
        "--concurrency", type=int, default=1, help="requests in flight in each child (the pool grows to match)"
    )
    parser.add_argument(
        "--keep-alive",
        action="store_true",
        help="each worker sends its next request once the response is complete, as a server's keep-alive "
        "connection does, not once the ASGI call has returned (see driver.py)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the callgrind output files (printed path)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "instructions.json", help="results file")
    parser.add_argument("--child", nargs=3, metavar=("APP", "ROUTE", "REQUESTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_counting_args(parser, args)
    if args.loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            args.loop = "asyncio"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        app_key, route, requests = args.child
        return child(app_key, route, int(requests), args.loop, args.concurrency, args.keep_alive)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    todo = pairs(args.apps, args.routes)
    jobs = [
        Job(app, route, k, repeat)
        for repeat in range(args.repeat)
        for app, route in todo
        for k in (args.small, args.large)
    ]
    jobs = [replace(job, insert_base=INSERT_FIRST_ID + _INSERT_ID_STRIDE * (1 + i)) for i, job in enumerate(jobs)]
    querying = any(route not in NO_QUERY_ROUTES for route in args.routes)
    if querying:
        asyncio.run(prepare_table(database_url()))
    workdir = Path(tempfile.mkdtemp(prefix="bench-callgrind-"))
    started = time.perf_counter()
    print(f"{len(jobs)} callgrind runs, {args.jobs} at a time, in {workdir}", file=sys.stderr, flush=True)
    counts: dict[Job, int] = {}
    failures: dict[tuple[str, str], str] = {}
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {
            job: pool.submit(callgrind_ir, job, args.loop, args.concurrency, args.keep_alive, workdir) for job in jobs
        }
        for job, future in futures.items():
            try:
                counts[job] = future.result()
            except Exception as exc:
                failures[(job.app, job.route)] = str(exc)
            else:
                print(
                    f"  {job.app} {job.route} x{job.requests} #{job.repeat + 1}: {counts[job]:,} Ir",
                    file=sys.stderr,
                    flush=True,
                )
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    if querying:
        asyncio.run(clean_inserted(database_url()))
    by_key = {(job.app, job.route, job.repeat, job.requests): ir for job, ir in counts.items()}
    runs, per_request = per_request_counts(by_key, todo, args)
    header = (
        f"Instructions per request (callgrind Ir, (Ir(K2) - Ir(K1)) / (K2 - K1), K1={args.small}, K2={args.large}), "
        + (
            "sequential in-process requests"
            if args.concurrency == 1
            else f"{args.concurrency} in-process requests at once"
        )
        + (", keep-alive (next request once the response is complete)" if args.keep_alive else "")
        + f", loop {args.loop}"
        + (f", median of {args.repeat} memory layouts" if args.repeat > 1 else "")
        + f"; {time.perf_counter() - started:.0f}s"
    )
    text, rows = render(per_request, args.routes, header) if per_request else ("no results", [])
    print(text)
    for (app, route), reason in failures.items():
        print(f"{app} {route}: n/a ({reason})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "small": args.small,
        "large": args.large,
        "loop": args.loop,
        "concurrency": args.concurrency,
        "keep_alive": args.keep_alive,
        "git": git_state(),
        "repeat": args.repeat,
        **layouts_record(args.repeat),
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
