"""The sync session class of each kind of database: one class over Session, whatever it adds to it.

Every attribute lookup that misses CPython's type attribute cache searches each class of the MRO, and SQLAlchemy's
Session makes many at every statement: a mixin per feature cost some 25k instructions a request on ``/ten``
(benchmarks/README.md, "One sync session class"). No connection is made: a session connects at its first statement.
"""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from asgi_db_session import Database, DatabaseSettings, GuardedSession, session_scope
from asgi_db_session._session import HookSession, holds_hooks

PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
REPLICA = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"

pytestmark = pytest.mark.anyio


class OwnSyncSession(HookSession):
    """An app's own sync session class: kept under what the package adds."""


class OwnSession(GuardedSession):
    sync_session_class = OwnSyncSession


async def sync_class(database: Database) -> type[Session]:
    try:
        async with session_scope(database.name) as session:
            return type(session.sync_session)
    finally:
        await database.dispose()


@pytest.mark.parametrize(
    ("url", "check", "replicas", "name", "tracks"),
    [
        # Not asyncpg: no outcome to learn, no write to track without replicas.
        ("sqlite+aiosqlite:///:memory:", True, False, "HookSession", False),
        (PG, True, False, "OutcomeLearningWriteTrackingSession", True),
        (PG, True, True, "OutcomeLearningWriteTrackingSession", True),
        (PG, False, False, "LostCommitNotingSession", False),
        (PG, False, True, "LostCommitNotingWriteTrackingSession", True),
    ],
)
async def test_each_kind_of_database_has_one_sync_session_class_over_session(
    url: str, check: bool, replicas: bool, name: str, tracks: bool
) -> None:
    settings = DatabaseSettings(url=url, commit_outcome_check=check, replica_urls=[REPLICA] if replicas else [])
    made = await sync_class(Database(settings=settings, name=f"{name}-{check}-{replicas}"))
    assert (made.__name__, made.__mro__[1]) == (name, Session)
    assert holds_hooks(made)
    assert getattr(made, "_tracks_writes", False) is tracks


async def test_an_apps_own_sync_session_class_stays_right_under_what_the_package_adds() -> None:
    settings = DatabaseSettings(url=PG)
    made = await sync_class(Database(settings=settings, name="own", session_options={"class_": OwnSession}))
    assert (made.__name__, made.__mro__[1]) == ("OutcomeLearningWriteTrackingOwnSyncSession", OwnSyncSession)
    assert holds_hooks(made)
