"""A strict, bounded, sans-I/O HTTP/1.1 parser: bytes in, events out.

Theory of operation
-------------------
One parser reads one direction of one connection: :class:`RequestParser` the
bytes a client sends (the waypoint's downstream side), :class:`ResponseParser`
the bytes a server sends (upstream side; it must be told each request's method
with :meth:`ResponseParser.expect_response`, because HEAD and CONNECT change how
the response is framed).  The caller loops::

    parser.feed(chunk)          # or parser.feed_eof()
    while (event := parser.next_event()) not in (NEED_DATA, PAUSED):
        handle(event)

Bytes are kept as the caller's ``bytes`` objects while they can be: a body piece is
a ``memoryview`` of what was fed (no copy), and a head is parsed from one slice
with ``find``/``split``/``translate`` (C loops, no per-byte Python).  Only when a
head or chunk-size line arrives split over several feeds are the leftovers joined
in a ``bytearray``.  Bytes of the next message that arrived with this one stay
buffered for it (pipelining).

Every wait is bounded: a head that has not ended within ``max_head_bytes`` is
refused (431) however slowly it trickles in, a request line longer than
``max_line`` earns 414, a chunk-size line longer than ``max_chunk_line`` 400, so
memory per connection never exceeds the limits plus one fed chunk.

Strictness (RFC 9112, with Envoy's defaults where the RFC leaves a choice):

* ``Content-Length`` with ``Transfer-Encoding``: 400 (Envoy rejects unless
  ``allow_chunked_length``; the RFC lets a server reject).  Two ``Content-Length``
  fields, even equal: 400 (Envoy's Balsa parser runs with
  ``disallow_multiple_content_length``).  A value that is not 1*DIGIT or is above
  2**63-1: 400.
* ``Transfer-Encoding`` must end in ``chunked`` (else 400, as RFC 9112 section
  6.3 requires; Envoy answers 501 to every value but exactly ``chunked``); other
  codings before it answer 501 (only chunked is implemented); ``chunked`` twice
  or an empty list element: 400; any ``Transfer-Encoding`` in HTTP/1.0: 400.
* Line folding (obs-fold), whitespace before the colon, a line without a colon,
  a name that is not a token, NUL/CTL bytes other than HTAB, a CR not followed by
  LF: 400.  (Envoy unfolds obs-fold; we refuse it, as RFC 9112 section 5.2 allows.)
* A bare LF ends a start line or a field line (header or trailer), as in Envoy
  (Balsa) and http-parser and as RFC 9112 section 2.2 allows: we re-serialize
  every head, so what we forward always uses CRLF and a backend cannot read the
  line differently.  The chunked framing itself (chunk-size lines, the line end
  after chunk data) must use CRLF (section 7.1; the section 2.2 leniency covers
  start line and fields only): a bare LF there is the line-terminator
  disagreement behind chunked smuggling (Go's CVE-2025-22871; nginx and Traffic
  Server refuse it too), so it is a 400.
* Method must be a token, target visible ASCII in origin, absolute, authority
  (CONNECT only) or asterisk (OPTIONS only) form, version ``HTTP/1.0`` or
  ``HTTP/1.1`` (a higher 1.x reads as 1.1; another well-formed ``HTTP/x.y``: 505).
  HTTP/1.1 without exactly one ``Host``: 400.
* Chunk sizes are hex digits (at most 16), extensions are skipped but bounded,
  chunk data must be followed by a line end, trailers are parsed and bounded
  like headers.

When parsing responses every error carries status 502, the answer a proxy owes
its client when the upstream breaks HTTP.  After an error the parser is dead:
every later call raises the same error and ``must_close`` is true.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from typing import Any

from common.errors import Http1Error, Http1TooLargeError, Http1UnsupportedError, LocalProtocolError
from waypoint.http.h1_events import (
    DEFAULT_LIMITS,
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Event,
    H1Limits,
    Headers,
    RequestHead,
    ResponseHead,
    Signal,
)

_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_VCHAR = bytes(range(0x21, 0x7F))
_HEXDIG = b"0123456789abcdefABCDEF"
# Bytes never allowed in a head or a chunk line: CTLs other than HTAB, and DEL.
# CR and LF are checked separately, as line ends.
_BAD_BYTES = bytes(b for b in range(0x20) if b not in (0x09, 0x0A, 0x0D)) + b"\x7f"
_BAD_AND_LINE_ENDS = _BAD_BYTES + b"\r\n"
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]+([/?][\x21-\x7e]*)?")
_AUTHORITY_FORM = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=%]+:[0-9]+|\[[0-9A-Fa-f:.]+\]:[0-9]+")
_HTTP_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")

# Content-Length of up to 18 digits always fits in a signed 64-bit integer.
_MAX_CL_DIGITS = 18
_MAX_CHUNK_HEX = 16
_MAX_CHUNK_SIZE = 2**63 - 1
# Empty lines tolerated before a request/status line (RFC 9112 section 2.2).
_MAX_LEADING_BLANK = 64
# Header names seen before, raw -> lower case, so that the common ones skip
# validation; bounded so that a peer cannot grow it with random names.
_NAME_CACHE_MAX = 2048
_name_cache: dict[bytes, bytes] = {}

_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"
_CONNECTION = b"connection"
_HOST = b"host"
_SPECIAL = frozenset((_CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION, _HOST))
_KNOWN_METHODS = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH",
                            b"TRACE", b"CONNECT"))

_END_OF_MESSAGE = EndOfMessage()

# Frozen dataclasses set each field through object.__setattr__ in __init__, which
# costs three times a slot store; events are built per message, so the parser
# stores into the slots directly (same class, same immutability for the caller).
_new = object.__new__


def _slot_setter(cls: type, name: str) -> Callable[[Any, Any], None]:
    setter: Callable[[Any, Any], None] = vars(cls)[name].__set__
    return setter


_rq_method = _slot_setter(RequestHead, "method")
_rq_target = _slot_setter(RequestHead, "target")
_rq_headers = _slot_setter(RequestHead, "headers")
_rq_version = _slot_setter(RequestHead, "version")
_rq_length = _slot_setter(RequestHead, "content_length")
_rq_chunked = _slot_setter(RequestHead, "chunked")
_rq_keep_alive = _slot_setter(RequestHead, "keep_alive")
_rs_status = _slot_setter(ResponseHead, "status")
_rs_reason = _slot_setter(ResponseHead, "reason")
_rs_headers = _slot_setter(ResponseHead, "headers")
_rs_version = _slot_setter(ResponseHead, "version")
_rs_length = _slot_setter(ResponseHead, "content_length")
_rs_chunked = _slot_setter(ResponseHead, "chunked")
_rs_keep_alive = _slot_setter(ResponseHead, "keep_alive")
_data_data = _slot_setter(Data, "data")


def _request_head(method: bytes, target: bytes, headers: Headers, version: bytes,
                  content_length: int | None, chunked: bool, keep_alive: bool) -> RequestHead:
    head: RequestHead = _new(RequestHead)
    _rq_method(head, method)
    _rq_target(head, target)
    _rq_headers(head, headers)
    _rq_version(head, version)
    _rq_length(head, content_length)
    _rq_chunked(head, chunked)
    _rq_keep_alive(head, keep_alive)
    return head


def _response_head(status: int, reason: bytes, headers: Headers, version: bytes,
                   content_length: int | None, chunked: bool, keep_alive: bool) -> ResponseHead:
    head: ResponseHead = _new(ResponseHead)
    _rs_status(head, status)
    _rs_reason(head, reason)
    _rs_headers(head, headers)
    _rs_version(head, version)
    _rs_length(head, content_length)
    _rs_chunked(head, chunked)
    _rs_keep_alive(head, keep_alive)
    return head


def _data(data: bytes | memoryview) -> Data:
    event: Data = _new(Data)
    _data_data(event, data)
    return event


# Parser states.
_HEAD = 0
_BODY_LENGTH = 1
_CHUNK_SIZE = 2
_CHUNK_DATA = 3
_CHUNK_END = 4
_TRAILERS = 5
_BODY_EOF = 6
_END = 7  # body complete: EndOfMessage is the next event
_CLOSED = 8  # no more messages: must close
_SWITCHED = 9  # CONNECT or 101: the rest of the bytes are not HTTP/1
_ERROR = 10


class _Parser:
    """Buffering, bounds and body framing shared by both directions."""

    __slots__ = ("_after_end", "_blank", "_buf", "_chunk_total", "_eof", "_error", "_limits",
                 "_pos", "_remaining", "_scan", "_state", "_status_for_errors")

    def __init__(self, limits: H1Limits, status_for_errors: int | None) -> None:
        self._limits = limits
        self._status_for_errors = status_for_errors
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._scan = 0
        self._state = _HEAD
        self._remaining = 0
        self._chunk_total = 0
        self._blank = 0
        self._eof = False
        self._error: Http1Error | None = None
        self._after_end = _HEAD

    # -- input ------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Hand the parser bytes received from the peer (copied unless ``bytes``)."""
        if self._eof:
            raise LocalProtocolError("feed() after feed_eof(): the peer's stream already ended")
        if not data or self._state == _CLOSED or self._state == _ERROR:
            # After a closing message the RFC has us ignore whatever follows.
            return
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
            self._scan = 0
        elif type(buf) is bytes:
            joined = bytearray(memoryview(buf)[pos:])
            joined += data
            self._buf = joined
            self._scan = max(0, self._scan - pos)
            self._pos = 0
        else:
            assert isinstance(buf, bytearray)
            if pos > 65536 and pos * 2 > len(buf):
                del buf[:pos]
                self._scan = max(0, self._scan - pos)
                self._pos = 0
            buf += data

    def feed_eof(self) -> None:
        """Tell the parser the peer closed its sending side."""
        self._eof = True

    # -- state the shell asks about ----------------------------------------------

    @property
    def must_close(self) -> bool:
        """True when this connection cannot carry another message: close it once done."""
        return self._state in (_CLOSED, _ERROR) or (
            self._after_end == _CLOSED and self._state != _HEAD)

    @property
    def buffered(self) -> int:
        """Bytes held for later events (bounded by the limits plus one fed chunk)."""
        return len(self._buf) - self._pos

    @property
    def switched_protocol(self) -> bool:
        """True after a CONNECT (request side) or a 101/2xx-to-CONNECT (response side)."""
        return self._state == _SWITCHED

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Bytes received past the last message, and whether the peer closed.

        After a protocol switch these belong to the new protocol (the tunnel).
        """
        return bytes(self._buf[self._pos:]), self._eof

    def events(self) -> list[Event]:
        """Every event available now (stops at NEED_DATA or PAUSED).

        When the peer broke the protocol after some good events, those are
        returned first (a proxy still answers the pipelined requests before the
        bad one); the error is raised by the next call.
        """
        out: list[Event] = []
        while True:
            try:
                ev = self.next_event()
            except Http1Error:
                if out:
                    return out
                raise
            if isinstance(ev, Signal):
                return out
            out.append(ev)

    # -- the state machine -------------------------------------------------------

    def next_event(self) -> Event | Signal:
        """The next event, ``NEED_DATA`` (feed more) or ``PAUSED`` (no more messages).

        Raises :class:`~common.errors.Http1Error` (or a subclass) when the peer
        breaks the protocol; the status hint says what to answer.
        """
        state = self._state
        if state == _HEAD:
            return self._next_head()
        if state in (_BODY_LENGTH, _CHUNK_DATA):
            return self._next_counted_data()
        if state == _END:
            self._state = self._after_end
            self._blank = 0
            return _END_OF_MESSAGE
        if state in (_CHUNK_SIZE, _CHUNK_END, _TRAILERS):
            return self._next_chunk_framing()
        if state == _BODY_EOF:
            return self._next_eof_data()
        if state == _ERROR:
            assert self._error is not None
            raise self._error
        return PAUSED

    def _fail(self, exc: Http1Error) -> Http1Error:
        if self._status_for_errors is not None:
            exc.status = self._status_for_errors
        self._state = _ERROR
        self._error = exc
        return exc

    def _end_message(self, event: EndOfMessage) -> EndOfMessage:
        self._state = self._after_end
        self._blank = 0
        return event

    def _take(self, count: int) -> bytes | memoryview:
        """Consume ``count`` buffered bytes, without copying when the buffer is ``bytes``."""
        buf = self._buf
        pos = self._pos
        self._pos = pos + count
        if type(buf) is bytes:
            if pos == 0 and count == len(buf):
                return buf
            return memoryview(buf)[pos:pos + count]
        return bytes(buf[pos:pos + count])

    def _next_counted_data(self) -> Event | Signal:
        avail = len(self._buf) - self._pos
        if avail <= 0:
            if self._eof:
                raise self._fail(Http1Error(
                    f"the peer closed the connection with {self._remaining} bytes of the "
                    "body still to come: check the sender's Content-Length or chunk sizes"))
            return NEED_DATA
        remaining = self._remaining
        count = avail if avail < remaining else remaining
        buf = self._buf
        pos = self._pos
        self._pos = pos + count
        data: bytes | memoryview
        if type(buf) is not bytes:
            data = bytes(buf[pos:pos + count])
        elif pos == 0 and count == len(buf):
            data = buf
        else:
            data = memoryview(buf)[pos:pos + count]
        remaining -= count
        self._remaining = remaining
        if remaining == 0:
            self._state = _END if self._state == _BODY_LENGTH else _CHUNK_END
        return _data(data)

    def _next_eof_data(self) -> Event | Signal:
        avail = len(self._buf) - self._pos
        if avail > 0:
            return _data(self._take(avail))
        if self._eof:
            return self._end_message(_END_OF_MESSAGE)
        return NEED_DATA

    def _next_chunk_framing(self) -> Event | Signal:
        """Chunk-size lines, chunk ends and trailers: everything in a chunked body but data."""
        limits = self._limits
        while True:
            buf = self._buf
            pos = self._pos
            state = self._state
            if state == _CHUNK_SIZE:
                nl = buf.find(b"\n", pos, pos + limits.max_chunk_line + 1)
                if nl < 0:
                    if len(buf) - pos > limits.max_chunk_line:
                        raise self._fail(Http1Error(
                            f"chunk-size line longer than {limits.max_chunk_line} bytes: "
                            "the sender's chunk extensions are too long"))
                    return self._need_data("a chunk-size line")
                self._pos = nl + 1
                size = self._chunk_size(bytes(buf[pos:nl]))
                if size == 0:
                    self._state = _TRAILERS
                    self._scan = self._pos
                    continue
                self._chunk_total += size
                if limits.max_body is not None and self._chunk_total > limits.max_body:
                    raise self._fail(Http1TooLargeError(
                        f"chunked body larger than the {limits.max_body}-byte limit", 413))
                self._remaining = size
                self._state = _CHUNK_DATA
                return self._next_counted_data()
            if state == _CHUNK_END:
                if buf.startswith(b"\r\n", pos):
                    self._pos = pos + 2
                elif len(buf) - pos < 2 and (pos == len(buf) or buf[pos] == 0x0D):
                    return self._need_data("the line end after chunk data")
                else:
                    raise self._fail(Http1Error(
                        "chunk data not followed by CRLF: the chunk size does not "
                        "match the data sent, or the sender ends chunk lines with a bare LF"))
                self._state = _CHUNK_SIZE
                continue
            # _TRAILERS
            if buf.startswith(b"\r\n", pos):
                self._pos = pos + 2
                return self._end_message(_END_OF_MESSAGE)
            if buf.startswith(b"\n", pos):
                self._pos = pos + 1
                return self._end_message(_END_OF_MESSAGE)
            block = self._find_block(limits.max_trailer_bytes, "trailer section")
            if block is None:
                return self._need_data("the trailer section")
            lines = self._split_lines(block)
            if len(lines) > limits.max_headers:
                raise self._fail(Http1TooLargeError(
                    f"more than {limits.max_headers} trailer fields"))
            trailers, _special = self._fields(lines, 0)
            return self._end_message(EndOfMessage(trailers))

    def _need_data(self, what: str) -> Signal:
        if self._eof:
            raise self._fail(Http1Error(
                f"the peer closed the connection in the middle of {what}"))
        return NEED_DATA

    def _chunk_size(self, line: bytes) -> int:
        if not line.endswith(b"\r"):
            raise self._fail(Http1Error(
                "chunk-size line ended by a bare LF: chunked framing needs CRLF"))
        line = line[:-1]
        if b"\r" in line or len(line.translate(None, _BAD_BYTES)) != len(line):
            raise self._fail(Http1Error(
                "control character or bare CR in a chunk-size line"))
        size, _, _extensions = line.partition(b";")
        size = size.rstrip(b" \t")
        if not size or size.translate(None, _HEXDIG) or len(size) > _MAX_CHUNK_HEX:
            raise self._fail(Http1Error(
                f"invalid chunk size {size[:32]!r}: expected 1 to 16 hex digits"))
        value = int(size, 16)
        if value > _MAX_CHUNK_SIZE:
            raise self._fail(Http1Error(f"chunk size {size!r} overflows 63 bits"))
        return value

    # -- heads -------------------------------------------------------------------

    def _next_head(self) -> Event | Signal:
        buf = self._buf
        pos = self._pos
        end = len(buf)
        if pos < end and (buf[pos] == 0x0D or buf[pos] == 0x0A):
            pos = self._skip_blank_lines(buf, pos)
        if pos >= end:
            if self._eof:
                self._state = _CLOSED
                return ConnectionClosed()
            return NEED_DATA
        if self._scan <= pos:
            # Fast path: a whole CRLF head already buffered (the usual keep-alive read).
            last = buf.find(b"\r\n\r\n", pos)
            if last >= 0 and last + 4 - pos <= self._limits.max_head_bytes:
                block = bytes(buf[pos:last + 2])
                lines = block.split(b"\r\n")
                # Deleting CTLs, CRs and LFs must remove exactly the CRLF pairs:
                # then there is no bad byte, bare CR or bare LF (which could hide
                # an earlier end of head).
                if len(block.translate(None, _BAD_AND_LINE_ENDS)) == len(block) - 2 * len(
                        lines) + 2:
                    self._pos = last + 4
                    lines.pop()
                    return self._on_head(lines)
        found = self._find_block(self._limits.max_head_bytes, "header section")
        if found is None:
            if self._eof:
                raise self._fail(Http1Error(
                    "the peer closed the connection in the middle of a message head"))
            return NEED_DATA
        return self._on_head(self._split_lines(found))

    def _skip_blank_lines(self, buf: bytes | bytearray, pos: int) -> int:
        while True:
            if buf.startswith(b"\r\n", pos):
                step = 2
            elif buf.startswith(b"\n", pos):
                step = 1
            else:
                break
            pos += step
            self._blank += step
            if self._blank > _MAX_LEADING_BLANK:
                raise self._fail(Http1Error("too many empty lines before the start line"))
        self._pos = pos
        return pos

    def _find_block(self, limit: int, what: str) -> bytes | None:
        """Consume lines up to the first empty line; return them (with their line ends).

        Searches only bytes not searched before, so a trickled head costs O(n).
        """
        buf = self._buf
        pos = self._pos
        if self._state == _HEAD and len(buf) - pos > self._limits.max_line:
            # The start line is judged first, from its first bytes only, so that the
            # verdict is the same however the head was split into reads.
            self._check_first_line(buf, pos)
        start = self._scan if self._scan > pos else pos
        crlf = buf.find(b"\n\r\n", start)
        lf = buf.find(b"\n\n", start, crlf + 1 if crlf >= 0 else len(buf))
        if lf >= 0:
            last, after = lf + 1, lf + 2
        elif crlf >= 0:
            last, after = crlf + 1, crlf + 3
        else:
            size = len(buf) - pos
            if size > limit:
                raise self._fail(Http1TooLargeError(
                    f"{what} larger than {limit} bytes: raise the limit or fix the sender"))
            self._scan = max(pos, len(buf) - 2)
            return None
        if after - pos > limit:
            raise self._fail(Http1TooLargeError(
                f"{what} larger than {limit} bytes: raise the limit or fix the sender"))
        self._pos = after
        return bytes(buf[pos:last])

    def _check_first_line(self, buf: bytes | bytearray, pos: int) -> None:
        """Refuse a start line longer than ``max_line`` once ``max_line + 1`` bytes are here.

        Looks at no more than ``max_line + 2`` bytes (the line and its CRLF), and
        a bad byte or bare CR among them is a 400 before the length is a 414: the
        same answer whether the rest of the head has arrived or not.
        """
        max_line = self._limits.max_line
        nl = buf.find(b"\n", pos, pos + max_line + 2)
        if nl >= 0:
            end = nl - 1 if nl > pos and buf[nl - 1] == 0x0D else nl
            if end - pos <= max_line:
                return
        elif len(buf) - pos == max_line + 1 and buf[pos + max_line] == 0x0D:
            return  # a CRLF may still end the line at exactly max_line bytes
        line = bytes(buf[pos:pos + max_line + 1])
        if len(line.translate(None, _BAD_BYTES)) != len(line):
            bad = next(b for b in line if b in _BAD_BYTES)
            raise self._fail(Http1Error(
                f"control byte 0x{bad:02x} in the message head: only HTAB is allowed"))
        if b"\r" in line:
            raise self._fail(Http1Error("bare CR in the message head: lines must end in CRLF"))
        raise self._fail(self._line_too_long())

    def _line_too_long(self) -> Http1Error:
        raise NotImplementedError

    def _split_lines(self, block: bytes) -> list[bytes]:
        """Validate a head's bytes and split it into lines (CRLF or bare LF)."""
        lines = block.split(b"\r\n")
        # Fast path: deleting CTLs, CRs and LFs removes exactly the CRLF pairs,
        # so the head has no bad byte, no bare CR and no bare LF.
        if len(block.translate(None, _BAD_AND_LINE_ENDS)) == len(block) - 2 * len(lines) + 2:
            lines.pop()
            return lines
        if len(block.translate(None, _BAD_BYTES)) != len(block):
            bad = next(b for b in block if b in _BAD_BYTES)
            raise self._fail(Http1Error(
                f"control byte 0x{bad:02x} in the message head: only HTAB is allowed"))
        if block.count(b"\r") != block.count(b"\r\n"):
            raise self._fail(Http1Error("bare CR in the message head: lines must end in CRLF"))
        lines = block.replace(b"\r\n", b"\n").split(b"\n")
        lines.pop()
        return lines

    def _fields(self, lines: list[bytes], first: int) -> tuple[Headers, Headers]:
        """Parse ``lines[first:]`` as field lines: (all of them, the framing-relevant ones)."""
        headers: Headers = []
        special: Headers = []
        append = headers.append
        cache_get = _name_cache.get
        for i in range(first, len(lines)):
            name, colon, value = lines[i].partition(b":")
            lname = cache_get(name)
            if lname is None or not colon:
                lname = self._new_name(lines[i], name, colon)
            value = value.strip(b" \t")
            append((lname, value))
            if lname in _SPECIAL:
                special.append((lname, value))
        return headers, special

    def _new_name(self, line: bytes, name: bytes, colon: bytes) -> bytes:
        if line[:1] in (b" ", b"\t"):
            raise self._fail(Http1Error(
                "obs-fold (a header line starting with whitespace) is not accepted: "
                "the sender must not fold header values"))
        if not colon:
            raise self._fail(Http1Error(f"header line without a colon: {line[:64]!r}"))
        if not name:
            raise self._fail(Http1Error("header line with an empty name"))
        if name[-1:] in (b" ", b"\t"):
            raise self._fail(Http1Error(
                f"whitespace between the header name {name.rstrip()[:64]!r} and the colon"))
        if name.translate(None, _TCHAR):
            raise self._fail(Http1Error(f"invalid character in header name {name[:64]!r}"))
        lname = name.lower()
        if len(_name_cache) < _NAME_CACHE_MAX:
            _name_cache[name] = lname
        return lname

    def _on_head(self, lines: list[bytes]) -> Event:
        raise NotImplementedError

    def _framing(self, special: Headers, version: bytes) -> tuple[int | None, bool, bool, int]:
        """From the framing fields: (Content-Length, chunked, keep-alive, Host count)."""
        content_length: int | None = None
        codings: list[bytes] = []
        close = False
        keep_alive_token = False
        hosts = 0
        for name, value in special:
            if name == _HOST:
                hosts += 1
            elif name == _CONTENT_LENGTH:
                if content_length is not None:
                    raise self._fail(Http1Error(
                        "more than one Content-Length field: a request smuggling shape"))
                if not value.isdigit() or len(value) > _MAX_CL_DIGITS:
                    raise self._fail(Http1Error(
                        f"invalid Content-Length {value[:32]!r}: expected 1 to 18 digits"))
                content_length = int(value)
            elif name == _TRANSFER_ENCODING:
                codings.extend(value.split(b","))
            elif value == b"keep-alive":
                keep_alive_token = True
            else:
                for token in value.lower().split(b","):
                    token = token.strip(b" \t")
                    if token == b"close":
                        close = True
                    elif token == b"keep-alive":
                        keep_alive_token = True
        chunked = False
        if codings:
            chunked = self._check_codings(codings, version, content_length)
        keep_alive = not close and (version == b"1.1" or keep_alive_token)
        return content_length, chunked, keep_alive, hosts

    def _check_codings(self, codings: list[bytes], version: bytes,
                       content_length: int | None) -> bool:
        if version != b"1.1":
            raise self._fail(Http1Error(
                "Transfer-Encoding in an HTTP/1.0 message: its framing cannot be trusted"))
        if content_length is not None:
            raise self._fail(Http1Error(
                "both Content-Length and Transfer-Encoding: a request smuggling shape"))
        names = [c.strip(b" \t").lower() for c in codings]
        if b"" in names:
            # The RFC lets list parsers skip empty elements; Envoy does not (its
            # value must be exactly "chunked"), and neither do we: less to disagree on.
            raise self._fail(Http1Error(
                f"empty element in Transfer-Encoding {b','.join(codings)[:64]!r}"))
        if names[-1] != b"chunked":
            raise self._fail(Http1Error(
                f"Transfer-Encoding {b', '.join(names)!r} does not end in chunked: "
                "the body length cannot be determined"))
        if len(names) > 1:
            if b"chunked" in names[:-1]:
                raise self._fail(Http1Error("chunked applied more than once"))
            raise self._fail(Http1UnsupportedError(
                f"transfer coding {names[0]!r} is not implemented (only chunked is)"))
        return True

    def _start_body(self, content_length: int | None, chunked: bool) -> None:
        limits = self._limits
        if chunked:
            self._chunk_total = 0
            self._state = _CHUNK_SIZE
        elif content_length:
            if limits.max_body is not None and content_length > limits.max_body:
                raise self._fail(Http1TooLargeError(
                    f"Content-Length {content_length} above the {limits.max_body}-byte limit",
                    413))
            self._remaining = content_length
            self._state = _BODY_LENGTH
        else:
            self._state = _END


