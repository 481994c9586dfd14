"""The tutorials, followed as a reader follows them: each file the page shows is written into an empty project,
each command it shows is run there in page order (``alembic``, ``python`` and ``uvicorn`` from this venv, the
``curl`` lines against that server), on PostgreSQL databases made for the test. tests/test_docs_code.py
type-checks the same files.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .docs_code import DOCS, blocks_run_by
from .system.server import free_port
from .test_testing_plugin import run_pg, user_tables

STARLETTE_PAGE = DOCS / "tutorial" / "starlette.md"
FASTAPI_PAGE = DOCS / "tutorial" / "fastapi.md"
COMMAND_SECONDS = 120
SERVER_START_SECONDS = 60


@pytest.fixture(scope="module")
def made_databases(postgresql_dsn: str) -> Iterator[dict[str, str]]:
    """Two databases made for this module's tests (made and dropped once: each costs seconds on a busy server)."""
    made = {name: f"adbs_tutorial_{uuid.uuid4().hex[:10]}" for name in ("tasks", "tasks_test")}
    for database in made.values():
        run_pg(postgresql_dsn, f"CREATE DATABASE {database}")
    server = postgresql_dsn.rsplit("/", 1)[0]
    yield {name: f"{server}/{database}" for name, database in made.items()}
    for database in made.values():
        run_pg(postgresql_dsn, f"DROP DATABASE {database} WITH (FORCE)")


@pytest.fixture
def tutorial_databases(made_databases: dict[str, str]) -> dict[str, str]:
    """The tutorial's two databases, ``tasks`` and ``tasks_test``: each name the page uses, with the URL of an
    empty database that stands in for it (emptied here: the tutorial before left its tables)."""
    for url in made_databases.values():
        run_pg(url, "DROP SCHEMA public CASCADE")
        run_pg(url, "CREATE SCHEMA public")
    return made_databases


def stand_in(url: str, databases: dict[str, str]) -> str:
    """The test's URL for a URL of the page, chosen by the database name it ends with."""
    name = url.rsplit("/", 1)[-1]
    assert name in databases, f"the page's URL {url} names a database the test has no stand-in for"
    return databases[name]


class Reader:
    """Runs a page's command lines in ``project`` as a reader would, in order: ``NAME=value`` prefixes, then
    ``alembic ...`` or ``python ...`` (this venv's), ``uvicorn app:app`` (in the background, on a free port), and
    ``curl`` lines sent to that server, each checked against its comment (``# 409 ...``: the status; ``# {...}``
    or ``# [...]``: the JSON answer)."""

    def __init__(self, project: Path, databases: dict[str, str]) -> None:
        self.project = project
        self.databases = databases
        # As the page's first step exports it: the app's database.
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("DATABASE_")}
        self.env["DATABASE_URL"] = databases["tasks"]
        self.server: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.outputs: list[str] = []

    def run(self, line: str) -> None:
        words = shlex.split(line, comments=True)
        if not words:
            return
        env = dict(self.env)
        while "=" in words[0]:
            name, _, value = words.pop(0).partition("=")
            env[name] = stand_in(value, self.databases) if name == "DATABASE_URL" else value
        program, *args = words
        if program == "uvicorn":
            self.serve(args, env)
        elif program == "curl":
            self.curl(line, args)
        else:
            commands = {"alembic": [sys.executable, "-m", "alembic"], "python": [sys.executable]}
            assert program in commands, f"this test does not know how to run the page's {line!r}"
            result = subprocess.run(
                [*commands[program], *args],
                cwd=self.project,
                env=env,
                capture_output=True,
                text=True,
                timeout=COMMAND_SECONDS,
                check=False,
            )
            assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
            self.outputs.append(result.stdout)

    def serve(self, args: list[str], env: dict[str, str]) -> None:
        assert self.server is None, "the page starts a second server"
        command = [sys.executable, "-m", "uvicorn", *args, "--port", str(self.port), "--no-access-log"]
        self.server = subprocess.Popen(command, cwd=self.project, env=env)
        deadline = time.monotonic() + SERVER_START_SECONDS  # generous: the machine may be loaded
        while time.monotonic() < deadline:
            assert self.server.poll() is None, f"uvicorn exited with {self.server.returncode}"
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.2)
        pytest.fail(f"uvicorn did not answer within {SERVER_START_SECONDS} s")

    def curl(self, line: str, args: list[str]) -> None:
        assert self.server is not None, f"{line!r} before the page starts the app"
        method, body, url = "GET", None, None
        while args:
            arg = args.pop(0)
            if arg == "-X":
                method = args.pop(0)
            elif arg == "--json":  # curl sends it as the body, with a JSON content-type, POST unless -X says
                body = args.pop(0)
                method = "POST" if method == "GET" else method
            elif arg != "-i":
                assert not arg.startswith("-"), f"this test does not know curl's {arg}: {line}"
                url = arg
        assert url is not None, line
        assert url.startswith("localhost:8000/"), line
        headers = {"content-type": "application/json"} if body is not None else {}
        response = httpx.request(
            method, f"http://127.0.0.1:{self.port}/{url.split('/', 1)[1]}", content=body, headers=headers, timeout=30
        )
        shown = line.partition("#")[2].strip()
        if shown[:1] in "{[":
            assert response.json() == json.loads(shown), line
        else:
            assert response.status_code == int(shown.split()[0]), f"{line}: {response.status_code} {response.text}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.terminate()
            self.server.wait(timeout=30)


def follow(page: Path, test: str, project: Path, databases: dict[str, str]) -> list[str]:
    """Write the page's files and run its commands in page order; the output of each program it ran."""
    reader = Reader(project, databases)
    try:
        for block in blocks_run_by(page, test):
            if block.language == "python":
                assert block.file_name is not None, f"{block.where}: its first line must name its file (# app.py)"
                path = project / block.file_name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(block.code, encoding="utf-8")
            else:
                assert block.language == "bash", block.where
                for line in block.code.splitlines():
                    reader.run(line)
    finally:
        reader.stop()
    return reader.outputs


def check_tutorial(page: Path, test: str, tmp_path: Path, databases: dict[str, str]) -> None:
    project = tmp_path / "tasks"
    project.mkdir()
    outputs = follow(page, test, project, databases)
    # Migrated: the app's database has the table the migration made; the tests' database was migrated up and
    # back down by the plugin, and is empty again.
    assert user_tables(databases["tasks"]) == ["public.alembic_version", "public.tasks"]
    assert "2 passed" in outputs[-1], outputs[-1]
    assert user_tables(databases["tasks_test"]) == []


def test_the_starlette_tutorial_migrates_and_its_tests_pass(tmp_path: Path, tutorial_databases: dict[str, str]) -> None:
    check_tutorial(
        STARLETTE_PAGE,
        "tests/test_tutorials.py::test_the_starlette_tutorial_migrates_and_its_tests_pass",
        tmp_path,
        tutorial_databases,
    )


def test_the_fastapi_tutorial_migrates_and_its_tests_pass(tmp_path: Path, tutorial_databases: dict[str, str]) -> None:
    check_tutorial(
        FASTAPI_PAGE,
        "tests/test_tutorials.py::test_the_fastapi_tutorial_migrates_and_its_tests_pass",
        tmp_path,
        tutorial_databases,
    )
