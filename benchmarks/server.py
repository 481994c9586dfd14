"""The app factory that HTTP mode runs under uvicorn: ``uvicorn --factory benchmarks.server:create_app``.

The app is chosen by ``BENCH_APP``; the engine settings come from ``BENCH_*`` variables (see
``EngineSettings.from_env``), and ``BENCH_INSERT_BASE`` gives this server's /insert ids their own range.
``BENCH_SERVER_GC=off`` disables the garbage collector once the app is built (``run.py --http --server-gc off``);
``BENCH_SERVER_GC=freeze`` moves everything alive then out of its view (``gc.freeze()``: what an app can do in its
own start-up), so that its collections walk only what the requests made (``http_instructions.py --server-gc``).
``BENCH_CLEANUP_TIMEOUT`` replaces asgi_db_session's default cleanup bound for apps given an engine (which read
no DATABASE_* setting): under callgrind (``http_instructions.py``) every wait is ~50 times longer.
``BENCH_SAME_HEAP`` (comma-separated app keys) imports, before the app is built, what each of those apps' builders
imports (``AppSpec.modules``): every server of a run then holds the same modules, so that the collector's full
collections walk heaps of the same size and the apps differ only in what their requests do.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys

from starlette.types import ASGIApp

from .apps import APPS
from .common import EngineSettings


def create_app() -> ASGIApp:
    key = os.environ.get("BENCH_APP", "")
    if key not in APPS:
        raise SystemExit(f"BENCH_APP={key!r} is not one of {', '.join(APPS)}")
    for other in filter(None, os.environ.get("BENCH_SAME_HEAP", "").split(",")):
        if other not in APPS:
            raise SystemExit(f"BENCH_SAME_HEAP names {other!r}, not one of {', '.join(APPS)}")
        for module in APPS[other].modules:
            importlib.import_module(module)
    app = APPS[key].build(EngineSettings.from_env())
    cleanup_timeout = os.environ.get("BENCH_CLEANUP_TIMEOUT")
    # Only where the app imported the package: importing it into another app's process would change that
    # app's heap, and so what the collector costs it per request.
    database = sys.modules.get("asgi_db_session.database")
    if cleanup_timeout is not None and database is not None:
        # Read by each Database made from an engine (its module's own binding of the name), when Starlette
        # builds the middleware stack at the first call (lifespan startup), after this.
        setattr(database, "DEFAULT_CLEANUP_TIMEOUT", float(cleanup_timeout))  # noqa: B010
    server_gc = os.environ.get("BENCH_SERVER_GC")
    if server_gc == "off":
        gc.collect()
        gc.disable()
    elif server_gc == "freeze":
        gc.collect()
        gc.freeze()
    return app
