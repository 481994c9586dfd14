"""The package's own spans (issue #18): the middleware's commit and its cleanup, each one span under the request's,
with the statements they run nested under them; none per statement; none, and nothing of OpenTelemetry imported,
when tracing is off.

Real PostgreSQL throughout. The request's span comes from OpenTelemetry's ASGI instrumentation (the outermost
middleware, as an app sets it up); statements' spans from its SQLAlchemy instrumentation (what the app runs) and
its asyncpg instrumentation (which also sees COMMIT and ROLLBACK, sent past SQLAlchemy's cursor events). Each
test hands its own TracerProvider to all of them, so no test sets the process's global one; the tests of the
global provider run in a child process of their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracerProvider, SpanKind, StatusCode
from sqlalchemy import String, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_db_session import Database, DatabaseSettings, DBSessionMiddleware, current_session
from asgi_db_session._tracing import (
    CLEANUP_OUTCOME,
    CLEANUP_SPAN,
    COMMIT_OUTCOME,
    COMMIT_OUTCOME_CHECK,
    COMMIT_SPAN,
    COMMIT_WHEN,
    DATABASE,
    DB_STATUS_CODE,
    ERROR_TYPE,
    ROLLBACK_REASON,
    TRACER_NAME,
    TRANSACTION_ID,
    note_outcome_check,
    request_spans,
)
from asgi_db_session._types import ASGIApp, Receive, Scope, Send

from .asgi import Channel, http_scope, run_lifespan
from .conftest import PG_URL, client
from .polling import eventually
from .system.pg_wire import FrontendMessages, is_commit
from .system.server import REPO_ROOT
from .system.tcp_proxy import Action, Fault, ProxyConnection, TcpProxy

pytestmark = pytest.mark.anyio

TABLE = f"adbs_own_spans_{os.getpid()}"
# The unique name is checked at COMMIT (deferred): a duplicate fails the middleware's commit, not the statement.
CREATE_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} "
    "(id INTEGER PRIMARY KEY, name VARCHAR(100) NOT NULL UNIQUE DEFERRABLE INITIALLY DEFERRED)"
)
# A value only the statements' parameters carry: it must not reach the package's spans.
PRIVATE = "private-7c1e"


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


@dataclass
class Traces:
    """What one TracerProvider received: the request's, the package's and the statements' spans."""

    provider: TracerProvider
    exporter: InMemorySpanExporter

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def own(self) -> list[ReadableSpan]:
        """The package's spans, in the order they ended."""
        return [span for span in self.spans() if scope_of(span) == TRACER_NAME]

    def one(self, name: str) -> ReadableSpan:
        found = [span for span in self.own() if span.name == name]
        assert len(found) == 1, [span.name for span in self.own()]
        return found[0]

    def request(self) -> ReadableSpan:
        found = [span for span in self.spans() if span.kind is SpanKind.SERVER]
        assert len(found) == 1, [span.name for span in self.spans()]
        return found[0]

    def statements(self, starting: str) -> list[ReadableSpan]:
        """The statements' spans (of either instrumentation) whose SQL starts with ``starting``."""
        return [span for span in self.spans() if statement_of(span).upper().startswith(starting)]

    def sends(self, event_type: str) -> list[ReadableSpan]:
        """The ASGI instrumentation's spans of the messages of ``event_type`` sent to the server."""
        return [span for span in self.spans() if attributes(span).get("asgi.event.type") == event_type]

    def children(self, span: ReadableSpan) -> list[str]:
        """What ran directly under ``span``: statements by their SQL, other spans by their name."""
        return [statement_of(each) or each.name for each in self.spans() if parent_of(each) == span_id(span)]

    def ancestors(self, span: ReadableSpan) -> list[ReadableSpan]:
        by_id = {span_id(each): each for each in self.spans()}
        found = []
        parent = span.parent
        while parent is not None and parent.span_id in by_id:
            found.append(by_id[parent.span_id])
            parent = by_id[parent.span_id].parent
        return found


def scope_of(span: ReadableSpan) -> str | None:
    return None if span.instrumentation_scope is None else span.instrumentation_scope.name


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def statement_of(span: ReadableSpan) -> str:
    found = attributes(span)
    return str(found.get("db.statement", found.get("db.query.text", "")))


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    found: int = span.context.span_id
    return found


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def ended(span: ReadableSpan) -> int:
    assert span.end_time is not None
    return span.end_time


