"""The README's runnable example works as printed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from asgi_db_session import Database

from .conftest import client

pytestmark = pytest.mark.anyio

README = Path(__file__).parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_starts_with_the_two_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["./dev demo", "./dev test"]
    assert "./dev test\n" in (README.parent / ".ci" / "run").read_text()


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
