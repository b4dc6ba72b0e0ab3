"""HBONE client: a pool of HTTP/2 connections multiplexing CONNECT tunnels.

Pool key: (source identity, expected destination identities, destination address),
DESIGN.md section 4; a connection carries at most 100 streams (or fewer if the peer
says so), past that the pool opens another.  Idle connections are closed after
``idle_timeout``.  A peer that went away (EOF, reset, GOAWAY, REFUSED_STREAM before
our request was processed) costs one retry on a fresh connection, not an error.

Bookkeeping is synchronous: choosing a connection and registering a stream on it
happen with no ``await`` in between, and a slot reserved across an ``await`` (while a
connection is being set up) is released in a ``finally``, so cancellation can never
leak capacity (the httpcore #785/#830 mistakes).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import TracebackType

import trio

from common.certs import CertificateStore
from common.errors import (
    CertificateError,
    ConnectRefusedError,
    ConnectTimeoutError,
    TunnelRejectedError,
)
from common.hbone.connection import HboneConnection
from common.hbone.request import Baggage, build_request
from common.hbone.stream import HboneStream, StreamResetError
from common.identity import SpiffeId
from common.logging import get_logger

_log = get_logger("hbone.client")

HBONE_PORT = 15008
MAX_STREAMS_PER_CONNECTION = 100
# ztunnel's POOL_UNUSED_RELEASE_TIMEOUT default.
IDLE_TIMEOUT = 300.0

_STATUS_MEANING = {
    400: "the peer found the request malformed",
    401: "the destination's policy denied this source",
    403: "the destination's policy denied this source",
    503: "the peer could not connect to the destination",
}


@dataclass(frozen=True, slots=True)
class PoolKey:
    source: SpiffeId | None
    expected: frozenset[SpiffeId]
    address: tuple[str, int]


Transport = trio.abc.HalfCloseableStream
Connector = Callable[[PoolKey], Awaitable[tuple[Transport, SpiffeId | None]]]


def tls_connector(context_for: Callable[[SpiffeId | None], Awaitable[ssl.SSLContext]], *,
                  connect_timeout: float = 10.0, so_mark: int | None = None) -> Connector:
    """The production connector: TCP + mTLS as ``key.source``, peer checked against
    ``key.expected`` (any identity when empty)."""
    from common.tls import connect_tls

    async def connect(key: PoolKey) -> tuple[Transport, SpiffeId | None]:
        context = await context_for(key.source)
        host, port = key.address
        try:
            stream = await connect_tls(host, port, context, expected=key.expected or None,
                                       connect_timeout=connect_timeout, so_mark=so_mark)
        except (ConnectRefusedError, ConnectTimeoutError) as exc:
            if port == HBONE_PORT:
                raise type(exc)(
                    f"{exc}; is HBONE port {HBONE_PORT} blocked on {host}, e.g. by a "
                    f"NetworkPolicy, or is the destination's ztunnel down?") from exc
            raise
        return stream, stream.peer_identity

    return connect


def store_connector(store: CertificateStore, *, connect_timeout: float = 10.0,
                    so_mark: int | None = None) -> Connector:
    """:func:`tls_connector` with client contexts from a :class:`CertificateStore`
    (fetched on first use, renewed certificates picked up by new connections)."""

    async def context_for(source: SpiffeId | None) -> ssl.SSLContext:
        if source is None:
            raise CertificateError("an HBONE connection needs a source identity")
        await store.get(source)
        return store.client_context(source)

    return tls_connector(context_for, connect_timeout=connect_timeout, so_mark=so_mark)


@dataclass(eq=False)
class _Entry:
    key: PoolKey
    connection: HboneConnection | None = None
    reserved: int = 0  # callers waiting for this connection to be set up
    ready: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class HbonePool:
    """Use as ``async with HbonePool(connector) as pool:``; connections live inside."""

    def __init__(self, connector: Connector, *, idle_timeout: float = IDLE_TIMEOUT,
                 max_streams_per_connection: int = MAX_STREAMS_PER_CONNECTION) -> None:
        self._connector = connector
        self.idle_timeout = idle_timeout
        self.max_streams = max_streams_per_connection
        self._entries: dict[PoolKey, list[_Entry]] = {}
        self._nursery: trio.Nursery | None = None
        self._manager: AbstractAsyncContextManager[trio.Nursery] | None = None

    async def __aenter__(self) -> HbonePool:
        self._manager = trio.open_nursery()
        self._nursery = await self._manager.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        self.close()
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        assert self._manager is not None
        return await self._manager.__aexit__(exc_type, exc, tb)

    def connections(self, key: PoolKey | None = None) -> list[HboneConnection]:
        """Live connections (for one key or all), for status pages and tests."""
        entries: Iterable[_Entry] = (
            self._entries.get(key, []) if key is not None
            else (e for group in self._entries.values() for e in group))
        return [e.connection for e in entries if e.connection is not None]

    def close(self) -> None:
        """GOAWAY every connection; streams in flight finish."""
        for group in self._entries.values():
            for entry in group:
                if entry.connection is not None:
                    entry.connection.close()

    async def connect(self, source: SpiffeId | None, dest: tuple[str, int], *,
                      expected: Iterable[SpiffeId] = (), authority: str,
                      forwarded_for: str | None = None, baggage: Baggage | str | None = None,
                      traceparent: str | None = None) -> HboneStream:
        """Open a tunnel to ``authority`` through the HBONE peer at ``dest``.

        Raises :class:`TunnelRejectedError` (``status``) for a non-200 answer, and the
        connector's errors (ConnectRefusedError, ConnectTimeoutError, HandshakeError,
        PeerIdentityError) when the peer cannot be reached or is not who we expect.
        """
        key = PoolKey(source, frozenset(expected), dest)
        headers = build_request(authority, forwarded_for=forwarded_for, baggage=baggage,
                                traceparent=traceparent)
        for attempt in (1, 2):
            connection = await self._acquire(key)
            try:
                stream = connection.open_stream(headers)
            except StreamResetError:
                if attempt == 2:
                    raise
                continue
            try:
                status = await stream._wait_response()
            except StreamResetError as exc:
                stream._close_now()
                if exc.retryable and attempt == 1:
                    _log.debug("hbone retry on a fresh connection", dest=dest, reason=str(exc))
                    continue
                raise
            except BaseException:
                stream._close_now()
                raise
            if status != 200:
                stream._close_now()
                meaning = _STATUS_MEANING.get(status, "unexpected answer")
                raise TunnelRejectedError(
                    status, f"HBONE peer {dest[0]}:{dest[1]} answered {status} to CONNECT "
                            f"{authority}: {meaning}")
            return stream
        raise AssertionError("unreachable")

    def _pick(self, key: PoolKey) -> HboneConnection | None:
        for entry in self._entries.get(key, ()):
            connection = entry.connection
            if (connection is not None and connection.available
                    and connection.active_streams < min(self.max_streams,
                                                        connection.max_streams)):
                return connection
        return None

    async def _acquire(self, key: PoolKey) -> HboneConnection:
        """A connection with a free stream slot; the caller opens its stream at once."""
        while True:
            await trio.lowlevel.checkpoint_if_cancelled()
            connection = self._pick(key)
            if connection is not None:
                return connection
            group = self._entries.setdefault(key, [])
            pending = next((e for e in group
                            if e.connection is None and e.reserved < self.max_streams), None)
            if pending is not None:
                pending.reserved += 1
                try:
                    await pending.ready.wait()
                finally:
                    pending.reserved -= 1
                if pending.error is not None:
                    raise pending.error
                continue
            await self._open(key, group)

    async def _open(self, key: PoolKey, group: list[_Entry]) -> None:
        assert self._nursery is not None, "use HbonePool inside 'async with'"
        entry = _Entry(key, reserved=1)
        group.append(entry)
        try:
            transport, peer = await self._connector(key)
        except BaseException as exc:
            # Waiters re-raise a real failure; if only the opener was cancelled they
            # simply try again themselves (a Cancelled must not cross tasks).
            entry.error = exc if isinstance(exc, Exception) else None
            entry.reserved -= 1
            self._remove(entry)
            entry.ready.set()
            raise
        entry.reserved -= 1
        entry.connection = HboneConnection(
            transport, client_side=True, peer_identity=peer, peer_address=key.address,
            log=_log.bind(dst=f"{key.address[0]}:{key.address[1]}", peer=str(peer)))
        self._nursery.start_soon(self._run, entry)
        entry.ready.set()

    def _remove(self, entry: _Entry) -> None:
        group = self._entries.get(entry.key)
        if group is not None and entry in group:
            group.remove(entry)
            if not group:
                del self._entries[entry.key]

    async def _run(self, entry: _Entry) -> None:
        connection = entry.connection
        assert connection is not None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connection.close_when_idle, self.idle_timeout)
                await connection.run()
                nursery.cancel_scope.cancel()
        finally:
            self._remove(entry)
