"""The ORM model the tests write through: one table of named items."""

from __future__ import annotations

import os

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# One table per test run, so that two runs against the same server (two checkouts, a CI run beside a
# developer's) do not truncate each other's rows.
TABLE = f"adbs_items_{os.getpid()}"


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
