"""asgi_db_session.testing: the rolled-back test transaction, driven as a user's test suite drives it.

Each test writes a small user project (a conftest enabling the plugin, an app whose endpoint commits, and
test files) and runs pytest on it with ``pytester``, in this process (so that coverage sees the plugin). The
user's tests check what they see inside the run; after the run a second connection that does not go through
SQLAlchemy (asyncpg, or the standard library's sqlite3) checks that nothing was saved.

The outer tests are sync: the inner run starts event loops of its own (anyio's, TestClient's).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

# pytester's in-process runs forget the modules first imported inside them; a dialect imported there and again
# later re-registers its SQL functions, and SQLAlchemy's warning about that is an error here. Imported now, they
# are part of what pytester keeps.
import sqlalchemy.dialects.postgresql.asyncpg
import sqlalchemy.dialects.sqlite.aiosqlite  # noqa: F401
from sqlalchemy import Column, Integer, MetaData, Table, text

from asgi_db_session import Database, NoSessionError, current_session, session_scope
from asgi_db_session import database as database_module
from asgi_db_session.exceptions import NO_DATABASE
from asgi_db_session.testing import (
    outer_transaction,
    outer_transaction_in,
    override_session,
    schema_from_alembic,
    schema_from_metadata,
)

from .conftest import PG_URL
from .docs_code import blocks_run_by

pytest_plugins = ["pytester"]

# Strict like this project's own run.
INNER_INI = """
[pytest]
filterwarnings =
    error
"""
# Starlette 1.x wants httpx2 for its TestClient; a user's own TestClient is not the plugin's concern.
INNER_INI_TESTCLIENT = INNER_INI + "    ignore:Using `httpx` with `starlette.testclient` is deprecated\n"

APP = """
from contextlib import asynccontextmanager

from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_db_session import Database, DBSessionMiddleware, current_session

TABLE = {table!r}
db = Database({url!r})


async def add(request: Request) -> JSONResponse:
    # App code that commits for itself: under the plugin the commit releases a savepoint.
    session = current_session()
    await session.execute(text(f"INSERT INTO {{TABLE}} (name) VALUES (:name)"), {{"name": request.path_params["name"]}})
    await session.commit()
    return JSONResponse({{"added": request.path_params["name"]}})


async def names(request: Request) -> JSONResponse:
    rows = await current_session().execute(text(f"SELECT name FROM {{TABLE}} ORDER BY name"))
    return JSONResponse(list(rows.scalars()))


LIFESPAN: list[str] = []


async def lifespan_events(request: Request) -> JSONResponse:
    return JSONResponse({{"events": LIFESPAN, "state": request.state.started}})


@asynccontextmanager
async def lifespan(app):
    LIFESPAN.append("startup")
    yield {{"started": True}}
    LIFESPAN.append("shutdown")


app = Starlette(
    routes=[Route("/add/{{name}}", add, methods=["POST"]), Route("/names", names), Route("/lifespan", lifespan_events)],
    lifespan=lifespan,
)
app.add_middleware(DBSessionMiddleware, database=db)
"""

CONFTEST = """
import pytest

from asgi_db_session.testing import outer_transaction  # imported before pytest loads it: no warning
from myapp import app as the_app, db

