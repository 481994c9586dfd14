"""Django: the project's asgi.py, with the middleware around Django's ASGI handler. Serve with
``uvicorn mysite.asgi:application``."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

from asgi_db_session import DBSessionMiddleware

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

# Around the handler, not in settings.MIDDLEWARE: Django's middleware runs per request, and its ASGI handler
# refuses the lifespan scope; DBSessionMiddleware then answers lifespan itself, checking the database at startup
# and disposing it at shutdown.
application = DBSessionMiddleware(get_asgi_application(), commit_on_success=True)
