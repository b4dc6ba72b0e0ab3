"""SOCKS5 server handshake (RFC 1928), sans I/O: byte-by-byte feeding, refusals, reply codes."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import (
    ConnectRefusedError,
    ConnectTimeoutError,
    MeshError,
    NameResolutionError,
    PolicyDeniedError,
    Socks5Error,
    TunnelRejectedError,
)
from ztunnel.socks5 import reply_code
from ztunnel.socks5_proto import (
    ADDRESS_TYPE_NOT_SUPPORTED,
    COMMAND_NOT_SUPPORTED,
    CONNECTION_NOT_ALLOWED,
    CONNECTION_REFUSED,
    GENERAL_FAILURE,
    HOST_UNREACHABLE,
    NETWORK_UNREACHABLE,
    ConnectRequest,
    ServerHandshake,
    reply,
)

GREETING = b"\x05\x01\x00"


def request(atyp: int, address: bytes, port: int = 8080, cmd: int = 1) -> bytes:
    return bytes((5, cmd, 0, atyp)) + address + struct.pack("!H", port)


def domain(name: str) -> bytes:
    return bytes((len(name),)) + name.encode()


@pytest.mark.parametrize(("atyp", "address", "expected"), [
    (1, bytes((10, 1, 2, 3)), ConnectRequest("10.1.2.3", 8080, False)),
    (4, bytes(15) + b"\x01", ConnectRequest("::1", 8080, False)),
    (3, domain("echo.default"), ConnectRequest("echo.default", 8080, True)),
    (3, domain("10.0.0.9"), ConnectRequest("10.0.0.9", 8080, False)),
])
def test_connect_request_of_each_address_type(atyp: int, address: bytes,
                                             expected: ConnectRequest) -> None:
    hs = ServerHandshake()
    assert hs.receive_data(GREETING) == b"\x05\x00"
    assert hs.receive_data(request(atyp, address)) == b""
    assert hs.request == expected and hs.done and hs.leftover == b""


def test_byte_by_byte_with_early_data_kept_for_the_destination() -> None:
    hs = ServerHandshake()
    wire = b"\x05\x02\x02\x00" + request(3, domain("example.com"), 443) + b"GET / HTTP/1.1\r\n"
    sent = b"".join(hs.receive_data(bytes((b,))) for b in wire[:-16])
    assert sent == b"\x05\x00"
    assert hs.request == ConnectRequest("example.com", 443, True)
    hs2 = ServerHandshake()
    hs2.receive_data(wire)
    assert hs2.leftover == b"GET / HTTP/1.1\r\n"


def test_greeting_and_request_in_one_read() -> None:
    hs = ServerHandshake()
    assert hs.receive_data(GREETING + request(1, bytes((1, 2, 3, 4)), 80)) == b"\x05\x00"
    assert hs.request == ConnectRequest("1.2.3.4", 80, False)


def test_only_username_password_offered_gets_no_acceptable_method() -> None:
    hs = ServerHandshake()
    with pytest.raises(Socks5Error):
        hs.receive_data(b"\x05\x01\x02")
    assert hs.error_response == b"\x05\xff"
    with pytest.raises(RuntimeError):
        hs.receive_data(b"more")


def test_not_socks5_is_refused_without_a_reply() -> None:
    hs = ServerHandshake()
    with pytest.raises(Socks5Error):
        hs.receive_data(b"\x04\x01\x00\x50")
    assert hs.error_response == b""


@pytest.mark.parametrize(("cmd", "name"), [(2, "BIND"), (3, "UDP ASSOCIATE"), (9, "9")])
def test_bind_and_udp_associate_are_command_not_supported(cmd: int, name: str) -> None:
    hs = ServerHandshake()
    hs.receive_data(GREETING)
    with pytest.raises(Socks5Error, match=name) as info:
        hs.receive_data(request(1, bytes(4), cmd=cmd))
    assert info.value.reply == COMMAND_NOT_SUPPORTED
    assert hs.error_response[:2] == bytes((5, COMMAND_NOT_SUPPORTED))


def test_unknown_address_type_is_refused() -> None:
    hs = ServerHandshake()
    hs.receive_data(GREETING)
    with pytest.raises(Socks5Error) as info:
        hs.receive_data(b"\x05\x01\x00\x07" + bytes(6))
    assert info.value.reply == ADDRESS_TYPE_NOT_SUPPORTED
    assert hs.error_response[1] == ADDRESS_TYPE_NOT_SUPPORTED


def test_non_ascii_and_empty_domains_are_general_failures() -> None:
    for address in (b"\x00", b"\x02\xc3\xa9"):
        hs = ServerHandshake()
        hs.receive_data(GREETING)
        with pytest.raises(Socks5Error) as info:
            hs.receive_data(request(3, address))
        assert info.value.reply == GENERAL_FAILURE


def test_reply_encodes_both_families() -> None:
    assert reply(0) == b"\x05\x00\x00\x01" + bytes(4) + b"\x00\x00"
    assert reply(5, ("::1", 1080)) == b"\x05\x05\x00\x04" + bytes(15) + b"\x01\x04\x38"


@pytest.mark.parametrize(("exc", "code"), [
    (PolicyDeniedError("no"), CONNECTION_NOT_ALLOWED),
    (TunnelRejectedError(401, "denied"), CONNECTION_NOT_ALLOWED),
    (TunnelRejectedError(503, "upstream refused"), CONNECTION_REFUSED),
    (TunnelRejectedError(400, "bad"), GENERAL_FAILURE),
    (ConnectTimeoutError("slow"), HOST_UNREACHABLE),
    (NameResolutionError("nx"), HOST_UNREACHABLE),
    (MeshError("bug"), GENERAL_FAILURE),
])
def test_reply_code_for_each_failure(exc: BaseException, code: int) -> None:
    assert reply_code(exc) == code


@pytest.mark.parametrize(("err", "code"), [
    (errno.ECONNREFUSED, CONNECTION_REFUSED), (errno.ENETUNREACH, NETWORK_UNREACHABLE),
    (errno.EHOSTUNREACH, HOST_UNREACHABLE)])
def test_reply_code_reads_the_os_error_behind_a_refused_connect(err: int, code: int) -> None:
    try:
        raise ConnectRefusedError("x") from OSError(err, "x")
    except ConnectRefusedError as exc:
        assert reply_code(exc) == code


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8))
def test_arbitrary_client_bytes_end_in_a_request_or_a_socks5_error(chunks: list[bytes]) -> None:
    hs = ServerHandshake()
    for chunk in chunks:
        try:
            out = hs.receive_data(chunk)
        except Socks5Error:
            return
        assert out in (b"", b"\x05\x00")
        if hs.done:
            assert hs.request is not None
            return