class RequestParser(_Parser):
    """Parses what a client sends: requests, pipelined one after another."""

    __slots__ = ()

    def __init__(self, limits: H1Limits = DEFAULT_LIMITS) -> None:
        super().__init__(limits, None)

    def _line_too_long(self) -> Http1Error:
        return Http1TooLargeError(
            f"request line longer than {self._limits.max_line} bytes", 414)

    def _on_head(self, lines: list[bytes]) -> Event:
        limits = self._limits
        line = lines[0]
        if len(line) > limits.max_line:
            raise self._fail(self._line_too_long())
        try:
            method, target, version = line.split(b" ")
        except ValueError:
            raise self._fail(Http1Error(
                f"malformed request line {line[:64]!r}: expected METHOD SP target SP version"
            )) from None
        if method not in _KNOWN_METHODS and (not method or method.translate(None, _TCHAR)):
            raise self._fail(Http1Error(f"invalid method {method[:32]!r}"))
        if version == b"HTTP/1.1":
            version = b"1.1"
        elif version == b"HTTP/1.0":
            version = b"1.0"
        elif _HTTP_VERSION.fullmatch(version):
            if version[5] != 0x31:
                raise self._fail(Http1UnsupportedError(
                    f"HTTP version {version!r} is not supported: use HTTP/1.1", 505))
            # A higher 1.x minor is read as 1.1 (RFC 9110 section 2.5).
            version = b"1.1"
        else:
            raise self._fail(Http1Error(f"invalid HTTP version {version[:32]!r}"))
        # Spaces were split off and the head holds no CTL but HTAB: ASCII without
        # HTAB is visible ASCII.
        if target[:1] != b"/" or not target.isascii() or b"\t" in target or (
                method == b"CONNECT"):
            self._check_target(method, target)
        if len(lines) - 1 > limits.max_headers:
            raise self._fail(Http1TooLargeError(f"more than {limits.max_headers} header fields"))
        headers, special = self._fields(lines, 1)
        if len(special) == 1 and special[0][0] == _HOST:
            content_length, chunked, keep_alive, hosts = None, False, version == b"1.1", 1
        else:
            content_length, chunked, keep_alive, hosts = self._framing(special, version)
        if hosts != 1 and (hosts or version == b"1.1"):
            raise self._fail(Http1Error("an HTTP/1.1 request needs exactly one Host field"))
        if method == b"CONNECT":
            if chunked:
                raise self._fail(Http1UnsupportedError("Transfer-Encoding on a CONNECT request"))
            if content_length:
                raise self._fail(Http1Error("a CONNECT request cannot carry a body"))
            self._after_end = _SWITCHED if keep_alive else _CLOSED
        else:
            self._after_end = _HEAD if keep_alive else _CLOSED
        if chunked or content_length:
            self._start_body(content_length, chunked)
        else:
            self._state = _END
        return _request_head(method, target, headers, version, content_length, chunked,
                             keep_alive)

    def _check_target(self, method: bytes, target: bytes) -> None:
        if not target or target.translate(None, _VCHAR):
            raise self._fail(Http1Error(
                f"invalid request target {target[:64]!r}: only visible ASCII is allowed"))
        if method == b"CONNECT":
            if not _AUTHORITY_FORM.fullmatch(target):
                raise self._fail(Http1Error(
                    f"CONNECT target {target[:64]!r} is not host:port"))
        elif target == b"*":
            if method != b"OPTIONS":
                raise self._fail(Http1Error("asterisk target is only valid for OPTIONS"))
        elif not target.startswith(b"/") and not _ABSOLUTE_FORM.fullmatch(target):
            raise self._fail(Http1Error(
                f"invalid request target {target[:64]!r}: expected /path or scheme://host/path"))


