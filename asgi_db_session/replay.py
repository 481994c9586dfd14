"""ReplayConflicts: an HTTP request run again when its transaction lost a race, before its response started.

It wraps the app outside DBSessionMiddleware, so that each attempt is a whole request of its own: a fresh copy
of the ASGI scope, a new request session. DBSessionMiddleware notes here (``_note_answered``) the database
error it is about to answer with an error response; when that error is a serialization failure or a deadlock
the server answered, this wrapper drops the answer and runs the request again instead, if it still can: the
response has not started, the request body it kept is all there is, the client is still there, and attempts
are left. Without the wrapper the note is one ContextVar read on the error path, and nothing at all otherwise.

Which requests it replays is the endpoint's to say too: ``session_policy(replay_conflicts=...)``. The middleware
hands over, with the error, the policy the request took (when its session was created, or when its marked
endpoint was called); where none was taken, the endpoint the router left in the scope (Starlette, FastAPI,
Litestar) is asked. Both are known before the error response starts, when the decision is made.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

from ._routes import SessionPolicy, policy_of
from ._types import ASGIApp, Message, Receive, Scope, Send
from .exceptions import REPLAY_BODY_SIZE, REPLAY_NOT_INSTALLED
from .retry import _check_bounds, _lost_race, _pause

__all__ = [
    "ReplayConflicts",
]

_logger = logging.getLogger("asgi_db_session")


class _Attempt:
    __slots__ = ("error", "policy")

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.policy: SessionPolicy | None = None


_attempt: ContextVar[_Attempt | None] = ContextVar("asgi_db_session:replay", default=None)
# The endpoints marked replay_conflicts=True whose conflict was answered with no ReplayConflicts around: each
# is named in a warning once, not at every conflict.
_unreplayed: set[str] = set()


def _note_answered(error: BaseException, policy: SessionPolicy | None) -> None:
    """Called by DBSessionMiddleware right before it answers ``error`` with an error response; ``policy``: the
    session_policy the request took, if any."""
    attempt = _attempt.get()
    if attempt is not None:
        attempt.error = error
        attempt.policy = policy
    elif policy is not None and policy.replay_conflicts and policy.endpoint not in _unreplayed:
        state = _lost_race(error)
        if state is not None:
            _unreplayed.add(policy.endpoint)
            _logger.warning(REPLAY_NOT_INSTALLED.format(endpoint=policy.endpoint, state=state))


class ReplayConflicts:
    """Run an HTTP request again, from the start, when the server ended its transaction with a serialization
    failure (40001) or a deadlock (40P01) before its response started.

    Add it outside DBSessionMiddleware (with Starlette's ``add_middleware``: after it). Each attempt gets a
    fresh copy of the ASGI scope and a new request session; the failed attempt's error response is dropped,
    its transaction was rolled back by the server and its ``on_commit`` callbacks never run. At most
    ``attempts`` runs, with a random wait before each retry (as ``run_in_transaction()``: ``backoff``,
    ``max_backoff``). The last attempt's response (503 with ``Retry-After`` by default) is the client's.

    A request is run again only if: the error was answered by DBSessionMiddleware before the response started
    (a streaming response that has started is never replayed); the request body it read is at most
    ``max_body_size`` bytes (kept in memory to be given again); the client has not disconnected; its endpoint
    wants it. Any other error (a connection lost during COMMIT among them) is never replayed. WebSockets and
    lifespan pass through.

    Which endpoints want it: with ``only_marked=False`` (the default) every one but those marked
    ``session_policy(replay_conflicts=False)``; with ``only_marked=True`` only those marked
    ``session_policy(replay_conflicts=True)``, every other request answered as without the wrapper.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        attempts: int = 3,
        max_body_size: int = 64 * 1024,
        backoff: float = 0.05,
        max_backoff: float = 1.0,
        only_marked: bool = False,
    ) -> None:
        _check_bounds("ReplayConflicts", attempts, backoff, max_backoff)
        if isinstance(max_body_size, bool) or not isinstance(max_body_size, int) or max_body_size < 0:
            raise ValueError(REPLAY_BODY_SIZE.format(size=max_body_size))
        self.app = app
        self.attempts = attempts
        self.max_body_size = max_body_size
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.only_marked = only_marked

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = _KeptRequest(receive, self.max_body_size)
        number = 1
        while not await self._attempt(scope, request, send, number):
            await _pause(number, self.backoff, self.max_backoff)
            number += 1

    def _wanted(self, policy: SessionPolicy | None) -> bool:
        """Whether the endpoint with ``policy`` (None: unmarked, or not known) has its conflicts replayed."""
        if policy is None or policy.replay_conflicts is None:
            return not self.only_marked
        return policy.replay_conflicts

    async def _attempt(self, scope: Scope, request: _KeptRequest, send: Send, number: int) -> bool:
        """Run the request once; False when its answer was dropped for a replay."""
        attempt = _Attempt()
        receive = request.receiver()
        started = False
        dropping = False
        # A copy per attempt: the app and the router write into the scope (path params, the endpoint, state).
        attempt_scope = dict(scope)
        if "state" in scope:
            attempt_scope["state"] = dict(scope["state"])

        async def attempt_send(message: Message) -> None:
            nonlocal started, dropping
            if dropping:
                return
            if not started and message["type"] == "http.response.start":
                error = attempt.error
                if (
                    error is not None
                    and number < self.attempts
                    and request.replayable()
                    and (state := _lost_race(error)) is not None
                    and self._wanted(attempt.policy or policy_of(attempt_scope))
                ):
                    dropping = True
                    _logger.info(
                        "Replaying %s %s after SQLSTATE %s (attempt %d of %d failed)",
                        scope.get("method"),
                        scope.get("path"),
                        state,
                        number,
                        self.attempts,
                    )
                    return
                started = True
            await send(message)

        token = _attempt.set(attempt)
        try:
            await self.app(attempt_scope, receive, attempt_send)
        finally:
            _attempt.reset(token)
        return not dropping


class _KeptRequest:
    """The request's messages as the app reads them, kept to be given again to the next attempt while their
    bodies add up to at most ``limit`` bytes."""

    __slots__ = ("_disconnected", "_kept", "_limit", "_receive", "_size")

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._kept: list[Message] | None = []  # None once the body outgrew the limit
        self._size = 0
        self._disconnected = False

    def replayable(self) -> bool:
        return self._kept is not None and not self._disconnected

    def receiver(self) -> Receive:
        """A receive for one attempt: the kept messages first, then the server's (kept in turn)."""
        given = 0

        async def receive() -> Message:
            nonlocal given
            kept = self._kept
            if kept is not None and given < len(kept):
                given += 1
                return kept[given - 1]
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._disconnected = True
            elif kept is not None:
                self._size += len(message.get("body", b""))
                if self._size > self._limit:
                    self._kept = None
                else:
                    kept.append(message)
                    given += 1
            return message

        return receive
