"""The truth about a COMMIT whose answer was lost (PostgreSQL): the connection dies after COMMIT was sent and
before its answer arrives, and the client hears what really happened.

A real TCP proxy (tcp_proxy.py) sits between the app's Database and the real server; its hook reads the
frontend messages (pg_wire.py) and acts on the first COMMIT once armed:

- forward it, then drop the connection: the server commits, the answer never comes back (committed);
- drop the connection instead of forwarding it: the server never sees it and rolls back (not committed);
- forward it and drop, then reset every connection through the proxy: the outcome cannot be asked (unknown).

Rows are read through a second connection straight to the server, never through the proxy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_db_session import (
    CommitOutcomeUnknownError,
    Database,
    DatabaseSettings,
    DBSessionMiddleware,
    current_session,
    on_commit,
    session_scope,
)
from asgi_db_session._commit_outcome import CommitOutcomeReader
from asgi_db_session.error_responses import OUTCOME_UNKNOWN, SERVICE_UNAVAILABLE
from asgi_db_session.exceptions import COMMIT_OUTCOME_NOT_ASKED

from ..conftest import PG_URL, client
from ..polling import eventually
from .pg_wire import FrontendMessages, is_commit
from .pgbouncer import running_pgbouncer
from .server import free_port
from .tcp_proxy import Action, Fault, ProxyConnection, TcpProxy

pytestmark = pytest.mark.anyio

TABLE = f"adbs_commit_outcome_{os.getpid()}"
# How long the Database tries to learn an outcome: short, since the "unknown" tests wait for all of it.
OUTCOME_TIMEOUT = 1.0
SLOW_IDS = 1000


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(primary_key=True)


class CommitTrap:
    """The proxy's hook: once armed, the first COMMIT on any connection gets ``action``; the rest passes."""

    def __init__(self) -> None:
        self._streams: dict[int, FrontendMessages] = {}
        self._action: Action | None = None
        self._then: Callable[[], None] | None = None
        self.sprung = 0

    def arm(self, action: Action, then: Callable[[], None] | None = None) -> None:
        """``action`` for the next COMMIT; ``then`` runs on the proxy's loop right after it."""
        self._action, self._then = action, then

    def __call__(self, connection: ProxyConnection, data: bytes) -> Action:
        messages = self._streams.setdefault(connection.number, FrontendMessages()).feed(data)
        action = self._action
        if action is None or not any(is_commit(message) for message in messages):
            return Action.FORWARD
        self._action = None
        self.sprung += 1
        if self._then is not None:
            asyncio.get_running_loop().call_soon(self._then)
        return action


@dataclass
class Proxied:
    proxy: TcpProxy
    trap: CommitTrap
    dsn: str  # straight to the server
    made: list[Database] = field(default_factory=list)

    def database(self, *, check: bool | None = True, command_timeout: float | None = None) -> Database:
        """A Database whose every connection, the outcome's question included, goes through the proxy; with
        DATABASE_COMMIT_OUTCOME_CHECK on unless told otherwise (None: the package's default)."""
        url = make_url(PG_URL).set(host="127.0.0.1", port=self.proxy.port)
        settings = DatabaseSettings(
            url=url.render_as_string(hide_password=False),
            ssl="disable",  # the hook reads the messages: no TLS
            application_name=f"adbs-outcome-{uuid.uuid4().hex[:8]}",
            commit_outcome_timeout=OUTCOME_TIMEOUT,
        )
        if check is not None:
            settings = settings.model_copy(update={"commit_outcome_check": check})
        if command_timeout is not None:
            settings = settings.model_copy(update={"command_timeout": command_timeout})
        database = Database(settings=settings, name=f"outcome-{uuid.uuid4().hex[:8]}")
        self.made.append(database)
        return database

    async def ids(self) -> list[int]:
        connection = await asyncpg.connect(self.dsn)
        try:
            return sorted(row[0] for row in await connection.fetch(f"SELECT id FROM {TABLE}"))
        finally:
            await connection.close()

    async def inserting_xid(self, row_id: int) -> int:
        """The 32-bit id of the transaction that wrote the row (its xmin)."""
        connection = await asyncpg.connect(self.dsn)
        try:
            xmin: str = await connection.fetchval(f"SELECT xmin::text FROM {TABLE} WHERE id = $1", row_id)
            return int(xmin)
        finally:
            await connection.close()


