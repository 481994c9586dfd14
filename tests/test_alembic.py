"""examples/alembic: ``alembic upgrade head`` and ``downgrade base`` with the database from DATABASE_URL.

Alembic runs as a user runs it, in a subprocess, with only DATABASE_URL set; a second connection that does not
go through SQLAlchemy (asyncpg, or the standard library's sqlite3) checks what the migrations left. On the
shared PostgreSQL server each run migrates a schema of its own (``-x schema=...``), so its ``notes`` table and
its version table cannot meet another run's.
"""

from __future__ import annotations

import asyncio
import os
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

from asgi_db_session.settings import NO_URL

from .conftest import PG_URL

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "alembic"
REVISION = "5e1d0c3a9b7f"


def alembic(*args: str, url: str | None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DATABASE_")}
    if url is not None:
        env["DATABASE_URL"] = url
    return subprocess.run(
        [sys.executable, "-W", "error", "-m", "alembic", "-c", str(EXAMPLE / "alembic.ini"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def succeeds(*args: str, url: str) -> str:
    result = alembic(*args, url=url)
    assert result.returncode == 0, result.stderr
    return result.stdout


def pg(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    async def run() -> list[tuple[Any, ...]]:
        connection = await asyncpg.connect(dsn)
        try:
            return [tuple(row) for row in await connection.fetch(sql, *params)]
        finally:
            await connection.close()

    return asyncio.run(run())


@pytest.fixture
def schema(postgresql_dsn: str) -> Iterator[str]:
    name = f"adbs_alembic_{uuid.uuid4().hex[:12]}"
    pg(postgresql_dsn, f"CREATE SCHEMA {name}")
    yield name
    pg(postgresql_dsn, f"DROP SCHEMA {name} CASCADE")


def test_upgrade_then_downgrade_on_postgresql(postgresql_dsn: str, schema: str) -> None:
    def tables() -> list[str]:
        rows = pg(
            postgresql_dsn,
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY table_name",
            schema,
        )
        return [row[0] for row in rows]

    succeeds("-x", f"schema={schema}", "upgrade", "head", url=PG_URL)
    assert tables() == ["alembic_version", "notes"]
    assert pg(postgresql_dsn, f"SELECT version_num FROM {schema}.alembic_version") == [(REVISION,)]
    columns = pg(
        postgresql_dsn,
        "SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'notes' "
        "ORDER BY ordinal_position",
        schema,
    )
    assert columns == [("id",), ("text",), ("created_at",)]
    # The table works: the server fills in id and created_at.
    pg(postgresql_dsn, f"INSERT INTO {schema}.notes (text) VALUES ('migrated')")
    assert pg(postgresql_dsn, f"SELECT id, text FROM {schema}.notes") == [(1, "migrated")]

    succeeds("-x", f"schema={schema}", "downgrade", "base", url=PG_URL)
    assert tables() == ["alembic_version"]
    assert pg(postgresql_dsn, f"SELECT version_num FROM {schema}.alembic_version") == []


def test_upgrade_then_downgrade_on_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "migrated.db"

    def tables() -> list[str]:
        with closing(sqlite3.connect(path)) as connection:
            return [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]

    # A plain sqlite:// URL: DatabaseSettings gives it the async driver, as it does for the app.
    succeeds("upgrade", "head", url=f"sqlite:///{path}")
    assert sorted(tables()) == ["alembic_version", "notes"]
    succeeds("downgrade", "base", url=f"sqlite:///{path}")
    assert tables() == ["alembic_version"]


def test_offline_sql_names_the_schema() -> None:
    # --sql connects to nothing: it prints what upgrade would run.
    sql = succeeds("-x", "schema=tenant_a", "upgrade", "head", "--sql", url=PG_URL)
    assert 'SET search_path TO "tenant_a";' in sql
    assert "CREATE TABLE notes (" in sql
    assert f"INSERT INTO alembic_version (version_num) VALUES ('{REVISION}')" in sql


def test_without_database_url_alembic_says_what_to_set() -> None:
    result = alembic("upgrade", "head", url=None)
    assert result.returncode != 0
    assert NO_URL in result.stderr
