"""The HTTP/1.1 parser refuses smuggling shapes, malformed heads and oversized input."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from common.errors import Http1Error, Http1TooLargeError, Http1UnsupportedError, MeshError
from tests.unit.h1_helpers import bytewise, drain, new_parser
from waypoint.http import NEED_DATA, H1Limits, RequestHead, RequestParser

GET = b"GET / HTTP/1.1\r\nHost: a\r\n"


def post(*headers: bytes, body: bytes = b"") -> bytes:
    fields = b"".join(h + b"\r\n" for h in headers)
    return b"POST / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n" + body


@dataclass
class Bad:
    id: str
    data: bytes
    status: int
    kind: str = "request"
    methods: list[bytes] = field(default_factory=list)
    error: type[Http1Error] = Http1Error
    eof: bool = False
    limits: H1Limits | None = None


SMALL = H1Limits(max_line=64, max_head_bytes=256, max_headers=4, max_chunk_line=32,
                 max_trailer_bytes=64, max_body=10)

INVALID = [
    # Framing ambiguity: the request smuggling shapes.
    Bad("cl-and-te", post(b"Content-Length: 3", b"Transfer-Encoding: chunked"), 400),
    Bad("te-and-cl", post(b"Transfer-Encoding: chunked", b"Content-Length: 3"), 400),
    Bad("cl-duplicate-different", post(b"Content-Length: 3", b"Content-Length: 4"), 400),
    Bad("cl-duplicate-equal", post(b"Content-Length: 3", b"Content-Length: 3"), 400),
    Bad("cl-list", post(b"Content-Length: 3, 3"), 400),
    Bad("cl-negative", post(b"Content-Length: -1"), 400),
    Bad("cl-plus", post(b"Content-Length: +3"), 400),
    Bad("cl-hex", post(b"Content-Length: 0x3"), 400),
    Bad("cl-underscore", post(b"Content-Length: 1_0"), 400),
    Bad("cl-empty", post(b"Content-Length:"), 400),
    Bad("cl-overflow", post(b"Content-Length: 99999999999999999999"), 400),
    Bad("cl-unicode-digit", post(b"Content-Length: \xd9\xa3"), 400),
    Bad("te-gzip-only", post(b"Transfer-Encoding: gzip"), 400),
    Bad("te-identity", post(b"Transfer-Encoding: identity"), 400),
    Bad("te-chunked-not-last", post(b"Transfer-Encoding: chunked, gzip"), 400),
    Bad("te-chunked-twice", post(b"Transfer-Encoding: chunked, chunked"), 400),
    Bad("te-unknown-coding", post(b"Transfer-Encoding: gzip, chunked"), 501,
        error=Http1UnsupportedError),
    Bad("te-split-over-lines", post(b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"),
        501, error=Http1UnsupportedError),
    Bad("te-lookalike", post(b"Transfer-Encoding: xchunked"), 400),
    Bad("te-in-http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    Bad("te-empty", post(b"Transfer-Encoding: ,"), 400),
    Bad("te-no-value", post(b"Transfer-Encoding:"), 400),
    Bad("te-trailing-comma", post(b"Transfer-Encoding: chunked,"), 400),
    Bad("te-leading-comma", post(b"Transfer-Encoding: , chunked"), 400),
    Bad("connect-with-body", b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\nContent-Length: 2\r\n\r\n",
        400),
    # Field syntax.
    Bad("obs-fold", GET + b"X-A: 1\r\n continued\r\n\r\n", 400),
    Bad("obs-fold-tab", GET + b"X-A: 1\r\n\tcontinued\r\n\r\n", 400),
    Bad("first-header-indented", b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400),
    Bad("space-before-colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    Bad("tab-before-colon", b"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n", 400),
    Bad("no-colon", GET + b"NoColon\r\n\r\n", 400),
    Bad("known-name-no-colon", GET + b"host\r\n\r\n", 400),
    Bad("empty-name", GET + b": value\r\n\r\n", 400),
    Bad("bad-name-char", GET + b"X(a): 1\r\n\r\n", 400),
    Bad("non-ascii-name", GET + b"X-\xe9: 1\r\n\r\n", 400),
    Bad("nul-in-value", GET + b"X-A: a\x00b\r\n\r\n", 400),
    Bad("ctl-in-value", GET + b"X-A: a\x01b\r\n\r\n", 400),
    Bad("del-in-value", GET + b"X-A: a\x7fb\r\n\r\n", 400),
    Bad("bare-cr-in-value", GET + b"X-A: a\rb\r\n\r\n", 400),
    Bad("bare-cr-line-end", b"GET / HTTP/1.1\rHost: a\r\n\r\n", 400),
    # Request line.
    Bad("bad-method", b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Bad("double-space", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Bad("missing-version", b"GET /\r\nHost: a\r\n\r\n", 400),
    Bad("space-in-target", b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Bad("tab-in-target", b"GET /a\tb HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Bad("non-ascii-target", b"GET /caf\xe9 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Bad("relative-target", b"GET foo HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Bad("asterisk-not-options", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Bad("connect-path", b"CONNECT /x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Bad("garbage-version", b"GET / HTTP/1.x\r\nHost: a\r\n\r\n", 400),
    Bad("lowercase-version", b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
    Bad("http2-version", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, error=Http1UnsupportedError),
    Bad("http09-version", b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505, error=Http1UnsupportedError),
    Bad("no-host", b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n", 400),
    Bad("two-hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    Bad("leading-control", b"\x00GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    # Chunked bodies.
    Bad("chunk-size-not-hex", post(b"Transfer-Encoding: chunked", body=b"zz\r\n"), 400),
    Bad("chunk-size-negative", post(b"Transfer-Encoding: chunked", body=b"-1\r\n"), 400),
    Bad("chunk-size-0x", post(b"Transfer-Encoding: chunked", body=b"0x5\r\n"), 400),
    Bad("chunk-size-leading-space", post(b"Transfer-Encoding: chunked", body=b" 5\r\n"), 400),
    Bad("chunk-size-empty", post(b"Transfer-Encoding: chunked", body=b"\r\n"), 400),
    Bad("chunk-size-17-hex", post(b"Transfer-Encoding: chunked", body=b"1" * 17 + b"\r\n"), 400),
    Bad("chunk-ext-ctl", post(b"Transfer-Encoding: chunked", body=b"5;a=\x01\r\n"), 400),
    Bad("chunk-ext-bare-cr", post(b"Transfer-Encoding: chunked", body=b"5;a\rb\r\n"), 400),
    Bad("chunk-data-overruns", post(b"Transfer-Encoding: chunked", body=b"2\r\nabc\r\n"), 400),
    Bad("chunk-trailer-obs-fold",
        post(b"Transfer-Encoding: chunked", body=b"0\r\nA: 1\r\n folded\r\n\r\n"), 400),
    Bad("chunk-trailer-no-colon",
        post(b"Transfer-Encoding: chunked", body=b"0\r\nnocolon\r\n\r\n"), 400),
    # Truncated input.
    Bad("eof-in-head", b"GET / HTTP/1.1\r\nHost: a\r\n", 400, eof=True),
    Bad("eof-in-body", post(b"Content-Length: 5", body=b"abc"), 400, eof=True),
    Bad("eof-in-chunk", post(b"Transfer-Encoding: chunked", body=b"5\r\nab"), 400, eof=True),
    Bad("eof-in-chunk-size", post(b"Transfer-Encoding: chunked", body=b"5"), 400, eof=True),
    Bad("eof-before-last-chunk", post(b"Transfer-Encoding: chunked", body=b"1\r\na\r\n"), 400,
        eof=True),
    # Bounds (small limits, so the cases stay short).
    Bad("request-line-too-long", b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414,
        error=Http1TooLargeError, limits=SMALL),
    Bad("request-line-unterminated", b"GET /" + b"a" * 100, 414, error=Http1TooLargeError,
        limits=SMALL),
    Bad("head-too-large", GET + b"X-A: " + b"a" * 300 + b"\r\n\r\n", 431,
        error=Http1TooLargeError, limits=SMALL),
    Bad("head-unterminated", GET + b"X-A: " + b"a" * 300, 431, error=Http1TooLargeError,
        limits=SMALL),
    Bad("too-many-headers", GET + b"A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n", 431,
        error=Http1TooLargeError, limits=SMALL),
    Bad("chunk-line-too-long", post(b"Transfer-Encoding: chunked", body=b"5;" + b"e" * 40), 400,
        limits=SMALL),
    Bad("trailers-too-large",
        post(b"Transfer-Encoding: chunked", body=b"0\r\nT: " + b"t" * 80 + b"\r\n\r\n"), 431,
        error=Http1TooLargeError, limits=SMALL),
    Bad("body-over-max", post(b"Content-Length: 11"), 413, error=Http1TooLargeError,
        limits=SMALL),
    Bad("chunked-body-over-max",
        post(b"Transfer-Encoding: chunked", body=b"6\r\nabcdef\r\n6\r\n"), 413,
        error=Http1TooLargeError, limits=SMALL),
    Bad("blank-line-flood", b"\r\n" * 100, 400),
    # Responses: every refusal answers 502 to the downstream client.
    Bad("resp-unsolicited", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 502,
        kind="response"),
    Bad("resp-bad-status", b"HTTP/1.1 20 OK\r\n\r\n", 502, kind="response", methods=[b"GET"]),
    Bad("resp-status-letters", b"HTTP/1.1 2xx OK\r\n\r\n", 502, kind="response",
        methods=[b"GET"]),
    Bad("resp-bad-version", b"HTTP/2 200 OK\r\n\r\n", 502, kind="response", methods=[b"GET"]),
    Bad("resp-cl-and-te",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 502,
        kind="response", methods=[b"GET"]),
    Bad("resp-te-not-chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", 502,
        kind="response", methods=[b"GET"], error=Http1Error),
    Bad("resp-header-nul", b"HTTP/1.1 200 OK\r\nX: \x00\r\n\r\n", 502, kind="response",
        methods=[b"GET"]),
    Bad("resp-status-line-too-long", b"HTTP/1.1 200 " + b"r" * 100, 502, kind="response",
        methods=[b"GET"], error=Http1TooLargeError, limits=SMALL),
    Bad("resp-eof-in-body", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", 502,
        kind="response", methods=[b"GET"], eof=True),
]


def drive(case: Bad, chunks: list[bytes]) -> Http1Error:
    parser = new_parser(case.kind, case.methods, case.limits)
    with pytest.raises(Http1Error) as info:
        for chunk in chunks:
            parser.feed(chunk)
            drain(parser)
        if case.eof:
            parser.feed_eof()
            drain(parser)
    # The parser stays dead: same error again, and the connection must close.
    with pytest.raises(Http1Error) as again:
        parser.next_event()
    assert again.value is info.value
    assert parser.must_close
    return info.value


@pytest.mark.parametrize("case", INVALID, ids=[c.id for c in INVALID])
def test_invalid_input_is_refused_with_its_status(case: Bad) -> None:
    error = drive(case, [case.data])
    assert isinstance(error, case.error), error
    assert isinstance(error, MeshError)
    assert error.status == case.status, error
    assert str(error)


@pytest.mark.parametrize("case", INVALID, ids=[c.id for c in INVALID])
def test_invalid_input_fed_bytewise_is_refused_the_same_way(case: Bad) -> None:
    error = drive(case, bytewise(case.data))
    assert isinstance(error, case.error), error
    assert error.status == case.status, error


def test_a_trickled_megabyte_of_headers_is_refused_within_the_bound() -> None:
    parser = RequestParser()
    parser.feed(GET)
    assert parser.next_event() is NEED_DATA
    limit = 60 * 1024
    fed = len(GET)
    with pytest.raises(Http1TooLargeError) as info:
        line = b"X-Filler: " + b"f" * 1000 + b"\r\n"
        while fed < 1024 * 1024:
            parser.feed(line)
            fed += len(line)
            assert parser.next_event() is NEED_DATA
            assert parser.buffered <= limit + len(line)
    assert info.value.status == 431
    assert fed <= limit + 2 * len(line)


def test_a_slow_request_line_costs_linear_time() -> None:
    # 8 KiB fed one byte at a time must not rescan the buffer each time (quadratic).
    parser = RequestParser()
    parser.feed(b"GET /")
    for _ in range(8 * 1024 - 32):
        parser.feed(b"a")
        assert parser.next_event() is NEED_DATA
    parser.feed(b" HTTP/1.1\r\nHost: a\r\n\r\n")
    head = parser.next_event()
    assert isinstance(head, RequestHead) and len(head.target) == 8 * 1024 - 31