@pytest.fixture
async def proxied(postgresql_dsn: str) -> AsyncIterator[Proxied]:
    connection = await asyncpg.connect(postgresql_dsn)
    try:
        await connection.execute(
            f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY);"
            # A row from SLOW_IDS on makes its COMMIT run for a long time: a deferred trigger sleeps in it.
            f"CREATE OR REPLACE FUNCTION {TABLE}_slow() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(60); RETURN NULL; END $$;"
            f"CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON {TABLE} DEFERRABLE INITIALLY DEFERRED "
            f"FOR EACH ROW WHEN (NEW.id >= {SLOW_IDS}) EXECUTE FUNCTION {TABLE}_slow()"
        )
    finally:
        await connection.close()
    trap = CommitTrap()
    port = make_url(PG_URL).port or 5432
    async with TcpProxy(port, on_client_data=trap) as proxy:
        state = Proxied(proxy, trap, postgresql_dsn)
        try:
            yield state
        finally:
            for database in state.made:
                pool = database.engine.sync_engine.pool
                assert pool.checkedout() == 0, "a connection was not given back"  # type: ignore[attr-defined]
                await database.dispose()
    connection = await asyncpg.connect(postgresql_dsn)
    try:
        # A backend of a failed test may still sleep in its COMMIT, holding the table.
        names = [database.settings.application_name for database in state.made if database.settings is not None]
        await connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ANY($1::text[])", names
        )
        await connection.execute("SET lock_timeout = '10s'")
        await connection.execute(f"DROP TABLE IF EXISTS {TABLE}; DROP FUNCTION IF EXISTS {TABLE}_slow()")
    finally:
        await connection.close()


def writing_app(database: Database, callbacks_ran: list[int]) -> Starlette:
    """POST /write?id=N adds row N (flushed by the middleware's commit) and registers an on_commit callback."""

    async def write(request: Request) -> Response:
        row_id = int(request.query_params["id"])
        current_session(database.name).add(Row(id=row_id))
        on_commit(lambda: callbacks_ran.append(row_id), database.name)
        return JSONResponse({"saved": row_id}, status_code=201, headers={"x-app": "yes"})

    app = Starlette(routes=[Route("/write", write, methods=["POST"])])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    return app


async def post(app: Starlette, row_id: int) -> httpx.Response:
    async with client(app) as http:
        return await http.post("/write", params={"id": row_id})


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == level]


def logged_xid(message: str) -> int:
    found = re.search(r"COMMIT of transaction (\d+)", message)
    assert found is not None, message
    return int(found[1])


# --- through the middleware (commit_on_success) ----------------------------------------------------------------


async def test_middleware_commit_that_committed_before_its_answer_was_lost_answers_the_apps_response(
    proxied: Proxied, caplog: pytest.LogCaptureFixture
) -> None:
    database = proxied.database()
    ran: list[int] = []
    app = writing_app(database, ran)
    proxied.trap.arm(Action.FORWARD_THEN_DROP)

    response = await post(app, 1)

    assert proxied.trap.sprung == 1, "the proxy saw no COMMIT"
    assert (response.status_code, response.headers.get("x-app")) == (201, "yes"), response.text
    assert await proxied.ids() == [1]
    assert ran == [1], "the on_commit callback must run: the data is saved"
    [warning] = [message for message in messages(caplog, logging.WARNING) if "COMMIT of transaction" in message]
    assert "reports the transaction committed" in warning
    assert logged_xid(warning) % 2**32 == await proxied.inserting_xid(1)
    assert (await post(app, 2)).status_code == 201, "the next request works"
    assert await proxied.ids() == [1, 2]


async def test_by_default_a_commit_whose_answer_was_lost_is_answered_as_it_really_ended(
    proxied: Proxied, caplog: pytest.LogCaptureFixture
) -> None:
    """The package's defaults learn the outcome: the app's 201 for a write the server committed, the 503 for one
    it never received; never the "not known" 500 while the server can be asked."""
    database = proxied.database(check=None)
    ran: list[int] = []
    app = writing_app(database, ran)

    proxied.trap.arm(Action.FORWARD_THEN_DROP)
    committed = await post(app, 1)
    proxied.trap.arm(Action.DROP)
    lost = await post(app, 2)

    assert proxied.trap.sprung == 2, "the proxy saw no COMMIT"
    assert (committed.status_code, committed.headers.get("x-app")) == (201, "yes"), committed.text
    assert (lost.status_code, lost.headers.get("retry-after")) == (503, "1"), lost.text
    assert await proxied.ids() == [1]
    assert ran == [1]
    assert COMMIT_OUTCOME_NOT_ASKED not in messages(caplog, logging.ERROR)


