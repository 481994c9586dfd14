"""The notes table: the one definition the demos (and examples/alembic) use."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import Connection, DateTime, String, Text, UniqueConstraint, inspect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TITLE_MAX_LENGTH = 200
# The id column is an INTEGER: 32 bits on PostgreSQL, where a larger value in a query is an error, not a miss.
NOTE_ID_MAX = 2**31 - 1

NO_UNIQUE_TITLE = (
    "The notes table in {url} has no unique constraint on title, so the demo's 409 for a repeated title cannot "
    "happen: it was made by an older version of the demo. Drop the table (for SQLite: delete the file) and start "
    "the demo again; it creates the table anew."
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """``moment`` with its UTC offset: SQLite stores none, and the demos write UTC only."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    # Two notes with one title are a conflict: the second INSERT fails and the middleware answers 409.
    __table_args__ = (UniqueConstraint("title", name="notes_title_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(TITLE_MAX_LENGTH))
    body: Mapped[str] = mapped_column(Text, default="")
    # A Python-side default rather than a server default: the value is on the object right after the flush,
    # so nothing has to refresh it (a lazy load is an error under AsyncSession).
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def create_tables(connection: Connection) -> None:
    """Create the notes table where it is missing, and refuse one made without the unique title (by an
    earlier version of the demo, say): on it the same title twice would be saved twice instead of a 409."""
    Base.metadata.create_all(connection)
    inspector = inspect(connection)
    unique: list[Sequence[str | None]] = [
        constraint["column_names"] for constraint in inspector.get_unique_constraints(Note.__tablename__)
    ]
    unique += [index["column_names"] for index in inspector.get_indexes(Note.__tablename__) if index["unique"]]
    if not any(list(columns) == ["title"] for columns in unique):
        raise RuntimeError(NO_UNIQUE_TITLE.format(url=connection.engine.url.render_as_string()))
