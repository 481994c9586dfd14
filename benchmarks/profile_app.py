"""Profile one app on one route, in-process: ``python benchmarks/profile_app.py --app asgi-db-session --route /read``.

``--profiler cprofile`` (the default) counts every call, which shows exactly which functions a request goes
through and how often; its own overhead inflates small functions, so read it for structure, not for
absolute time. ``--profiler pyinstrument`` samples the wall clock (every 0.1 ms here) with little overhead
and shows where the time goes as a call tree; it needs ``pip install pyinstrument``.

``--against APP`` counts the calls of both apps instead (cProfile, the same route, requests and concurrency) and
prints the calls per request of each, then every function whose calls per request differ by at least
``--min-difference``: what one app does per request that the other does not. Call counts do not depend on the
machine's load, which moves timings here by ten per cent and more. ``--keep-alive`` sends each worker's next
request once the response is complete, as a server's keep-alive connection does (see driver.py).
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
import cProfile
import io
import json
import pstats
import time
from collections.abc import Callable, Sequence

from benchmarks.apps import APPS
from benchmarks.common import ROUTES, EngineSettings, clean_inserted, database_url, git_state, prepare_table
from benchmarks.driver import Lifespan, run_batch

ROOT = Path(__file__).resolve().parent.parent


async def _profile(args: argparse.Namespace, key: str, counts: dict[str, dict[str, float]] | None = None) -> str:
    """Profile app ``key``; with ``counts``, keep its calls per request there (under ``key``) instead of a table."""
    url = database_url()
    await prepare_table(url)
    app = APPS[key].build(EngineSettings(url=url, pool_size=args.concurrency))
    lifespan = Lifespan(app)
    await lifespan.startup()
    try:
        warm = await run_batch(
            app, args.route, min(args.requests, 200), args.concurrency, lifespan.state, keep_alive=args.keep_alive
        )
        if warm.errors:
            raise SystemExit(f"{key} {args.route}: {warm.first_error}")
        if args.profiler == "pyinstrument":
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0001)
            profiler.start()
            batch = await run_batch(
                app, args.route, args.requests, args.concurrency, lifespan.state, keep_alive=args.keep_alive
            )
            profiler.stop()
            text = profiler.output_text(unicode=True, color=False, show_all=args.show_all)
            if args.html is not None:
                args.html.write_text(profiler.output_html())
        else:
            profile = cProfile.Profile()
            profile.enable()
            batch = await run_batch(
                app, args.route, args.requests, args.concurrency, lifespan.state, keep_alive=args.keep_alive
            )
            profile.disable()
            if counts is not None:
                counts[key] = _calls_per_request(profile, batch.requests)
                text = ""
            else:
                out = io.StringIO()
                stats = pstats.Stats(profile, stream=out)
                restrictions: list[str | int] = [args.filter] if args.filter else []
                stats.sort_stats(args.sort).print_stats(*restrictions, args.limit)
                text = out.getvalue()
        if batch.errors:
            raise SystemExit(f"{key} {args.route}: {batch.errors} requests failed: {batch.first_error}")
    finally:
        await lifespan.shutdown()
        await clean_inserted(url)
    header = f"{key} {args.route}: {batch.requests} requests at concurrency {args.concurrency}, {batch.rps:,.0f} req/s"
    return f"{header} (under the profiler)\n{text}"


def _calls_per_request(profile: cProfile.Profile, requests: int) -> dict[str, float]:
    """Calls per request of each function (a coroutine counts once per resumption), keyed by where it lives."""
    counts: dict[str, float] = {}
    stats: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    for (filename, _, name), (_, calls, _, _, _) in stats.items():
        where = filename.split("site-packages/")[-1].removeprefix(str(ROOT) + "/")
        key = f"{where}:{name}"
        counts[key] = counts.get(key, 0.0) + calls / requests
    return counts


def _compare(counts: dict[str, dict[str, float]], first: str, second: str, min_difference: float) -> str:
    a, b = counts[first], counts[second]
    lines = [
        f"calls per request: {first} {sum(a.values()):,.1f}, {second} {sum(b.values()):,.1f}",
        f"{'difference':>10} {first[:18]:>18} {second[:18]:>18}  function",
    ]
    for key in sorted(set(a) | set(b), key=lambda k: (-(b.get(k, 0.0) - a.get(k, 0.0)), k)):
        difference = b.get(key, 0.0) - a.get(key, 0.0)
        if abs(difference) >= min_difference:
            lines.append(f"{difference:>+10.2f} {a.get(key, 0.0):>18.2f} {b.get(key, 0.0):>18.2f}  {key}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", choices=list(APPS), default="asgi-db-session")
    parser.add_argument("--route", choices=list(ROUTES), default="/read")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--profiler", choices=("cprofile", "pyinstrument"), default="cprofile")
    parser.add_argument("--sort", default="tottime", help="cProfile sort key (tottime, cumulative, ncalls)")
    parser.add_argument("--limit", type=int, default=40, help="cProfile rows")
    parser.add_argument("--filter", default=None, help="cProfile: only rows whose location matches this regex")
    parser.add_argument("--show-all", action="store_true", help="pyinstrument: keep library frames")
    parser.add_argument("--html", type=Path, default=None, help="pyinstrument: also write an HTML report")
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--keep-alive", action="store_true", help="next request once the response is complete")
    parser.add_argument("--against", choices=list(APPS), default=None, help="compare call counts with this app")
    parser.add_argument("--min-difference", type=float, default=0.5, help="--against: smallest difference shown")
    parser.add_argument("--output", type=Path, default=None, help="--against: also write the counts as JSON")
    args = parser.parse_args(argv)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop_factory = uvloop.new_event_loop
    if args.against is None:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            print(runner.run(_profile(args, args.app)))
        return 0
    if args.profiler != "cprofile":
        parser.error("--against counts calls: it needs --profiler cprofile")
    counts: dict[str, dict[str, float]] = {}
    for key in (args.against, args.app):
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            print(runner.run(_profile(args, key, counts)).rstrip())
    print(_compare(counts, args.against, args.app, args.min_difference))
    if args.output is not None:
        document = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "route": args.route,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "keep_alive": args.keep_alive,
            "git": git_state(),
            "calls_per_request": {key: sum(calls.values()) for key, calls in counts.items()},
            "functions": counts,
        }
        args.output.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
