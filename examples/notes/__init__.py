"""A small notes API on Starlette: routes call services, services call repositories, and only the
repositories touch the database, through ``current_session()``.

Run it with ``python -m examples.notes [--host HOST] [--port PORT]`` (``DATABASE_URL`` from the environment).
"""

from .app import create_app

__all__ = ["create_app"]
