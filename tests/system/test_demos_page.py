"""The demos page (docs/tutorial/demos.md): each curl line is a real route of the demos and answers the status
the page gives it, and each route of the demos has a curl line."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route

from ..conftest import Backend
from ..docs_code import DOCS, blocks, blocks_run_by
from .test_examples import DEMOS, _demo_env, _free_port, _wait_until_serving, notes_db, notes_pg_database, serving

__all__ = ["notes_db", "notes_pg_database"]  # fixtures shared with the demos' own tests

pytestmark = pytest.mark.anyio

DEMOS_PAGE = DOCS / "tutorial" / "demos.md"
RUN_BY = "tests/system/test_demos_page.py::test_the_curl_lines_answer_as_documented"
ORIGIN = "localhost:8000"
FASTAPI_ONLY = "FastAPI demo only"


@dataclass(frozen=True)
class Curl:
    """One curl line of the demos page, as the request it sends and the status the page says it gets."""

    line: str
    method: str
    path: str
    body: bytes | None
    status: int
    fastapi_only: bool


def parse(line: str) -> Curl:
    match = re.fullmatch(r"(curl .*?)\s+# (\d{3})\b(.*)", line)
    assert match is not None, f"a curl line without its status as '# NNN ...': {line}"
    method: str | None = None
    body: bytes | None = None
    url: str | None = None
    args = shlex.split(match[1])[1:]
    while args:
        arg = args.pop(0)
        if arg == "-i":
            continue
        if arg == "-X":
            method = args.pop(0)
        elif arg == "--json":  # curl sends it as the body, POST unless -X says otherwise
            body = args.pop(0).encode()
        else:
            assert not arg.startswith("-"), f"this test does not know curl's {arg}: {line}"
            assert url is None, f"two URLs in one line: {line}"
            url = arg
    assert url is not None
    assert url.startswith(ORIGIN + "/"), f"not the demo's address, {ORIGIN}: {line}"
    # curl's --json sends \u0000 etc. as written: JSON escapes, decoded by the app.
    method = method or ("POST" if body is not None else "GET")
    return Curl(line, method, url.removeprefix(ORIGIN), body, int(match[2]), FASTAPI_ONLY in match[3])


def curl_lines() -> list[Curl]:
    """The curl lines of the page's blocks marked as run by this module's tests."""
    return [parse(line) for block in blocks_run_by(DEMOS_PAGE, RUN_BY) for line in block.code.splitlines()]


def test_the_demos_page_has_its_curl_lines() -> None:
    curls = curl_lines()
    # Every curl command of the page is one the tests run: none escapes the parser (indented, or in a block
    # without the marker, say). Not an exact count: the page is free to gain lines, and each is run below.
    commands = [line for block in blocks(DEMOS_PAGE) for line in block.code.splitlines() if "curl " in line]
    assert [curl.line for curl in curls] == commands
    assert len(curls) >= 10
    assert 409 in {curl.status for curl in curls}


@pytest.mark.parametrize("demo", sorted(DEMOS))
async def test_the_curl_lines_answer_as_documented(notes_db: Backend, demo: str) -> None:
    curls = [curl for curl in curl_lines() if demo == "fastapi" or not curl.fastapi_only]
    app = DEMOS[demo](notes_db.url)
    async with serving(app) as http:
        answered = []
        for curl in curls:
            headers = {"content-type": "application/json", "accept": "application/json"} if curl.body else {}
            response = await http.request(curl.method, curl.path, content=curl.body, headers=headers)
            answered.append((curl.line, response.status_code))
    assert answered == [(curl.line, curl.status) for curl in curls]

    # And the other way round: every route the demo has is on the page.
    for route in app.routes:
        if not isinstance(route, Route) or not route.include_in_schema:
            continue
        for method in (route.methods or set()) - {"HEAD"}:
            documented = [curl for curl in curls if curl.method == method and route.path_regex.fullmatch(curl.path)]
            assert documented, f"{method} {route.path} of the {demo} demo has no curl line in docs/tutorial/demos.md"


async def test_the_curl_lines_run_with_curl_against_the_demo_server(tmp_path: Path) -> None:
    """The lines as a user runs them: real curl against ``python -m examples.notes`` (on another port)."""
    if shutil.which("curl") is None:
        reason = "curl is not installed (apt-get install curl; ./dev test installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the demos page's curl lines must run")
        pytest.skip(reason)
    port = _free_port()
    env = {key: value for key, value in _demo_env().items() if "proxy" not in key.lower()}
    log = (tmp_path / "server.log").open("wb")
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "examples.notes", "--port", str(port), cwd=tmp_path, env=env, stdout=log, stderr=log
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10, trust_env=False) as http:
            await _wait_until_serving(http, server)
        answered = []
        curls = [curl for curl in curl_lines() if not curl.fastapi_only]
        for line in curls:
            command = line.line.split("#")[0].replace(ORIGIN, f"127.0.0.1:{port}")
            result = await asyncio.to_thread(
                subprocess.run, shlex.split(command), env=env, capture_output=True, timeout=30, check=False
            )
            status_line = result.stdout.split(b"\r\n", 1)[0].decode()
            answered.append((line.line, int(status_line.split()[1]) if status_line.startswith("HTTP/") else None))
    finally:
        if server.returncode is None:
            server.terminate()
            await asyncio.wait_for(server.wait(), timeout=15)
        log.close()
    assert answered == [(line.line, line.status) for line in curls], (tmp_path / "server.log").read_text()
