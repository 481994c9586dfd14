"""examples/alembic, copied into a project of its own as docs/how-to/migrations.md says, and run as a user runs it.

Each test copies the recipe into a temporary project (``migrations/``) beside a models package of that
project's own (``notesapp``, with the demo's models: examples/notes/models.py), changes the one import in
env.py that the migrations page tells a user to change, and runs the ``alembic`` command in a subprocess from the
project's root (so that ``prepend_sys_path`` is what finds the models) with only DATABASE_URL set:
``revision --autogenerate`` writes the first migration, ``upgrade head`` runs it, a second ``revision
--autogenerate`` must find nothing to do, ``downgrade base`` removes the tables. A second connection that
does not go through SQLAlchemy (asyncpg, or the standard library's sqlite3) checks what the migrations left.
PostgreSQL runs get a fresh database of their own (or a fresh schema, for ``-x schema=``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_db_session import Database
from asgi_db_session.exceptions import NO_URL
from asgi_db_session.testing import schema_from_alembic
from examples.notes.models import Base

from ..conftest import PG_URL

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE = REPO_ROOT / "examples" / "alembic"
DEMO_MODELS = REPO_ROOT / "examples" / "notes" / "models.py"
# The line of env.py that the migrations page tells a user to change, and what this test's project changes it to.
MODELS_IMPORT = "from examples.notes.models import Base"
OWN_MODELS_IMPORT = "from notesapp.models import Base"
ALEMBIC = str(Path(sys.executable).parent / "alembic")


def pg(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    async def run() -> list[tuple[Any, ...]]:
        connection = await asyncpg.connect(dsn)
        try:
            return [tuple(row) for row in await connection.fetch(sql, *params)]
        finally:
            await connection.close()

    return asyncio.run(run())


class Project:
    """A user's project: the recipe copied to ``migrations/``, and a models package of its own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        shutil.copytree(RECIPE, root / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
        (root / "notesapp").mkdir()
        (root / "notesapp" / "__init__.py").write_text("")
        shutil.copy(DEMO_MODELS, root / "notesapp" / "models.py")
        env_py = root / "migrations" / "env.py"
        text = env_py.read_text()
        assert text.count(MODELS_IMPORT) == 1, "env.py lost the import the migrations page tells users to change"
        env_py.write_text(text.replace(MODELS_IMPORT, OWN_MODELS_IMPORT))

    @property
    def ini(self) -> Path:
        return self.root / "migrations" / "alembic.ini"

    def alembic(self, *args: str, url: str | None) -> subprocess.CompletedProcess[str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("DATABASE_")}
        env.pop("PYTHONPATH", None)  # the project's own directory is what puts notesapp on the path
        env["PYTHONWARNINGS"] = "error"
        if url is not None:
            env["DATABASE_URL"] = url
        # The `alembic` command, as a user types it (python -m alembic would put the project on sys.path anyway).
        return subprocess.run(
            [ALEMBIC, "-c", "migrations/alembic.ini", *args],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def succeeds(self, *args: str, url: str) -> str:
        result = self.alembic(*args, url=url)
        assert result.returncode == 0, result.stderr
        return result.stdout + result.stderr

    def migrations(self) -> list[Path]:
        return sorted((self.root / "migrations" / "versions").glob("*.py"))

    def autogenerate(self, message: str, *args: str, url: str) -> str:
        """``revision --autogenerate``; the text of the migration it wrote."""
        before = set(self.migrations())
        self.succeeds(*args, "revision", "--autogenerate", "-m", message, url=url)
        (written,) = set(self.migrations()) - before
        return written.read_text()


def empty(migration: str) -> bool:
    """The migration has no operations: autogenerate found no difference between models and database."""
    bodies = re.findall(r"def (?:upgrade|downgrade)\(\) -> None:\n(.*?)(?=\n\n\ndef |\Z)", migration, re.DOTALL)
    statements = [[line.strip() for line in body.splitlines() if line.strip()[:1] not in ("", "#")] for body in bodies]
    return statements == [["pass"], ["pass"]]


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path / "project")


