"""The server side of a SOCKS5 handshake (RFC 1928), sans I/O: bytes in, bytes out, a request.

Only what ztunnel offers is accepted: method "no authentication" and the CONNECT command,
to an IPv4, IPv6 or domain-name address.  Anything else earns the reply RFC 1928 names
for it (method 0xFF, "command not supported", "address type not supported") and then the
connection is closed.  Each message has a fixed maximum size (a greeting at most 257
bytes, a request at most 262), so the parser never buffers more than one message plus
whatever the client sent early after it (:attr:`ServerHandshake.leftover`, which belongs
to the destination).

Usage::

    hs = ServerHandshake()
    while hs.request is None:
        try:
            await send(hs.receive_data(await receive()))
        except Socks5Error:
            await send(hs.error_response); close(); break
    ... connect to hs.request ..., then send reply(SUCCEEDED, bound address)
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from common.errors import Socks5Error

__all__ = [
    "ADDRESS_TYPE_NOT_SUPPORTED", "COMMAND_NOT_SUPPORTED", "CONNECTION_NOT_ALLOWED",
    "CONNECTION_REFUSED", "GENERAL_FAILURE", "HOST_UNREACHABLE", "NETWORK_UNREACHABLE",
    "SUCCEEDED", "TTL_EXPIRED", "ConnectRequest", "ServerHandshake", "reply",
]

VERSION = 5
METHOD_NO_AUTH = 0x00
METHOD_NONE_ACCEPTABLE = 0xFF

CMD_CONNECT = 1
CMD_BIND = 2
CMD_UDP_ASSOCIATE = 3

ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4

SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
CONNECTION_NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08

MAX_GREETING = 2 + 255
MAX_REQUEST = 4 + 1 + 255 + 2


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A CONNECT to ``host:port``; ``host`` is an IP address unless ``is_domain``."""

    host: str
    port: int
    is_domain: bool


class _State(enum.Enum):
    GREETING = "greeting"
    REQUEST = "request"
    DONE = "done"
    FAILED = "failed"


def reply(code: int, bound: tuple[str, int] = ("0.0.0.0", 0)) -> bytes:
    """A reply to a request: ``code`` and the address the proxy connected from."""
    ip = ipaddress.ip_address(bound[0])
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes((VERSION, code, 0, atyp)) + ip.packed + struct.pack("!H", bound[1])


class ServerHandshake:
    """One client's greeting and request; see the module docstring for the calling pattern."""

    def __init__(self) -> None:
        self._state = _State.GREETING
        self._buffer = bytearray()
        self.request: ConnectRequest | None = None
        self.leftover = b""
        self.error_response = b""

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def receive_data(self, data: bytes) -> bytes:
        """Feed bytes from the client; returns bytes to send back (maybe none).

        Raises :class:`Socks5Error` when the client asks for something refused or breaks
        the protocol; :attr:`error_response` then holds what to send before closing.
        """
        if self._state in (_State.DONE, _State.FAILED):
            raise RuntimeError(f"handshake already {self._state.value}")
        self._buffer += data
        out = b""
        try:
            if self._state is _State.GREETING:
                out = self._greeting()
            if self._state is _State.REQUEST:
                self._request()
        except Socks5Error:
            self._state = _State.FAILED
            raise
        return out

    def _fail(self, message: str, reply_code: int, response: bytes) -> Socks5Error:
        self.error_response = response
        return Socks5Error(message, reply_code)

    def _greeting(self) -> bytes:
        buf = self._buffer
        if len(buf) < 2:
            return b""
        if buf[0] != VERSION:
            raise self._fail(f"not SOCKS5 (version byte {buf[0]})", GENERAL_FAILURE, b"")
        nmethods = buf[1]
        if nmethods == 0:
            raise self._fail("no authentication methods offered", GENERAL_FAILURE,
                             bytes((VERSION, METHOD_NONE_ACCEPTABLE)))
        if len(buf) < 2 + nmethods:
            return b""
        methods = bytes(buf[2:2 + nmethods])
        del buf[:2 + nmethods]
        if METHOD_NO_AUTH not in methods:
            raise self._fail(
                f"the client offers only authentication methods {list(methods)}; this "
                f"proxy accepts only 0 (no authentication)", GENERAL_FAILURE,
                bytes((VERSION, METHOD_NONE_ACCEPTABLE)))
        self._state = _State.REQUEST
        return bytes((VERSION, METHOD_NO_AUTH))

    def _request(self) -> None:
        buf = self._buffer
        if len(buf) < 5:
            return
        version, command, _, atyp = buf[0], buf[1], buf[2], buf[3]
        if version != VERSION:
            raise self._fail(f"request with version byte {version}", GENERAL_FAILURE,
                             reply(GENERAL_FAILURE))
        if atyp == ATYP_IPV4:
            end = 4 + 4
        elif atyp == ATYP_IPV6:
            end = 4 + 16
        elif atyp == ATYP_DOMAIN:
            if buf[4] == 0:
                raise self._fail("empty domain name", GENERAL_FAILURE, reply(GENERAL_FAILURE))
            end = 5 + buf[4]
        else:
            raise self._fail(f"address type {atyp} is not supported",
                             ADDRESS_TYPE_NOT_SUPPORTED, reply(ADDRESS_TYPE_NOT_SUPPORTED))
        if len(buf) < end + 2:
            return
        if command != CMD_CONNECT:
            name = {CMD_BIND: "BIND", CMD_UDP_ASSOCIATE: "UDP ASSOCIATE"}.get(
                command, str(command))
            raise self._fail(f"command {name} is not supported (only CONNECT)",
                             COMMAND_NOT_SUPPORTED, reply(COMMAND_NOT_SUPPORTED))
        port = struct.unpack_from("!H", buf, end)[0]
        raw = bytes(buf[5:end] if atyp == ATYP_DOMAIN else buf[4:end])
        self.leftover = bytes(buf[end + 2:])
        buf.clear()
        self.request = self._connect_request(atyp, raw, port)
        self._state = _State.DONE

    def _connect_request(self, atyp: int, raw: bytes, port: int) -> ConnectRequest:
        if atyp != ATYP_DOMAIN:
            return ConnectRequest(str(ipaddress.ip_address(raw)), port, False)
        try:
            host = raw.decode("ascii")
        except UnicodeDecodeError:
            raise self._fail("the domain name is not ASCII (send it IDNA-encoded)",
                             GENERAL_FAILURE, reply(GENERAL_FAILURE)) from None
        try:  # a literal address sent as a "domain name" is still an address
            return ConnectRequest(str(ipaddress.ip_address(host)), port, False)
        except ValueError:
            return ConnectRequest(host, port, True)
