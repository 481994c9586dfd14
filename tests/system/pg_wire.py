"""Reading PostgreSQL frontend messages (protocol 3.0) out of one connection's client -> server bytes.

For a TCP proxy's hook (tests/system/tcp_proxy.py), which sees TCP chunks: a message may be split between two
chunks or share one with others, so the bytes are buffered until each message is whole. Before the startup
message a client's messages carry no type byte (SSLRequest, GSSENCRequest, the startup message itself); after
it each is a type byte and a length. Only for unencrypted connections (``ssl=disable``): TLS hides the messages.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = ["FrontendMessages", "Message", "is_commit"]

_PROTOCOL_3 = 196608  # the startup message's protocol version: 3.0
_LENGTH = struct.Struct("!i")


@dataclass(frozen=True)
class Message:
    """One frontend message: its type byte (empty before the startup message's end) and its body."""

    type: bytes
    body: bytes


@dataclass
class FrontendMessages:
    """The frontend messages of one connection, fed its client -> server chunks in order."""

    _buffer: bytearray = field(default_factory=bytearray)
    _started: bool = False  # the startup message went by: messages from now on carry a type byte

    def feed(self, data: bytes) -> list[Message]:
        """The messages that ``data`` completes, in order."""
        self._buffer += data
        messages: list[Message] = []
        while True:
            header = 5 if self._started else 4
            if len(self._buffer) < header:
                return messages
            (length,) = _LENGTH.unpack_from(self._buffer, header - 4)
            size = header - 4 + length  # the length counts itself, not the type byte
            if len(self._buffer) < size:
                return messages
            kind = bytes(self._buffer[:1]) if self._started else b""
            body = bytes(self._buffer[header:size])
            del self._buffer[:size]
            if not self._started and len(body) >= 4 and _LENGTH.unpack_from(body)[0] == _PROTOCOL_3:
                self._started = True
            messages.append(Message(kind, body))


def is_commit(message: Message) -> bool:
    """A simple Query whose text is COMMIT (asyncpg sends ``COMMIT;`` that way: SQLAlchemy's commit)."""
    if message.type != b"Q":
        return False
    query = message.body.rstrip(b"\0").decode("utf-8", "replace").strip().rstrip(";").strip()
    return query.upper() in ("COMMIT", "END", "COMMIT TRANSACTION", "COMMIT WORK")
