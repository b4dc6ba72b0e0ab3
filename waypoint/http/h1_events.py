"""Events, signals and limits of the HTTP/1.1 codec.

The parser (:mod:`waypoint.http.h1_parse`) turns bytes into these events; the
writer (:mod:`waypoint.http.h1_serialize`) turns them back into bytes.  One
message is always ``RequestHead | ResponseHead``, then zero or more ``Data``,
then one ``EndOfMessage``; an informational response (1xx other than 101) is a
lone ``ResponseHead`` with no body and no ``EndOfMessage``.

Header lists hold ``(name, value)`` pairs with the name in lower case, in the
order received, duplicates kept (original case is not kept: Envoy also writes
HTTP/1 names in lower case).  Events are frozen: a proxy that edits headers
builds a new list and a new event (``dataclasses.replace``).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

Headers = list[tuple[bytes, bytes]]
"""``(lower-case name, value)`` pairs, in order, duplicates kept."""


class Signal(enum.Enum):
    """What :meth:`H1Parser.next_event` returns when it has no event to give."""

    NEED_DATA = "need-data"
    """Feed more bytes (or EOF) and ask again."""
    PAUSED = "paused"
    """No more HTTP/1 messages on this connection: it must close (``must_close``)
    or it switched protocols (CONNECT, 101) and the rest is ``trailing_data``."""


NEED_DATA = Signal.NEED_DATA
PAUSED = Signal.PAUSED


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestHead:
    """A request line and its header section.

    ``version`` is ``b"1.1"`` or ``b"1.0"``.  The framing fields are filled by the
    parser (a writer ignores them and reads the headers instead):
    ``content_length`` (None when absent), ``chunked``, ``keep_alive`` (the
    connection may carry another request after this one).
    """

    method: bytes
    target: bytes
    headers: Headers
    version: bytes = b"1.1"
    content_length: int | None = None
    chunked: bool = False
    keep_alive: bool = True

    @property
    def has_body(self) -> bool:
        """The request carries a body (chunked, or a non-zero Content-Length)."""
        return self.chunked or bool(self.content_length)

    @property
    def expect_continue(self) -> bool:
        """``Expect: 100-continue`` on an HTTP/1.1 request with a body: the client
        waits for a 100 (or the final response) before sending the body."""
        return self.version == b"1.1" and self.has_body and any(
            name == b"expect" and value.lower() == b"100-continue"
            for name, value in self.headers)


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseHead:
    """A status line and its header section (see :class:`RequestHead` for the fields).

    A status below 200 other than 101 is informational: the final response follows.
    ``keep_alive`` is False when the body runs until the connection closes.
    """

    status: int
    headers: Headers
    reason: bytes = b""
    version: bytes = b"1.1"
    content_length: int | None = None
    chunked: bool = False
    keep_alive: bool = True


@dataclass(frozen=True, slots=True)
class Data:
    """A piece of a message body.

    The parser hands out zero-copy ``memoryview`` slices of the bytes it was fed
    where it can (bytes, never a reusable buffer), ``bytes`` otherwise.  Pieces do
    not follow chunk boundaries: a proxy re-frames the body itself.
    """

    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """The message is complete; ``trailers`` are the chunked trailer fields, if any."""

    trailers: Sequence[tuple[bytes, bytes]] = ()


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the connection cleanly between two messages."""


Event = RequestHead | ResponseHead | Data | EndOfMessage | ConnectionClosed


@dataclass(frozen=True, slots=True, kw_only=True)
class H1Limits:
    """Bounds on what one peer can make the codec hold.

    Defaults follow Envoy: 60 KiB of headers (``max_request_headers_kb``), 100
    header fields (``max_headers_count``).  ``max_line`` bounds the request line
    (over it: 414) or the status line; ``max_chunk_line`` the chunk-size line with
    its extensions; ``max_body`` (None: unbounded) answers 413 when exceeded.
    """

    max_line: int = 8 * 1024
    max_head_bytes: int = 60 * 1024
    max_headers: int = 100
    max_chunk_line: int = 4 * 1024
    max_trailer_bytes: int = 60 * 1024
    max_body: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_line", "max_head_bytes", "max_headers", "max_chunk_line",
                     "max_trailer_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"H1Limits.{name} must be at least 1")
        if self.max_body is not None and self.max_body < 0:
            raise ValueError("H1Limits.max_body must be None or non-negative")


DEFAULT_LIMITS = H1Limits()
