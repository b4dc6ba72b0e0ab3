"""The HTTP/1.1 writer: exact bytes, body framing checks, refusals, hop-by-hop rules."""

from __future__ import annotations

import pytest

from common.errors import LocalProtocolError
from tests.unit.h1_helpers import run
from waypoint.http import (
    Data,
    EndOfMessage,
    H1Limits,
    RequestHead,
    RequestParser,
    RequestWriter,
    ResponseHead,
    ResponseWriter,
    forward_headers,
    hop_by_hop_names,
    reason_phrase,
    strip_hop_by_hop,
)


def request(*headers: tuple[bytes, bytes], method: bytes = b"GET", target: bytes = b"/",
            version: bytes = b"1.1") -> RequestHead:
    return RequestHead(method=method, target=target, headers=list(headers), version=version)


def response(status: int, *headers: tuple[bytes, bytes], version: bytes = b"1.1") -> ResponseHead:
    return ResponseHead(status=status, reason=reason_phrase(status), headers=list(headers),
                        version=version)


def test_request_head_is_one_exact_join() -> None:
    writer = RequestWriter()
    out = writer.head(request((b"host", b"a"), (b"x-a", b"1"), (b"x-a", b"2"), target=b"/p?q"))
    assert out == b"GET /p?q HTTP/1.1\r\nhost: a\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
    assert writer.data(b"") == []
    assert writer.end() == b""
    assert not writer.must_close


def test_request_without_headers() -> None:
    assert RequestWriter().head(request(version=b"1.0")) == b"GET / HTTP/1.0\r\n\r\n"


def test_content_length_body_is_counted() -> None:
    writer = RequestWriter()
    writer.head(request((b"host", b"a"), (b"content-length", b"5"), method=b"POST"))
    body = memoryview(b"hello")
    parts = writer.data(body[:2])
    assert parts == [b"he"] and parts[0] is not None
    with pytest.raises(LocalProtocolError, match="left of the Content-Length"):
        writer.data(b"toolong")
    with pytest.raises(LocalProtocolError, match="short of its Content-Length"):
        writer.end()
    assert writer.data(body[2:]) == [b"llo"]
    assert writer.end() == b""


def test_chunked_body_and_trailers() -> None:
    writer = ResponseWriter()
    writer.head(response(200, (b"transfer-encoding", b"chunked")))
    data = b"x" * 300
    parts = writer.data(data)
    assert parts == [b"12c\r\n", data, b"\r\n"]
    assert parts[1] is data  # the caller's buffer, not a copy
    assert writer.data(b"") == []  # an empty chunk would end the body early
    assert writer.end([(b"grpc-status", b"0")]) == b"0\r\ngrpc-status: 0\r\n\r\n"
    writer.head(response(200, (b"transfer-encoding", b"chunked")))
    assert writer.end() == b"0\r\n\r\n"


def test_bodyless_responses_refuse_data() -> None:
    for status, method in ((204, b"GET"), (304, b"GET"), (200, b"HEAD")):
        writer = ResponseWriter()
        writer.head(response(status, (b"content-length", b"10")), method)
        with pytest.raises(LocalProtocolError, match="without a body"):
            writer.data(b"x")
        assert writer.end() == b""


def test_informational_then_final_response() -> None:
    writer = ResponseWriter()
    assert writer.head(response(100)) == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert writer.head(response(200, (b"content-length", b"0"))).startswith(b"HTTP/1.1 200 OK")
    assert writer.end() == b""


def test_response_without_length_is_delimited_by_close() -> None:
    writer = ResponseWriter()
    writer.head(response(200))
    assert writer.must_close
    assert writer.data(b"abc") == [b"abc"]
    writer.end()
    with pytest.raises(LocalProtocolError, match="closing"):
        writer.head(response(200))


def test_connection_close_and_http10_mark_the_writer_closing() -> None:
    closing = RequestWriter()
    closing.head(request((b"host", b"a"), (b"connection", b"Keep-Alive, Close")))
    assert closing.must_close
    http10 = ResponseWriter()
    http10.head(response(200, (b"content-length", b"0"), version=b"1.0"))
    assert http10.must_close
    kept = ResponseWriter()
    kept.head(response(200, (b"content-length", b"0"), (b"connection", b"keep-alive"),
                       version=b"1.0"))
    assert not kept.must_close


