"""session_policy() and the route named in N+1 warnings, on each framework's own app (and a raw ASGI app).

Every app serves the same endpoints, written in its framework's way and wrapped by DBSessionMiddleware at the
ASGI level: ``/items/7`` runs three statements (over the warning's limit of two), ``/none`` is marked
``session=False``, ``/read`` ``read_only=True`` (``?write=1`` tries an INSERT), ``/add`` ``commit_on_success=True``
under a middleware that does not commit. The framework-agnostic checks are in ``check_app()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, cast

import django
import httpx
import pytest
from blacksheep import Application
from blacksheep import Request as BlackSheepRequest
from blacksheep.server.responses import text as text_response
from blacksheep.server.routing import Router
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import clear_url_caches, path
from django.views.decorators.csrf import csrf_exempt
from litestar import Litestar, get, post
from litestar import Request as LitestarRequest
from litestar.di import NamedDependency, Provide
from quart import Quart, request, websocket
from rodi import Container
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_db_session import (
    Database,
    DBSessionMiddleware,
    NoSessionError,
    current_session,
    session_policy,
    session_scope,
)
from asgi_db_session._routes import route_template
from asgi_db_session._types import AnyASGIApp, ASGIApp, Receive, Scope, Send

from .conftest import Backend, client
from .models import TABLE, Item

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("backend", ["postgresql"], indirect=True)]


# ---- what each endpoint does, whatever the framework ----------------------------------------------------


async def run_three_statements() -> str:
    for _ in range(3):
        await current_session().execute(select(1))
    return "3"


async def ask_for_a_session() -> str:
    try:
        current_session()
    except NoSessionError as exc:
        return str(exc)
    return "a session was handed out"


async def read_only_state(session: AsyncSession, write: bool) -> str:
    state = str(await session.scalar(text("SHOW transaction_read_only")))
    if write:
        try:
            await session.execute(text(f"INSERT INTO {TABLE} (id, name) VALUES (1, 'sneaked')"))
        except DBAPIError as exc:
            return f"{state}, refused: SQLSTATE {getattr(exc.orig, 'sqlstate', '?')}"
        return f"{state}, written"
    return state


def add_item(name: str) -> str:
    current_session().add(Item(id=1, name=name))
    return "added"


async def check_app(
    app: ASGIApp, backend: Backend, database: Database, caplog: pytest.LogCaptureFixture, *, route: str
) -> None:
    """The checks every framework passes; ``route``: what the N+1 warning names for ``/items/7``."""
    wrapped = DBSessionMiddleware(app, database=database, commit_on_success=False, warn_over_queries=2)
    with caplog.at_level(logging.WARNING, logger="asgi_db_session"):
        async with client(wrapped) as http:
            none = await http.get("/none")
            read = await http.get("/read")
            refused = await http.get("/read", params={"write": "1"})
            added = await http.post("/add")
            assert (await http.get("/items/7")).text == "3"
    assert "is marked session_policy(session=False)" in none.text, none.text
    assert "no_database" in none.text
    assert read.text == "on"
    assert refused.text == "on, refused: SQLSTATE 25006"  # read_only_sql_transaction
    assert added.status_code in (200, 201), added.text
    assert await backend.names() == ["kept"]  # committed by the route's own policy
    logged = [record.getMessage() for record in caplog.records]
    assert len(logged) == 1, logged
    assert f"GET {route} ran 3 statements" in logged[0]


# ---- raw ASGI: no router; the marked function is called ------------------------------------------------------


async def respond(send: Send, body: str, status: int = 200) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body.encode()})


@session_policy(session=False)
async def no_database(scope: Scope, receive: Receive, send: Send) -> None:
    await respond(send, await ask_for_a_session())


@session_policy(read_only=True)
async def raw_read(scope: Scope, receive: Receive, send: Send) -> None:
    await respond(send, await read_only_state(current_session(), b"write=1" in scope["query_string"]))


@session_policy(commit_on_success=True)
async def raw_add(scope: Scope, receive: Receive, send: Send) -> None:
    await respond(send, add_item("kept"), 201)


async def raw_items(scope: Scope, receive: Receive, send: Send) -> None:
    await respond(send, await run_three_statements())


RAW_ROUTES: dict[str, ASGIApp] = {"/none": no_database, "/read": raw_read, "/add": raw_add, "/items/7": raw_items}


async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
    await RAW_ROUTES[scope["path"]](scope, receive, send)


async def test_raw_asgi(backend: Backend, database: Database, caplog: pytest.LogCaptureFixture) -> None:
    # No router, no route template: the warning names the request's path.
    await check_app(raw_app, backend, database, caplog, route="/items/7")


@session_policy(commit_on_success=False)
async def raw_add_and_drop(scope: Scope, receive: Receive, send: Send) -> None:
    await raw_add(scope, receive, send)


async def test_the_endpoint_called_first_sets_the_policy(backend: Backend, database: Database) -> None:
    # raw_add_and_drop calls raw_add, marked commit_on_success=True: the request keeps the first one's policy.
    async with client(DBSessionMiddleware(raw_add_and_drop, database=database, commit_on_success=True)) as http:
        assert (await http.post("/")).status_code == 201
    assert await backend.names() == []


@session_policy(read_only=True)
async def read_only_app(scope: Scope, receive: Receive, send: Send) -> None:
    await respond(send, await read_only_state(current_session(), write=False))


async def test_raw_asgi_a_whole_app_can_be_marked(database: Database) -> None:
    async with client(DBSessionMiddleware(read_only_app, database=database)) as http:
        assert (await http.get("/")).text == "on"


# ---- Litestar: the scope holds the route handler and the path template ---------------------------------------


def litestar_app() -> ASGIApp:
    @get("/none")
    @session_policy(session=False)
    async def no_database() -> str:
        return await ask_for_a_session()

    @get("/read")
    @session_policy(read_only=True)
    async def read(request: LitestarRequest[Any, Any, Any]) -> str:
        return await read_only_state(current_session(), bool(request.query_params.get("write")))

    @session_policy(commit_on_success=True)  # above the route decorator: marks the handler object
    @post("/add")
    async def add() -> str:
        return add_item("kept")

    @get("/items/{item_id:int}")
    async def items() -> str:
        return await run_three_statements()

    async def provide_session() -> AsyncSession:
        return current_session()  # the session is created here, before the handler runs

    @get("/dependency", dependencies={"session": Provide(provide_session)})
    @session_policy(read_only=True)
    async def dependency(session: NamedDependency[AsyncSession]) -> str:
        return await read_only_state(session, write=False)

    # logging_config=None: with its default logging set-up the package's warning does not reach caplog.
    return cast(ASGIApp, Litestar([no_database, read, add, items, dependency], logging_config=None))


async def test_litestar(backend: Backend, database: Database, caplog: pytest.LogCaptureFixture) -> None:
    # The template without its parameter's type.
    await check_app(litestar_app(), backend, database, caplog, route="/items/{item_id}")


async def test_litestar_dependencies_follow_the_route(database: Database) -> None:
    async with client(DBSessionMiddleware(litestar_app(), database=database)) as http:
        assert (await http.get("/dependency")).text == "on"


# ---- Quart: the route is on its request, in Quart's own context ---------------------------------------------


def quart_app() -> ASGIApp:
    app = Quart(__name__)

    @app.get("/none")
    @session_policy(session=False)
    async def no_database() -> str:
        return await ask_for_a_session()

    @app.get("/read")
    @session_policy(read_only=True)
    async def read() -> str:
        return await read_only_state(current_session(), bool(request.args.get("write")))

    @app.post("/add")
    @session_policy(commit_on_success=True)
    async def add() -> str:
        return add_item("kept")

    @app.get("/items/<int:item_id>")
    async def items(item_id: int) -> str:
        return await run_three_statements()

    @session_policy(read_only=True)  # above the route decorator: Quart registered the function itself
    @app.get("/above")
    async def above() -> str:
        return await read_only_state(current_session(), write=False)

    @app.before_request
    async def open_early() -> None:
        if request.path in ("/early", "/missing"):
            current_session()  # created by a hook, before the endpoint runs (Quart has routed already)

    @app.get("/early")
    @session_policy(read_only=True)
    async def early() -> str:
        return await read_only_state(current_session(), write=False)

    return cast(ASGIApp, app)


async def test_quart(backend: Backend, database: Database, caplog: pytest.LogCaptureFixture) -> None:
    await check_app(quart_app(), backend, database, caplog, route="/items/<int:item_id>")


async def test_quart_reads_the_endpoint_from_its_own_context(database: Database) -> None:
    async with client(DBSessionMiddleware(quart_app(), database=database)) as http:
        assert (await http.get("/above")).text == "on"
        assert (await http.get("/early")).text == "on"
        # No rule matched: the hook's session gets the middleware's policy, and Quart answers 404.
        assert (await http.get("/missing")).status_code == 404


async def test_quart_websockets_take_the_marker_too(database: Database) -> None:
    app = Quart(__name__)

    @session_policy(session=False)  # above: read from Quart's websocket context, not through the wrapper
    @app.websocket("/ws")
    async def no_database() -> None:
        await websocket.send(await ask_for_a_session())

    # Quart's own way to add an ASGI middleware; its test client (httpx has no WebSocket) calls asgi_app.
    app.asgi_app = DBSessionMiddleware(cast(ASGIApp, app.asgi_app), database=database)  # type: ignore[method-assign,assignment]
    async with app.test_client().websocket("/ws") as connection:
        assert "no_database is marked session_policy(session=False)" in await connection.receive()


@session_policy(read_only=True)
async def marked_helper() -> str:
    return str(await current_session().scalar(text("SHOW transaction_read_only")))


async def test_a_marked_function_called_outside_a_request_changes_nothing(database: Database) -> None:
    async with session_scope():
        assert await marked_helper() == "off"


# ---- BlackSheep: the matched route is kept on neither the request nor the scope ----------------------------


def blacksheep_app(services: Callable[[Application], None] | None = None) -> ASGIApp:
    router = Router()

    @router.get("/none")
    @session_policy(session=False)
    async def no_database() -> Any:
        return text_response(await ask_for_a_session())

    @router.get("/read")
    @session_policy(read_only=True)
    async def read(request: BlackSheepRequest) -> Any:
        return text_response(await read_only_state(current_session(), bool(request.query.get("write"))))

    @router.post("/add")
    @session_policy(commit_on_success=True)
    async def add() -> Any:
        return text_response(add_item("kept"))

    @router.get("/items/{item_id}")
    async def items(item_id: int) -> Any:
        return text_response(await run_three_statements())

    app = Application(router=router)
    if services is not None:
        services(app)
    return app


async def test_blacksheep(backend: Backend, database: Database, caplog: pytest.LogCaptureFixture) -> None:
    # BlackSheep keeps the matched route's values on the request, not its pattern: the warning names the path.
    await check_app(blacksheep_app(), backend, database, caplog, route="/items/7")


class Repository:
    """A service BlackSheep's dependency injection builds for the handler, before calling it."""

    def __init__(self) -> None:
        self.session = current_session()


