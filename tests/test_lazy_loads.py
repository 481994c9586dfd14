"""A lazy load outside ``await`` (MissingGreenlet): the error that escapes names the model and the attribute.

Real models with a lazy relationship, on PostgreSQL and SQLite: the endpoint or block touches an attribute
that was not loaded, SQLAlchemy raises MissingGreenlet (on SQLite wrapped in a StatementError), and the line the package
logs, and the note it adds to the error, name ``Author.books`` (or the column) and the fixes.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import ForeignKey, String, event, select
from sqlalchemy.exc import InvalidRequestError, MissingGreenlet, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, joinedload, mapped_column, relationship, selectinload
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_db_session import Database, DBSessionMiddleware, current_session, session_scope
from asgi_db_session._lazy_loads import lazy_load_message
from asgi_db_session.exceptions import LAZY_LOAD_OF_COLUMN, LAZY_LOAD_OF_RELATIONSHIP, LAZY_LOAD_UNNAMED

from .conftest import Backend, client
from .docs_code import DOCS, blocks_run_by

pytestmark = [
    pytest.mark.anyio,
    # The driver's coroutine that SQLAlchemy made before it found no greenlet is never awaited: its warning
    # is SQLAlchemy's, at garbage collection, and the very failure these tests provoke.
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]

SUFFIX = os.getpid()
GREENLET = "greenlet_spawn has not been called"
LAZY_LOADING_PAGE = DOCS / "how-to" / "lazy-loading.md"


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = f"adbs_authors_{SUFFIX}"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    books: Mapped[list[Book]] = relationship(back_populates="author")


class Book(Base):
    __tablename__ = f"adbs_books_{SUFFIX}"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100))
    author_id: Mapped[int] = mapped_column(ForeignKey(Author.id))
    author: Mapped[Author] = relationship(back_populates="books")


@pytest.fixture
async def library(backend: Backend) -> AsyncIterator[Database]:
    """A Database with one author and one book, the tables dropped at the end."""
    database = Database(backend.url)
    async with database.engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
        await connection.run_sync(Base.metadata.create_all)
    async with session_scope(commit=True) as session:
        session.add(Author(id=1, name="Le Guin", books=[Book(id=1, title="The Dispossessed")]))
    try:
        yield database
    finally:
        # The never-awaited driver coroutine is collected here, under this module's warning filters, rather
        # than at some later test's collection.
        gc.collect()
        async with database.engine.begin() as connection:
            await connection.run_sync(Base.metadata.drop_all)
        await database.dispose()


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "asgi_db_session"]


async def test_a_lazy_relationship_touched_in_an_endpoint_is_named_in_the_log(
    library: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async def titles(request: Request) -> Response:
        author = (await current_session().execute(select(Author))).scalar_one()
        return JSONResponse([book.title for book in author.books])

    async def loaded(request: Request) -> Response:
        query = select(Author).options(selectinload(Author.books))
        author = (await current_session().execute(query)).scalar_one()
        return JSONResponse([book.title for book in author.books])

    app = Starlette(routes=[Route("/titles", titles), Route("/loaded", loaded)])
    app.add_middleware(DBSessionMiddleware, database=library)
    async with client(app) as http:
        with caplog.at_level(logging.ERROR, logger="asgi_db_session"):
            with pytest.raises(SQLAlchemyError, match=GREENLET) as caught:
                await http.get("/titles")
            assert (await http.get("/loaded")).json() == ["The Dispossessed"]

    expected = LAZY_LOAD_OF_RELATIONSHIP.format(target=f"{Author.__name__}.books", attribute="books")
    assert lines(caplog) == [f"GET /titles: {expected}"]
    for advice in ("selectinload(Author.books)", "awaitable_attrs.books", 'lazy="raise"'):
        assert advice in expected
    # The server's traceback shows it too.
    assert caught.value.__notes__ == [expected]


async def test_a_lazy_relationship_touched_in_a_session_scope_is_named_once(
    library: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async def touch_the_author() -> None:
        async with session_scope() as outer, session_scope():
            book = (await outer.execute(select(Book))).scalar_one()
            book.author  # noqa: B018 - the lazy load under test

    caplog.set_level(logging.ERROR, logger="asgi_db_session")
    with pytest.raises(SQLAlchemyError, match=GREENLET) as caught:
        await touch_the_author()

    expected = LAZY_LOAD_OF_RELATIONSHIP.format(target="Book.author", attribute="author")
    # The inner block logs it; the outer one sees the note and stays silent.
    assert lines(caplog) == [f"session_scope('default'): {expected}"]
    assert caught.value.__notes__ == [expected]


async def test_an_expired_column_read_outside_await_is_named_with_its_own_fix(
    library: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async def read_after_commit() -> None:
        async with session_scope(session_options={"expire_on_commit": True}) as session:
            author = (await session.execute(select(Author))).scalar_one()
            await session.commit()
            author.name  # noqa: B018 - expired by the commit: a lazy load

    with caplog.at_level(logging.ERROR, logger="asgi_db_session"), pytest.raises(SQLAlchemyError, match=GREENLET):
        await read_after_commit()

    expected = LAZY_LOAD_OF_COLUMN.format(target="Author.name", attribute="name")
    assert lines(caplog) == [f"session_scope('default'): {expected}"]
    assert "session.refresh(obj)" in expected


async def test_other_errors_get_no_such_line(library: Database, caplog: pytest.LogCaptureFixture) -> None:
    async def divide() -> None:
        async with session_scope() as session:
            author = (await session.execute(select(Author))).scalar_one()
            author.id // 0

    with caplog.at_level(logging.ERROR, logger="asgi_db_session"), pytest.raises(ZeroDivisionError):
        await divide()

    assert lines(caplog) == []


def test_a_missing_greenlet_without_the_loader_in_its_traceback_gets_the_general_advice() -> None:
    assert lazy_load_message(RuntimeError("wrapped")) is None
    error = RuntimeError("wrapped")
    error.__cause__ = MissingGreenlet("greenlet_spawn has not been called")
    assert lazy_load_message(error) == LAZY_LOAD_UNNAMED
    # From a task group (anyio, asyncio.TaskGroup): found among the group's errors.
    group = ExceptionGroup("tasks", [ValueError("other"), MissingGreenlet("greenlet_spawn has not been called")])
    assert lazy_load_message(group) == LAZY_LOAD_UNNAMED


async def test_the_docs_conftest_makes_lazy_loads_raise(library: Database) -> None:
    (block,) = blocks_run_by(
        LAZY_LOADING_PAGE, "tests/test_lazy_loads.py::test_the_docs_conftest_makes_lazy_loads_raise"
    )
    namespace: dict[str, Any] = {}
    exec(compile(block.code, block.where, "exec"), namespace)
    listener = namespace["raise_on_lazy_loads"]
    event.listen(Session, "do_orm_execute", listener)
    try:
        async with session_scope() as session:
            author = (await session.execute(select(Author))).scalar_one()
            with pytest.raises(InvalidRequestError, match="'Author.books' is not available due to lazy='raise'"):
                author.books  # noqa: B018 - the lazy load the recipe makes raise
        async with session_scope() as session:
            query = select(Author).options(selectinload(Author.books))
            author = (await session.execute(query)).scalar_one()
            assert [book.title for book in author.books] == ["The Dispossessed"]
            book = (await session.execute(select(Book).options(joinedload(Book.author)))).scalar_one()
            assert book.author.name == "Le Guin"
    finally:
        event.remove(Session, "do_orm_execute", listener)
