"""The documentation site's settings table (docs/hooks.py) follows ``DatabaseSettings``' fields.

The generator needs no MkDocs, so these run in every test run; ``./dev docs build`` (in CI) runs it in the build.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from asgi_db_session import DatabaseSettings

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _load_hooks() -> tuple[Callable[[type[BaseSettings]], str], str]:
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.settings_table, module.SETTINGS_TABLE_MARKER


settings_table, SETTINGS_TABLE_MARKER = _load_hooks()


def _rows(table: str) -> dict[str, list[str]]:
    """The table's rows by their first cell (the variable), each row's cells without the backticks."""
    rows: dict[str, list[str]] = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        variable = cells[0].strip("`")
        assert variable not in rows, f"{variable} has two rows"
        rows[variable] = cells
    return rows


def test_the_settings_table_has_a_row_for_every_field_with_its_variable() -> None:
    rows = _rows(settings_table(DatabaseSettings))
    assert sorted(rows) == sorted(f"DATABASE_{name.upper()}" for name in DatabaseSettings.model_fields)
    for name in DatabaseSettings.model_fields:
        _variable, field, _type, _default, description = rows[f"DATABASE_{name.upper()}"]
        assert field == f"`{name}`"
        assert description, f"{name} has no description"


def test_the_variables_are_the_ones_pydantic_settings_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _rows(settings_table(DatabaseSettings))
    monkeypatch.setenv("DATABASE_URL", "sqlite:///./docs.db")
    monkeypatch.setenv("DATABASE_POOL_SIZE", "7")
    settings = DatabaseSettings()
    assert {"DATABASE_URL", "DATABASE_POOL_SIZE"} <= rows.keys()
    assert settings.pool_size == 7
    assert settings.url == "sqlite+aiosqlite:///./docs.db"


def test_the_settings_table_shows_each_fields_type_default_and_docstring() -> None:
    rows = _rows(settings_table(DatabaseSettings))
    assert rows["DATABASE_POOL_SIZE"] == [
        "`DATABASE_POOL_SIZE`",
        "`pool_size`",
        "int",
        "`5`",
        "Connections the pool keeps open.",
    ]
    assert rows["DATABASE_REPLICA_URLS"][2:4] == ["list[str]", "`[]`"]
    assert rows["DATABASE_ECHO_POOL"][2] == "bool \\| `'debug'`"
    assert rows["DATABASE_STATEMENT_TIMEOUT"][2:] == [
        "int \\| None",
        "`None`",
        "Milliseconds after which PostgreSQL cancels a statement (asyncpg only).",
    ]


def test_a_new_field_appears_in_the_table() -> None:
    class MoreSettings(DatabaseSettings):
        retries: int = 3
        """How often to retry."""

    rows = _rows(settings_table(MoreSettings))
    assert rows["DATABASE_RETRIES"] == ["`DATABASE_RETRIES`", "`retries`", "int", "`3`", "How often to retry."]
    assert len(rows) == len(DatabaseSettings.model_fields) + 1


def test_a_field_without_a_docstring_fails_the_build() -> None:
    class UndocumentedSettings(DatabaseSettings):
        retries: int = 3

    with pytest.raises(ValueError, match=r"UndocumentedSettings\.retries has no docstring"):
        settings_table(UndocumentedSettings)


def test_the_settings_page_has_the_place_for_the_table() -> None:
    page = (DOCS / "reference" / "settings.md").read_text(encoding="utf-8")
    assert page.count(SETTINGS_TABLE_MARKER) == 1