@pytest.fixture
def fresh_database(postgresql_dsn: str) -> Iterator[str]:
    """A PostgreSQL database created for this test (its DSN), dropped after it."""
    name = f"adbs_alembic_{uuid.uuid4().hex[:12]}"
    pg(postgresql_dsn, f"CREATE DATABASE {name}")
    yield postgresql_dsn.rsplit("/", 1)[0] + "/" + name
    pg(postgresql_dsn, f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def schema(postgresql_dsn: str) -> Iterator[str]:
    name = f"adbs_alembic_{uuid.uuid4().hex[:12]}"
    pg(postgresql_dsn, f"CREATE SCHEMA {name}")
    yield name
    pg(postgresql_dsn, f"DROP SCHEMA {name} CASCADE")


def pg_tables(dsn: str, schema: str = "public") -> list[str]:
    rows = pg(
        dsn, "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY table_name", schema
    )
    return [row[0] for row in rows]


def pg_columns(dsn: str, schema: str = "public") -> list[tuple[Any, ...]]:
    return pg(
        dsn,
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_schema = $1 AND table_name = 'notes' ORDER BY ordinal_position",
        schema,
    )


def pg_constraints(dsn: str, schema: str = "public") -> list[tuple[Any, ...]]:
    """The notes table's constraints: type and columns (names differ: the server names unnamed ones)."""
    return pg(
        dsn,
        "SELECT c.constraint_type, string_agg(k.column_name, ',' ORDER BY k.ordinal_position) "
        "FROM information_schema.table_constraints c JOIN information_schema.key_column_usage k "
        "USING (constraint_schema, constraint_name) WHERE c.table_schema = $1 AND c.table_name = 'notes' "
        "GROUP BY c.constraint_name, c.constraint_type ORDER BY 1, 2",
        schema,
    )


def the_demos_schema(postgresql_dsn: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The notes table as the demo makes it (``create_all`` at its startup), in a schema of its own."""
    name = f"adbs_demo_{uuid.uuid4().hex[:12]}"
    pg(postgresql_dsn, f"CREATE SCHEMA {name}")

    async def create_all() -> None:
        engine = create_async_engine(PG_URL)
        try:
            async with engine.begin() as connection:
                await connection.execution_options(schema_translate_map={None: name})
                await connection.run_sync(Base.metadata.create_all)
        finally:
            await engine.dispose()

    try:
        asyncio.run(create_all())
        return pg_columns(postgresql_dsn, name), pg_constraints(postgresql_dsn, name)
    finally:
        pg(postgresql_dsn, f"DROP SCHEMA {name} CASCADE")


def test_the_copied_recipe_migrates_a_fresh_postgresql_database(
    project: Project, fresh_database: str, postgresql_dsn: str
) -> None:
    url = fresh_database  # postgresql://..., as a user writes DATABASE_URL
    first = project.autogenerate("create notes", url=url)
    assert "op.create_table(" in first
    assert "'notes'" in first
    project.succeeds("upgrade", "head", url=url)
    assert pg_tables(fresh_database) == ["alembic_version", "notes"]
    # The schema is the demo's: the columns and constraints that the demo's create_all makes.
    assert (pg_columns(fresh_database), pg_constraints(fresh_database)) == the_demos_schema(postgresql_dsn)
    assert [column[0] for column in pg_columns(fresh_database)] == ["id", "title", "body", "created_at"]
    # Models and database agree: a second autogenerate finds nothing to do.
    assert empty(project.autogenerate("nothing to do", url=url))
    project.succeeds("downgrade", "base", url=url)
    assert pg_tables(fresh_database) == ["alembic_version"]
    assert pg(fresh_database, "SELECT version_num FROM alembic_version") == []


def test_in_a_schema_of_its_own(project: Project, postgresql_dsn: str, schema: str) -> None:
    url = PG_URL
    project.autogenerate("create notes", "-x", f"schema={schema}", url=url)
    project.succeeds("-x", f"schema={schema}", "upgrade", "head", url=url)
    assert pg_tables(postgresql_dsn, schema) == ["alembic_version", "notes"]
    pg(postgresql_dsn, f"INSERT INTO {schema}.notes (title, body, created_at) VALUES ('migrated', '', now())")
    assert pg(postgresql_dsn, f"SELECT id, title FROM {schema}.notes") == [(1, "migrated")]
    assert empty(project.autogenerate("nothing to do", "-x", f"schema={schema}", url=url))
    project.succeeds("-x", f"schema={schema}", "downgrade", "base", url=url)
    assert pg_tables(postgresql_dsn, schema) == ["alembic_version"]


def test_on_sqlite(project: Project, tmp_path: Path) -> None:
    path = tmp_path / "migrated.db"
    url = f"sqlite:///{path}"  # DatabaseSettings gives a plain sqlite:// URL the async driver, as for the app

    def tables() -> list[str]:
        with closing(sqlite3.connect(path)) as connection:
            return sorted(row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))

    project.autogenerate("create notes", url=url)
    project.succeeds("upgrade", "head", url=url)
    assert tables() == ["alembic_version", "notes"]
    assert empty(project.autogenerate("nothing to do", url=url))
    project.succeeds("downgrade", "base", url=url)
    assert tables() == ["alembic_version"]


def test_offline_sql_names_the_schema(project: Project, tmp_path: Path) -> None:
    project.autogenerate("create notes", url=f"sqlite:///{tmp_path / 'scratch.db'}")
    # --sql connects to nothing: it prints what upgrade would run.
    sql = project.succeeds("-x", "schema=tenant_a", "upgrade", "head", "--sql", url=PG_URL)
    assert 'SET search_path TO "tenant_a";' in sql
    assert "CREATE TABLE notes (" in sql
    assert "INSERT INTO alembic_version (version_num) VALUES (" in sql


def test_without_database_url_alembic_says_what_to_set(project: Project) -> None:
    result = project.alembic("upgrade", "head", url=None)
    assert result.returncode != 0
    assert NO_URL in result.stderr


def test_the_recipe_ships_no_migration_and_finds_the_models_from_the_project_root() -> None:
    assert list((RECIPE / "versions").glob("*.py")) == []
    assert "prepend_sys_path = .\n" in (RECIPE / "alembic.ini").read_text()
    assert MODELS_IMPORT in (RECIPE / "env.py").read_text()
    assert isinstance(Base.metadata, MetaData)


# asgi_db_session.testing.schema_from_alembic on the copied recipe, in this process.


def test_schema_from_alembic_migrates_for_the_block_and_leaves_the_database_as_it_found_it(
    project: Project, fresh_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.autogenerate("create notes", url=fresh_database)
    monkeypatch.chdir(project.root)  # prepend_sys_path = . : where notesapp is
    monkeypatch.delenv("DATABASE_URL", raising=False)  # the connection is handed to env.py, not found by it
    database = Database(fresh_database, name="adbs-alembic-plugin")
    with schema_from_alembic(project.ini, database):
        assert pg_tables(fresh_database) == ["alembic_version", "notes"]
    # autogenerate made the (empty) version table; what the block made is gone.
    assert pg_tables(fresh_database) == ["alembic_version"]
    pg(fresh_database, "DROP TABLE alembic_version")
    with schema_from_alembic(project.ini, database):
        assert pg_tables(fresh_database) == ["alembic_version", "notes"]
    assert pg_tables(fresh_database) == []
    # A database that stands at a revision already is brought back to it, rows and all.
    project.succeeds("upgrade", "head", url=fresh_database)
    pg(fresh_database, "INSERT INTO notes (title, body, created_at) VALUES ('kept', '', now())")
    version = pg(fresh_database, "SELECT version_num FROM alembic_version")
    with schema_from_alembic(project.ini, database):
        pass
    assert pg(fresh_database, "SELECT version_num FROM alembic_version") == version
    assert pg(fresh_database, "SELECT title FROM notes") == [("kept",)]


def ignoring_the_connection(project: Project, run_online: str) -> None:
    """env.py as if it had no use for the connection it is given; ``run_online`` replaces its last line."""
    env_py = project.root / "migrations" / "env.py"
    text = env_py.read_text().replace('config.attributes.get("connection")', "None")
    assert text.endswith("    asyncio.run(run_online())\n")
    env_py.write_text(text.removesuffix("asyncio.run(run_online())\n") + run_online + "\n")


@pytest.mark.parametrize(
    ("run_online", "detail"),
    [
        # Alembic's async template: an event loop of its own (on the DATABASE_URL below).
        ("asyncio.run(run_online())", "it started an event loop of its own: asyncio.run() cannot be called"),
        # A sync engine of its own, on a database that is not the one given.
        (
            "from sqlalchemy import create_engine\n"
            "    with create_engine(DatabaseSettings().engine_url().set(drivername='sqlite')).begin() as c:\n"
            "        run_migrations(c)",
            "after `alembic upgrade head` the database at postgresql+asyncpg://",
        ),
    ],
    ids=["asyncio.run", "another database"],
)
def test_schema_from_alembic_with_an_env_py_that_ignores_the_connection(
    project: Project,
    fresh_database: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    run_online: str,
    detail: str,
) -> None:
    project.autogenerate("create notes", url=fresh_database)
    pg(fresh_database, "DROP TABLE alembic_version")
    ignoring_the_connection(project, run_online)
    elsewhere = tmp_path / "elsewhere.db"
    monkeypatch.chdir(project.root)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{elsewhere}")  # where that env.py migrates instead
    database = Database(fresh_database, name="adbs-alembic-plugin-2")
    with pytest.raises(RuntimeError) as caught, schema_from_alembic(project.ini, database):
        pass  # pragma: no cover - not entered
    message = str(caught.value)
    assert message.startswith(
        f"asgi_db_session.testing: the env.py of {project.ini} did not run the migrations on the connection it was "
        "given ("
    )
    assert detail in message
    assert message.endswith(
        "). Make it run them on config.attributes['connection'] when that is set, as examples/alembic/env.py does."
    )
    assert pg_tables(fresh_database) == []
