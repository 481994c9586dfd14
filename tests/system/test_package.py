"""The package as a user installs it: the built wheel in a fresh venv, and the README's Quickstart run as printed.

One test, because the build and the venv are its cost: ``python -m build`` (an isolated build, as pip builds
from an sdist) makes the sdist and, from it, the wheel. The Quickstart's code block becomes app.py, and its
command runs on a free loopback port twice: with the wheel installed without extras (a missing optional
dependency must name its extra), then after the README's install line with the wheel in place of the name.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from contextlib import closing
from email.parser import HeaderParser
from pathlib import Path
from urllib.parse import urlsplit

from ..docs_code import blocks_run_by
from .server import REPO_ROOT, free_port

README = REPO_ROOT / "README.md"
INSTALL_SECONDS = 300.0
START_SECONDS = 20.0


def quickstart_blocks() -> tuple[str, str]:
    """The README Quickstart's ``app.py`` and its ``bash`` lines: the blocks this test runs
    (tests/docs_code.py's ``<!-- check: run ... -->`` markers)."""
    app, commands = blocks_run_by(
        README, "tests/system/test_package.py::test_the_wheel_installs_and_runs_the_readme_quickstart"
    )
    assert (app.language, commands.language) == ("python", "bash")
    return app.code, commands.code


def user_env() -> dict[str, str]:
    """This process's environment without what would reach into the repository's venv or database."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_", "PYTHON", "VIRTUAL_ENV", "TEST_DATABASE"))
    }


def run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=user_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=INSTALL_SECONDS,
        check=False,
    )


def checked(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def wait_until_listening(port: int, server: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        assert server.poll() is None, "the server exited before it listened"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {START_SECONDS} s")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        body: bytes = response.read()
        return body.decode()


def check_archives(dist: Path) -> Path:
    """Check what the wheel and the sdist hold; return the wheel."""
    (wheel,) = dist.glob("asgi_db_session-*.whl")
    (sdist,) = dist.glob("asgi_db_session-*.tar.gz")
    license_text = (REPO_ROOT / "LICENSE").read_text()
    assert "MIT License" in license_text

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        metadata = HeaderParser().parsestr(archive.read(metadata_name).decode())
        (license_name,) = [name for name in names if name.endswith(".dist-info/licenses/LICENSE")]
        assert archive.read(license_name).decode() == license_text
    assert metadata["License-Expression"] == "MIT"
    assert {"sqlite", "fastapi"} <= set(metadata.get_all("Provides-Extra") or [])

    with tarfile.open(sdist) as archive:
        root = archive.getnames()[0].split("/")[0]
        members = {name.removeprefix(f"{root}/") for name in archive.getnames()}
        license_member = archive.extractfile(f"{root}/LICENSE")
        assert license_member is not None
        assert license_member.read().decode() == license_text
    assert {"LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "asgi_db_session/__init__.py"} <= members
    # The tests need examples/, benchmarks/ and a PostgreSQL server: an sdist leaves them out rather than ship
    # tests that cannot be collected once unpacked.
    assert not [name for name in members if name.startswith(("tests/", "examples/", "benchmarks/"))]
    return wheel


def serve(line: str, venv: Path, project: Path, port: int) -> subprocess.Popen[str]:
    """Start the README's ``DATABASE_URL=... uvicorn app:app`` line from ``venv`` in ``project`` on ``port``."""
    *assignments, program, target = shlex.split(line)
    assert program == "uvicorn"
    env = user_env() | dict(assignment.split("=", 1) for assignment in assignments)
    assert env["DATABASE_URL"].startswith("sqlite")
    return subprocess.Popen(
        [str(venv / "bin" / program), target, "--host", "127.0.0.1", "--port", str(port)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_the_wheel_installs_and_runs_the_readme_quickstart(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    checked(run(sys.executable, "-m", "build", "--outdir", dist, REPO_ROOT, cwd=tmp_path))
    wheel = check_archives(dist)

    venv = tmp_path / "venv"
    # Without a pip of its own (ensurepip is most of a venv's cost): this pip installs into it.
    checked(run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path))
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    project = tmp_path / "project"
    project.mkdir()
    app_py, commands = quickstart_blocks()
    (project / "app.py").write_text(app_py)
    install, serve_line, curl = commands.strip().splitlines()

    # Without the extras: the Quickstart's command stops at startup, saying which extra to install, and
    # asgi_db_session.fastapi does the same.
    checked(run(*pip, "install", "-q", wheel, "uvicorn", cwd=tmp_path))
    server = serve(serve_line, venv, project, free_port())
    output, _ = server.communicate(timeout=START_SECONDS)
    print(output)
    assert server.returncode != 0
    assert "needs aiosqlite, which is not installed: pip install 'asgi-db-session[sqlite]'" in output
    assert "Application startup failed" in output
    no_fastapi = run(venv / "bin" / "python", "-c", "import asgi_db_session.fastapi", cwd=tmp_path)
    assert no_fastapi.returncode == 1
    assert "needs fastapi, which is not installed: pip install 'asgi-db-session[fastapi]'" in no_fastapi.stderr

    # The README's install line, with the built wheel in place of the name on PyPI.
    install_args = [re.sub(r"^asgi-db-session(?=\[)", str(wheel), arg) for arg in shlex.split(install)]
    assert install_args[:2] == ["pip", "install"]
    assert any(arg.startswith(f"{wheel}[sqlite") for arg in install_args)
    checked(run(*pip, *install_args[1:], "-q", cwd=tmp_path))

    port = free_port()
    server = serve(serve_line, venv, project, port)
    try:
        wait_until_listening(port, server)
        command, _comment, shown_answer = curl.partition("#")
        program, url = shlex.split(command)
        assert program == "curl"
        url = urlsplit(url)._replace(netloc=f"127.0.0.1:{port}").geturl()
        expected = re.search(r"\{.*\}", shown_answer)
        assert expected is not None
        assert get(url) == expected.group(0)
        assert get(url) == expected.group(0).replace("1", "2")
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=START_SECONDS)
    print(output)
    assert not re.search(r"Traceback|ERROR|Warning", output)
    assert server.returncode in (0, -signal.SIGTERM)  # newer uvicorn re-raises the signal it stopped on

    # Both rows were committed: read through a connection of the test's own.
    database = project / "app.db"
    assert "sqlite:///./app.db" in serve_line
    with closing(sqlite3.connect(database)) as connection:
        assert connection.execute("SELECT count(*) FROM visits").fetchone() == (2,)
