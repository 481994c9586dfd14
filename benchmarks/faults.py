"""Network faults between the app and PostgreSQL: asgi_db_session beside the hand-written app and the peers.

    python benchmarks/faults.py [--apps a,b,...] [--faults blackhole,...] [--fault-seconds 20] [--clients 20]

For each app of ``fault_apps.py`` and each fault, the app runs under uvicorn in a process of its own, its engine
pointed at a TCP proxy (tests/system/tcp_proxy.py, the one the tests use) in front of the PostgreSQL server of
``BENCH_DATABASE_URL``. ``--clients`` clients (httpx, one keep-alive connection each) send in turn one
``POST /insert?id=N`` (a unique id) and ``--write-every`` - 1 ``GET /read``, pausing ``--pause`` s between requests,
each with a timeout of ``--client-timeout`` s. Once every client has had a success, the load runs healthy for
``--healthy-seconds``; then the proxy switches into the fault for ``--fault-seconds`` and heals:

- **blackhole**: sockets stay open, every byte is dropped, both ways;
- **half-open**: the client's bytes reach the server, the server's answers are dropped;
- **stall**: bytes are held both ways and delivered when the fault ends (a partition that heals);
- **reset**: every connection is reset (RST) at the switch, and every new one as soon as it is made.

The load goes on until every client has had a success for a request sent after the heal (or for
``--recovery-seconds``), then stops, and each client's last request is let finish. Recorded per app and fault:

- the longest request, and how many requests took longer than the app's bound + 1 s (the bound of
  docs/how-to/timeouts.md for the bounds the app runs with; the peers, which have no bound, against the
  package's default one);
- the statuses, by count (``500?``: the 500 that says the outcome of the COMMIT is unknown; ``none``: no answer
  within the client's timeout; ``error``: the connection failed);
- of the requests sent during the fault: answered within the bound + 1 s, and left to the client's timeout;
- the answers to the requests sent after the heal, and how long after it every client had had a success again;
- the app's backends still in a transaction, and its engine's checked-out connections (``GET /pool``), once the
  load has stopped and both are 0, or after ``--settle-seconds``;
- every write by its answer, found in the table or not (read on a connection of this script's own, once the server
  has exited and its backends are gone): a 2xx whose row is missing is a lost write, a 503 ("nothing was saved,
  retry") whose row is there is an untrue answer, and ``500?`` says that either may be so;
- the longest answer of ``GET /nodb`` (no database) during the fault.

Results go to ``benchmarks/results/faults.json`` (with the commit and whether the package had uncommitted
changes), and a markdown table is printed. The script uses its own database, ``adbs_bench_faults`` on the same
server (created and dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:
    # Run as a script: import from the repository root, and keep this folder off sys.path.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != _here]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from asgi_db_session.error_responses import OUTCOME_UNKNOWN
from benchmarks.common import INSERT_FIRST_ID, database_url, drop_database, prepare_table, recreate_database
from benchmarks.fault_apps import DEFAULT_BOUND, FAULT_APPS, FaultApp
from benchmarks.throughput import environment, write_results
from tests.system.server import backends, free_port, serve, uvicorn_command
from tests.system.tcp_proxy import Fault, TcpProxy

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DATABASE = "adbs_bench_faults"
FAULTS = {fault.value: fault for fault in (Fault.BLACKHOLE, Fault.HALF_OPEN, Fault.STALL, Fault.RESET)}
SLACK = 1.0  # the "+ 1 s": the machine runs the server, PostgreSQL, the proxy and the clients
NODB_EVERY = 0.2
IN_TRANSACTION = ("active", "idle in transaction", "idle in transaction (aborted)")
UNKNOWN = "500?"
NO_ANSWER = "none"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@dataclass
class Outcome:
    client: int
    started: float
    write_id: int | None
    ended: float = 0.0
    answer: str = ""  # the status ("200", "503", "500?" ...), NO_ANSWER or "error"
    error: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Clients:
    base_url: str
    args: argparse.Namespace
    ids: itertools.count[int]
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def one_client(self, number: int) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        timeout = httpx.Timeout(self.args.client_timeout)
        async with httpx.AsyncClient(base_url=self.base_url, limits=limits, timeout=timeout, trust_env=False) as http:
            for sent in itertools.count(number):
                if self.stop.is_set():
                    return
                write_id = next(self.ids) if sent % self.args.write_every == 0 else None
                outcome = Outcome(number, time.monotonic(), write_id)
                self.outcomes.append(outcome)
                try:
                    if write_id is not None:
                        response = await http.post("/insert", params={"id": str(write_id)})
                    else:
                        response = await http.get("/read")
                except httpx.TimeoutException:
                    outcome.answer = NO_ANSWER
                except httpx.HTTPError as exc:
                    outcome.answer, outcome.error = "error", f"{type(exc).__name__}: {exc}"
                else:
                    unknown = response.status_code == OUTCOME_UNKNOWN.status and response.text == OUTCOME_UNKNOWN.body
                    outcome.answer = UNKNOWN if unknown else str(response.status_code)
                outcome.ended = time.monotonic()
                await asyncio.sleep(self.args.pause)

    def succeeded_since(self, since: float) -> set[int]:
        return {o.client for o in self.outcomes if o.started >= since and o.answer == "200"}

    async def wait_until_each_succeeded(self, since: float, seconds: float) -> float | None:
        """Seconds from ``since`` until every client has had a success for a request sent since then; None if
        that did not happen within ``seconds``."""
        deadline = time.monotonic() + seconds
        while len(self.succeeded_since(since)) < self.args.clients:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.05)
        return (
            max(
                min(o.ended for o in self.outcomes if o.client == client and o.started >= since and o.answer == "200")
                for client in range(self.args.clients)
            )
            - since
        )


async def watch_nodb(base_url: str, stop: asyncio.Event, client_timeout: float) -> list[tuple[float, float]]:
    """GET /nodb every NODB_EVERY s until stopped: when each was sent, and how long its answer took."""
    took: list[tuple[float, float]] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=client_timeout, trust_env=False) as http:
        while not stop.is_set():
            started = time.monotonic()
            # A failure counts as the time it took to fail: only how long /nodb keeps a client waiting matters here.
            with suppress(httpx.HTTPError):
                await http.get("/nodb")
            took.append((started, time.monotonic() - started))
            await asyncio.sleep(NODB_EVERY)
    return took


async def app_backends(dsn: str, application_name: str) -> Counter[str]:
    """The app's backends by state (pg_stat_activity), read on a connection of this script's own."""
    return Counter(backend.state for backend in await backends(dsn, application_name))


async def checked_out(base_url: str) -> int | None:
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=5, trust_env=False) as http:
            count: int = (await http.get("/pool")).json()["checkedout"]
            return count
    except httpx.HTTPError:
        return None


async def settle(base_url: str, dsn: str, application_name: str, seconds: float) -> tuple[int, int | None, float]:
    """Backends in a transaction and checked-out connections once both are 0, or after ``seconds``; and when."""
    started = time.monotonic()
    while True:
        states = await app_backends(dsn, application_name)
        in_transaction = sum(states[state] for state in IN_TRANSACTION)
        out = await checked_out(base_url)
        waited = time.monotonic() - started
        if (in_transaction == 0 and out == 0) or waited > seconds:
            return in_transaction, out, waited
        await asyncio.sleep(0.2)


async def present_ids(dsn: str, ids: list[int]) -> set[int]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch("SELECT id FROM bench_items WHERE id = ANY($1::int[])", ids)
    finally:
        await connection.close()
    return {row[0] for row in rows}


def with_port(url: str, host: str, port: int) -> str:
    return make_url(url).set(host=host, port=port).render_as_string(hide_password=False)


async def run_one(
    spec: FaultApp, fault: Fault, args: argparse.Namespace, url: str, dsn: str, ids: itertools.count[int]
) -> dict[str, Any]:
    upstream = make_url(url)
    bound = spec.bound if spec.bound is not None else DEFAULT_BOUND
    result: dict[str, Any] = {"app": spec.key, "fault": fault.value, "bound_seconds": spec.bound, "problems": []}
    log_dir = Path(tempfile.mkdtemp(prefix=f"adbs-faults-{spec.key}-{fault.value}-"))
    port = free_port()
    command = [
        *uvicorn_command(port, app="benchmarks.fault_apps:create_app"),
        "--factory",
        "--timeout-graceful-shutdown",
        "3",
    ]
    clients: Clients | None = None
    fault_started = healed = math.inf
    serving = False
    with TcpProxy(upstream.port or 5432, upstream.host or "127.0.0.1").in_thread() as proxy:
        try:
            async with serve(
                command,
                database_url=with_port(url, "127.0.0.1", proxy.port),
                admin_dsn=dsn,
                log_path=log_dir / "server.log",
                port=port,
                env={"FAULT_APP": spec.key, **spec.env},
                show_log=False,
                ready_path="/nodb",
            ) as server:
                serving = True
                clients = Clients(server.base_url, args, ids)
                tasks = [asyncio.create_task(clients.one_client(number)) for number in range(args.clients)]
                stop_nodb = asyncio.Event()
                nodb = asyncio.create_task(watch_nodb(server.base_url, stop_nodb, args.client_timeout))
                try:
                    if await clients.wait_until_each_succeeded(time.monotonic(), 30) is None:
                        result["problems"].append("not every client got a success before the fault")
                    await asyncio.sleep(args.healthy_seconds)
                    fault_started = time.monotonic()
                    proxy.set_fault(fault)
                    await asyncio.sleep(args.fault_seconds)
                    proxy.heal()
                    healed = time.monotonic()
                    recovered = await clients.wait_until_each_succeeded(healed, args.recovery_seconds)
                    result["recovered_after_seconds"] = None if recovered is None else round(recovered, 2)
                finally:
                    clients.stop.set()
                    stop_nodb.set()
                    await asyncio.gather(*tasks)
                    nodb_took = await nodb
                in_transaction, out, waited = await settle(
                    server.base_url, dsn, server.application_name, args.settle_seconds
                )
                result["after"] = {
                    "in_transaction": in_transaction,
                    "checked_out": out,
                    "waited_seconds": round(waited, 2),
                }
        except (TimeoutError, AssertionError) as exc:
            if not serving:  # it never answered /nodb: the app could not be built or started
                result["problems"].append(f"the server did not start ({type(exc).__name__}: {exc}); see the log")
            elif isinstance(exc, TimeoutError):
                # serve() waits 20 s for the server to exit, then kills it: a request it could not end held it.
                result["problems"].append("the server did not exit within 20 s of SIGTERM and was killed")
            else:
                raise
    log_path = log_dir / "server.log"
    result["log"] = str(log_path)
    server_log = log_path.read_text(errors="replace") if log_path.exists() else ""
    # What the server's log says went wrong besides the answers: tracebacks, and connections the garbage
    # collector had to reclaim (never given back to the pool).
    result["log_tracebacks"] = server_log.count("Traceback")
    result["log_non_checked_in"] = server_log.count("non-checked-in")
    if clients is None:
        return result
    outcomes = clients.outcomes
    during = [o for o in outcomes if fault_started <= o.started < healed]
    answered = [o for o in outcomes if o.answer not in (NO_ANSWER, "error")]
    result["requests"] = len(outcomes)
    result["answers"] = dict(Counter(o.answer for o in outcomes).most_common())
    result["longest_seconds"] = round(max((o.seconds for o in outcomes), default=0.0), 2)
    result["longest_answered_seconds"] = round(max((o.seconds for o in answered), default=0.0), 2)

    def within(outcome: Outcome) -> bool:
        # A write may also ask what became of a COMMIT whose answer was lost (the outcome check).
        return outcome.seconds <= bound + (spec.outcome_seconds if outcome.write_id is not None else 0.0) + SLACK

    result["over_bound"] = sum(not within(o) for o in outcomes)
    result["during"] = {
        "sent": len(during),
        "answered_in_bound": sum(o.answer not in (NO_ANSWER, "error") and within(o) for o in during),
        "no_answer": sum(o.answer == NO_ANSWER for o in during),
        "answers": dict(Counter(o.answer for o in during).most_common()),
    }
    # Sent once the network was back: whether the app serves as before.
    result["after_heal_answers"] = dict(Counter(o.answer for o in outcomes if o.started >= healed).most_common())
    errors = [o.error for o in outcomes if o.error]
    if errors:
        result["problems"].append(f"{len(errors)} connection errors, first: {errors[0]}")
    nodb_during = [took for started, took in nodb_took if fault_started <= started < healed]
    result["nodb_longest_during_seconds"] = round(max(nodb_during, default=0.0), 3)
    writes = [o for o in outcomes if o.write_id is not None]
    present = await present_ids(dsn, [o.write_id for o in writes if o.write_id is not None])
    by_answer: dict[str, dict[str, int]] = {}
    for o in writes:
        counts = by_answer.setdefault(o.answer, {"present": 0, "absent": 0})
        counts["present" if o.write_id in present else "absent"] += 1
    result["writes"] = by_answer
    result["untrue"] = {
        "2xx_absent": sum(c["absent"] for answer, c in by_answer.items() if answer.startswith("2")),
        "503_present": by_answer.get("503", {}).get("present", 0),
    }
    return result


# ---- the table --------------------------------------------------------------------------------------------------


def _writes_cell(writes: dict[str, dict[str, int]]) -> str:
    parts = []
    for answer in sorted(writes):
        counts = writes[answer]
        parts.append(f"{answer}: {counts['present']}/{counts['present'] + counts['absent']}")
    return ", ".join(parts)


def _answers(answers: dict[str, int]) -> str:
    return ", ".join(f"{answer}: {count}" for answer, count in answers.items())


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| fault | app | longest (s) | over bound + 1 s | answers | sent during the fault: answered in bound / no "
        "answer | sent after the heal | all served again after (s) | after: in transaction / checked out "
        "| writes present / answered, by answer | untrue: 2xx absent / 503 present |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "requests" not in r:
            lines.append(f"| {r['fault']} | {r['app']} | n/a: {'; '.join(r['problems'])} ||||||||")
            continue
        bound = f"none: {DEFAULT_BOUND:g} s" if r["bound_seconds"] is None else f"{r['bound_seconds']:g} s"
        during = r["during"]
        recovered = r.get("recovered_after_seconds")
        after = r.get("after", {})
        out = after.get("checked_out")
        lines.append(
            f"| {r['fault']} | {r['app']} | {r['longest_seconds']:.1f} | {r['over_bound']} (bound {bound}) "
            f"| {_answers(r['answers'])} | {during['answered_in_bound']} of {during['sent']} / {during['no_answer']} "
            f"| {_answers(r.get('after_heal_answers', {}))} "
            f"| {'not within the run' if recovered is None else f'{recovered:.1f}'} "
            f"| {after.get('in_transaction', '?')} / {'?' if out is None else out} "
            f"| {_writes_cell(r['writes'])} | {r['untrue']['2xx_absent']} / {r['untrue']['503_present']} |"
        )
    return "\n".join(lines)


# ---- the database and the command line ------------------------------------------------------------------------


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--apps", type=_csv, default=list(FAULT_APPS), help="comma-separated app keys")
    parser.add_argument("--faults", type=_csv, default=list(FAULTS), help="comma-separated faults")
    parser.add_argument("--clients", type=int, default=20, help="clients, one keep-alive connection each")
    parser.add_argument("--write-every", type=int, default=4, help="one write in this many requests")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds each client waits between requests")
    parser.add_argument("--client-timeout", type=float, default=60.0, help="seconds a client waits for an answer")
    parser.add_argument("--healthy-seconds", type=float, default=2.0, help="load before the fault")
    parser.add_argument("--fault-seconds", type=float, default=20.0, help="how long the fault lasts")
    parser.add_argument(
        "--recovery-seconds", type=float, default=30.0, help="longest load after the heal, until each client succeeds"
    )
    parser.add_argument("--settle-seconds", type=float, default=8.0, help="longest wait for the app to be quiet")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "faults.json", help="results file")
    parser.add_argument("--table", type=Path, help="only print the table of this results file")
    args = parser.parse_args(argv)
    unknown = [key for key in args.apps if key not in FAULT_APPS] + [f for f in args.faults if f not in FAULTS]
    if unknown:
        parser.error(f"unknown apps or faults {unknown}; apps: {list(FAULT_APPS)}; faults: {list(FAULTS)}")
    return args


async def amain(args: argparse.Namespace) -> int:
    base = make_url(database_url())
    server_dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    url = base.set(database=DATABASE).render_as_string(hide_password=False)
    dsn = base.set(drivername="postgresql", database=DATABASE).render_as_string(hide_password=False)
    await recreate_database(server_dsn, DATABASE)
    results: list[dict[str, Any]] = []
    ids = itertools.count(INSERT_FIRST_ID)
    started = time.monotonic()
    try:
        await prepare_table(url)
        for fault_name in args.faults:
            for key in args.apps:
                log(f"{fault_name} / {key} ...")
                result = await run_one(FAULT_APPS[key], FAULTS[fault_name], args, url, dsn, ids)
                results.append(result)
                log(
                    f"{fault_name} / {key}: longest {result.get('longest_seconds')} s, {result.get('answers')}, "
                    f"after {result.get('after')}, writes {result.get('writes')}, problems {result['problems']}"
                )
    finally:
        await drop_database(server_dsn, DATABASE)
    print(table(results))
    payload = {
        "benchmark": "faults",
        "config": {
            key: getattr(args, key)
            for key in (
                "clients",
                "write_every",
                "pause",
                "client_timeout",
                "healthy_seconds",
                "fault_seconds",
                "recovery_seconds",
                "settle_seconds",
            )
        }
        | {"slack_seconds": SLACK, "apps": {key: FAULT_APPS[key].description for key in args.apps}},
        "environment": environment("uvicorn (auto)"),
        "seconds": round(time.monotonic() - started, 1),
        "runs": results,
    }
    write_results(args.output, payload)
    log(f"results written to {args.output}")
    ours = [r for r in results if r["app"] == "asgi-db-session"]
    failed = [
        r
        for r in ours
        if r["problems"]
        or r.get("over_bound")
        or r.get("untrue", {}).get("503_present")
        or r.get("after", {}).get("checked_out")
    ]
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table is not None:
        print(table(json.loads(args.table.read_text())["runs"]))
        return 0
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
