"""``python -m examples.fastapi_notes [--host HOST] [--port PORT]``: the FastAPI demo with uvicorn
(127.0.0.1:8000; its interactive docs at /docs)."""

from __future__ import annotations

from ..notes.cli import main
from .app import create_app

if __name__ == "__main__":
    main(create_app, "python -m examples.fastapi_notes")