def started(span: ReadableSpan) -> int:
    assert span.start_time is not None
    return span.start_time


@pytest.fixture
def traces() -> Iterator[Traces]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    statements = SQLAlchemyInstrumentor()
    # The instrumentation declares SQLAlchemy < 2.1; what it does (engine events) works on 2.1 too.
    statements.instrument(tracer_provider=provider, skip_dep_check=True)
    driver = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    driver.instrument(tracer_provider=provider)
    try:
        yield Traces(provider, exporter)
    finally:
        driver.uninstrument()
        statements.uninstrument()


async def pg(sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run ``sql`` on a connection of its own, straight to the server: how a test sees what was saved."""
    connection = await asyncpg.connect(PG_URL.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return [tuple(row) for row in await connection.fetch(sql, *args)]
    finally:
        await connection.close()


@pytest.fixture
async def table(postgresql_dsn: str) -> AsyncIterator[None]:
    await pg(CREATE_TABLE)
    await pg(f"TRUNCATE {TABLE}")
    yield
    await pg(f"DROP TABLE IF EXISTS {TABLE}")


async def names() -> list[str]:
    return sorted(row[0] for row in await pg(f"SELECT name FROM {TABLE}"))


@pytest.fixture
async def database(table: None) -> AsyncIterator[Database]:
    db = Database(PG_URL)
    yield db
    if db._engine is not None:
        assert db.engine.pool.checkedout() == 0, "a connection was not returned to the pool"  # type: ignore[attr-defined]
    await db.dispose()


def traced(traces: Traces, database: Database, routes: Sequence[Route], *, commit_on_success: bool = True) -> ASGIApp:
    """A Starlette app with the middleware, under the ASGI instrumentation's request span."""
    app = Starlette(routes=list(routes))
    app.add_middleware(
        DBSessionMiddleware, database=database, commit_on_success=commit_on_success, tracer_provider=traces.provider
    )
    instrumented: ASGIApp = OpenTelemetryMiddleware(app, tracer_provider=traces.provider)
    return instrumented


async def insert(name: str, row_id: int = 1, database: str = "default") -> None:
    statement = text(f"INSERT INTO {TABLE} (id, name) VALUES (:id, :name)")
    await current_session(database).execute(statement, {"id": row_id, "name": name})


async def test_the_commit_before_the_response_is_one_span_under_the_request_over_its_statements(
    traces: Traces, database: Database
) -> None:
    async def create(request: Request) -> Response:
        session = current_session()
        for _ in range(3):
            await session.execute(text("SELECT 1"))
        session.add(Row(id=1, name="first"))  # autoflush is off: its INSERT is sent by the commit
        return PlainTextResponse("created", status_code=201)

    async with client(traced(traces, database, [Route("/", create, methods=["POST"])])) as http:
        assert (await http.post("/")).status_code == 201
    assert await names() == ["first"]

    # One span of the package's for the request, however many statements it ran: the commit.
    assert [span.name for span in traces.own()] == [COMMIT_SPAN]
    commit = traces.one(COMMIT_SPAN)
    assert attributes(commit) == {DATABASE: "default", COMMIT_WHEN: "before_response", COMMIT_OUTCOME: "committed"}
    assert commit.status.status_code is StatusCode.UNSET
    assert parent_of(commit) == span_id(traces.request())
    # What the instrumentation sees of the commit nests under it: the INSERT it flushed, and COMMIT itself.
    inserts = traces.statements("INSERT")
    assert inserts
    assert all(commit in traces.ancestors(span) for span in inserts)
    [commit_statement] = traces.statements("COMMIT")
    assert parent_of(commit_statement) == span_id(commit)
    # The reads are the request's, not the commit's.
    reads = traces.statements("SELECT 1")
    assert len(reads) >= 3
    assert not any(commit in traces.ancestors(span) for span in reads)
    # Made before the response started: the response's start went to the server after the commit had ended.
    [start] = traces.sends("http.response.start")
    assert ended(commit) <= started(start)


@pytest.mark.parametrize(
    ("commit_on_success", "status", "reason"), [(True, 422, "error"), (False, 200, "not_committing")]
)
async def test_a_request_that_does_not_commit_has_a_cleanup_span_over_its_rollback_after_the_response(
    traces: Traces, database: Database, commit_on_success: bool, status: int, reason: str
) -> None:
    async def refuse(request: Request) -> Response:
        await insert("not kept")
        return PlainTextResponse("no", status_code=status)

    app = traced(traces, database, [Route("/", refuse, methods=["POST"])], commit_on_success=commit_on_success)
    async with client(app) as http:
        assert (await http.post("/")).status_code == status
    assert await names() == []

    assert [span.name for span in traces.own()] == [CLEANUP_SPAN]
    cleanup = traces.one(CLEANUP_SPAN)
    assert attributes(cleanup) == {DATABASE: "default", ROLLBACK_REASON: reason, CLEANUP_OUTCOME: "rolled_back"}
    assert parent_of(cleanup) == span_id(traces.request())
    assert traces.children(cleanup) == ["ROLLBACK;"]
    # After the response: its last body message had gone to the server before the cleanup began.
    last_body = traces.sends("http.response.body")[-1]
    assert ended(last_body) <= started(cleanup)


async def test_a_failed_commit_is_recorded_on_its_span_without_the_statement_parameters(
    traces: Traces, database: Database
) -> None:
    await pg(f"INSERT INTO {TABLE} (id, name) VALUES (1, $1)", PRIVATE)

    async def create(request: Request) -> Response:
        await insert(PRIVATE, row_id=2)  # deferred: the duplicate name fails the COMMIT
        return PlainTextResponse("created", status_code=201)

    async with client(traced(traces, database, [Route("/", create, methods=["POST"])])) as http:
        assert (await http.post("/")).status_code == 409
    assert await names() == [PRIVATE]

    # The commit, then the cleanup of the transaction it left failed.
    assert [span.name for span in traces.own()] == [COMMIT_SPAN, CLEANUP_SPAN]
    assert attributes(traces.one(CLEANUP_SPAN))[ROLLBACK_REASON] == "commit_failed"
    commit = traces.one(COMMIT_SPAN)
    assert parent_of(commit) == span_id(traces.request())
    found = attributes(commit)
    assert found[COMMIT_OUTCOME] == "failed"
    assert found[COMMIT_WHEN] == "before_response"
    assert found[ERROR_TYPE] == "asyncpg.exceptions.UniqueViolationError"
    assert found[DB_STATUS_CODE] == "23505"
    assert commit.status.status_code is StatusCode.ERROR
    assert commit.status.description is not None
    assert commit.status.description.startswith("IntegrityError: duplicate key value violates unique constraint")
    [event] = commit.events
    assert event.name == "exception"
    assert dict(event.attributes or {}) == {
        "exception.type": "asyncpg.exceptions.UniqueViolationError",
        "exception.message": commit.status.description.removeprefix("IntegrityError: "),
    }
    assert "COMMIT;" in traces.children(commit)
    # The request's span shows what the client got instead of the app's 201.
    request = attributes(traces.request())
    assert request.get("http.status_code", request.get("http.response.status_code")) == 409
    for span in traces.own():
        shown = json.dumps([attributes(span), [dict(e.attributes or {}) for e in span.events], span.status.description])
        assert PRIVATE not in shown, span.name


async def test_a_commit_while_streaming_or_after_the_response_says_when(traces: Traces, database: Database) -> None:
    async def stream(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"one "
            await insert("while streaming")
            yield b"two"

        return StreamingResponse(body())

    async def later(request: Request) -> Response:
        async def work() -> None:
            await insert("after the response", row_id=2)

        return PlainTextResponse("accepted", status_code=202, background=BackgroundTask(work))

    app = traced(traces, database, [Route("/stream", stream), Route("/later", later)])
    async with client(app) as http:
        assert (await http.get("/stream")).text == "one two"
        assert (await http.get("/later")).status_code == 202
    assert await names() == ["after the response", "while streaming"]
    assert [attributes(span)[COMMIT_WHEN] for span in traces.own()] == ["before_last_body", "call_end"]
    assert all(attributes(span)[COMMIT_OUTCOME] == "committed" for span in traces.own())
    assert len({span.context.trace_id for span in traces.own() if span.context is not None}) == 2  # one per request


async def test_a_failed_commit_after_the_response_is_recorded_and_its_transaction_cleaned_up(
    traces: Traces, database: Database
) -> None:
    await pg(f"INSERT INTO {TABLE} (id, name) VALUES (1, 'taken')")

    async def later(request: Request) -> Response:
        async def work() -> None:
            await insert("taken", row_id=2)  # deferred: the duplicate fails the commit at the end of the call

        return PlainTextResponse("accepted", status_code=202, background=BackgroundTask(work))

    async with client(traced(traces, database, [Route("/", later)]), raise_app_exceptions=False) as http:
        assert (await http.get("/")).status_code == 202  # sent before the work ran: the failure is the server's to log
    assert await names() == ["taken"]
    assert [span.name for span in traces.own()] == [COMMIT_SPAN, CLEANUP_SPAN]
    commit, cleanup = traces.own()
    assert attributes(commit)[COMMIT_WHEN] == "call_end"
    assert attributes(commit)[COMMIT_OUTCOME] == "failed"
    assert attributes(commit)[DB_STATUS_CODE] == "23505"
    assert attributes(cleanup)[ROLLBACK_REASON] == "commit_failed"
    assert parent_of(commit) == parent_of(cleanup) == span_id(traces.request())


def test_without_opentelemetry_imported_nothing_is_looked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in an app that never imported OpenTelemetry (the child process below shows the package imports none)."""
    monkeypatch.delitem(sys.modules, "opentelemetry.trace")
    assert request_spans(None, "default") is None
    note_outcome_check("committed", "1")  # no span to mark, and no import to make
    assert "opentelemetry.trace" not in sys.modules


async def test_a_cleanup_without_answer_is_a_span_that_says_it_timed_out(traces: Traces, table: None) -> None:
    async with TcpProxy() as proxy:
        url = make_url(PG_URL).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        database = Database(settings=DatabaseSettings(url=url, cleanup_timeout=0.5), name="spans-cleanup")
        try:

            async def stranded(request: Request) -> Response:
                await insert("stranded", database="spans-cleanup")
                proxy.set_fault(Fault.BLACKHOLE)  # the rollback that follows gets no answer
                return PlainTextResponse("no", status_code=400)

            app = traced(traces, database, [Route("/", stranded)])
            async with client(app) as http:
                assert (await http.get("/")).status_code == 400
        finally:
            proxy.heal()
            await database.dispose()
    cleanup = traces.one(CLEANUP_SPAN)
    assert attributes(cleanup) == {DATABASE: "spans-cleanup", ROLLBACK_REASON: "error", CLEANUP_OUTCOME: "timed_out"}
    assert ended(cleanup) - started(cleanup) < 2_000_000_000  # the bound, not a hang


class CommitTrap:
    """The proxy's hook: once armed, the first COMMIT goes to the server and its connection is then dropped, so the
    server commits and the answer never comes back; ``then`` runs on the proxy's loop right after."""

    def __init__(self) -> None:
        self._streams: dict[int, FrontendMessages] = {}
        self.armed = False
        self.then: Callable[[], None] | None = None

    def __call__(self, connection: ProxyConnection, data: bytes) -> Action:
        messages = self._streams.setdefault(connection.number, FrontendMessages()).feed(data)
        if not self.armed or not any(is_commit(message) for message in messages):
            return Action.FORWARD
        self.armed = False
        if self.then is not None:
            asyncio.get_running_loop().call_soon(self.then)
        return Action.FORWARD_THEN_DROP


@pytest.mark.parametrize(
    ("check", "cut_off", "status", "outcome", "learned"),
    [
        (True, False, 201, "committed", "committed"),
        # Every connection through the proxy reset from then on: the server cannot be asked.
        (True, True, 500, "unknown", "unknown"),
        (False, False, 500, "unknown", "off"),
    ],
)
async def test_a_commit_whose_answer_was_lost_shows_what_the_outcome_check_learned(
    traces: Traces, table: None, check: bool, cut_off: bool, status: int, outcome: str, learned: str
) -> None:
    trap = CommitTrap()
    async with TcpProxy(make_url(PG_URL).port or 5432, on_client_data=trap) as proxy:
        if cut_off:
            trap.then = lambda: proxy.set_fault(Fault.RESET)
        url = make_url(PG_URL).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        settings = DatabaseSettings(url=url, ssl="disable", commit_outcome_check=check, commit_outcome_timeout=1)
        database = Database(settings=settings, name="spans-outcome")
        try:

            async def create(request: Request) -> Response:
                await insert("saved after all", database="spans-outcome")
                trap.armed = True
                return PlainTextResponse("created", status_code=201)

            async with client(traced(traces, database, [Route("/", create)]), raise_app_exceptions=False) as http:
                assert (await http.get("/")).status_code == status
        finally:
            proxy.heal()
            await database.dispose()

    # The server commits, whatever the client could be told; with the check off nothing waited for it to finish
    # the COMMIT it received, so a loaded server may show the row a moment after the answer.
    async def saved() -> bool:
        return bool(await names())

    await eventually(saved, "the row of the COMMIT the server received")
    assert await names() == ["saved after all"]
    commit = traces.one(COMMIT_SPAN)
    found = attributes(commit)
    assert found[COMMIT_OUTCOME] == outcome
    assert found[COMMIT_OUTCOME_CHECK] == learned
    if check:
        assert int(found[TRANSACTION_ID]) > 0
    else:
        assert TRANSACTION_ID not in found  # not read with the check off
    assert commit.status.status_code is (StatusCode.UNSET if outcome == "committed" else StatusCode.ERROR)


async def test_a_response_that_never_went_out_whole_is_rolled_back_as_incomplete(
    traces: Traces, database: Database
) -> None:
    async def half_sent(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await insert("half sent")
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        # Returns without the last body message: as a streaming response that stopped when its client left.

    app = DBSessionMiddleware(half_sent, database=database, commit_on_success=True, tracer_provider=traces.provider)
    channel = Channel([{"type": "http.request", "body": b"", "more_body": False}])
    await app(http_scope(), channel.receive, channel.send)
    assert channel.types() == ["http.response.start", "http.response.body"]
    assert await names() == []
    cleanup = traces.one(CLEANUP_SPAN)
    assert [span.name for span in traces.own()] == [CLEANUP_SPAN]
    assert attributes(cleanup) == {DATABASE: "default", ROLLBACK_REASON: "incomplete", CLEANUP_OUTCOME: "rolled_back"}
    assert cleanup.parent is None  # no request span around it here: the middleware is the outermost app


async def test_a_no_op_provider_turns_the_spans_off(sqlite_url: str) -> None:
    middleware = DBSessionMiddleware(Starlette(), url=sqlite_url, tracer_provider=NoOpTracerProvider())
    assert middleware._spans is None
    channel = await run_lifespan(middleware)  # a provider given is kept: the global one is not looked for
    assert channel.types() == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert middleware._spans is None


# The child: the global TracerProvider, which a process can set only once. It prints what it saw as JSON.
CHILD = """
import asyncio, json, sys
from contextlib import asynccontextmanager

import httpx
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_db_session import DBSessionMiddleware, current_session

URL = sys.argv[1]
seen = {}


async def endpoint(request):
    await current_session().execute(text("SELECT 1"))
    return PlainTextResponse("ok")


async def serve(middleware):
    async with LifespanManager(middleware):
        started = middleware._spans is not None
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            assert (await http.get("/")).text == "ok"
    return started


async def main():
    plain = DBSessionMiddleware(Starlette(routes=[Route("/", endpoint)]), url=URL)
    seen["untraced"] = [plain._spans is not None, await serve(plain)]
    seen["imported"] = sorted({name.split(".")[0] for name in sys.modules if name.startswith("opentelemetry")})

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    without_provider = DBSessionMiddleware(Starlette(routes=[Route("/", endpoint)]), url=URL)
    seen["without_provider"] = [without_provider._spans is not None, await serve(without_provider)]

    exporter = InMemorySpanExporter()

    @asynccontextmanager
    async def lifespan(app):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        yield

    set_at_startup = DBSessionMiddleware(Starlette(routes=[Route("/", endpoint)], lifespan=lifespan), url=URL)
    seen["set_at_startup"] = [set_at_startup._spans is not None, await serve(set_at_startup)]
    seen["spans"] = [span.name for span in exporter.get_finished_spans()]
    already_set = DBSessionMiddleware(Starlette(routes=[Route("/", endpoint)]), url=URL)
    seen["already_set"] = already_set._spans is not None
    print(json.dumps(seen))


asyncio.run(main())
"""


def test_the_global_provider_is_taken_once_the_app_has_set_one_and_nothing_is_imported_before(
    postgresql_dsn: str,
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, PG_URL],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONWARNINGS": "error"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    # [spans at construction, spans once the lifespan startup completed]
    assert seen["untraced"] == [False, False]
    assert seen["imported"] == []  # a request with tracing off imports nothing of OpenTelemetry
    assert seen["without_provider"] == [False, False]  # imported, but no provider set: off
    assert seen["set_at_startup"] == [False, True]  # set in the app's lifespan startup: taken then
    assert seen["spans"] == [CLEANUP_SPAN]
    assert seen["already_set"] is True
