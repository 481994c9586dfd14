"""Where a scope's session lives: one ContextVar per database name, holding a mutable scope state.

The ContextVar holds a ``ScopeState`` rather than the session itself, so that a session created lazily in a
child context (a streaming body's task group, a threadpool endpoint, a background task) is the one every
other part of the request sees, and the one the middleware closes.

A scope's life is ``enter()`` and ``leave()`` (or ``opened()``, both around a block): set the ContextVar, then
reset it, end the state and finish its session, committing only after a clean exit when the scope's policy
says so, rolling back after any exception (a cancellation too). ``session_scope()``, the ``on_commit()`` runner
and the testing plugin use them; the middleware spells the same steps out inline for its per-request path,
where each call is a measurable share of a request that never queries (benchmarks/README.md, "Reading the
results").
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from ._routes import SessionPolicy, policy_of
from ._session import finish
from ._types import Scope
from .exceptions import NO_SCOPE, NO_SESSION_ROUTE, POLICY_TOO_LATE, SCOPE_ENDED, NoSessionError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from .database import Database

_vars: dict[str, ContextVar[ScopeState | None]] = {}
_logger = logging.getLogger("asgi_db_session")


def scope_var(name: str) -> ContextVar[ScopeState | None]:
    """The ContextVar for database ``name``; one per name for the life of the process."""
    var = _vars.get(name)
    if var is None:
        var = _vars.setdefault(name, ContextVar(f"asgi_db_session:{name}", default=None))
    return var


class ScopeState:
    """One scope's session: created on first use, then given up exactly once by ``end()``.

    A request's state also holds the ASGI scope until the endpoint's ``session_policy`` has been read from
    it; a session_scope()'s state holds the state it was opened in (``outer``). Attributes that most scopes
    never change are class-level defaults, set on the instance only when they change: a state is made for
    every request, and each assignment in ``__init__`` is a measurable share of one that never queries.
    """

    # The policy of this scope: a session_scope() opened inside it follows it unless told otherwise.
    commit_on_success: bool
    session: AsyncSession | None
    asgi_scope: Scope | None
    read_only = False
    # A session_scope()'s own session arguments, over the database's.
    session_options: Mapping[str, Any] | None = None
    ended = False
    outer: ScopeState | None = None
    # The endpoint marked session_policy(session=False), if this request's is.
    forbidden_by: str | None = None
    # A request's scope (DBSessionMiddleware's subclass): an endpoint called in it may bring its policy.
    in_request = False
    # The endpoint's session_policy this request follows, once taken.
    route_policy: SessionPolicy | None = None
    # Milliseconds after which PostgreSQL cancels a statement of this scope's session (SET LOCAL in each of
    # its transactions); None: the connection's own statement_timeout.
    statement_timeout: int | None = None
    # Set when a session of this scope, or of a scope opened in it, wrote (databases with replicas only):
    # reads that follow in the same request then stay on the primary, which a replica may lag behind.
    wrote = False

    def __init__(
        self,
        database: Database,
        commit_on_success: bool,
        session: AsyncSession | None = None,
        asgi_scope: Scope | None = None,
    ) -> None:
        self.database = database
        self.commit_on_success = commit_on_success
        self.session = session
        self.asgi_scope = asgi_scope

    def open(self) -> AsyncSession:
        """The scope's session, created now if this is the first call."""
        session = self.session
        if session is None:
            if self.ended:
                raise NoSessionError(SCOPE_ENDED.format(name=self.database.name))
            if self.asgi_scope is not None:
                self.apply_route_policy()
            if self.forbidden_by is not None:
                raise NoSessionError(NO_SESSION_ROUTE.format(name=self.database.name, endpoint=self.forbidden_by))
            read_only = self.read_only
            session = self.session = self.database.new_session(
                read_only=read_only, on_primary=read_only and self.after_write(), options=self.session_options
            )
            if self.statement_timeout is not None:
                self.database._bound_statements(session, self.statement_timeout)
        return session

    def apply_route_policy(self) -> None:
        """Take the endpoint's session_policy, once, from the ASGI scope where the router left the endpoint.

        Done when the session is created (in the endpoint or below it), not when the request starts: the
        middleware runs before the router. A session made before routing (by a middleware inside this one)
        gets the middleware's policy, but for ``commit_on_success`` when the endpoint is called (``follow()``).
        """
        asgi_scope, self.asgi_scope = self.asgi_scope, None
        policy = None if asgi_scope is None else policy_of(asgi_scope)
        if policy is not None:
            self.take(policy)

    def take(self, policy: SessionPolicy) -> None:
        """Follow ``policy`` from now on; the session is not created yet."""
        self.route_policy = policy
        if not policy.session:
            self.forbidden_by = policy.endpoint
        if policy.commit_on_success is not None:
            self.commit_on_success = policy.commit_on_success
        self.read_only = policy.read_only
        if policy.statement_timeout is not None:
            self.statement_timeout = policy.statement_timeout

    def follow(self, policy: SessionPolicy) -> None:
        """The request's endpoint, marked with ``policy``, is being called: follow it where still possible."""
        if self.route_policy is not None or self.ended:
            # Taken already: from the scope when the session was created, or from the endpoint the framework
            # called first (a marked function that it calls in turn does not change the request's policy).
            return
        if self.session is None:
            self.asgi_scope = None
            self.take(policy)
            return
        # Created before the endpoint ran (by a middleware, a hook or a dependency that its framework runs
        # first): the session keeps its transaction. Only the commit, decided at the end, can still follow.
        self.route_policy = policy
        if policy.commit_on_success is not None:
            self.commit_on_success = policy.commit_on_success
        if not policy.session:
            asked = "session=False"
        elif policy.read_only != self.read_only:
            asked = f"read_only={policy.read_only}"
        elif policy.statement_timeout is not None and policy.statement_timeout != self.statement_timeout:
            asked = f"statement_timeout={policy.statement_timeout / 1000:g}"
        else:
            return
        _logger.warning(POLICY_TOO_LATE.format(name=self.database.name, endpoint=policy.endpoint, asked=asked))

    def after_write(self) -> bool:
        """Whether this scope, or a scope it was opened in, has written: a read must then see the primary."""
        state: ScopeState | None = self
        while state is not None:
            if state.wrote or (not state.read_only and _has_written(state.session)):
                return True
            state = state.outer
        return False

    def end(self) -> AsyncSession | None:
        """Close the scope to new use and hand over its session (None if none was created) for closing."""
        session, self.session = self.session, None
        self.ended = True
        if not self.read_only and _has_written(session):
            # Kept on every enclosing scope: a later block of the same request must know, not only this one.
            # (A read-only session cannot have written: the server refused.)
            state: ScopeState | None = self
            while state is not None:
                state.wrote = True
                state = state.outer
        return session