pytest_plugins = ["asgi_db_session.testing"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def database():
    return db


@pytest.fixture
def app():
    return the_app
"""

HTTPX_TESTS = """
import httpx
import pytest
from sqlalchemy import text

from myapp import TABLE, app

pytestmark = pytest.mark.anyio


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def test_the_app_commits_and_the_test_sees_it(db_session):
    async with client() as http:
        assert (await http.post("/add/one")).status_code == 200
        assert (await http.post("/add/two")).status_code == 200
        assert (await http.get("/names")).json() == ["one", "two"]
    rows = await db_session.execute(text(f"SELECT name FROM {TABLE} ORDER BY name"))
    assert list(rows.scalars()) == ["one", "two"]


async def test_the_next_test_starts_empty(db_session):
    async with client() as http:
        assert (await http.get("/names")).json() == []
    assert list((await db_session.execute(text(f"SELECT name FROM {TABLE}"))).scalars()) == []
"""

DB_CLIENT_TESTS = """
import pytest
from sqlalchemy import text

from myapp import LIFESPAN, TABLE

pytestmark = pytest.mark.anyio


async def test_the_app_commits_and_the_test_sees_it(db_client, db_session):
    assert (await db_client.post("/add/one")).status_code == 200
    assert (await db_client.get("/names")).json() == ["one"]
    assert list((await db_session.execute(text(f"SELECT name FROM {TABLE}"))).scalars()) == ["one"]


async def test_the_lifespan_has_run(db_client):
    # Started for this test (the shutdown of the one before it ran too), with its state given to requests.
    assert (await db_client.get("/lifespan")).json() == {"events": ["startup", "shutdown", "startup"], "state": True}


async def test_the_next_test_starts_empty(db_client):
    assert (await db_client.get("/names")).json() == []
    assert LIFESPAN == ["startup", "shutdown", "startup", "shutdown", "startup"]
"""

TESTCLIENT_TESTS = """
from sqlalchemy import text
from starlette.testclient import TestClient

from asgi_db_session.testing import outer_transaction_in
from myapp import TABLE, app, db


def test_outer_transaction_in_a_client_of_ones_own():
    with TestClient(app, base_url="http://example.org") as client, outer_transaction_in(client, db) as session:
        assert client.post("/add/three").status_code == 200

        async def seen() -> list[str]:
            return list((await session.execute(text(f"SELECT name FROM {TABLE}"))).scalars())

        assert client.portal.call(seen) == ["three"]


def test_and_after_that_one_too():
    with TestClient(app) as client, outer_transaction_in(client, db):
        assert client.get("/names").json() == []
"""


@dataclass
class Target:
    """A database the user's project runs on, and a second connection to see what it really holds."""

    name: str
    url: str
    dsn: str
    table: str

    def stored(self) -> list[str]:
        sql = f"SELECT name FROM {self.table} ORDER BY name"
        if self.name == "sqlite":
            with closing(sqlite3.connect(self.dsn)) as connection:
                return [row[0] for row in connection.execute(sql)]
        return [row[0] for row in self._pg(lambda connection: connection.fetch(sql))]

    def has_table(self) -> bool:
        if self.name == "sqlite":
            sql = "SELECT name FROM sqlite_master WHERE name = ?"
            with closing(sqlite3.connect(self.dsn)) as connection:
                return connection.execute(sql, (self.table,)).fetchone() is not None
        rows = self._pg(lambda connection: connection.fetch("SELECT to_regclass($1)", self.table))
        return bool(rows[0][0])

    def execute(self, sql: str) -> None:
        if self.name == "sqlite":
            with closing(sqlite3.connect(self.dsn)) as connection, connection:
                connection.execute(sql)
        else:
            self._pg(lambda connection: connection.execute(sql))

    def _pg(self, work: Any) -> Any:
        async def run() -> Any:
            connection = await asyncpg.connect(self.dsn)
            try:
                return await work(connection)
            finally:
                await connection.close()

        return asyncio.run(run())


@pytest.fixture(params=["postgresql", "sqlite"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """An empty table of names, unique to this test (the PostgreSQL server is shared with other runs)."""
    table = f"adbs_testing_{uuid.uuid4().hex[:12]}"
    if request.param == "postgresql":
        dsn = request.getfixturevalue("postgresql_dsn")
        selected = Target("postgresql", PG_URL, dsn, table)
    else:
        path = tmp_path / "user.db"
        selected = Target("sqlite", f"sqlite+aiosqlite:///{path}", str(path), table)
    selected.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name VARCHAR(50) NOT NULL)")
    if request.param == "postgresql":
        selected.execute(f"ALTER TABLE {table} ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY")
    yield selected
    selected.execute(f"DROP TABLE IF EXISTS {table}")


def user_project(pytester: pytest.Pytester, target: Target, **test_files: str) -> None:
    pytester.makeini(INNER_INI)
    pytester.makepyfile(myapp=APP.format(table=target.table, url=target.url))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(**test_files)


def test_httpx_client_commits_are_seen_in_the_test_and_rolled_back_after_it(
    pytester: pytest.Pytester, target: Target
) -> None:
    user_project(pytester, target, test_with_httpx=HTTPX_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert target.stored() == []


def test_db_client_runs_the_lifespan_and_its_commits_are_rolled_back(pytester: pytest.Pytester, target: Target) -> None:
    user_project(pytester, target, test_with_db_client=DB_CLIENT_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert target.stored() == []


def test_db_client_without_asgi_lifespan_names_the_extra(
    pytester: pytest.Pytester, target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "asgi_lifespan", None)  # what an import finds when it is not installed
    user_project(pytester, target, test_with_db_client=DB_CLIENT_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=3)
    # Not fnmatch_lines: the message's "[testing]" would be a character class there.
    # The text the user sees, literally (not the package's constant): a changed message must change this test.
    assert (
        "ImportError: asgi_db_session.testing: the db_client fixture needs asgi_lifespan, which is not installed. "
        "Install the plugin's extra: pip install 'asgi-db-session[testing]'."
    ) in result.stdout.str()
    assert target.stored() == []


def test_a_testclient_of_ones_own_with_outer_transaction_in(pytester: pytest.Pytester, target: Target) -> None:
    user_project(pytester, target, test_with_testclient=TESTCLIENT_TESTS)
    pytester.makeini(INNER_INI_TESTCLIENT)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert target.stored() == []


def test_the_default_database_fixture_finds_the_database_by_name(pytester: pytest.Pytester, target: Target) -> None:
    user_project(pytester, target, test_default=HTTPX_TESTS)
    # Without the project's own `database` fixture the plugin's takes get_database("default").
    pytester.makeconftest(CONFTEST.replace("def database():", "def unused_database():"))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert target.stored() == []


def test_a_database_fixture_that_returns_something_else_is_named(pytester: pytest.Pytester, target: Target) -> None:
    user_project(pytester, target, test_wrong=HTTPX_TESTS)
    pytester.makeconftest(CONFTEST.replace("return db\n", "return 'postgresql://elsewhere'\n"))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "*TypeError: asgi_db_session.testing: the `database` fixture returned 'postgresql://elsewhere'; "
            "it must return a Database."
        ]
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# The functions themselves, in this process.


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_outer_transaction_with_no_database_and_no_url_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)

    async def attempt() -> None:
        async with outer_transaction("adbs-never-created"):
            pass  # pragma: no cover - cannot open

    with pytest.raises(LookupError) as caught:
        run(attempt())
    assert str(caught.value).startswith("asgi_db_session.testing: no Database named 'adbs-never-created' exists")
    assert "DATABASE_URL" in str(caught.value)


def test_a_database_made_inside_the_block_joins_it(target: Target) -> None:
    """The app's Database may be made during the test (the middleware makes its own at the first request)."""

    async def work() -> list[str]:
        database = Database(target.url, name="adbs-made-later")
        async with outer_transaction(database) as session:
            later = Database(target.url, name="adbs-made-later")
            async with session_scope("adbs-made-later", commit=True) as inner:
                await inner.execute(text(f"INSERT INTO {target.table} (name) VALUES ('joined')"))
            seen = list((await session.execute(text(f"SELECT name FROM {target.table}"))).scalars())
        await later.dispose()
        return seen

    assert run(work()) == ["joined"]
    assert target.stored() == []


def test_the_plugin_finds_an_app_whose_middleware_reads_the_environment(
    pytester: pytest.Pytester, target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``app.add_middleware(DBSessionMiddleware)`` with DATABASE_URL set and no `database` fixture: the
    testing page's own pattern, where the app's Database is made only at the first request."""
    monkeypatch.setenv("DATABASE_URL", target.url)
    app = APP.format(table=target.table, url=target.url)
    app = app.replace(f"db = Database({target.url!r})\n", "").replace(
        "app.add_middleware(DBSessionMiddleware, database=db)", "app.add_middleware(DBSessionMiddleware)"
    )
    assert "database=db" not in app
    pytester.makeini(INNER_INI)
    pytester.makepyfile(myapp=app)
    conftest = CONFTEST.replace("from myapp import app as the_app, db", "from myapp import app as the_app")
    pytester.makeconftest(conftest.replace("@pytest.fixture\ndef database():\n    return db\n", ""))
    pytester.makepyfile(test_env=HTTPX_TESTS)
    # The inner run shares this process: a "default" Database left by an earlier one would be found first.
    monkeypatch.delitem(database_module._registry, "default", raising=False)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert target.stored() == []


def test_outer_transaction_in_a_client_that_is_not_started() -> None:
    class NotStarted:
        portal = None

    with pytest.raises(RuntimeError) as caught:
        outer_transaction_in(NotStarted())
    assert str(caught.value) == (
        "asgi_db_session.testing: the TestClient is not started. Use it as `with TestClient(app) as client:`; "
        "without `with`, every request runs on a new event loop and the test's connection cannot serve them."
    )


def test_outer_transaction_rolls_back_what_sessions_committed_inside(target: Target) -> None:
    async def work() -> list[str]:
        database = Database(target.url, name="adbs-outer")
        async with outer_transaction(database) as session:
            async with session_scope("adbs-outer", commit=True) as inner:
                await inner.execute(text(f"INSERT INTO {target.table} (name) VALUES ('kept?')"))
            async with session_scope("adbs-outer") as inner:  # rolled back to its savepoint
                await inner.execute(text(f"INSERT INTO {target.table} (name) VALUES ('dropped')"))
            seen = list((await session.execute(text(f"SELECT name FROM {target.table}"))).scalars())
        await database.dispose()
        return seen

    assert run(work()) == ["kept?"]
    assert target.stored() == []


def test_a_failing_block_is_rolled_back_too(target: Target) -> None:
    async def work() -> None:
        database = Database(target.url, name="adbs-failing")
        async with outer_transaction(database):
            async with session_scope("adbs-failing", commit=True) as inner:
                await inner.execute(text(f"INSERT INTO {target.table} (name) VALUES ('lost')"))
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        run(work())
    assert target.stored() == []


# override_session


@pytest.mark.anyio
async def test_override_session_makes_current_session_return_it(sqlite_url: str) -> None:
    database = Database(sqlite_url, name="adbs-override")
    async with session_scope("adbs-override") as mine:
        pass
    with pytest.raises(NoSessionError):
        current_session("adbs-override")
    with override_session(mine, "adbs-override") as given:
        assert given is mine
        assert current_session("adbs-override") is mine
        # A scope opened inside still opens a new session of that Database, and gives it back after.
        async with session_scope("adbs-override") as inner:
            assert inner is not mine
            assert current_session("adbs-override") is inner
        assert current_session("adbs-override") is mine
    with pytest.raises(NoSessionError):
        current_session("adbs-override")
    assert mine.sync_session.get_bind() is database.engine.sync_engine
    await database.dispose()


@pytest.mark.anyio
async def test_override_session_for_a_database_nobody_created(sqlite_url: str) -> None:
    database = Database(sqlite_url, name="adbs-override-2")
    session = database.new_session()
    with pytest.raises(NoSessionError) as caught, override_session(session, "adbs-override-missing"):
        pass  # pragma: no cover - cannot enter
    assert str(caught.value) == NO_DATABASE.format(name="adbs-override-missing")
    await session.close()


OVERRIDE_TESTS = """
import pytest
from sqlalchemy import text

from asgi_db_session import current_session
from asgi_db_session.testing import override_session
from myapp import TABLE

pytestmark = pytest.mark.anyio


async def add(name: str) -> None:  # a repository function: it asks for the session
    await current_session().execute(text(f"INSERT INTO {TABLE} (name) VALUES (:name)"), {"name": name})


@pytest.fixture
async def session(db_session):
    with override_session(db_session):
        yield db_session


async def test_a_repository_called_directly_uses_the_test_session(session):
    await add("direct")
    await session.commit()
    assert current_session() is session
    assert list((await session.execute(text(f"SELECT name FROM {TABLE}"))).scalars()) == ["direct"]


async def test_next(session):
    assert list((await session.execute(text(f"SELECT name FROM {TABLE}"))).scalars()) == []
"""


def test_override_session_in_a_fixture_reaches_the_test(pytester: pytest.Pytester, target: Target) -> None:
    user_project(pytester, target, test_override=OVERRIDE_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert target.stored() == []


# The testing how-to's example (docs/how-to/testing.md), run the way a user runs it. tests/test_docs_code.py
# type-checks it with the docs' other blocks.

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTING_PAGE = REPO_ROOT / "docs" / "how-to" / "testing.md"
RUN_BY = "tests/test_testing_plugin.py::test_the_docs_testing_example_passes_twice_on_a_fresh_database"


def docs_testing_files() -> dict[str, str]:
    """The testing page's files: the blocks this test runs, each named by its first line (``# conftest.py``)."""
    files = {}
    for block in blocks_run_by(TESTING_PAGE, RUN_BY):
        assert block.file_name is not None, f"{block.where}: its first line must name its file (# conftest.py)"
        files[block.file_name] = block.code
    assert sorted(files) == ["conftest.py", "test_notes.py"]
    return files


def run_pg(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    async def run() -> list[tuple[Any, ...]]:
        connection = await asyncpg.connect(dsn)
        try:
            return [tuple(row) for row in await connection.fetch(sql)]
        finally:
            await connection.close()

    return asyncio.run(run())


@pytest.fixture
def fresh_postgresql_database(postgresql_dsn: str) -> Iterator[str]:
    """A database created for this test (its DSN), dropped after it."""
    name = f"adbs_fresh_{uuid.uuid4().hex[:12]}"
    run_pg(postgresql_dsn, f"CREATE DATABASE {name}")
    yield postgresql_dsn.rsplit("/", 1)[0] + "/" + name
    run_pg(postgresql_dsn, f"DROP DATABASE {name} WITH (FORCE)")


def user_tables(dsn: str) -> list[str]:
    rows = run_pg(
        dsn,
        "SELECT table_schema || '.' || table_name FROM information_schema.tables "
        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
    )
    return [row[0] for row in rows]


def docs_project(root: Path) -> Path:
    """The testing page's conftest.py and test file, with the notes app of examples/notes as ``myapp``."""
    project = root / "project"
    shutil.copytree(REPO_ROOT / "examples" / "notes", project / "myapp", ignore=shutil.ignore_patterns("__pycache__"))
    for name, content in docs_testing_files().items():
        (project / name).write_text(content)
    return project


def test_the_docs_testing_example_passes_twice_on_a_fresh_database(
    tmp_path: Path, fresh_postgresql_database: str
) -> None:
    """Two runs of ``python -m pytest -W error`` in the testing page's project both pass, and leave the
    database without tables."""
    project = docs_project(tmp_path)
    env = {key: value for key, value in os.environ.items() if not key.startswith("DATABASE_")}
    env["DATABASE_URL"] = fresh_postgresql_database  # postgresql://..., as the page writes it
    assert user_tables(fresh_postgresql_database) == []
    for attempt in ("first", "second"):
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-W", "error", "-p", "no:cacheprovider"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"{attempt} run:\n{result.stdout}\n{result.stderr}"
        assert "2 passed" in result.stdout, result.stdout
        assert "warning" not in result.stdout.lower(), result.stdout
        assert user_tables(fresh_postgresql_database) == [], f"after the {attempt} run"


# db_schema with schema_from_metadata, in a user's project.

SCHEMA_CONFTEST = """
from collections.abc import Iterator

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table

from asgi_db_session.testing import schema_from_metadata
from myapp import TABLE, db

metadata = MetaData()
Table(TABLE, metadata, Column("id", Integer, primary_key=True), Column("name", String(50), nullable=False))


@pytest.fixture(scope="session")
def db_schema() -> Iterator[None]:
    with schema_from_metadata(metadata, db):
        yield
"""


def test_db_schema_from_metadata_makes_the_tables_for_the_session_and_drops_them_after(
    pytester: pytest.Pytester, target: Target
) -> None:
    target.execute(f"DROP TABLE {target.table}")  # the project's metadata makes it
    user_project(pytester, target, test_with_db_client=DB_CLIENT_TESTS, test_with_httpx=HTTPX_TESTS)
    pytester.makeconftest(CONFTEST + SCHEMA_CONFTEST)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    assert not target.has_table()


def test_schema_from_metadata_with_the_tables_there_already_leaves_them_alone(target: Target) -> None:
    target.execute(f"INSERT INTO {target.table} (name) VALUES ('not the tests')")
    metadata = MetaData()
    Table(target.table, metadata, Column("id", Integer, primary_key=True))
    database = Database(target.url, name="adbs-schema-exists")
    with pytest.raises(RuntimeError) as caught, schema_from_metadata(metadata, database):
        pass  # pragma: no cover - not entered
    url = database.engine.url.render_as_string(hide_password=True)
    assert str(caught.value) == (
        "asgi_db_session.testing: schema_from_metadata() creates the tables for the test session and drops them "
        f"after it, but the database at {url} already has {target.table}. Tests should run on a database of their "
        "own: point the tests' DATABASE_URL at an empty one, or drop these tables (a test run that was killed leaves "
        "them behind)."
    )
    assert target.stored() == ["not the tests"]


def test_schema_from_alembic_without_alembic_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "alembic", None)  # what an import finds when it is not installed
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'none.db'}", name="adbs-no-alembic")
    with pytest.raises(ImportError) as caught, schema_from_alembic(tmp_path / "alembic.ini", database):
        pass  # pragma: no cover - not entered
    assert str(caught.value) == (
        "asgi_db_session.testing: schema_from_alembic() needs Alembic, which is not installed. Install it (pip "
        "install alembic), or make the schema with schema_from_metadata()."
    )
