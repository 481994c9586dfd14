"""The notes API again, on FastAPI: the same services and repositories, which call current_session()."""

from .app import create_app

__all__ = ["create_app"]
