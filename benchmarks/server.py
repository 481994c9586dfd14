"""The app factory that HTTP mode runs under uvicorn: ``uvicorn --factory benchmarks.server:create_app``.

The app is chosen by ``BENCH_APP``; the engine settings come from ``BENCH_*`` variables (see
``EngineSettings.from_env``), and ``BENCH_INSERT_BASE`` gives this server's /insert ids their own range.
"""

from __future__ import annotations

import os

from starlette.types import ASGIApp

from .apps import APPS
from .common import EngineSettings


def create_app() -> ASGIApp:
    key = os.environ.get("BENCH_APP", "")
    if key not in APPS:
        raise SystemExit(f"BENCH_APP={key!r} is not one of {', '.join(APPS)}")
    return APPS[key].build(EngineSettings.from_env())
