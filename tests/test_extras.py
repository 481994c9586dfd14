"""Optional dependencies: a missing one is an error that names the extra installing it."""

from __future__ import annotations

import re
import tomllib

import pytest

from asgi_db_session._extras import DRIVER_EXTRAS, require
from asgi_db_session.exceptions import MISSING_EXTRA

from .system.server import REPO_ROOT


def test_a_missing_module_is_an_error_that_names_the_extra() -> None:
    with pytest.raises(ModuleNotFoundError) as caught:
        require("asgi_db_session_no_such_module", extra="sqlite", needed_by="The database URL 'sqlite:///x.db'")
    assert str(caught.value) == MISSING_EXTRA.format(
        needed_by="The database URL 'sqlite:///x.db'", module="asgi_db_session_no_such_module", extra="sqlite"
    )
    assert "pip install 'asgi-db-session[sqlite]'" in str(caught.value)
    assert caught.value.name == "asgi_db_session_no_such_module"  # as Python's own error names it


def test_an_installed_module_passes() -> None:
    require("aiosqlite", extra="sqlite", needed_by="The test")


def test_each_driver_extra_installs_that_driver() -> None:
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, extra in DRIVER_EXTRAS.items():
        assert [dep for dep in extras[extra] if re.match(rf"{module}\b", dep)], (module, extra)
