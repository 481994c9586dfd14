"""The public API is exactly what __all__ says, sorted, and every name in it is importable."""

from __future__ import annotations

from types import ModuleType

import asgi_db_session


def test_all_is_sorted_and_complete() -> None:
    assert asgi_db_session.__all__ == sorted(asgi_db_session.__all__)
    public = {
        name
        for name, value in vars(asgi_db_session).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    assert public == set(asgi_db_session.__all__) - {"__version__"}


def test_exported_names_live_where_they_say() -> None:
    for name in asgi_db_session.__all__:
        member = getattr(asgi_db_session, name)
        if name != "__version__":
            assert member.__module__.startswith("asgi_db_session"), name


def test_version_is_a_string() -> None:
    assert isinstance(asgi_db_session.__version__, str)
