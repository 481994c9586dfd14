"""A Django project in one module (settings configured in code, async views), served by Django's ASGI handler with
DBSessionMiddleware wrapped around it.

Django's handler raises for the lifespan scope ("Django can only handle ASGI/HTTP connections, not lifespan."):
the middleware answers the lifespan protocol itself then, so startup checks and disposal still happen. Django has
no background tasks that run after the response.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import django
from django.conf import settings
from django.core.exceptions import BadRequest
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import path

from asgi_db_session import Database, DBSessionMiddleware

from . import service

__all__ = ["make_app", "urlpatterns"]

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="tests-only-not-secret-" * 3,
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["*"],
        MIDDLEWARE=[],  # no CSRF middleware: the tests POST without a token
        INSTALLED_APPS=[],
        DATABASES={},  # Django's ORM is not used: the session is SQLAlchemy's
        USE_TZ=True,
    )
    django.setup()

from django.core.asgi import get_asgi_application


async def nodb(request: HttpRequest) -> HttpResponse:
    return HttpResponse("no database", content_type="text/plain")


async def write(request: HttpRequest) -> HttpResponse:
    return HttpResponse(await service.write(request.GET["name"]), status=201, content_type="text/plain")


async def reject(request: HttpRequest) -> HttpResponse:
    await service.add_item(request.GET["name"])
    raise BadRequest("rejected")


async def crash(request: HttpRequest) -> HttpResponse:
    await service.add_item(request.GET["name"])
    raise RuntimeError("the endpoint failed after writing")


async def duplicate(request: HttpRequest) -> HttpResponse:
    await service.add_item(request.GET["name"])
    return HttpResponse("saved?", status=201, content_type="text/plain")


async def stream(request: HttpRequest) -> StreamingHttpResponse:
    name = request.GET["name"]

    async def body() -> AsyncIterator[bytes]:
        yield b"start\n"
        await service.add_item(name)
        yield f"{await service.count_items()}\n".encode()

    return StreamingHttpResponse(body(), content_type="text/plain")


async def sleep(request: HttpRequest) -> HttpResponse:
    await service.sleep_in_database()
    return HttpResponse("slept", content_type="text/plain")


urlpatterns = [
    path("nodb", nodb),
    path("write", write),
    path("reject", reject),
    path("crash", crash),
    path("duplicate", duplicate),
    path("stream", stream),
    path("sleep", sleep),
]


def make_app(database: Database) -> DBSessionMiddleware:
    return DBSessionMiddleware(get_asgi_application(), database=database, commit_on_success=True)
