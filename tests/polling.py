"""Waiting for something the server does on its own time: polled to a deadline, never a fixed sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def eventually(check: Callable[[], Awaitable[bool]], what: str, *, seconds: float = 5.0) -> None:
    """Poll ``check`` every 20 ms until it holds; fail after ``seconds`` (generous: the machine may be loaded),
    saying ``what`` was awaited."""
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"not within {seconds:g} s: {what}"
        await asyncio.sleep(0.02)
