"""default_error_response on driver errors made for real, where a whole request would be hard to stage."""

from __future__ import annotations

import asyncpg
import pytest

from asgi_db_session import default_error_response

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
