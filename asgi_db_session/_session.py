"""The package's session classes, and their commit and close that a cancellation cannot stop halfway.

- ``GuardedSession`` (the AsyncSession): refuses an operation from a second task while another task's runs,
  with ConcurrentSessionUseError, before it touches the session. SQLAlchemy detects overlapping operations
  only part of the time and then in its own terms ("This session is provisioning a new connection", asyncpg's
  "another operation is in progress"); worse, the scope's cleanup can then fail the same way and never return
  the connection. The first operation finishes undisturbed; close() waits for it. Every guarded method is one
  coroutine of its own (made by ``_guard`` below) that checks and sets the busy task and awaits AsyncSession's
  method directly: a query pays one extra coroutine frame, not two.
- ``HookSession`` (its sync Session): holds the ``on_commit()`` hooks. Its transaction events sort them: a
  commit makes them due, the end of the transaction without one drops them, and the rollback of a savepoint
  drops what was registered inside it. Due hooks run after the commit has returned, outside the commit's
  cancellation shield; each hook carries its own runner (commit_hooks.py), which this module only calls.
- ``sync_session_class()``: the sync Session class of one engine, which may add to the hooks
  - write tracking (databases with replicas, and the outcome check): notes when the session has written, so
    that a request that wrote reads its own write from the primary (see ScopeState.after_write), and a COMMIT
    reads the transaction's id only after a write;
  - outcome learning (PostgreSQL databases on asyncpg): reads the transaction's id just before COMMIT when it
    wrote, and notes it when COMMIT fails in a way that leaves its outcome open (a lost connection);
    ``GuardedSession.commit()`` then learns the outcome (_commit_outcome.py) and answers it: returns if the
    transaction committed (its on_commit callbacks become due), re-raises the error if it did not, raises
    CommitOutcomeUnknownError if it could not be learned; with the check off, only notes such a COMMIT.
- ``bound_statements()``: a session whose transactions each start with ``SET LOCAL statement_timeout``
  (``session_policy(statement_timeout=...)``, ``session_scope(statement_timeout=...)``).
- ``finish()`` and ``commit()``: a scope's commit and close, run through ``_shield.shielded`` so that a
  cancellation cannot stop either halfway.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

from sqlalchemy import Connection, TextClause, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction
from sqlalchemy.orm import Session, SessionTransaction

from ._commit_outcome import CommitOutcomeReader, LostCommit, answer_may_be_lost
from ._shield import shielded, shielded_starting_now
from ._tracing import CLEANUP_OUTCOME, note_outcome_check
from .exceptions import (
    CLEANUP_FAILED,
    CLEANUP_TIMED_OUT,
    COMMIT_LEARNED_ABORTED,
    COMMIT_LEARNED_COMMITTED,
    COMMIT_OUTCOME_NOT_ASKED,
    COMMIT_OUTCOME_UNKNOWN,
    CONCURRENT_USE,
    CommitOutcomeUnknownError,
    ConcurrentSessionUseError,
)

if TYPE_CHECKING:
    from ._tracing import Spans

logger = logging.getLogger("asgi_db_session")

# Set while the package commits a session inside its cancellation shield: the commit's own task must not run
# the hooks (a slow one could not be cancelled there); the code that awaited the shield runs them after.
hooks_deferred: ContextVar[bool] = ContextVar("asgi_db_session.hooks_deferred", default=False)


@dataclass(frozen=True, slots=True)
class Hook:
    """One on_commit() callback, as its runner: a coroutine function that runs it (in a scope of its own)."""

    run: Callable[[], Awaitable[None]]
    # The innermost transaction open when the hook was registered (None: none was): a rollback of it, or of
    # a savepoint around it, means the hook's data was not saved.
    transaction: SessionTransaction | None


class HookSession(Session):
    """The sync Session behind the package's sessions: the one whose transaction events move hooks along.

    The hooks live in attributes of its own rather than in ``info``: ``info`` is made on first access, and
    reading it at every transaction's end would make one dict per request that registers no hook.
    """

    # What on_commit() looks for: sync_session_class() copies the hooks into classes that do not derive from this.
    _holds_hooks: ClassVar[bool] = True
    # Hooks waiting for the transaction to end, and hooks whose commit happened.
    _hooks_waiting: list[Hook] | None = None
    _hooks_due: list[Hook] | None = None

    def _hold_until_commit(self, run: Callable[[], Awaitable[None]]) -> None:
        """Keep ``run`` until the current transaction ends: due if it commits, dropped otherwise."""
        hook = Hook(run, self.get_nested_transaction() or self.get_transaction())
        self._hooks_waiting = [*(self._hooks_waiting or ()), hook]


def holds_hooks(sync_class: type) -> bool:
    """Whether sessions of ``sync_class`` keep on_commit() callbacks (HookSession, and sync_session_class()'s)."""
    return getattr(sync_class, "_holds_hooks", False) is True


def _commit_made_hooks_due(session: HookSession) -> None:
    waiting = session._hooks_waiting
    # SQLAlchemy sends after_commit for a savepoint's release too (it is then still the session's current
    # transaction): nothing is saved until the outermost transaction commits.
    if waiting and not session.in_nested_transaction():
        session._hooks_waiting = None
        session._hooks_due = [*(session._hooks_due or ()), *waiting]


def _savepoint_rollback_dropped_hooks(session: HookSession, previous_transaction: SessionTransaction) -> None:
    waiting = session._hooks_waiting
    if not waiting or not previous_transaction.nested:
        return  # the outermost transaction's end is handled below

    def inside_rolled_back(hook: Hook) -> bool:
        transaction = hook.transaction
        while transaction is not None:
            if transaction is previous_transaction:
                return True
            transaction = transaction.parent
        return False

    waiting[:] = [hook for hook in waiting if not inside_rolled_back(hook)]


def _uncommitted_end_dropped_hooks(session: HookSession, transaction: SessionTransaction) -> None:
    # A commit has moved its hooks on (after_commit comes first): what still waits when the outermost
    # transaction ends was rolled back, or closed without a commit.
    if session._hooks_waiting is not None and transaction.parent is None and not transaction.nested:
        session._hooks_waiting = None


def _listen_for_hooks(sync_class: type[Session]) -> None:
    event.listen(sync_class, "after_commit", _commit_made_hooks_due)
    event.listen(sync_class, "after_soft_rollback", _savepoint_rollback_dropped_hooks)
    event.listen(sync_class, "after_transaction_end", _uncommitted_end_dropped_hooks)


_listen_for_hooks(HookSession)


def has_due_hooks(session: AsyncSession) -> bool:
    """Whether a commit of ``session`` left callbacks to run: a cheap check for the commit paths."""
    return bool(getattr(session.sync_session, "_hooks_due", None))


async def run_due_hooks(session: AsyncSession) -> None:
    """Run the callbacks that the last commit of ``session`` made due, in order, each through its own runner."""
    sync_session = cast(HookSession, session.sync_session)  # has_due_hooks() said so
    due, sync_session._hooks_due = sync_session._hooks_due or [], None
    for hook in due:
        await hook.run()


def _noting_writes(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (Session.execute(), scalar() or scalars()), first noting a statement that may write: ``_wrote``
    stays set for the session's life (a later read must see the primary), ``_wrote_since_commit`` until the
    outcome learning's commit.

    The statements are seen there (the async session's calls all end in one of the three), not by a
    ``do_orm_execute`` listener: any such listener makes SQLAlchemy prepare every ORM statement twice, which
    cost a read more than the rest of the session's bookkeeping.
    """

    def noting(self: Any, statement: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._wrote_since_commit and _writes(statement):
            self._wrote = self._wrote_since_commit = True
        return method(self, statement, *args, **kwargs)

    return noting


def _flushed(session: Any, flush_context: Any) -> None:
    session._wrote = session._wrote_since_commit = True


def _writes(statement: Any) -> bool:
    """Whether ``statement`` may write: anything but a SELECT, or raw SQL that starts as a plain read (the
    primary is the safe side)."""
    if getattr(statement, "is_select", False):
        return False
    return not (isinstance(statement, TextClause) and statement.text.lstrip()[:6].upper() in _READ_PREFIXES)


_READ_PREFIXES = frozenset({"SELECT", "SHOW"})


def bound_statements(session: AsyncSession, milliseconds: int) -> None:
    """Have PostgreSQL cancel any statement of ``session`` that runs longer than ``milliseconds``, from its next
    transaction on.

    ``SET LOCAL`` at the start of each transaction, not ``SET``: the setting ends with the transaction, so it
    never reaches the next user of the connection, whether that is the pool's next checkout or, behind PgBouncer
    in transaction mode, another client's transaction on the same server connection, and it holds there because
    the whole transaction runs on one server connection. A listener on this session only: sessions without a
    bound run no event for it. Other databases than PostgreSQL have no statement_timeout: nothing is sent.
    """
    event.listen(session.sync_session, "after_begin", _setting_timeout(milliseconds))


@functools.cache
def _setting_timeout(milliseconds: int) -> Callable[[Session, SessionTransaction, Connection], None]:
    statement = f"SET LOCAL statement_timeout = {milliseconds}"

    def set_timeout(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
        # A savepoint runs inside the transaction that has it already.
        if not transaction.nested and connection.dialect.name == "postgresql":
            connection.exec_driver_sql(statement)

    return set_timeout


def _lost_at_commit(error: sa_exc.DBAPIError | TimeoutError) -> bool:
    if isinstance(error, TimeoutError):
        # DATABASE_COMMAND_TIMEOUT ended the wait for COMMIT's answer (asyncpg's TimeoutError, which SQLAlchemy
        # passes on unwrapped): the server may have committed all the same.
        return True
    # SQLAlchemy's error names no statement when the COMMIT itself failed (a flush's INSERT is named): only
    # then can the server have committed.
    return error.statement is None and answer_may_be_lost(error)


def _noting_lost_commits(commit: Callable[[Any], None], reader: CommitOutcomeReader) -> Callable[[Any], None]:
    """``commit`` (Session.commit()), noting a COMMIT whose answer was lost, with the check off: GuardedSession's
    commit() then reports it as of unknown outcome. It needs no write tracking (that costs at every statement):
    any lost COMMIT answer is unknown then, even a read-only transaction's."""

    def noting(self: Any) -> None:
        try:
            commit(self)
        except (sa_exc.DBAPIError, TimeoutError) as error:
            if _lost_at_commit(error):
                self._lost_commit = LostCommit(reader, None, None)
            raise

    return noting


def _learning_outcomes(commit: Callable[[Any], None], reader: CommitOutcomeReader) -> Callable[[Any], None]:
    """``commit`` (Session.commit()), reading the transaction's id (and its server's start) before COMMIT when
    it wrote, and noting it when COMMIT fails leaving the outcome open; GuardedSession's commit() learns it."""

    def learning(self: Any) -> None:
        # What commit() flushes first, flushed here: the transaction's id exists once it has written.
        self.flush()
        if not self._wrote_since_commit:
            commit(self)  # nothing written since the last commit: no id, no data a lost answer could hide
            return
        self._wrote_since_commit = False
        transaction = reader.transaction(self)
        if transaction is None:
            commit(self)
            return
        try:
            commit(self)
        except (sa_exc.DBAPIError, TimeoutError) as error:
            if _lost_at_commit(error):
                self._lost_commit = LostCommit.of(reader, transaction)
            raise

    return learning


def sync_session_class(
    base: type[Session], *, tracking: bool, reader: CommitOutcomeReader | None = None
) -> type[Session]:
    """``base`` (HookSession, or an app's own sync session class), noting its writes (``tracking``), and
    learning (or, with the check off, noting) the outcome of a lost COMMIT through ``reader``: one class per
    engine, one level over ``base``, or over Session when ``base`` is HookSession, whose hooks it then holds.

    One level, not a mixin per feature: every attribute lookup that misses CPython's type attribute cache
    searches each class of the MRO, and SQLAlchemy's Session looks up many at every statement
    (benchmarks/README.md, "One sync session class").
    """
    namespace: dict[str, Any] = {"__module__": __name__}
    name = "Session" if base is HookSession else base.__name__
    hooks_here = base is HookSession
    if hooks_here:
        namespace.update({key: value for key, value in vars(HookSession).items() if not key.startswith("__")})
        base = Session
    # The outcome learning reads the id only after a write: it needs the tracking.
    tracking = (tracking or (reader is not None and reader.check)) and not getattr(base, "_tracks_writes", False)
    if tracking:
        namespace["_tracks_writes"] = True
        namespace["_wrote"] = namespace["_wrote_since_commit"] = False
        for method in ("execute", "scalar", "scalars"):
            namespace[method] = _noting_writes(getattr(base, method))
        name = f"WriteTracking{name}"
    if reader is not None:
        namespace["_lost_commit"] = None
        if reader.check:
            namespace["commit"] = _learning_outcomes(base.commit, reader)
            name = f"OutcomeLearning{name}"
        else:
            namespace["commit"] = _noting_lost_commits(base.commit, reader)
            name = f"LostCommitNoting{name}"
    made = cast("type[Session]", type(name, (base,), namespace))
    if hooks_here:
        _listen_for_hooks(made)
    if tracking:
        event.listen(made, "after_flush", _flushed)
    return made


# How long close() waits for another task's operation on the session before giving up with an error.
CLOSE_WAIT_SECONDS = 30.0

_AsyncMethod = Callable[..., Coroutine[Any, Any, Any]]

# C from Python 3.12 on; a short Python function before.
_current_task = asyncio.current_task

# Every AsyncSession method that runs something on the sync Session (close() and commit() add to the guard).
_GUARDED_METHODS = (
    "connection",
    "delete",
    "delete_all",
    "execute",
    "flush",
    "get",
    "get_one",
    "invalidate",
    "merge",
    "merge_all",
    "refresh",
    "reset",
    "rollback",
    "run_sync",
    "scalar",
    "scalars",
    "stream",
    "stream_scalars",
)


class GuardedSession(AsyncSession):
    """The AsyncSession class of every session the package makes, unless ``session_options`` names another.

    On top of AsyncSession it refuses an operation from a second task while another task's runs (with
    ConcurrentSessionUseError, instead of SQLAlchemy's errors or a stuck connection), lets ``close()`` wait for
    that operation, and runs the ``on_commit()`` callbacks after a commit: ``commit()``, the end of
    ``async with session.begin():``, or the package's own commit. A session class of your own
    (``session_options={"class_": MySession}``) must derive from it for ``on_commit()``, the guard and
    read-your-writes with replicas to keep working.
    """

    sync_session_class = HookSession

    _busy_task: asyncio.Task[Any] | None = None
    # Set (to a future) by a close() that waits for another task's operation; that operation completes it.
    _idle: asyncio.Future[None] | None = None

    async def _wait_idle(self) -> None:
        """Wait until no other task runs an operation on this session (at most CLOSE_WAIT_SECONDS).

        asyncio.wait() rather than wait_for(): from Python 3.12 on, wait_for() times out by cancelling the
        task it runs in, which the cleanup's shield (_shield.shielded) would take for a cancellation from outside.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_WAIT_SECONDS
        while self._busy_task is not None and self._busy_task is not _current_task():
            idle = self._idle
            if idle is None:
                idle = self._idle = loop.create_future()
            done, _ = await asyncio.wait((idle,), timeout=max(0.0, deadline - loop.time()))
            if not done:
                raise ConcurrentSessionUseError(CONCURRENT_USE.format(method="close"))

    async def close(self) -> None:
        """Wait until no other task is running an operation on this session, then close it."""
        if self._busy_task is not None:
            await self._wait_idle()
        await _guarded_close(self)

    async def commit(self) -> None:
        """Commit, then run the on_commit callbacks that the commit made due.

        On PostgreSQL, when the connection dies after COMMIT was sent, the outcome is learned before this
        returns: it returns if the transaction committed, re-raises the error if it did not, and raises
        CommitOutcomeUnknownError if the server could not tell in time (see _commit_outcome.py).
        """
        try:
            await _guarded_commit(self)
        except Exception as error:
            sync_session = self.sync_session
            lost: LostCommit | None = getattr(sync_session, "_lost_commit", None)
            if lost is None:
                raise
            sync_session._lost_commit = None  # type: ignore[attr-defined]  # a class of sync_session_class()
            if not await _committed_after_all(self, lost, error):
                raise
        if has_due_hooks(self) and not hooks_deferred.get():
            await run_due_hooks(self)

    # SQLAlchemy's own idiom, ``async with session.begin():``, commits through the transaction object, not
    # commit(): its begin, commit and rollback are guarded too, and its commit runs the due callbacks.
    def begin(self) -> AsyncSessionTransaction:
        """A transaction that commits at the end of ``async with``; then the on_commit callbacks run."""
        return _GuardedTransaction(self)

    def begin_nested(self) -> AsyncSessionTransaction:
        """A savepoint; its release is no commit: on_commit callbacks wait for the outermost transaction's."""
        return _GuardedTransaction(self, nested=True)

    def get_transaction(self) -> AsyncSessionTransaction | None:
        transaction = self.sync_session.get_transaction()
        if transaction is None:
            return None
        return _GuardedTransaction._retrieve_proxy_for_target(transaction, async_session=self)

    def get_nested_transaction(self) -> AsyncSessionTransaction | None:
        transaction = self.sync_session.get_nested_transaction()
        if transaction is None:
            return None
        return _GuardedTransaction._retrieve_proxy_for_target(transaction, async_session=self)


async def _committed_after_all(session: GuardedSession, lost: LostCommit, error: Exception) -> bool:
    """After a COMMIT whose answer was lost: True if the server says it committed, False if it did not;
    CommitOutcomeUnknownError (from ``error``) if that cannot be learned."""
    xid, started = lost.transaction_id, lost.server_started
    if xid is None or started is None:
        message = COMMIT_OUTCOME_NOT_ASKED
        logger.error(message)
        note_outcome_check("off", None)
        raise CommitOutcomeUnknownError(message, None) from error
    outcome, reason = await lost.reader.outcome(xid, started)
    note_outcome_check(outcome or "unknown", xid)
    if outcome == "aborted":
        logger.warning(COMMIT_LEARNED_ABORTED.format(xid=xid))
        return False
    sync_session = cast(HookSession, session.sync_session)
    if outcome is None:
        message = COMMIT_OUTCOME_UNKNOWN.format(xid=xid, reason=reason)
        logger.error(message)
        raise CommitOutcomeUnknownError(message, xid) from error
    logger.warning(COMMIT_LEARNED_COMMITTED.format(xid=xid))
    # The commit happened, but SQLAlchemy saw it fail: its after_commit never came, so the callbacks are made
    # due here, before the rollback below (which ends the failed transaction on its dead connection) drops them.
    waiting, sync_session._hooks_waiting = sync_session._hooks_waiting, None
    if waiting:
        sync_session._hooks_due = [*(sync_session._hooks_due or ()), *waiting]
    try:
        await session.rollback()
    except Exception:  # the connection is dead already; close() discards it
        logger.debug("ending the committed transaction's session state failed", exc_info=True)
    return True


class _GuardedTransaction(AsyncSessionTransaction):
    """A GuardedSession's transaction: begun, committed and rolled back under the session's guard."""

    __slots__ = ()

    session: GuardedSession

    async def start(self, is_ctxmanager: bool = False) -> AsyncSessionTransaction:
        await (_guarded_begin_nested if self.nested else _guarded_begin)(self.session, self, is_ctxmanager)
        return self

    async def commit(self) -> None:
        await _guarded_transaction_commit(self.session, self)
        await _run_due_hooks(self.session)

    async def rollback(self) -> None:
        await _guarded_transaction_rollback(self.session, self)

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        if type_ is not None:
            await _guarded_exit_rollback(self.session, self, type_, value, traceback)
            return
        await _guarded_exit_commit(self.session, self, type_, value, traceback)
        await _run_due_hooks(self.session)


async def _run_due_hooks(session: GuardedSession) -> None:
    # Due only after the outermost transaction committed: a savepoint's release makes none due.
    if has_due_hooks(session) and not hooks_deferred.get():
        await run_due_hooks(session)


def _guard(method: _AsyncMethod) -> _AsyncMethod:
    """``method`` of AsyncSession, refusing a second task while one runs an operation on the session."""
    name = method.__name__

    @functools.wraps(method)
    async def guarded(self: GuardedSession, *args: Any, **kwargs: Any) -> Any:
        task = _current_task()
        busy = self._busy_task
        if busy is None:
            self._busy_task = task
            try:
                return await method(self, *args, **kwargs)
            finally:
                self._busy_task = None
                idle = self._idle
                if idle is not None:
                    self._idle = None
                    if not idle.done():
                        idle.set_result(None)
        if busy is task:  # the same task, one level down (scalars() runs execute(), say)
            return await method(self, *args, **kwargs)
        raise ConcurrentSessionUseError(CONCURRENT_USE.format(method=name))

    return guarded


def _transaction_step(name: str, step: _AsyncMethod) -> _AsyncMethod:
    """``step`` of AsyncSessionTransaction, under the guard of its session; ``name`` is what the error says."""

    async def run(session: GuardedSession, transaction: AsyncSessionTransaction, *args: Any) -> Any:
        return await step(transaction, *args)

    run.__name__ = name
    return _guard(run)


_guarded_close = _guard(AsyncSession.close)
_guarded_commit = _guard(AsyncSession.commit)
_guarded_begin = _transaction_step("begin", AsyncSessionTransaction.start)
_guarded_begin_nested = _transaction_step("begin_nested", AsyncSessionTransaction.start)
_guarded_transaction_commit = _transaction_step("commit", AsyncSessionTransaction.commit)
_guarded_transaction_rollback = _transaction_step("rollback", AsyncSessionTransaction.rollback)
# Leaving ``async with session.begin():`` commits, or rolls back after an exception.
_guarded_exit_commit = _transaction_step("commit", AsyncSessionTransaction.__aexit__)
_guarded_exit_rollback = _transaction_step("rollback", AsyncSessionTransaction.__aexit__)

for _name in _GUARDED_METHODS:
    if hasattr(AsyncSession, _name):  # delete_all() and merge_all() came with SQLAlchemy 2.1
        setattr(GuardedSession, _name, _guard(getattr(AsyncSession, _name)))


async def _close(session: AsyncSession, seconds: float) -> str:
    """close(): roll back whatever is still open and give the connection back; if that fails, or gets no answer
    within ``seconds``, log and discard. Returns which: "rolled_back", "discarded" or "timed_out".

    Never raises: the scope's own outcome (the app's exception, or the response already sent) is what the
    caller must hear of, and nothing of the transaction was committed either way.
    """
    transaction = session.sync_session.get_transaction()
    timer = None
    try:
        if getattr(session, "_busy_task", None) is not None:
            # Another task's operation (bounded by the driver's own timeout) may finish first: not the cleanup's
            # time, whose bound is for the rollback and the close.
            await cast(GuardedSession, session)._wait_idle()
        timer = asyncio.get_running_loop().call_later(seconds, _cut_off, transaction, seconds)
        await session.close()
    except Exception:
        logger.warning(CLEANUP_FAILED, exc_info=True)
        _discard(transaction)
        # The timer went off (it closed the connection under the rollback) if its time has come.
        cut_off = timer is not None and timer.when() <= asyncio.get_running_loop().time()
        return "timed_out" if cut_off else "discarded"
    finally:
        if timer is not None:
            timer.cancel()
    return "rolled_back"


async def _traced_close(session: AsyncSession, seconds: float, spans: Spans, reason: str) -> None:
    """_close() under the cleanup span, which says why the transaction was rolled back and what became of the
    connection."""
    with spans.cleanup(reason) as span:
        span.set_attribute(CLEANUP_OUTCOME, await _close(session, seconds))


def _cut_off(transaction: SessionTransaction | None, seconds: float) -> None:
    """The cleanup got no answer in time: close its connections' sockets now, so that it fails at once.

    Rather than cancelling the cleanup: SQLAlchemy would then throw the connection away itself, giving asyncpg up
    to 2 s to close it gracefully, which a silent network makes it wait out. A connection closed under it is one
    SQLAlchemy knows is gone: the rollback fails, the connection is invalidated and checked in, the server ends
    the backend (and its transaction) once it sees the socket closed. Drivers without a way to close at once
    (aiosqlite: no network) are left to finish.
    """
    cut = False
    for connection, _, _, autoclose in set(getattr(transaction, "_connections", {}).values()):
        if not autoclose or connection.closed or connection.invalidated or not connection.dialect.has_terminate:
            continue
        try:
            connection.dialect.do_terminate(connection.connection.dbapi_connection)
        except Exception:  # a timer callback: an error here would only reach the loop's handler
            logger.debug("could not close the connection of a cleanup cut off", exc_info=True)
        else:
            cut = True
    if cut:
        logger.warning(CLEANUP_TIMED_OUT.format(seconds=seconds))


def _discard(transaction: SessionTransaction | None) -> None:
    # SQLAlchemy invalidates a connection itself only when it recognises the error as a disconnect; any other
    # failure of the rollback (a backend killed while idle shows as "another operation is in progress") leaves
    # it checked out with its transaction open on the server. The session has let go of its transaction by
    # now, so the connections are reached through the transaction taken before close(). Only those it took
    # from an engine (autoclose): one it was given (the testing plugin's) is its owner's. Outside a greenlet,
    # invalidate() aborts the socket at once: the server ends the backend and rolls its transaction back (the
    # pool logs, rather than raises, a failure to close it).
    for connection, _, _, autoclose in set(getattr(transaction, "_connections", {}).values()):
        if autoclose and not connection.invalidated and not connection.closed:
            connection.invalidate()


async def _commit_then_close(session: AsyncSession, cleanup_timeout: float) -> None:
    token = hooks_deferred.set(True)  # the callbacks run after the shield, in finish()
    try:
        if session.in_transaction():
            await session.commit()
    finally:
        hooks_deferred.reset(token)
        await _close(session, cleanup_timeout)


async def _traced_commit_then_close(session: AsyncSession, cleanup_timeout: float, spans: Spans) -> None:
    """_commit_then_close() with the commit's span, and the cleanup's when the commit failed and left the
    transaction to roll back (after a commit, close() has nothing to send)."""
    token = hooks_deferred.set(True)  # the callbacks run after the shield, in finish()
    try:
        if session.in_transaction():
            with spans.commit("call_end"):
                await session.commit()
    finally:
        hooks_deferred.reset(token)
        if session.in_transaction():
            await _traced_close(session, cleanup_timeout, spans, "commit_failed")
        else:
            await _close(session, cleanup_timeout)


async def _commit_deferring_hooks(session: AsyncSession) -> None:
    token = hooks_deferred.set(True)  # the callbacks run after the shield, in commit()
    try:
        await session.commit()
    finally:
        hooks_deferred.reset(token)


async def _traced_commit_deferring_hooks(session: AsyncSession, spans: Spans, when: str) -> None:
    with spans.commit(when):
        await _commit_deferring_hooks(session)


def cancel_other_task(session: AsyncSession) -> None:
    """Cancel the task running an operation on ``session`` right now, unless it is the caller's own.

    For a scope cancelled while a task it started still queries: Django's ASGI handler and Quart run the view in
    a task of their own, which a cancellation of the ASGI call does not reach. Left alone, its statement would run
    on, and close() would wait for it (CLOSE_WAIT_SECONDS) before throwing the connection away; cancelled, the
    statement ends as in any cancelled request and close() follows at once.
    """
    busy = getattr(session, "_busy_task", None)
    if busy is not None and busy is not _current_task():
        busy.cancel()


async def finish(
    session: AsyncSession,
    *,
    commit: bool,
    cleanup_timeout: float,
    spans: Spans | None = None,
    rollback_reason: str = "",
) -> None:
    """Commit (when ``commit`` and a transaction is open), then close, shielded from cancellation.

    A failed commit is raised; a failed close (its rollback), or one not done within ``cleanup_timeout``
    seconds, is logged and its connection discarded. With ``spans``, the commit and the rollback of an open
    transaction each have their span (the commit's ``when`` is "call_end"); ``rollback_reason`` says on the
    cleanup's why nothing was committed.
    """
    if not session.in_transaction() and getattr(session, "_busy_task", None) is None:
        # Nothing begun, so no connection: close() only forgets the session's objects. It does no IO and so
        # never yields to the loop, leaving a cancellation nothing to interrupt: no shield needed. Our own
        # session class is closed on its sync Session directly: with no IO there is nothing for the greenlet
        # that AsyncSession.close() would start to wait on.
        if type(session) is GuardedSession:
            session.sync_session.close()
        else:
            await session.close()
        return
    if spans is not None:
        if commit:
            await shielded(_traced_commit_then_close(session, cleanup_timeout, spans))
        else:
            await shielded_starting_now(_traced_close(session, cleanup_timeout, spans, rollback_reason))
    elif commit:
        await shielded(_commit_then_close(session, cleanup_timeout))
    else:
        # Started at once: after a response, the next request may be waiting for this connection.
        await shielded_starting_now(_close(session, cleanup_timeout))
    if commit and has_due_hooks(session):
        await run_due_hooks(session)


async def commit(session: AsyncSession, spans: Spans | None = None, when: str = "") -> None:
    """Commit, shielded from cancellation: a commit is never left half-sent on the connection.

    Then the on_commit callbacks that the commit made due, outside the shield. With ``spans``, under the commit
    span, whose ``when`` says where the caller commits.
    """
    if spans is None:
        await shielded(_commit_deferring_hooks(session))
    else:
        await shielded(_traced_commit_deferring_hooks(session, spans, when))
    if has_due_hooks(session):
        await run_due_hooks(session)
