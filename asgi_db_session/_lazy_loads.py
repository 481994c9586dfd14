"""Name the attribute behind a MissingGreenlet: the lazy load that an AsyncSession cannot run on attribute access.

Touching an unloaded relationship (or a column that a commit or ``expire()`` expired) outside ``await`` makes
SQLAlchemy try to run a query synchronously, which fails deep in the driver as ``MissingGreenlet:
greenlet_spawn has not been called``, wrapped in a StatementError whose text names neither the model nor the
attribute. The traceback still holds them: SQLAlchemy's attribute loader runs with the instance's
``InstanceState`` as the local ``state`` and the attribute's name as ``key`` (``AttributeImpl.get`` and
``_fire_loader_callables``, in SQLAlchemy 2.0 and 2.1 alike). Only ever read on an error path.
"""

from __future__ import annotations

import logging
from types import TracebackType

from sqlalchemy.exc import MissingGreenlet
from sqlalchemy.orm import InstanceState

from .exceptions import LAZY_LOAD_OF_COLUMN, LAZY_LOAD_OF_RELATIONSHIP, LAZY_LOAD_UNNAMED

__all__ = [
    "lazy_load_message",
    "log_lazy_load",
]

_logger = logging.getLogger("asgi_db_session")


def _chain(error: BaseException) -> list[BaseException]:
    """The error, its causes and contexts, the driver errors SQLAlchemy wraps (``.orig``) and group members."""
    seen: list[BaseException] = []
    pending = [error]
    while pending:
        each = pending.pop()
        if any(each is known for known in seen):
            continue
        seen.append(each)
        linked = [getattr(each, "orig", None), each.__cause__, each.__context__]
        if isinstance(each, BaseExceptionGroup):
            linked.extend(each.exceptions)
        pending.extend(item for item in linked if isinstance(item, BaseException))
    return seen


def _loaded_attribute(traceback: TracebackType | None) -> tuple[InstanceState[object], str] | None:
    """The instance state and attribute name of the outermost attribute load in ``traceback``."""
    while traceback is not None:
        local = traceback.tb_frame.f_locals
        state, key = local.get("state"), local.get("key")
        if isinstance(state, InstanceState) and isinstance(key, str):
            return state, key
        traceback = traceback.tb_next
    return None


def lazy_load_message(error: BaseException) -> str | None:
    """What to tell about ``error`` when a MissingGreenlet is in its chain: which attribute, and the fixes."""
    chain = _chain(error)
    if not any(isinstance(each, MissingGreenlet) for each in chain):
        return None
    for each in chain:
        found = _loaded_attribute(each.__traceback__)
        if found is not None:
            state, key = found
            model = state.class_.__name__
            message = LAZY_LOAD_OF_RELATIONSHIP if key in state.mapper.relationships else LAZY_LOAD_OF_COLUMN
            return message.format(target=f"{model}.{key}", attribute=key)
    return LAZY_LOAD_UNNAMED


def log_lazy_load(error: BaseException, where: str) -> None:
    """Log one error line naming the lazily loaded attribute when ``error`` comes from one, and add it to the
    error as a note, so that the traceback a server prints says it too.

    Once per error: a session_scope() block inside a request sees it first, the middleware then finds the note.
    """
    message = lazy_load_message(error)
    if message is not None and message not in getattr(error, "__notes__", ()):
        error.add_note(message)
        _logger.error("%s: %s", where, message)
