"""Sans-I/O RESP2 (the Redis protocol): encode commands, parse replies from bytes.

Commands go out as arrays of bulk strings.  Replies come back as simple strings
(``+``), errors (``-``), integers (``:``), bulk strings (``$``, ``$-1`` is nil) and
arrays (``*``).  :class:`ReplyParser` takes bytes as they arrive and yields whole
replies; a reply split across reads waits for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ProtocolError

#: Bound on a reply we keep buffering; a rate-limit script's answers are tiny.
MAX_REPLY = 1 << 20


@dataclass(frozen=True, slots=True)
class RedisReplyError:
    """An error reply (``-ERR ...``, ``-NOSCRIPT ...``): the server's words, not ours."""

    message: str


def encode_command(*parts: bytes | str | int) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        raw = part if isinstance(part, bytes) else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class _Incomplete(Exception):
    pass


class ReplyParser:
    """Feed bytes, take replies."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > MAX_REPLY:
            raise ProtocolError(f"Redis reply over {MAX_REPLY} bytes: is this a Redis server?")

    def next_reply(self) -> tuple[bool, object]:
        """``(True, reply)`` when a whole reply is buffered, else ``(False, None)``."""
        try:
            reply, end = self._parse(0)
        except _Incomplete:
            return False, None
        del self._buf[:end]
        return True, reply

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self._buf.find(b"\r\n", pos)
        if end < 0:
            raise _Incomplete
        return bytes(self._buf[pos + 1:end]), end + 2

    def _parse(self, pos: int) -> tuple[object, int]:
        if pos >= len(self._buf):
            raise _Incomplete
        kind = self._buf[pos:pos + 1]
        line, nxt = self._line(pos)
        try:
            if kind == b"+":
                return line, nxt
            if kind == b"-":
                return RedisReplyError(line.decode("utf-8", "replace")), nxt
            if kind == b":":
                return int(line), nxt
            if kind == b"$":
                size = int(line)
                if size < 0:
                    return None, nxt
                if len(self._buf) < nxt + size + 2:
                    raise _Incomplete
                return bytes(self._buf[nxt:nxt + size]), nxt + size + 2
            if kind == b"*":
                count = int(line)
                if count < 0:
                    return None, nxt
                items: list[object] = []
                for _ in range(count):
                    item, nxt = self._parse(nxt)
                    items.append(item)
                return items, nxt
        except ValueError as exc:
            raise ProtocolError(f"malformed Redis reply line {line!r}") from exc
        raise ProtocolError(f"unknown Redis reply type {bytes(kind)!r}: is this a Redis server?")
