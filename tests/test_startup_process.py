"""``DATABASE_CHECK_ON_STARTUP=true`` under a real uvicorn: a database it cannot use stops the server.

uvicorn runs tests/server_app.py in a subprocess. When the database does not answer (nothing listens on its
port), or refuses the login (a wrong password, on tests/pg_cluster.py's throwaway cluster), the process must
exit with a non-zero status instead of serving, and its output must say why in words an operator can act on,
with the URL's password masked: no 4-character piece of it anywhere in the output.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import pytest

from .pg_cluster import PASSWORD_ROLE, ROLE_PASSWORD, Cluster, pg_cluster
from .server import REPO_ROOT, free_port, server_env, uvicorn_command

__all__ = ["pg_cluster"]  # the session fixture, imported so that pytest finds it for this module

pytestmark = pytest.mark.anyio

PASSWORD = "Qm4!Hx8@Tz"  # with an "@" and a "!" that the URL percent-encodes
EXIT_SECONDS = 15.0


def pieces(*passwords: str) -> set[str]:
    return {
        piece
        for password in passwords
        for piece in {password[i : i + 4] for i in range(len(password) - 3)} | {quote(password, safe="")}
    }


async def run_until_exit(database_url: str) -> tuple[int, str]:
    """Start uvicorn on the app with the startup check on; its exit status and output once it has exited."""
    port = free_port()
    env = server_env(database_url, "adbs-startup-process", {"DATABASE_CHECK_ON_STARTUP": "true"})
    process = await asyncio.create_subprocess_exec(
        *uvicorn_command(port),
        cwd=REPO_ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=EXIT_SECONDS)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    text = output.decode(errors="replace")
    print(text)
    return process.returncode, text


async def test_an_unreachable_database_stops_uvicorn() -> None:
    closed_port = free_port()  # nothing listens there: the connection is refused
    url = f"postgresql://app:{quote(PASSWORD, safe='')}@127.0.0.1:{closed_port}/shop"
    status, output = await run_until_exit(url)

    assert status != 0
    assert "Application startup failed. Exiting." in output
    assert f"Cannot reach database 'default' at postgresql+asyncpg://app:***@127.0.0.1:{closed_port}/shop" in output
    assert "ConnectionRefusedError" in output
    assert "Check DATABASE_URL" in output
    assert "Uvicorn running on" not in output
    assert sorted(piece for piece in pieces(PASSWORD) if piece in output) == []


async def test_a_wrong_password_stops_uvicorn(pg_cluster: Cluster) -> None:
    wrong = "Zx9-Sqv7t@Pw"
    status, output = await run_until_exit(pg_cluster.url_as(PASSWORD_ROLE, wrong))

    assert status != 0
    assert "Application startup failed. Exiting." in output
    assert f"postgresql+asyncpg://{PASSWORD_ROLE}:***@127.0.0.1:{pg_cluster.port}/" in output
    assert f'password authentication failed for user "{PASSWORD_ROLE}"' in output
    assert sorted(piece for piece in pieces(wrong, ROLE_PASSWORD) if piece in output) == []


async def test_a_database_that_does_not_exist_stops_uvicorn(pg_cluster: Cluster) -> None:
    """SQLSTATE 3D000, like a wrong port or user: a readable reason, no traceback."""
    status, output = await run_until_exit(pg_cluster.url.rsplit("/", 1)[0] + "/adbs_missing")

    assert status != 0
    assert "Application startup failed. Exiting." in output
    assert (
        f"Cannot reach database 'default' at postgresql+asyncpg://postgres@127.0.0.1:{pg_cluster.port}/adbs_missing: "
        'the server has no such database: InvalidCatalogNameError: database "adbs_missing" does not exist. '
        "Check DATABASE_URL"
    ) in output
    assert "Traceback" not in output
    assert "Uvicorn running on" not in output