async def test_middleware_commit_that_never_reached_the_server_is_503(
    proxied: Proxied, caplog: pytest.LogCaptureFixture
) -> None:
    database = proxied.database()
    ran: list[int] = []
    app = writing_app(database, ran)
    proxied.trap.arm(Action.DROP)

    response = await post(app, 1)

    assert proxied.trap.sprung == 1, "the proxy saw no COMMIT"
    assert response.status_code == 503, response.text
    assert response.text == SERVICE_UNAVAILABLE.body
    assert response.headers["retry-after"] == "1"
    assert "x-app" not in response.headers
    assert await proxied.ids() == []
    assert ran == []
    # Learned, not assumed: the server was asked and said so.
    assert any("reports the transaction rolled back" in message for message in messages(caplog, logging.WARNING))
    assert (await post(app, 2)).status_code == 201, "the next request works"


async def test_middleware_commit_whose_outcome_cannot_be_learned_is_a_distinct_500(
    proxied: Proxied, caplog: pytest.LogCaptureFixture
) -> None:
    database = proxied.database()
    ran: list[int] = []
    app = writing_app(database, ran)
    proxied.trap.arm(Action.FORWARD_THEN_DROP, then=lambda: proxied.proxy.set_fault(Fault.RESET))

    response = await post(app, 1)

    assert proxied.trap.sprung == 1, "the proxy saw no COMMIT"
    assert response.status_code == 500, response.text
    assert response.text == OUTCOME_UNKNOWN.body
    assert "retry-after" not in response.headers
    assert "x-app" not in response.headers
    assert ran == [], "no on_commit callback for data that may not be saved"
    # The COMMIT did reach the server: the answer said "unknown", never "nothing was saved".
    assert await proxied.ids() == [1]
    [error] = [message for message in messages(caplog, logging.ERROR) if "COMMIT of transaction" in message]
    assert "could not be learned" in error
    assert logged_xid(error) % 2**32 == await proxied.inserting_xid(1)
    proxied.proxy.heal()
    assert (await post(app, 2)).status_code == 201, "the next request works"