@pytest.mark.parametrize("headers", [
    [(b"x-a", b"1\r\nx-injected: 1")],
    [(b"x-a", b"1\nx")],
    [(b"x-a", b"1\rx")],
    [(b"x-a", b"a\x00b")],
])
def test_response_splitting_values_are_refused(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(LocalProtocolError, match="splitting"):
        ResponseWriter().head(ResponseHead(status=200, headers=headers))


@pytest.mark.parametrize("name", [b"X-Upper", b"x a", b"x:a", b"", b"x\r\ny"])
def test_names_must_be_lower_case_tokens(name: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        RequestWriter().head(request((name, b"v")))


@pytest.mark.parametrize("head", [
    request(method=b"G T"), request(method=b""), request(target=b"/a b"), request(target=b""),
    request(target=b"/\x01"), request(version=b"2"),
])
def test_invalid_request_lines_are_refused(head: RequestHead) -> None:
    with pytest.raises(LocalProtocolError):
        RequestWriter().head(head)


@pytest.mark.parametrize("headers", [
    [(b"content-length", b"1"), (b"transfer-encoding", b"chunked")],
    [(b"transfer-encoding", b"chunked"), (b"content-length", b"1")],
    [(b"content-length", b"1"), (b"content-length", b"1")],
    [(b"content-length", b"-1")],
    [(b"transfer-encoding", b"gzip, chunked")],
])
def test_ambiguous_framing_is_never_written(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(LocalProtocolError):
        ResponseWriter().head(ResponseHead(status=200, headers=headers))


def test_misuse_of_the_message_sequence() -> None:
    writer = RequestWriter()
    with pytest.raises(LocalProtocolError, match="without a message"):
        writer.end()
    writer.head(request((b"host", b"a"), (b"content-length", b"1"), method=b"POST"))
    with pytest.raises(LocalProtocolError, match="previous message"):
        writer.head(request((b"host", b"a")))
    writer.data(b"x")
    with pytest.raises(LocalProtocolError, match="trailers need chunked"):
        writer.end([(b"x", b"y")])
    writer.end()
    with pytest.raises(LocalProtocolError, match="after end"):
        writer.data(b"late")
    writer.head(request((b"host", b"a")))
    with pytest.raises(LocalProtocolError, match="without a body"):
        writer.data(b"x")


def test_hop_by_hop_headers_are_stripped() -> None:
    headers = [
        (b"host", b"a"), (b"connection", b"keep-alive, X-Private, host, content-length, te"),
        (b"keep-alive", b"timeout=5"), (b"proxy-connection", b"keep-alive"),
        (b"te", b"trailers, deflate"), (b"trailer", b"grpc-status"),
        (b"transfer-encoding", b"chunked"), (b"upgrade", b"websocket"),
        (b"x-private", b"secret"), (b"content-length", b"3"), (b"x-end", b"1"),
    ]
    assert strip_hop_by_hop(headers) == [
        (b"host", b"a"), (b"te", b"trailers"), (b"content-length", b"3"), (b"x-end", b"1")]
    assert b"x-private" in hop_by_hop_names(headers)
    assert b"host" not in hop_by_hop_names(headers)


def test_te_without_trailers_is_dropped_and_clean_headers_pass_through() -> None:
    assert strip_hop_by_hop([(b"te", b"gzip"), (b"x", b"1")]) == [(b"x", b"1")]
    clean = [(b"host", b"a"), (b"x", b"1")]
    stripped = strip_hop_by_hop(clean)
    assert stripped == clean and stripped is not clean


def test_reason_phrases() -> None:
    assert reason_phrase(431) == b"Request Header Fields Too Large"
    assert reason_phrase(299) == b""


def test_forwarding_a_chunked_request_keeps_its_framing() -> None:
    parser = RequestParser()
    wire = (b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: x-hop\r\nX-Hop: 1\r\nTE: trailers\r\n\r\n"
            b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\n\r\n")
    head, data, end = run(parser, [wire])
    assert isinstance(head, RequestHead) and isinstance(data, Data)
    assert isinstance(end, EndOfMessage)
    writer = RequestWriter()
    out = [writer.head(head, forward_headers(head))]
    out += [bytes(b) for b in writer.data(data.data)]
    out.append(writer.end(end.trailers))
    forwarded = run(RequestParser(), [b"".join(out)])
    assert forwarded[0] == RequestHead(
        method=b"POST", target=b"/up", chunked=True,
        headers=[(b"host", b"a"), (b"te", b"trailers"), (b"transfer-encoding", b"chunked")])
    assert forwarded[1:] == [Data(b"abc"), EndOfMessage(((b"grpc-status", b"0"),))]


def test_chunked_is_refused_for_http10() -> None:
    with pytest.raises(LocalProtocolError, match=r"HTTP/1\.0"):
        ResponseWriter().head(response(200, (b"transfer-encoding", b"chunked"), version=b"1.0"))
    with pytest.raises(LocalProtocolError, match=r"HTTP/1\.0"):
        RequestWriter().head(request((b"transfer-encoding", b"chunked"), version=b"1.0"))
    writer = ResponseWriter()
    writer.head(response(200, version=b"1.0"))
    assert writer.must_close and writer.data(b"body") == [b"body"]


@pytest.mark.parametrize("field", ["max_line", "max_head_bytes", "max_headers",
                                   "max_chunk_line", "max_trailer_bytes"])
def test_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        H1Limits(**{field: 0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_body"):
        H1Limits(max_body=-1)
