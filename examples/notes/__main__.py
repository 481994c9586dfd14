"""``python -m examples.notes``: serve the notes API with uvicorn on $HOST:$PORT (127.0.0.1:8000)."""

from __future__ import annotations

import logging
import os

import uvicorn

from .app import create_app


def main() -> None:
    # uvicorn configures only its own loggers; this makes the app's startup line visible too.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    uvicorn.run(create_app(), host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "8000")))


if __name__ == "__main__":
    main()
