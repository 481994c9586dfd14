"""Profile one app on one route, in-process: ``python benchmarks/profile_app.py --app asgi-db-session --route /read``.

``--profiler cprofile`` (the default) counts every call, which shows exactly which functions a request goes
through and how often; its own overhead inflates small functions, so read it for structure, not for
absolute time. ``--profiler pyinstrument`` samples the wall clock (every 0.1 ms here) with little overhead
and shows where the time goes as a call tree; it needs ``pip install pyinstrument``.
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
import pstats
from collections.abc import Callable, Sequence

from benchmarks.apps import APPS
from benchmarks.common import ROUTES, EngineSettings, clean_inserted, database_url, prepare_table
from benchmarks.driver import Lifespan, run_batch


async def _profile(args: argparse.Namespace) -> str:
    url = database_url()
    await prepare_table(url)
    app = APPS[args.app].build(EngineSettings(url=url, pool_size=args.concurrency))
    lifespan = Lifespan(app)
    await lifespan.startup()
    try:
        warm = await run_batch(app, args.route, min(args.requests, 200), args.concurrency, lifespan.state)
        if warm.errors:
            raise SystemExit(f"{args.app} {args.route}: {warm.first_error}")
        if args.profiler == "pyinstrument":
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0001)
            profiler.start()
            batch = await run_batch(app, args.route, args.requests, args.concurrency, lifespan.state)
            profiler.stop()
            text = profiler.output_text(unicode=True, color=False, show_all=args.show_all)
            if args.html is not None:
                args.html.write_text(profiler.output_html())
        else:
            profile = cProfile.Profile()
            profile.enable()
            batch = await run_batch(app, args.route, args.requests, args.concurrency, lifespan.state)
            profile.disable()
            out = io.StringIO()
            stats = pstats.Stats(profile, stream=out)
            restrictions: list[str | int] = [args.filter] if args.filter else []
            stats.sort_stats(args.sort).print_stats(*restrictions, args.limit)
            text = out.getvalue()
    finally:
        await lifespan.shutdown()
        await clean_inserted(url)
    header = (
        f"{args.app} {args.route}: {batch.requests} requests at concurrency {args.concurrency}, {batch.rps:,.0f} req/s"
    )
    return f"{header} (under the profiler)\n{text}"


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
    args = parser.parse_args(argv)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        print(runner.run(_profile(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
