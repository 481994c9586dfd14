"""The framework apps under test, by name: the rows of the compatibility table (docs/how-to/frameworks.md)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from asgi_db_session import Database
from asgi_db_session._types import ASGIApp

__all__ = ["FRAMEWORKS", "Framework"]


@dataclass(frozen=True)
class Framework:
    name: str  # as the compatibility table names it
    module: str  # the module of tests/frameworks/ that holds its make_app()
    background_tasks: bool  # whether the framework has a background-task mechanism (POST /background)

    @property
    def prefix(self) -> str:
        """Its path prefix in the server process that serves every framework (tests/frameworks/served.py)."""
        return "/" + self.module.removesuffix("_app")

    def make_app(self, database: Database) -> ASGIApp:
        """The framework's app with DBSessionMiddleware in place (imported only now: Django configures itself)."""
        make: Callable[[Database], ASGIApp] = importlib.import_module(f"tests.frameworks.{self.module}").make_app
        return make(database)


FRAMEWORKS = [
    Framework("raw ASGI", "raw_asgi", background_tasks=False),
    Framework("Starlette", "starlette_app", background_tasks=True),
    Framework("FastAPI", "fastapi_app", background_tasks=True),
    Framework("Litestar", "litestar_app", background_tasks=True),
    Framework("Quart", "quart_app", background_tasks=True),
    Framework("BlackSheep", "blacksheep_app", background_tasks=False),
    Framework("Django", "django_app", background_tasks=False),
]
