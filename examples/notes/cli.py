"""The command line of both demos: ``python -m examples.notes`` and ``python -m examples.fastapi_notes``."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Sequence

import uvicorn
from starlette.applications import Starlette


def port_number(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def parse_args(prog: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the notes demo with uvicorn. The database is DATABASE_URL, else SQLite in ./notes.db.",
    )
    parser.add_argument("--host", default=None, help="the address to listen on (default: $HOST, else 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=None, help="the port (default: $PORT, else 8000)")
    args = parser.parse_args(argv)
    if args.host is None:
        args.host = os.environ.get("HOST") or "127.0.0.1"
    if args.port is None:
        try:
            args.port = port_number(os.environ.get("PORT") or "8000")
        except argparse.ArgumentTypeError as exc:
            parser.error(f"PORT: {exc}")
    return args


def main(create_app: Callable[[], Starlette], prog: str, argv: Sequence[str] | None = None) -> None:
    args = parse_args(prog, argv)
    # uvicorn configures only its own loggers; this makes the app's startup line visible too.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    uvicorn.run(create_app(), host=args.host, port=args.port)
