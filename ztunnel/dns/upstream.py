"""Asking the upstream DNS server: the trio shell of the forwarder.

One exchange is UDP, then TCP when the UDP answer comes back truncated, all within the
per-query timeout.  A query that times out, is refused (ICMP) or gets garbage back is tried
once more, on the next upstream when there are several; after that it is a
:class:`~common.errors.DnsUpstreamError` (the resolver answers SERVFAIL).

Every query goes out with a fresh random id from a fresh socket (a random source port), so
an off-path attacker has to guess both, and a reply that does not match the id and the
question is ignored.  The sockets come from a :data:`SocketFactory`: for a pod, one that
creates them inside the pod's network namespace with ztunnel's ``SO_MARK``, so the capture
rules let them through to the cluster DNS instead of back to us.
"""

from __future__ import annotations

import secrets
import socket
import struct
from collections.abc import Callable, Sequence

import trio

from common.errors import DnsFormatError, DnsUpstreamError
from common.logging import get_logger
from ztunnel.dns.wire import (
    FLAG_RD,
    MAX_MESSAGE,
    Message,
    Question,
    build,
    opt_record,
    parse,
)
from ztunnel.inpod.rules import ZTUNNEL_MARK

__all__ = ["SocketFactory", "UpstreamDns", "host_socket", "marked_socket"]

_log = get_logger("ztunnel.dns.upstream")

SocketFactory = Callable[[socket.AddressFamily, socket.SocketKind], socket.socket]
"""Creates an unconnected socket of the given family and kind (SOCK_DGRAM or SOCK_STREAM)."""

# What we announce upstream: the size that avoids IP fragmentation on common paths (DNS
# flag day 2020); larger answers come over TCP.
EDNS_PAYLOAD = 1232
# Stray datagrams (a late answer to an earlier try, spoofing attempts) tolerated per query.
_MAX_STRAY = 16


def host_socket(family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
    """An unmarked socket in ztunnel's own namespace (tests, or a node-local upstream)."""
    return socket.socket(family, kind)


def marked_socket(family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
    """A socket with ztunnel's ``SO_MARK``; call it inside the pod's namespace."""
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK)
    except BaseException:
        sock.close()
        raise
    return sock


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _matches(response: Message, msg_id: int, question: Question) -> bool:
    q = response.question
    return (response.is_response and response.id == msg_id and q is not None
            and q.key == question.key)


class UpstreamDns:
    """The upstream servers with their timeout and retry policy."""

    def __init__(self, servers: Sequence[tuple[str, int]], *, timeout: float = 2.0,
                 attempts: int = 2) -> None:
        self.servers = tuple(servers)
        self.timeout = timeout
        self.attempts = max(attempts, 1)

    async def query(self, question: Question, open_socket: SocketFactory,
                    *, recursion_desired: bool = True) -> Message:
        """The upstream's answer to ``question``; DnsUpstreamError when none came in time."""
        if not self.servers:
            raise DnsUpstreamError(
                "no upstream DNS server is configured: pass --dns-upstream (the cluster DNS "
                "address), or give the node a nameserver in /etc/resolv.conf")
        errors = []
        for attempt in range(self.attempts):
            server = self.servers[attempt % len(self.servers)]
            try:
                with trio.fail_after(self.timeout):
                    return await self._exchange(question, server, open_socket,
                                                recursion_desired)
            except trio.TooSlowError:
                errors.append(f"{server[0]}:{server[1]}: no answer within {self.timeout:g} s")
            except (OSError, DnsFormatError, trio.BrokenResourceError) as exc:
                errors.append(f"{server[0]}:{server[1]}: {exc}")
            _log.debug("upstream DNS attempt failed", question=question.key,
                       error=errors[-1])
        raise DnsUpstreamError(
            f"upstream DNS gave no answer for {question.key[0]!r}: {'; '.join(errors)} "
            f"(check --dns-upstream and that the cluster DNS is reachable from the pod)")

    async def _exchange(self, question: Question, server: tuple[str, int],
                        open_socket: SocketFactory, recursion_desired: bool) -> Message:
        msg_id = secrets.randbits(16)
        query = Message(msg_id, FLAG_RD if recursion_desired else 0, (question,),
                        additionals=(opt_record(EDNS_PAYLOAD),))
        wire = build(query)
        response = await _udp_exchange(wire, msg_id, question, server, open_socket)
        if response.truncated:
            response = await _tcp_exchange(wire, msg_id, question, server, open_socket)
        return response


async def _udp_exchange(wire: bytes, msg_id: int, question: Question,
                        server: tuple[str, int], open_socket: SocketFactory) -> Message:
    sock = trio.socket.from_stdlib_socket(open_socket(_family(server[0]), socket.SOCK_DGRAM))
    with sock:
        await sock.connect(server)
        await sock.send(wire)
        for _ in range(_MAX_STRAY):
            data = await sock.recv(MAX_MESSAGE)
            try:
                response = parse(data)
            except DnsFormatError:
                continue
            if _matches(response, msg_id, question):
                return response
    raise DnsFormatError(f"{_MAX_STRAY} datagrams that do not answer the query")


async def _tcp_exchange(wire: bytes, msg_id: int, question: Question,
                        server: tuple[str, int], open_socket: SocketFactory) -> Message:
    sock = trio.socket.from_stdlib_socket(open_socket(_family(server[0]), socket.SOCK_STREAM))
    with sock:
        await sock.connect(server)
        tcp = trio.SocketStream(sock)
        await tcp.send_all(struct.pack("!H", len(wire)) + wire)
        (length,) = struct.unpack("!H", await receive_exactly(tcp, 2))
        response = parse(await receive_exactly(tcp, length))
    if not _matches(response, msg_id, question):
        raise DnsFormatError("the TCP answer does not match the query")
    return response


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    """``size`` bytes from ``stream``; BrokenResourceError if it ends first."""
    buf = bytearray()
    while len(buf) < size:
        chunk = await stream.receive_some(size - len(buf))
        if not chunk:
            raise trio.BrokenResourceError(f"the peer closed after {len(buf)} of {size} bytes")
        buf += chunk
    return bytes(buf)