async def test_through_pgbouncer_a_commit_that_committed_before_its_answer_was_lost_answers_the_apps_response(
    proxied: Proxied, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # app -> proxy -> PgBouncer (transaction mode) -> server: the id is read through PgBouncer, and the question
    # is a plain query on a new client connection, which PgBouncer serves like any other.
    async with (
        running_pgbouncer(tmp_path / "pgbouncer") as bouncer,
        TcpProxy(bouncer.port, on_client_data=proxied.trap) as proxy,
    ):
        url = make_url(bouncer.url).set(port=proxy.port).render_as_string(hide_password=False)
        settings = DatabaseSettings(
            url=url, pgbouncer=True, ssl="disable", commit_outcome_check=True, commit_outcome_timeout=OUTCOME_TIMEOUT
        )
        database = Database(settings=settings, name=f"outcome-{uuid.uuid4().hex[:8]}")
        ran: list[int] = []
        try:
            proxied.trap.arm(Action.FORWARD_THEN_DROP)
            response = await post(writing_app(database, ran), 1)
        finally:
            await database.dispose()

    assert proxied.trap.sprung == 1, "the proxy saw no COMMIT"
    assert response.status_code == 201, response.text
    assert await proxied.ids() == [1]
    assert ran == [1]
    assert any("reports the transaction committed" in message for message in messages(caplog, logging.WARNING))


async def test_with_the_check_off_a_lost_commit_answer_is_the_unknown_500_without_asking(
    proxied: Proxied, caplog: pytest.LogCaptureFixture
) -> None:
    database = proxied.database(check=False)
    ran: list[int] = []
    app = writing_app(database, ran)
    proxied.trap.arm(Action.FORWARD_THEN_DROP)

    response = await post(app, 1)

    assert proxied.trap.sprung == 1, "the proxy saw no COMMIT"
    assert (response.status_code, response.text) == (500, OUTCOME_UNKNOWN.body)
    assert proxied.proxy.accepted == 1, "the request's own connection only: no question was asked"

    # Saved: "unknown" was the truth, "nothing was saved" would not have been. Nothing waited for the server to
    # finish the COMMIT it received, so a loaded server may show the row a moment after the answer.
    async def saved() -> bool:
        return bool(await proxied.ids())

    await eventually(saved, "the row of the COMMIT the server received")
    assert await proxied.ids() == [1]
    assert ran == []
    assert COMMIT_OUTCOME_NOT_ASKED in messages(caplog, logging.ERROR)


def answers_lost_for(proxied: Proxied, seconds: float) -> Callable[[], None]:
    """For the trap's ``then``: every answer from the server is dropped (half-open) for ``seconds``, then the
    network heals; the dropped answers are gone for good, as on a real link that lost them."""

    def half_open() -> None:
        proxied.proxy.set_fault(Fault.HALF_OPEN)
        asyncio.get_running_loop().call_later(seconds, proxied.proxy.set_fault, Fault.NONE)

    return half_open


@pytest.mark.parametrize("check", [True, False], ids=["check-on", "check-off"])
async def test_a_commit_whose_answer_never_came_within_the_command_timeout_is_not_called_unsaved(
    proxied: Proxied, check: bool
) -> None:
    """DATABASE_COMMAND_TIMEOUT ends the wait for COMMIT's answer with a TimeoutError: the server may have
    committed, so that is a lost answer too, never the 503 "nothing was saved"."""
    database = proxied.database(check=check, command_timeout=1.0)
    ran: list[int] = []
    app = writing_app(database, ran)
    proxied.trap.arm(Action.FORWARD, then=answers_lost_for(proxied, 0.5))

    response = await post(app, 1)

    assert proxied.trap.sprung == 1, "the proxy saw no COMMIT"
    assert await proxied.ids() == [1], "the server committed"
    if check:
        assert (response.status_code, response.headers.get("x-app")) == (201, "yes"), response.text
        assert ran == [1]
    else:
        assert (response.status_code, response.text) == (500, OUTCOME_UNKNOWN.body)
        assert ran == []
    assert (await post(app, 2)).status_code == 201, "the next request works"


async def test_a_commit_still_running_on_a_backend_whose_client_is_gone_is_settled_by_ending_that_backend(
    proxied: Proxied, caplog: pytest.LogCaptureFixture
) -> None:
    # The server got the COMMIT and works on it (a deferred trigger sleeps for a minute), while its client is
    # gone: "in progress" for longer than the Database waits. Ending the backend rolls it back, and says so.
    database = proxied.database()
    ran: list[int] = []
    app = writing_app(database, ran)
    proxied.trap.arm(Action.FORWARD_THEN_DROP)

    response = await post(app, SLOW_IDS)

    assert proxied.trap.sprung == 1, "the proxy saw no COMMIT"
    assert response.status_code == 503, response.text
    assert await proxied.ids() == []
    assert ran == []
    assert any("reports the transaction rolled back" in message for message in messages(caplog, logging.WARNING))


async def test_a_lost_commit_of_a_transaction_that_changed_nothing_asks_nothing_and_is_503(
    proxied: Proxied, caplog: pytest.LogCaptureFixture
) -> None:
    # An UPDATE that matched no row: a write to the session, but no transaction id, so nothing to learn or lose.
    database = proxied.database()

    async def update_nothing(request: Request) -> Response:
        await current_session(database.name).execute(text(f"UPDATE {TABLE} SET id = id WHERE false"))
        return JSONResponse({}, status_code=200)

    app = Starlette(routes=[Route("/nothing", update_nothing)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    proxied.trap.arm(Action.DROP)
    async with client(app) as http:
        response = await http.get("/nothing")

    assert proxied.trap.sprung == 1, "the proxy saw no COMMIT"
    assert response.status_code == 503, response.text
    assert not any("COMMIT of transaction" in record.getMessage() for record in caplog.records)


async def test_a_connection_that_died_before_commit_is_503_without_asking(
    proxied: Proxied, caplog: pytest.LogCaptureFixture
) -> None:
    # Its backend is terminated before the middleware commits: reading the id fails, the COMMIT is never sent.
    database = proxied.database()

    async def write_then_die(request: Request) -> Response:
        session = current_session(database.name)
        session.add(Row(id=1))
        await session.flush()
        connection = await asyncpg.connect(proxied.dsn)
        try:
            pid = await session.scalar(text("SELECT pg_backend_pid()"))
            await connection.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await connection.close()
        return JSONResponse({}, status_code=201)

    app = Starlette(routes=[Route("/die", write_then_die)])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    async with client(app) as http:
        response = await http.get("/die")

    assert response.status_code == 503, response.text
    assert await proxied.ids() == []
    assert not any("COMMIT of transaction" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("failure", ["refused", "cancelled by the command timeout"])
async def test_a_transaction_whose_id_could_not_be_read_is_not_answered_saved(proxied: Proxied, failure: str) -> None:
    """The read of the id before COMMIT fails with the server's error, or is cancelled by asyncpg's command
    timeout: either leaves the transaction aborted, and a COMMIT then ends it as ROLLBACK with no error. The
    request must fail, not answer 201 for a row that is not there. The failure is made by a function of the
    same name earlier on the transaction's search_path."""
    schema = f"{TABLE}_shadow"
    body = "RAISE EXCEPTION 'refused'" if failure == "refused" else "PERFORM pg_sleep(5)"
    connection = await asyncpg.connect(proxied.dsn)
    try:
        await connection.execute(
            f"CREATE SCHEMA {schema}; CREATE FUNCTION {schema}.pg_current_xact_id_if_assigned() RETURNS xid8 "
            f"LANGUAGE plpgsql AS $$ BEGIN {body}; RETURN NULL; END $$"
        )
    finally:
        await connection.close()
    database = proxied.database(command_timeout=0.5)
    ran: list[int] = []

    async def write(request: Request) -> Response:
        session = current_session(database.name)
        await session.execute(text(f"SET LOCAL search_path = {schema}, pg_catalog, public"))
        session.add(Row(id=1))
        on_commit(lambda: ran.append(1), database.name)
        return JSONResponse({"saved": 1}, status_code=201)

    app = Starlette(routes=[Route("/write", write, methods=["POST"])])
    app.add_middleware(DBSessionMiddleware, database=database, commit_on_success=True)
    try:
        async with client(app, raise_app_exceptions=False) as http:
            response = await http.post("/write")
    finally:
        connection = await asyncpg.connect(proxied.dsn)
        try:
            await connection.execute(f"DROP SCHEMA {schema} CASCADE")
        finally:
            await connection.close()

    assert response.status_code == 500, response.text
    assert await proxied.ids() == []
    assert ran == []
    async with client(writing_app(database, ran)) as http:
        assert (await http.post("/write", params={"id": 2})).status_code == 201, "the next request works"
    assert await proxied.ids() == [2]


async def server_started(dsn: str) -> str:
    """The server's start, as the sessions read it with a transaction's id."""
    connection = await asyncpg.connect(dsn)
    try:
        started: str = await connection.fetchval("SELECT extract(epoch FROM pg_postmaster_start_time())::text")
        return started
    finally:
        await connection.close()


async def test_the_reader_answers_from_the_server(proxied: Proxied) -> None:
    # Straight to the server: a transaction committed a moment ago, one rolled back, one it has not reached.
    connection = await asyncpg.connect(proxied.dsn)
    try:
        async with connection.transaction():
            await connection.execute(f"INSERT INTO {TABLE} (id) VALUES (1)")
            committed = await connection.fetchval("SELECT pg_current_xact_id()::text")
        transaction = connection.transaction()
        await transaction.start()
        await connection.execute(f"INSERT INTO {TABLE} (id) VALUES (2)")
        aborted = await connection.fetchval("SELECT pg_current_xact_id()::text")
        await transaction.rollback()
    finally:
        await connection.close()
    started = await server_started(proxied.dsn)
    reader = CommitOutcomeReader(make_url(PG_URL), {}, check=True, timeout=OUTCOME_TIMEOUT)
    try:
        assert await reader.outcome(committed, started) == ("committed", "committed")
        assert await reader.outcome(aborted, started) == ("aborted", "aborted")
        outcome, reason = await reader.outcome(str(int(committed) + 2**40), started)
        assert outcome is None
        assert "in the future" in reason, reason
    finally:
        await reader.close()


async def test_the_reader_does_not_ask_a_server_that_started_after_the_transactions_own(proxied: Proxied) -> None:
    """After a crash or a failover the server hands out again the ids of the transactions that were under way
    (the failover test met it: ids answered "committed" that were other transactions'). An id read on a server
    that started at another time is not asked about, even when this server has it committed."""
    connection = await asyncpg.connect(proxied.dsn)
    try:
        async with connection.transaction():
            await connection.execute(f"INSERT INTO {TABLE} (id) VALUES (1)")
            committed = await connection.fetchval("SELECT pg_current_xact_id()::text")
    finally:
        await connection.close()
    started = await server_started(proxied.dsn)
    earlier = f"{float(started) - 60:.6f}"  # the same server, a minute before its restart
    reader = CommitOutcomeReader(make_url(PG_URL), {}, check=True, timeout=OUTCOME_TIMEOUT)
    try:
        outcome, reason = await reader.outcome(committed, earlier)
    finally:
        await reader.close()
    assert outcome is None
    assert reason == (
        f"the server asked is not the one that ran the transaction: that one started at {earlier}, this one at "
        f"{started} (in seconds since 1970; a restart or a failover since), and it may have given the same id to "
        "another transaction"
    )


async def test_the_reader_asks_again_while_the_server_refuses_then_says_it_does_not_know(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Nothing listens on the port: a server on its way back from a restart refuses connections. The reader asks
    # again until its timeout, then answers "unknown" naming the refusal, never a guessed outcome.
    caplog.set_level(logging.DEBUG, logger="asgi_db_session")
    url = make_url(PG_URL).set(host="127.0.0.1", port=free_port())
    reader = CommitOutcomeReader(url, {}, check=True, timeout=OUTCOME_TIMEOUT)
    try:
        outcome, reason = await reader.outcome("123", "0")
    finally:
        await reader.close()
    assert outcome is None
    assert reason.startswith(f"no answer within {OUTCOME_TIMEOUT:g} s: ConnectionRefusedError: "), reason
    asked_again = [message for message in messages(caplog, logging.DEBUG) if "asking again" in message]
    assert len(asked_again) >= 2, asked_again


# --- session_scope() ---------------------------------------------------------------------------------------------


async def write_in_scope(database: Database, row_id: int, callbacks_ran: list[int]) -> None:
    # A Core statement this time (no flush): the session notes the write all the same.
    async with session_scope(database.name, commit=True) as session:
        await session.execute(text(f"INSERT INTO {TABLE} (id) VALUES (:id)"), {"id": row_id})
        on_commit(lambda: callbacks_ran.append(row_id), database.name)


async def test_session_scope_commit_that_committed_before_its_answer_was_lost_returns(proxied: Proxied) -> None:
    database = proxied.database()
    ran: list[int] = []
    proxied.trap.arm(Action.FORWARD_THEN_DROP)

    await write_in_scope(database, 1, ran)

    assert proxied.trap.sprung == 1, "the proxy saw no COMMIT"
    assert await proxied.ids() == [1]
    assert ran == [1]


async def test_session_scope_commit_that_never_reached_the_server_raises_the_lost_connection(
    proxied: Proxied, caplog: pytest.LogCaptureFixture
) -> None:
    database = proxied.database()
    ran: list[int] = []
    proxied.trap.arm(Action.DROP)

    with pytest.raises(sa_exc.DBAPIError) as raised:
        await write_in_scope(database, 1, ran)

    assert raised.value.connection_invalidated
    assert proxied.trap.sprung == 1, "the proxy saw no COMMIT"
    assert await proxied.ids() == []
    assert ran == []
    assert any("reports the transaction rolled back" in message for message in messages(caplog, logging.WARNING))


async def test_session_scope_commit_whose_outcome_cannot_be_learned_raises_commit_outcome_unknown(
    proxied: Proxied, caplog: pytest.LogCaptureFixture
) -> None:
    database = proxied.database()
    ran: list[int] = []
    proxied.trap.arm(Action.FORWARD_THEN_DROP, then=lambda: proxied.proxy.set_fault(Fault.RESET))

    with pytest.raises(CommitOutcomeUnknownError) as raised:
        await write_in_scope(database, 1, ran)

    assert isinstance(raised.value.__cause__, sa_exc.DBAPIError)
    xid = raised.value.transaction_id
    assert xid is not None
    assert int(xid) % 2**32 == await proxied.inserting_xid(1)
    assert xid in str(raised.value)
    assert ran == []
    assert any(xid in message for message in messages(caplog, logging.ERROR))
