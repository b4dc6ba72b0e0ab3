"""Line ends in the HTTP/1.1 parser: what a bare LF or CR means, whatever the split."""

from __future__ import annotations

import pytest

from common.errors import Http1Error
from tests.unit.h1_helpers import bytewise, run
from waypoint.http import EndOfMessage, H1Limits, RequestHead, RequestParser

SMALL = H1Limits(max_line=48, max_head_bytes=160, max_headers=6, max_chunk_line=24,
                 max_trailer_bytes=64, max_body=1000)
CHUNKED_HEAD = b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"


def verdict(chunks: list[bytes]) -> int | None:
    try:
        run(RequestParser(SMALL), chunks)
    except Http1Error as exc:
        return exc.status
    return None


@pytest.mark.parametrize(("line", "status"), [
    (b"\rGET /" + b"a" * 60 + b" HTTP/1.1", 400),   # bare CR in an over-long line
    (b"GET /" + b"\x01" * 60 + b" HTTP/1.1", 400),  # control byte in an over-long line
    (b"GET /" + b"a" * 60 + b" HTTP/1.1", 414),
    (b"GET /" + b"a" * 34 + b" HTTP/1.1", None),    # exactly max_line bytes before CRLF
])
def test_the_start_line_verdict_does_not_depend_on_the_split(line: bytes,
                                                             status: int | None) -> None:
    wire = line + b"\r\nhost: a\r\n\x00bad: x\r\n\r\n" if status else line + b"\r\nhost: a\r\n\r\n"
    assert verdict([wire]) == status
    assert verdict(bytewise(wire)) == status


@pytest.mark.parametrize("body", [
    b"0\n\r\n",            # last-chunk line ended by a bare LF
    b"1\nx\r\n0\r\n\r\n",  # chunk-size line ended by a bare LF
    b"1\r\nx\n0\r\n\r\n",  # chunk data followed by a bare LF
])
def test_chunked_framing_needs_crlf(body: bytes) -> None:
    for chunks in ([CHUNKED_HEAD + body], bytewise(CHUNKED_HEAD + body)):
        with pytest.raises(Http1Error, match="LF") as info:
            run(RequestParser(), chunks)
        assert info.value.status == 400


def test_trailer_fields_and_empty_lines_between_requests_accept_a_bare_lf() -> None:
    # RFC 9112 section 2.2: field lines may end in a bare LF, and a server
    # ignores empty lines before a request line.
    wire = (CHUNKED_HEAD + b"0\r\nx: 1\n\r\n\r\n\nGET / HTTP/1.1\r\nhost: a\r\n\r\n")
    for chunks in ([wire], bytewise(wire)):
        events = run(RequestParser(), chunks)
        assert [type(ev) for ev in events] == [RequestHead, EndOfMessage, RequestHead,
                                               EndOfMessage]
        assert events[1] == EndOfMessage(((b"x", b"1"),))