class ResponseParser(_Parser):
    """Parses what a server sends: responses, in the order of the requests sent."""

    __slots__ = ("_methods",)

    def __init__(self, limits: H1Limits = DEFAULT_LIMITS) -> None:
        super().__init__(limits, 502)
        self._methods: deque[bytes] = deque()

    def expect_response(self, method: bytes) -> None:
        """Record that a request with ``method`` was sent: its response comes next in line."""
        self._methods.append(method)

    def _line_too_long(self) -> Http1Error:
        return Http1TooLargeError(f"status line longer than {self._limits.max_line} bytes")

    def _on_head(self, lines: list[bytes]) -> Event:
        limits = self._limits
        line = lines[0]
        if len(line) > limits.max_line:
            raise self._fail(self._line_too_long())
        parts = line.split(b" ", 2)
        version = parts[0]
        if version == b"HTTP/1.1":
            version = b"1.1"
        elif version == b"HTTP/1.0":
            version = b"1.0"
        else:
            raise self._fail(Http1Error(f"unsupported response version {version[:32]!r}"))
        code = parts[1] if len(parts) > 1 else b""
        if len(code) != 3 or not code.isdigit() or code[0] == 0x30:
            raise self._fail(Http1Error(f"invalid status code {code[:32]!r}"))
        status = int(code)
        reason = parts[2] if len(parts) == 3 else b""
        if not self._methods:
            raise self._fail(Http1Error(
                "a response arrived with no request outstanding: the server is out of step"))
        if len(lines) - 1 > limits.max_headers:
            raise self._fail(Http1TooLargeError(f"more than {limits.max_headers} header fields"))
        headers, special = self._fields(lines, 1)
        content_length, chunked, keep_alive, _hosts = self._framing(special, version)
        if status < 200:
            if status == 101:
                self._methods.popleft()
                self._state = _SWITCHED
        else:
            method = self._methods.popleft()
            if method == b"CONNECT" and status < 300:
                self._after_end = _SWITCHED
                self._state = _END
            elif method == b"HEAD" or status == 204 or status == 304:
                self._after_end = _HEAD if keep_alive else _CLOSED
                self._state = _END
            elif chunked or content_length is not None:
                self._after_end = _HEAD if keep_alive else _CLOSED
                self._start_body(content_length, chunked)
            else:
                # No length: the body runs to the end of the connection.
                keep_alive = False
                self._after_end = _CLOSED
                self._state = _BODY_EOF
        return _response_head(status, reason, headers, version, content_length, chunked,
                              keep_alive)
