"""The DNS proxy's trio shells: UDP and TCP on loopback port 15053 inside each enrolled pod,
where the capture rules redirect the pod's port-53 traffic.

:func:`serve_dns` serves one pair of sockets for one client pod; :class:`DnsService` is the
per-pod hook ztunnel's agent starts with the pod's other listeners (it opens the sockets in
the pod's namespace and shares one :class:`~ztunnel.dns.resolver.Resolver`, hence one
cache, between all the pods of the node).

Local and cached answers are computed inline in the receive loop (about 20 µs of CPU, no
task).  Bounds, so a misbehaving client costs only itself: forwarded queries in flight per
pod (``max_pending``; a UDP query over it is dropped, the client retries; a TCP connection
stops reading), TCP connections per pod, an idle timeout per TCP connection, and at most
16 pipelined queries per TCP connection (RFC 7766 lets them be answered out of order).
A query the resolver chokes on costs that query only (logged, no answer).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

import trio
from prometheus_client import CollectorRegistry, Counter

from common.errors import MeshError
from common.logging import get_logger
from common.model import Workload
from ztunnel.dns.resolver import DnsConfig, Outcome, Resolver
from ztunnel.dns.upstream import SocketFactory, host_socket, marked_socket, receive_exactly
from ztunnel.dns.wire import MAX_MESSAGE, Message
from ztunnel.inpod.rules import ZTUNNEL_MARK
from ztunnel.proxy.dial import accept, family_of

if TYPE_CHECKING:
    from ztunnel.proxy.pod import EnrolledPod
    from ztunnel.proxy.state import ProxyState

__all__ = ["DnsMetrics", "DnsService", "default_upstreams", "parse_upstream",
           "pod_socket_factory", "serve_dns"]

_log = get_logger("ztunnel.dns")

_TCP_PIPELINE = 16
_TRANSIENT_UDP_ERRORS = frozenset((errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                                   errno.EINTR, errno.ENOBUFS, errno.ENOMEM))
DNS_PORT = 53


class DnsMetrics:
    """``ztunnel_dns_requests_total{protocol, outcome}`` (outcome: :class:`Outcome`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.requests = Counter(
            "ztunnel_dns_requests", "DNS queries received by the DNS proxy, by how they were "
            "answered (local, cached, forwarded, failed, malformed, dropped)",
            ("protocol", "outcome"), registry=registry)

    def count(self, protocol: str, outcome: Outcome | str) -> None:
        value = outcome.value if isinstance(outcome, Outcome) else outcome
        self.requests.labels(protocol, value).inc()


async def serve_dns(udp_sock: socket.socket, tcp_sock: socket.socket | None,
                    resolver: Resolver, client: Workload, *,
                    open_socket: SocketFactory = host_socket,
                    metrics: DnsMetrics | None = None,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer ``client``'s queries on a bound UDP socket and a listening TCP socket.

    Forwarded queries use sockets from ``open_socket``.  Runs until cancelled; the caller
    owns (and closes) the two sockets.
    """
    server = _PodDns(resolver, client.namespace, open_socket, metrics or _NO_METRICS,
                     f"{client.namespace}/{client.name}")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_udp, udp_sock)
        if tcp_sock is not None:
            nursery.start_soon(server.serve_tcp, tcp_sock)
        task_status.started()


class _NoMetrics(DnsMetrics):
    def __init__(self) -> None:
        pass

    def count(self, protocol: str, outcome: Outcome | str) -> None:
        pass


_NO_METRICS = _NoMetrics()


class _PodDns:
    def __init__(self, resolver: Resolver, namespace: str, open_socket: SocketFactory,
                 metrics: DnsMetrics, pod: str) -> None:
        self.resolver = resolver
        self.namespace = namespace
        self.open_socket = open_socket
        self.metrics = metrics
        self.config = resolver.config
        self.pending = trio.Semaphore(self.config.max_pending)
        self.tcp_slots = trio.Semaphore(self.config.tcp_max_connections)
        self.log = _log.bind(pod=pod)

    def _answer_nowait(self, data: bytes, protocol: str) -> bytes | Message | None:
        """Response bytes, None (no answer), or the parsed query when upstream must answer."""
        try:
            done = self.resolver.answer_nowait(data, self.namespace, udp=protocol == "udp")
        except Exception as exc:
            self.log.error("DNS query failed unexpectedly", error=repr(exc), exc_info=exc)
            self.metrics.count(protocol, Outcome.FAILED)
            return None
        if isinstance(done, Message):
            return done
        self.metrics.count(protocol, done[1])
        return done[0]

    async def _answer_upstream(self, query: Message, protocol: str) -> bytes | None:
        try:
            response, outcome = await self.resolver.answer_upstream(
                query, self.namespace, self.open_socket, udp=protocol == "udp")
        except Exception as exc:
            self.log.error("DNS query failed unexpectedly", error=repr(exc), exc_info=exc)
            self.metrics.count(protocol, Outcome.FAILED)
            return None
        self.metrics.count(protocol, outcome)
        return response

    # -- UDP -------------------------------------------------------------------------------

    async def serve_udp(self, raw: socket.socket) -> None:
        sock = trio.socket.from_stdlib_socket(raw)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    data, peer = await sock.recvfrom(MAX_MESSAGE)
                except OSError as exc:
                    if exc.errno not in _TRANSIENT_UDP_ERRORS:
                        raise
                    # A queued ICMP error for an earlier reply; the socket still works.
                    self.log.debug("DNS udp receive failed", error=str(exc))
                    continue
                done = self._answer_nowait(data, "udp")
                if isinstance(done, Message):
                    try:
                        self.pending.acquire_nowait()
                    except trio.WouldBlock:
                        self.metrics.count("udp", "dropped")
                        continue
                    nursery.start_soon(self._udp_upstream, sock, done, peer)
                elif done is not None:
                    await self._send(sock, done, peer)

    async def _send(self, sock: trio.socket.SocketType, response: bytes,
                    peer: tuple[str, int]) -> None:
        try:
            await sock.sendto(response, peer)
        except OSError as exc:
            self.log.debug("DNS udp send failed", peer=peer, error=str(exc))

    async def _udp_upstream(self, sock: trio.socket.SocketType, query: Message,
                            peer: tuple[str, int]) -> None:
        try:
            response = await self._answer_upstream(query, "udp")
            if response is not None:
                await self._send(sock, response, peer)
        finally:
            self.pending.release()

    # -- TCP -------------------------------------------------------------------------------

    async def serve_tcp(self, listener: socket.socket) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                conn, peer = await accept(listener)
                try:
                    self.tcp_slots.acquire_nowait()
                except trio.WouldBlock:
                    self.metrics.count("tcp", "dropped")
                    conn.close()
                    continue
                nursery.start_soon(self._tcp_connection, conn, peer)

    async def _tcp_connection(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
        send_lock = trio.Lock()
        in_flight = trio.Semaphore(_TCP_PIPELINE)
        try:
            async with stream, trio.open_nursery() as nursery:
                while True:
                    data = None
                    with trio.move_on_after(self.config.tcp_idle_timeout):
                        data = await self._read_message(stream)
                    if data is None:  # EOF, idle timeout, or a broken frame
                        break
                    await in_flight.acquire()
                    nursery.start_soon(self._tcp_query, stream, send_lock, in_flight, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.log.debug("DNS tcp connection ended", peer=peer, error=str(exc))
        finally:
            self.tcp_slots.release()

    @staticmethod
    async def _read_message(stream: trio.SocketStream) -> bytes | None:
        try:
            (length,) = struct.unpack("!H", await receive_exactly(stream, 2))
            if length == 0:
                return None
            return await receive_exactly(stream, length)
        except trio.BrokenResourceError:
            return None

    async def _tcp_query(self, stream: trio.SocketStream, send_lock: trio.Lock,
                         in_flight: trio.Semaphore, data: bytes) -> None:
        try:
            done = self._answer_nowait(data, "tcp")
            if isinstance(done, Message):
                async with self.pending:
                    response = await self._answer_upstream(done, "tcp")
            else:
                response = done
            if response is not None:
                async with send_lock:
                    await stream.send_all(struct.pack("!H", len(response)) + response)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client left before its answer; nothing to tell it
        finally:
            in_flight.release()


# -- the per-pod hook ------------------------------------------------------------------------


class DnsService:
    """ztunnel's DNS proxy for all its pods; :meth:`serve_pod` is the per-pod hook.

    One resolver (one cache, one set of metrics) per ztunnel :class:`ProxyState`.
    """

    def __init__(self, config: DnsConfig) -> None:
        self.config = config
        self._per_state: WeakKeyDictionary[ProxyState, tuple[Resolver, DnsMetrics]] = \
            WeakKeyDictionary()

    def _shared(self, state: ProxyState) -> tuple[Resolver, DnsMetrics]:
        shared = self._per_state.get(state)
        if shared is None:
            shared = (Resolver(state.snapshot, self.config),
                      DnsMetrics(state.metrics.registry))
            self._per_state[state] = shared
        return shared

    def resolver_for(self, state: ProxyState) -> Resolver:
        """The resolver the pods of ``state``'s ztunnel share (SOCKS5 resolves with it)."""
        return self._shared(state)[0]

    async def serve_pod(self, pod: EnrolledPod) -> None:
        """Listen on loopback 15053 (udp and tcp) in ``pod``'s namespace until cancelled.

        A failure to open the listeners is logged and leaves the pod's other listeners
        alone (its DNS then times out rather than bypassing the proxy).
        """
        resolver, metrics = self._shared(pod.state)
        client = pod.current()
        port = self.config.port
        # The capture rules redirect the pod's own port-53 traffic, and nftables maps a
        # locally generated packet's redirect to the loopback address.  A UDP socket bound
        # to the wildcard would answer from the pod's IP, which conntrack does not map back
        # to the original server address, and the stub would drop the reply.
        hosts = ["127.0.0.1"] + (["::1"] if any(":" in ip for ip in client.ips) else [])
        sockets: list[socket.socket] = []
        try:
            pairs = []
            for host in hosts:
                udp = pod.netns.run(partial(_udp_listener, host, port))
                sockets.append(udp)
                tcp = pod.netns.listen(host, port)
                sockets.append(tcp)
                pairs.append((udp, tcp))
        except (MeshError, OSError) as exc:
            for sock in sockets:
                sock.close()
            pod.log.error("DNS proxy not started", port=port, error=str(exc))
            return
        if not self.config.upstreams:
            pod.log.warning("DNS proxy has no upstream: names outside the mesh get SERVFAIL "
                            "(pass --dns-upstream)")
        if any(ipaddress.ip_address(ip).is_loopback for ip, _ in self.config.upstreams):
            pod.log.warning("DNS upstream is a loopback address, which is the pod's own "
                            "loopback from inside the pod: pass --dns-upstream with the "
                            "cluster DNS address", upstreams=self.config.upstreams)

        open_socket = pod_socket_factory(pod)
        try:
            async with trio.open_nursery() as nursery:
                for udp, tcp in pairs:
                    await nursery.start(partial(serve_dns, udp, tcp, resolver, client,
                                                open_socket=open_socket, metrics=metrics))
                pod.listen_ports["dns"] = port
        except Exception as exc:
            # A bug or an unforeseen OS error stops the DNS proxy of this pod, never the
            # pod's proxy listeners (hooks share their nursery).
            pod.log.error("DNS proxy failed", error=repr(exc), exc_info=exc)
        finally:
            pod.listen_ports.pop("dns", None)
            for sock in sockets:
                sock.close()


def pod_socket_factory(pod: EnrolledPod) -> SocketFactory:
    """Sockets created inside ``pod``'s namespace with ztunnel's mark (not captured)."""

    def open_socket(family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
        return pod.netns.run(partial(marked_socket, family, kind))

    return open_socket


def _udp_listener(host: str, port: int) -> socket.socket:
    family = family_of(host)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# -- configuration -----------------------------------------------------------------------------


def parse_upstream(text: str) -> tuple[str, int]:
    """``ip``, ``ip:port`` or ``[v6]:port`` as an address; ValueError otherwise."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else DNS_PORT
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    else:
        host, port = text, DNS_PORT
    ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return host, port


def default_upstreams(resolv_conf: Path = Path("/etc/resolv.conf")) -> tuple[tuple[str, int], ...]:
    """The ``nameserver`` lines of the node's resolv.conf (empty when there are none)."""
    try:
        lines = resolv_conf.read_text().splitlines()
    except OSError:
        return ()
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                found.append(parse_upstream(fields[1].partition("%")[0]))
            except ValueError:
                continue
    return tuple(found)
