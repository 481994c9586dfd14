"""What the server says of an app's connections, read on a connection of the test's own, never the app's."""

from __future__ import annotations

import asyncpg


async def backends_of(dsn: str, application_name: str) -> int:
    """How many backends of the server at ``dsn`` serve clients named ``application_name``."""
    connection = await asyncpg.connect(dsn)
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", application_name
        )
        return count
    finally:
        await connection.close()
