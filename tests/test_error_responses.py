"""default_error_response on driver errors made for real, where a whole request would be hard to stage."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_db_session import CommitOutcomeUnknownError, default_error_response
from asgi_db_session.error_responses import OUTCOME_UNKNOWN

pytestmark = pytest.mark.anyio


async def test_asyncpgs_own_connection_closed_error_is_a_503(postgresql_dsn: str) -> None:
    connection = await asyncpg.connect(postgresql_dsn)
    await connection.close()
    with pytest.raises(asyncpg.InterfaceError) as raised:
        await connection.fetchval("SELECT 1")
    response = default_error_response(raised.value)
    assert response is not None
    assert response.status == 503
    assert ("Retry-After", "1") in response.headers


async def test_other_asyncpg_interface_errors_are_left_alone(postgresql_dsn: str) -> None:
    connection = await asyncpg.connect(postgresql_dsn)
    try:
        # A misuse, not a lost connection: the server's error handling (a 500) is the honest answer.
        with pytest.raises(asyncpg.InterfaceError) as raised:
            await connection.fetchval("SELECT $1::int")
    finally:
        await connection.close()
    assert default_error_response(raised.value) is None


def test_a_busy_sqlite_database_is_a_503(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'busy.db'}", connect_args={"timeout": 0})
    try:
        with engine.begin() as setup:
            setup.exec_driver_sql("CREATE TABLE t (id INTEGER)")
        with engine.connect() as holder, engine.connect() as other:
            holder.exec_driver_sql("BEGIN EXCLUSIVE")
            with pytest.raises(DBAPIError) as raised:
                other.exec_driver_sql("INSERT INTO t VALUES (1)")
            holder.rollback()
    finally:
        engine.dispose()
    response = default_error_response(raised.value)
    assert response is not None
    assert response.status == 503


async def test_a_postgresql_error_with_another_sqlstate_is_left_alone(postgresql_dsn: str) -> None:
    engine = create_async_engine(postgresql_dsn.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        async with engine.connect() as connection:
            with pytest.raises(DBAPIError) as raised:
                await connection.exec_driver_sql("SELEC 1")  # 42601, a syntax error: the app's bug, a 500
    finally:
        await engine.dispose()
    assert default_error_response(raised.value) is None


async def test_a_statement_past_the_command_timeout_is_a_503(postgresql_dsn: str) -> None:
    """asyncpg raises a plain TimeoutError, which SQLAlchemy passes on unwrapped: a 503 all the same."""
    url = postgresql_dsn.replace("postgresql://", "postgresql+asyncpg://")
    engine = create_async_engine(url, connect_args={"command_timeout": 0.2})
    try:
        async with engine.connect() as connection:
            with pytest.raises(TimeoutError) as raised:
                await connection.exec_driver_sql("SELECT pg_sleep(2)")
    finally:
        await engine.dispose()
    response = default_error_response(raised.value)
    assert response is not None
    assert response.status == 503
    assert ("Retry-After", "1") in response.headers


async def test_the_apps_own_timeout_is_left_alone() -> None:
    """A TimeoutError raised outside the driver and SQLAlchemy (the app's asyncio.timeout) is not the database's."""
    with pytest.raises(TimeoutError) as raised:
        async with asyncio.timeout(0):
            await asyncio.sleep(1)
    assert default_error_response(raised.value) is None
    assert default_error_response(TimeoutError()) is None


def test_a_commit_whose_outcome_is_unknown_is_a_500_that_says_so_without_retry_after() -> None:
    response = default_error_response(CommitOutcomeUnknownError("lost", "742"))
    assert response is OUTCOME_UNKNOWN
    assert response.status == 500
    assert "not known" in response.body
    assert "retry-after" not in {name.lower() for name, _ in response.headers}
