"""``python -m examples.notes [--host HOST] [--port PORT]``: serve the notes API with uvicorn (127.0.0.1:8000)."""

from __future__ import annotations

from .app import create_app
from .cli import main

if __name__ == "__main__":
    main(create_app, "python -m examples.notes")
