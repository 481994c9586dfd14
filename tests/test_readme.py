"""The README's runnable example works as printed."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from asgi_db_session import Database

from .conftest import client

pytestmark = pytest.mark.anyio

README = Path(__file__).parent.parent / "README.md"
PYPROJECT = README.parent / "pyproject.toml"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def section(title: str) -> str:
    text = README.read_text()
    assert f"\n## {title}\n" in text
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_starts_with_what_a_user_needs() -> None:
    headings = re.findall(r"^## (.+)$", README.read_text(), flags=re.MULTILINE)
    assert headings[:4] == ["Installation", "Quickstart", "Supported versions", "Contributing"]


def test_the_contributor_commands_are_the_ones_ci_runs() -> None:
    block = re.search(r"```bash\n(.*?)```", section("Contributing"), flags=re.DOTALL)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["./dev demo", "./dev test"]
    assert "./dev test\n" in (README.parent / ".ci" / "run").read_text()


def test_the_installation_names_only_extras_that_exist() -> None:
    extras = set(tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"])
    named = re.findall(r"asgi-db-session\[([a-z,]+)\]", section("Installation"))
    assert {"sqlite", "fastapi"} <= {extra for group in named for extra in group.split(",")} <= extras


def test_the_supported_versions_are_pyprojects_bounds_and_ci_runs_both_ends() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project["optional-dependencies"]
    bounds: dict[str, str] = {}
    for dep in project["dependencies"] + extras["sqlite"] + extras["fastapi"]:
        match = re.fullmatch(r"([a-z-]+)(?:\[\w+\])?>=([\d.]+)", dep)
        assert match is not None, dep
        bounds[match[1]] = match[2]
    text = " ".join(section("Supported versions").split())
    shown = {name.lower(): version for name, version in re.findall(r"([A-Za-z-]+) ([\d.]+)\+", text)}
    assert shown == bounds
    named = [c.rsplit(" ", 1)[1] for c in project["classifiers"] if re.fullmatch(r".*Python :: 3\.\d+", c)]
    pythons = sorted(named, key=lambda version: int(version.split(".")[1]))
    assert project["requires-python"] == f">={pythons[0]}"
    assert f"Python {pythons[0]} to {pythons[-1]}" in text
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert {"./dev test", "./dev oldest", "./dev newest"} <= set(ci)


async def test_the_before_and_after_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (example,) = [block for block in python_blocks() if "count_tables" in block]
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(example, str(README), "exec"), namespace)
    async with client(namespace["app"]) as http:
        response = await http.get("/")
    assert response.json() == {"rows": 1}
    assert (tmp_path / "example.db").exists()
    middleware = namespace["app"].middleware_stack
    while not hasattr(middleware, "database"):
        middleware = middleware.app
    database: Database = middleware.database
    await database.dispose()
