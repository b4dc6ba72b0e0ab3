"""The HTTP/1.1 parser on valid shapes: events, framing, keep-alive, pipelining, splits."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from common.errors import Http1Error
from tests.unit.h1_helpers import bytewise, new_parser, normalize, run
from waypoint.http import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Event,
    RequestHead,
    RequestParser,
    ResponseHead,
)


def req(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], *,
        version: bytes = b"1.1", content_length: int | None = None, chunked: bool = False,
        keep_alive: bool = True) -> RequestHead:
    return RequestHead(method=method, target=target, headers=headers, version=version,
                       content_length=content_length, chunked=chunked, keep_alive=keep_alive)


def resp(status: int, headers: list[tuple[bytes, bytes]], *, reason: bytes = b"OK",
         version: bytes = b"1.1", content_length: int | None = None, chunked: bool = False,
         keep_alive: bool = True) -> ResponseHead:
    return ResponseHead(status=status, reason=reason, headers=headers, version=version,
                        content_length=content_length, chunked=chunked, keep_alive=keep_alive)


EOM = EndOfMessage()
HOST = [(b"host", b"a")]


@dataclass
class Case:
    id: str
    kind: str
    data: bytes
    events: list[Event]
    methods: list[bytes] = field(default_factory=list)
    eof: bool = False
    must_close: bool = False
    switched: bool = False
    trailing: bytes = b""


VALID = [
    Case("simple-get", "request", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
         [req(b"GET", b"/", HOST), EOM]),
    Case("pipelined-get-post-put", "request",
         b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
         b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
         b"PUT /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"3\r\nabc\r\n0\r\n\r\n",
         [req(b"GET", b"/1", HOST), EOM,
          req(b"POST", b"/2", [*HOST, (b"content-length", b"5")], content_length=5),
          Data(b"hello"), EOM,
          req(b"PUT", b"/3", [*HOST, (b"transfer-encoding", b"chunked")], chunked=True),
          Data(b"abc"), EOM]),
    Case("chunked-extensions-and-trailers", "request",
         b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n"
         b"5;name=value;quoted=\"a;b\"\r\nhello\r\n000A \t;x\r\n0123456789\r\n"
         b"0\r\nGrpc-Status: 0\r\nx-trailer: a b\r\n\r\n",
         [req(b"POST", b"/c", [*HOST, (b"transfer-encoding", b"Chunked")], chunked=True),
          Data(b"hello0123456789"),
          EndOfMessage([(b"grpc-status", b"0"), (b"x-trailer", b"a b")])]),
    Case("http10-closes", "request",
         b"GET / HTTP/1.0\r\n\r\nGET /ignored HTTP/1.0\r\n\r\n",
         [req(b"GET", b"/", [], version=b"1.0", keep_alive=False), EOM], must_close=True),
    Case("http10-keep-alive", "request",
         b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\nGET /2 HTTP/1.0\r\n\r\n",
         [req(b"GET", b"/", [(b"connection", b"Keep-Alive")], version=b"1.0"), EOM,
          req(b"GET", b"/2", [], version=b"1.0", keep_alive=False), EOM], must_close=True),
    Case("connection-close", "request",
         b"GET / HTTP/1.1\r\nHost: a\r\nConnection: foo, close\r\n\r\n",
         [req(b"GET", b"/", [*HOST, (b"connection", b"foo, close")], keep_alive=False), EOM],
         must_close=True),
    Case("bare-lf-line-ends", "request",
         b"GET / HTTP/1.1\nHost: a\nX-A: 1\r\n\n",
         [req(b"GET", b"/", [*HOST, (b"x-a", b"1")]), EOM]),
    Case("leading-empty-lines", "request", b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
         [req(b"GET", b"/", HOST), EOM]),
    Case("absolute-form", "request",
         b"GET http://example.com:8080/x?y=1 HTTP/1.1\r\nHost: example.com\r\n\r\n",
         [req(b"GET", b"http://example.com:8080/x?y=1", [(b"host", b"example.com")]), EOM]),
    Case("options-asterisk", "request", b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
         [req(b"OPTIONS", b"*", HOST), EOM]),
    Case("connect-switches", "request",
         b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\n\r\n\x16\x03\x01tls",
         [req(b"CONNECT", b"10.0.0.1:443", [(b"host", b"10.0.0.1:443")]), EOM],
         switched=True, trailing=b"\x16\x03\x01tls"),
    Case("fields-trimmed-duplicates-kept", "request",
         b"GET /p?q HTTP/1.1\r\nHost: a\r\nX-Dup: 1\r\nx-dup:2\r\nEmpty:\r\n"
         b"Spaced: \t a  b \t\r\nLatin: caf\xe9\r\n\r\n",
         [req(b"GET", b"/p?q", [*HOST, (b"x-dup", b"1"), (b"x-dup", b"2"), (b"empty", b""),
                                (b"spaced", b"a  b"), (b"latin", b"caf\xe9")]), EOM]),
    Case("zero-content-length", "request",
         b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
         [req(b"POST", b"/", [*HOST, (b"content-length", b"0")], content_length=0), EOM]),
    Case("custom-method-and-1.2", "request", b"PURGE /x HTTP/1.2\r\nHost: a\r\n\r\n",
         [req(b"PURGE", b"/x", HOST), EOM]),
    Case("expect-continue", "request",
         b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
         [req(b"PUT", b"/", [*HOST, (b"expect", b"100-continue"), (b"content-length", b"2")],
              content_length=2), Data(b"ok"), EOM]),
    Case("clean-close-between-requests", "request", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
         [req(b"GET", b"/", HOST), EOM, ConnectionClosed()], eof=True, must_close=True),
    Case("response-content-length", "response",
         b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
         [resp(200, [(b"content-length", b"3")], content_length=3), Data(b"abc"), EOM],
         methods=[b"GET"]),
    Case("response-to-head-has-no-body", "response",
         b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n"
         b"\r\nx",
         [resp(200, [(b"content-length", b"3")], content_length=3), EOM,
          resp(200, [(b"content-length", b"1")], content_length=1), Data(b"x"), EOM],
         methods=[b"HEAD", b"GET"]),
    Case("informational-then-final", "response",
         b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"
         b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
         [resp(100, [], reason=b"Continue"),
          resp(103, [(b"link", b"</s>")], reason=b"Early Hints"),
          resp(201, [(b"content-length", b"0")], reason=b"Created", content_length=0), EOM],
         methods=[b"PUT"]),
    Case("204-and-304-have-no-body", "response",
         b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
         [resp(204, [], reason=b"No Content"), EOM,
          resp(304, [(b"content-length", b"9")], reason=b"Not Modified", content_length=9),
          EOM],
         methods=[b"GET", b"GET"]),
    Case("read-until-eof", "response", b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\nall of it",
         [resp(200, [(b"server", b"x")], keep_alive=False), Data(b"all of it"), EOM],
         methods=[b"GET"], eof=True, must_close=True),
    Case("http10-response-until-eof", "response", b"HTTP/1.0 200 OK\r\n\r\nbody",
         [resp(200, [], version=b"1.0", keep_alive=False), Data(b"body"), EOM],
         methods=[b"GET"], eof=True, must_close=True),
    Case("response-chunked-trailers", "response",
         b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n"
         b"2\r\nhi\r\n0\r\ngrpc-status: 0\r\n\r\n",
         [resp(200, [(b"transfer-encoding", b"chunked"), (b"trailer", b"grpc-status")],
               chunked=True), Data(b"hi"), EndOfMessage([(b"grpc-status", b"0")])],
         methods=[b"POST"]),
    Case("response-no-reason", "response", b"HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n",
         [resp(404, [(b"content-length", b"0")], reason=b"", content_length=0), EOM],
         methods=[b"GET"]),
    Case("switching-protocols", "response",
         b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
         [resp(101, [(b"upgrade", b"websocket")], reason=b"Switching Protocols")],
         methods=[b"GET"], switched=True, trailing=b"\x81\x05hello"),
    Case("connect-established", "response",
         b"HTTP/1.1 200 Connection established\r\n\r\ntunnel bytes",
         [resp(200, [], reason=b"Connection established"), EOM],
         methods=[b"CONNECT"], switched=True, trailing=b"tunnel bytes"),
]


@pytest.mark.parametrize("case", VALID, ids=[c.id for c in VALID])
def test_valid_shapes_give_expected_events(case: Case) -> None:
    parser = new_parser(case.kind, case.methods)
    assert run(parser, [case.data], eof=case.eof) == normalize(case.events)
    assert parser.next_event() in (NEED_DATA, PAUSED)
    assert parser.must_close is case.must_close
    assert parser.switched_protocol is case.switched
    if case.switched:
        assert parser.trailing_data == (case.trailing, case.eof)


@pytest.mark.parametrize("case", VALID, ids=[c.id for c in VALID])
def test_byte_at_a_time_gives_the_same_events(case: Case) -> None:
    parser = new_parser(case.kind, case.methods)
    assert run(parser, bytewise(case.data), eof=case.eof) == normalize(case.events)
    assert parser.must_close is case.must_close
    if case.switched:
        assert parser.trailing_data == (case.trailing, case.eof)


@pytest.mark.parametrize("case", VALID, ids=[c.id for c in VALID])
def test_every_two_way_split_gives_the_same_events(case: Case) -> None:
    for cut in range(1, len(case.data)):
        parser = new_parser(case.kind, case.methods)
        chunks = [case.data[:cut], case.data[cut:]]
        assert run(parser, chunks, eof=case.eof) == normalize(case.events), cut


def test_body_is_a_zero_copy_view_of_the_fed_bytes() -> None:
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n01234")
    assert isinstance(parser.next_event(), RequestHead)
    first = parser.next_event()
    assert isinstance(first, Data) and isinstance(first.data, memoryview)
    assert first.data.obj is not None and bytes(first.data) == b"01234"
    body = b"56789"
    parser.feed(body)
    second = parser.next_event()
    assert isinstance(second, Data) and second.data is body  # the very object fed
    assert parser.next_event() == EndOfMessage()


def test_next_request_waits_in_the_buffer_until_asked() -> None:
    parser = RequestParser()
    parser.feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\nGET /3")
    first = parser.next_event()
    assert isinstance(first, RequestHead) and first.target == b"/1"
    assert parser.next_event() == EndOfMessage()
    assert parser.buffered == len(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\nGET /3")
    second = parser.next_event()
    assert isinstance(second, RequestHead) and second.target == b"/2"
    assert parser.next_event() == EndOfMessage()
    assert parser.next_event() is NEED_DATA
    parser.feed(b" HTTP/1.1\r\nHost: a\r\n\r\n")
    third = parser.next_event()
    assert isinstance(third, RequestHead) and third.target == b"/3"


def test_expect_continue_only_with_a_body_on_http11() -> None:
    parser = RequestParser()
    parser.feed(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n")
    with_body = parser.next_event()
    assert isinstance(with_body, RequestHead) and with_body.expect_continue
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n")
    without = parser.next_event()
    assert isinstance(without, RequestHead) and not without.expect_continue


def test_events_after_the_closing_message_are_ignored_and_bounded() -> None:
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert normalize(parser.events()) == normalize([
        req(b"GET", b"/", [*HOST, (b"connection", b"close")], keep_alive=False), EOM])
    held = parser.buffered
    parser.feed(b"x" * 100_000)
    assert parser.buffered == held
    assert parser.next_event() is PAUSED


def test_events_before_an_error_are_delivered_then_the_error() -> None:
    parser = RequestParser()
    parser.feed(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nGET /bad HTTP/9.9\r\nHost: a\r\n\r\n")
    good = parser.events()
    assert [type(ev) for ev in good] == [RequestHead, EndOfMessage]
    with pytest.raises(Http1Error) as info:
        parser.events()
    assert info.value.status == 505
    assert parser.must_close


def test_parsed_events_are_frozen_dataclasses() -> None:
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx")
    head, data, end = parser.events()
    for event, name in ((head, "headers"), (data, "data"), (end, "trailers")):
        assert dataclasses.is_dataclass(event) and not hasattr(event, "__dict__")
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(event, name, None)
    assert head == req(b"POST", b"/", [*HOST, (b"content-length", b"1")], content_length=1)
    assert data == Data(b"x")
