"""Every framework app in one ASGI app, for a real server: ``uvicorn tests.frameworks.served:app``.

Each framework's app is under its prefix (``/litestar/write``, ``/django/reject``, ...; see ``Framework.prefix``),
with its own DBSessionMiddleware and a Database of its own, configured from ``DATABASE_*``: with
``DATABASE_ECHO_POOL=true`` each pool's "Pool disposed" line at shutdown shows that that app's middleware got the
lifespan. The table is ``FRAMEWORKS_TABLE`` (tests/frameworks/service.py).
"""

from __future__ import annotations

from asgi_db_session import Database, DatabaseSettings

from .registry import FRAMEWORKS
from .router import PrefixRouter

__all__ = ["app"]

app = PrefixRouter(
    {framework.prefix: framework.make_app(Database(settings=DatabaseSettings())) for framework in FRAMEWORKS}
)
