"""SQLAlchemy's own transaction idiom on the package's session: ``async with session.begin():`` and the
``get_transaction()`` / ``get_nested_transaction()`` accessors, under the guard, with on_commit callbacks run
only for a transaction that committed. Rows are read through a second connection (Backend)."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction

from asgi_db_session import Database, current_session, on_commit, session_scope

from .conftest import Backend
from .models import Item

pytestmark = pytest.mark.anyio


async def test_the_transaction_accessors_give_the_guarded_transactions(database: Database) -> None:
    async with session_scope(database.name):
        session = current_session(database.name)
        assert session.get_transaction() is None
        assert session.get_nested_transaction() is None
        async with session.begin() as outer:
            transaction = session.get_transaction()
            assert isinstance(transaction, AsyncSessionTransaction)
            assert transaction is outer
            assert session.get_nested_transaction() is None
            async with session.begin_nested() as savepoint:
                assert session.get_nested_transaction() is savepoint
                assert session.get_transaction() is outer


async def failing_block(session: AsyncSession, ran: list[int], name: str) -> None:
    async with session.begin():
        session.add(Item(id=1, name="lost"))
        on_commit(lambda: ran.append(1), name)
        await session.flush()
        raise LookupError("the block failed")


async def test_a_begin_block_left_by_an_exception_rolls_back_and_runs_no_callback(
    backend: Backend, database: Database
) -> None:
    ran: list[int] = []
    async with session_scope(database.name):
        session = current_session(database.name)
        with pytest.raises(LookupError):
            await failing_block(session, ran, database.name)
        assert not session.in_transaction()
        async with session.begin():
            session.add(Item(id=2, name="kept"))
            on_commit(lambda: ran.append(2), database.name)
    assert await backend.names() == ["kept"]
    assert ran == [2]
