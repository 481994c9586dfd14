"""Soak: many keep-alive requests through uvicorn, watching the server's memory.

    python benchmarks/soak.py [--requests 200000] [--concurrency 16] [--every 10000] [--warm-up 20000]

Runs tests/system/server_app.py under uvicorn on PostgreSQL (``--database-url``, default ``TEST_DATABASE_URL`` or
the local test database), sends ``--requests`` requests (one POST /write for three GET /read) from
``--concurrency`` keep-alive connections, and every ``--every`` requests prints the server process's RSS, its
traced Python memory (tracemalloc, unless ``--no-tracemalloc``), its open sessions and the checked-out
connections. Exits with status 1 when the RSS rose more than ``--max-rss-growth`` MiB above its value after the
warm-up, when a request did not get 200, or when a session or connection is still out at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:
    # Run as a script: import from the repository root, and keep this folder off sys.path.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != _here]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy.engine import make_url

from tests.system.server import (
    Load,
    backends,
    drop_table,
    free_port,
    fresh_table,
    log_problems,
    rss_bytes,
    serve,
    uvicorn_command,
)

MIB = 1024 * 1024
DEFAULT_URL = os.environ.get("TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000, help="requests in all (default 200000)")
    parser.add_argument("--concurrency", type=int, default=16, help="keep-alive connections (default 16)")
    parser.add_argument("--every", type=int, default=10_000, help="print a line every N requests (default 10000)")
    parser.add_argument("--warm-up", type=int, default=20_000, help="requests before the RSS baseline (default 20000)")
    parser.add_argument("--max-rss-growth", type=float, default=5.0, help="MiB allowed after warm-up (default 5)")
    parser.add_argument("--pool-size", type=int, default=4, help="DATABASE_POOL_SIZE, no overflow (default 4)")
    parser.add_argument("--database-url", default=DEFAULT_URL, help="PostgreSQL URL (asyncpg)")
    parser.add_argument("--no-tracemalloc", dest="tracemalloc", action="store_false", help="run the app untraced")
    args = parser.parse_args(argv)
    if not 0 < args.warm_up < args.requests:
        parser.error("--warm-up must be above 0 and below --requests")
    return args


async def soak(args: argparse.Namespace) -> int:
    url = make_url(args.database_url)
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    table = f"adbs_soak_bench_{os.getpid()}"
    env = {
        "SERVER_APP_TABLE": table,
        "DATABASE_POOL_SIZE": str(args.pool_size),
        "DATABASE_MAX_OVERFLOW": "0",
        "DATABASE_POOL_TIMEOUT": "5",
    }
    if args.tracemalloc:
        env["SERVER_APP_TRACEMALLOC"] = "1"
    log_path = Path(tempfile.mkdtemp(prefix="adbs-soak-")) / "server.log"
    port = free_port()
    failures: list[str] = []
    await fresh_table(dsn, table)
    try:
        async with (
            serve(
                uvicorn_command(port),
                database_url=url.render_as_string(hide_password=False),
                admin_dsn=dsn,
                log_path=log_path,
                port=port,
                env=env,
                show_log=False,
            ) as server,
            Load(server, args.concurrency) as load,
        ):
            print(f"server pid {server.process.pid}, log {log_path}")
            print(
                f"{'requests':>9} {'seconds':>8} {'req/s':>6} {'RSS MiB':>8} {'traced KiB':>10} {'sessions':>8} "
                f"{'checked out':>11} {'backends':>8}"
            )
            started = time.monotonic()
            done = 0
            baseline: int | None = None
            baseline_traced: int | None = None
            rss = peak = 0
            stats: dict[str, Any] = {}
            last = started
            while done < args.requests:
                step = min(args.every - done % args.every, args.requests - done)
                if done < args.warm_up < done + step:
                    step = args.warm_up - done  # stop at the warm-up too, for the baseline
                statuses = await load.run(step)
                done += step
                bad = {status: count for status, count in statuses.items() if status != 200}
                if bad:
                    failures.append(f"requests {done - step}..{done}: statuses {bad}")
                stats = await server.quiet_stats(load.clients[0])
                rss = rss_bytes(server.process.pid)
                now = time.monotonic()
                traced = "-" if stats["traced_bytes"] is None else f"{stats['traced_bytes'] / 1024:.0f}"
                count = len(await backends(dsn, server.application_name))
                print(
                    f"{done:>9} {now - started:>8.1f} {step / (now - last):>6.0f} {rss / MIB:>8.2f} {traced:>10} "
                    f"{stats['sessions_open']:>8} {stats['checkedout']:>11} {count:>8}"
                    + ("  <- warm-up baseline" if done == args.warm_up else ""),
                    flush=True,
                )
                last = now
                if done == args.warm_up:
                    baseline = rss
                    baseline_traced = stats["traced_bytes"]
                if done >= args.warm_up:
                    peak = max(peak, rss)
            stats = await server.quiet_stats(load.clients[0])
            if stats["sessions_open"] or stats["sessions_alive"] or stats["checkedout"]:
                failures.append(
                    f"at the end: {stats['sessions_open']} sessions open, {stats['sessions_alive']} not freed, "
                    f"{stats['checkedout']} connections checked out"
                )
    finally:
        await drop_table(dsn, table)

    assert baseline is not None
    growth = peak - baseline
    print(
        f"RSS after warm-up {baseline / MIB:.2f} MiB, at most {peak / MIB:.2f} MiB after it ({growth / MIB:+.2f} MiB), "
        f"at the end {rss / MIB:.2f} MiB"
    )
    if stats["traced_bytes"] is not None and baseline_traced is not None:
        print(
            f"traced Python memory after warm-up {baseline_traced} bytes, at the end {stats['traced_bytes']} bytes: "
            f"{stats['traced_bytes'] - baseline_traced:+d} bytes"
        )
    if growth > args.max_rss_growth * MIB:
        failures.append(f"RSS grew by {growth / MIB:.2f} MiB after warm-up (at most {args.max_rss_growth} allowed)")
    problems = log_problems(log_path.read_text(errors="replace"))
    if problems:
        failures.append("server log: " + "; ".join(problems[:5]))
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(soak(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
