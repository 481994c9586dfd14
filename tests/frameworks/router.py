"""One ASGI app that serves several under path prefixes and fans the lifespan protocol out to all of them.

For the process tests (tests/system/test_framework_servers.py): one server process runs every framework's app,
each with its own DBSessionMiddleware, so that each server is started once rather than once per framework.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from asgi_db_session._types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["PrefixRouter"]


class PrefixRouter:
    """``/{prefix}/rest`` goes to the app of ``/{prefix}`` as ``/rest``, as if that app were served alone. The lifespan
    goes to every app: startup completes once each app's has, shutdown likewise; any failure fails the whole."""

    def __init__(self, apps: Mapping[str, ASGIApp]) -> None:
        self.apps = dict(apps)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        path: str = scope["path"]
        prefix, _, rest = path[1:].partition("/")
        app = self.apps.get("/" + prefix)
        if app is None:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"no app under this prefix"})
            return
        await app({**scope, "path": "/" + rest, "raw_path": ("/" + rest).encode()}, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        inboxes = {prefix: asyncio.Queue[Message]() for prefix in self.apps}
        answers = asyncio.Queue[tuple[str, Message]]()

        async def run(prefix: str, app: ASGIApp) -> None:
            shut_down = False

            async def answer(message: Message) -> None:
                nonlocal shut_down
                shut_down = shut_down or message["type"].startswith("lifespan.shutdown.")
                await answers.put((prefix, message))

            # A lifespan that ends before it has answered must not leave the server waiting: its end is its answer.
            try:
                await app(scope, inboxes[prefix].get, answer)
            except Exception as exc:
                await answers.put((prefix, {"type": "raised", "message": repr(exc)}))
            else:
                # Returning after its shutdown answer is the protocol's end; counted as another answer, it would be
                # taken for a slower app's.
                if not shut_down:
                    await answers.put((prefix, {"type": "returned", "message": "the lifespan returned unanswered"}))

        tasks = [asyncio.create_task(run(prefix, app)) for prefix, app in self.apps.items()]
        try:
            for phase in ("startup", "shutdown"):
                message = await receive()
                for inbox in inboxes.values():
                    inbox.put_nowait(message)
                failures = []
                for _ in inboxes:
                    prefix, answer = await answers.get()
                    if answer["type"] != f"lifespan.{phase}.complete":
                        failures.append(f"{prefix}: {answer.get('message', answer['type'])}")
                if failures:
                    await send({"type": f"lifespan.{phase}.failed", "message": "; ".join(failures)})
                    return
                await send({"type": f"lifespan.{phase}.complete"})
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