async def test_blacksheep_services_are_built_before_the_policy_is_known(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    def register(app: Application) -> None:
        cast(Container, app.services).add_transient(Repository)  # BlackSheep's default container

        @app.router.get("/service")
        @session_policy(read_only=True)
        async def service(repository: Repository) -> Any:
            return text_response(await read_only_state(repository.session, write=False))

    with caplog.at_level(logging.WARNING, logger="asgi_db_session"):
        async with client(DBSessionMiddleware(blacksheep_app(register), database=database)) as http:
            # The session was created by the service, under the middleware's policy: not read-only.
            assert (await http.get("/service")).text == "off"
    [warning] = [record.getMessage() for record in caplog.records]
    assert "service" in warning
    assert "read_only=True" in warning


# ---- Django: async views through its ASGI handler -----------------------------------------------------------


@pytest.fixture
def django_app() -> Iterator[AnyASGIApp]:
    if not settings.configured:
        settings.configure(ALLOWED_HOSTS=["testserver"], ROOT_URLCONF=__name__, MIDDLEWARE=[])
        django.setup()
    from django.core.handlers.asgi import ASGIHandler

    @session_policy(session=False)
    async def no_database(request: HttpRequest) -> HttpResponse:
        return HttpResponse(await ask_for_a_session())

    @session_policy(read_only=True)
    async def read(request: HttpRequest) -> HttpResponse:
        return HttpResponse(await read_only_state(current_session(), bool(request.GET.get("write"))))

    @session_policy(commit_on_success=True)
    async def add(request: HttpRequest) -> HttpResponse:
        return HttpResponse(add_item("kept"))

    async def items(request: HttpRequest, item_id: int) -> HttpResponse:
        return HttpResponse(await run_three_statements())

    @session_policy(session=False)
    def sync_no_database(request: HttpRequest) -> HttpResponse:
        # Django runs a sync view in a thread, with the request's context: the wrapper reaches the request.
        try:
            current_session()
        except NoSessionError as exc:
            return HttpResponse(str(exc))
        return HttpResponse("a session was handed out")

    urls = ModuleType("urls")
    urls.urlpatterns = [  # type: ignore[attr-defined]
        path("none", no_database),
        path("read", read),
        path("add", csrf_exempt(add)),
        path("items/<int:item_id>", items),
        path("sync-none", sync_no_database),
    ]
    saved = settings.ROOT_URLCONF
    settings.ROOT_URLCONF = urls
    clear_url_caches()
    try:
        yield ASGIHandler()
    finally:
        settings.ROOT_URLCONF = saved
        clear_url_caches()


async def test_django(
    django_app: AnyASGIApp, backend: Backend, database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    await check_app(django_app, backend, database, caplog, route="items/<int:item_id>")


async def test_django_routes_are_resolved_without_the_root_path(
    django_app: AnyASGIApp, database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    wrapped = DBSessionMiddleware(django_app, database=database, warn_over_queries=2)
    transport = httpx.ASGITransport(app=wrapped, root_path="/app")
    with caplog.at_level(logging.WARNING, logger="asgi_db_session"):
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            assert (await http.get("/app/items/7")).text == "3"
    [warning] = [record.getMessage() for record in caplog.records]
    assert "GET items/<int:item_id> ran 3 statements" in warning
    # A path Django does not resolve is named as it is.
    assert route_template({"type": "http", "path": "/nowhere", "root_path": ""}) == "/nowhere"


async def test_django_sync_views_take_the_marker_too(django_app: AnyASGIApp, database: Database) -> None:
    async with client(DBSessionMiddleware(django_app, database=database)) as http:
        assert "sync_no_database is marked session_policy(session=False)" in (await http.get("/sync-none")).text


# ---- Starlette: a session created before routing ------------------------------------------------------------


def created_before_routing(app: ASGIApp) -> ASGIApp:
    """A middleware inside DBSessionMiddleware that creates the request's session before the router runs."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        current_session()
        await app(scope, receive, send)

    return middleware


async def test_a_session_created_before_routing_still_follows_the_commit_policy(
    backend: Backend, database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    @session_policy(commit_on_success=True)
    async def add(request: StarletteRequest) -> Response:
        return PlainTextResponse(add_item("kept"))

    @session_policy(read_only=True)
    async def read(request: StarletteRequest) -> Response:
        return PlainTextResponse(await read_only_state(current_session(), write=False))

    app = created_before_routing(Starlette(routes=[Route("/add", add, methods=["POST"]), Route("/read", read)]))
    with caplog.at_level(logging.WARNING, logger="asgi_db_session"):
        async with client(DBSessionMiddleware(app, database=database)) as http:
            assert (await http.post("/add")).status_code == 200
            # Too late for a read-only transaction: the session was made read-write, and a warning says so.
            assert (await http.get("/read")).text == "off"
    assert await backend.names() == ["kept"]
    [warning] = [record.getMessage() for record in caplog.records]
    assert "read_only=True" in warning
    assert "created before the endpoint" in warning