def _has_written(session: AsyncSession | None) -> bool:
    # Only a write-tracking session (replicas, the outcome check: sync_session_class()) notes its writes.
    return session is not None and getattr(session.sync_session, "_wrote", False)


def follow_route_policy(policy: SessionPolicy) -> None:
    """Make the current request (on every database) follow the session_policy of the endpoint being called."""
    for var in _vars.values():
        state = var.get()
        while state is not None and not state.in_request:
            state = state.outer
        if state is not None:
            state.follow(policy)


def current_session(name: str = "default") -> AsyncSession:
    """The session of the innermost active scope for database ``name``.

    Inside a request handled by DBSessionMiddleware that is the request's session, created on this first
    call; inside ``session_scope(name)`` it is that block's session. Raises NoSessionError elsewhere.
    """
    var = _vars.get(name)
    state = None if var is None else var.get()
    if state is None:
        raise NoSessionError(NO_SCOPE.format(name=name))
    session = state.session
    return session if session is not None else state.open()


def enter(state: ScopeState) -> Token[ScopeState | None]:
    """Make ``state`` the current scope of its database; give the token to ``leave()`` or ``exit_scope()``."""
    return scope_var(state.database.name).set(state)


def exit_scope(state: ScopeState, token: Token[ScopeState | None]) -> AsyncSession | None:
    """Make the scope around ``state`` current again and end ``state``; its session (if any) is the caller's."""
    scope_var(state.database.name).reset(token)
    return state.end()


async def leave(state: ScopeState, token: Token[ScopeState | None], *, clean: bool) -> None:
    """Leave the scope entered with ``token``: its session commits when ``clean`` and the scope's policy say so,
    rolls back otherwise, and is closed, shielded from cancellation. A failed commit is raised."""
    session = exit_scope(state, token)
    if session is not None:
        await finish(session, commit=clean and state.commit_on_success, cleanup_timeout=state.database.cleanup_timeout)


@asynccontextmanager
async def opened(state: ScopeState) -> AsyncIterator[ScopeState]:
    """``state`` as the current scope for the block; left cleanly only when the block raised nothing."""
    token = enter(state)
    clean = False
    try:
        yield state
        clean = True
    finally:
        await leave(state, token, clean=clean)
