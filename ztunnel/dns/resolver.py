"""The DNS proxy's brain: answer from the mesh snapshot, else from the cache, else upstream.

For one query from a pod (its namespace decides what a short name means):

1. not a standard query with one question: NOTIMP or FORMERR;
2. :func:`ztunnel.dns.zone.lookup` on the snapshot: a cluster Service or ServiceEntry host
   answers A/AAAA here (TTL ``config.ttl``, authoritative; no address of the asked family
   is NOERROR/NODATA), a name that cannot exist is NXDOMAIN here (with the zone's SOA, so
   stub caches keep it); both without any network round trip;
3. everything else (and other record types of our names, e.g. SRV) goes to the upstream DNS
   through a TTL-honouring cache (:mod:`ztunnel.dns.cache`); identical questions in flight
   at once share one upstream query; no answer upstream in time is SERVFAIL.

One :class:`Resolver` serves every pod of a ztunnel, so pods share the cache; each pod passes
its own :data:`~ztunnel.dns.upstream.SocketFactory`, so a forwarded query leaves from that
pod's network namespace.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from common.errors import DnsFormatError, DnsUpstreamError, NameResolutionError
from common.logging import get_logger
from common.model import Snapshot
from ztunnel.dns.cache import DnsCache
from ztunnel.dns.upstream import SocketFactory, UpstreamDns
from ztunnel.dns.wire import (
    CLASS_IN,
    FLAG_AA,
    FLAG_QR,
    FLAG_RA,
    FLAG_RD,
    MAX_MESSAGE,
    OPCODE_QUERY,
    RCODE_FORMERR,
    RCODE_NOERROR,
    RCODE_NOTIMP,
    RCODE_NXDOMAIN,
    RCODE_SERVFAIL,
    TYPE_A,
    TYPE_AAAA,
    TYPE_OPT,
    Message,
    Question,
    Record,
    address_record,
    build,
    formerr_for,
    name_from_text,
    name_text,
    opt_record,
    parse,
    soa_record,
)
from ztunnel.dns.zone import EMPTY_SERVICE_ENTRIES, Hit, NxDomain, ServiceEntryHosts, lookup

__all__ = ["DnsConfig", "Outcome", "Resolver", "UpstreamQuery"]

_log = get_logger("ztunnel.dns")

# RFC 1035's limit for a client without EDNS; a bigger announced size is honoured up to
# what we ever ask upstream for.
_PLAIN_UDP = 512
_MAX_UDP = 4096
_OUR_EDNS_PAYLOAD = 1232


class Outcome(enum.Enum):
    """How a query was answered (the ``outcome`` label of the DNS metrics)."""

    LOCAL = "local"          # from the snapshot (an address, NODATA or NXDOMAIN)
    CACHED = "cached"        # from the cache, or a concurrent identical query's answer
    FORWARDED = "forwarded"  # the upstream answered this query
    FAILED = "failed"        # no upstream answer: SERVFAIL
    MALFORMED = "malformed"  # unparseable or unsupported: FORMERR / NOTIMP / dropped


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsConfig:
    """The DNS proxy's settings (defaults are Istio's where it has one)."""

    upstreams: tuple[tuple[str, int], ...]
    port: int = 15053
    ttl: int = 30                  # of our own answers
    query_timeout: float = 2.0     # per upstream attempt
    attempts: int = 2              # one retry
    cache_entries: int = 10_000
    max_cache_ttl: float = 300.0
    max_negative_ttl: float = 60.0
    tcp_idle_timeout: float = 10.0
    tcp_max_connections: int = 64  # per pod
    max_pending: int = 256         # forwarded queries in flight per pod (UDP and TCP)


class UpstreamQuery(Protocol):
    async def __call__(self, question: Question, open_socket: SocketFactory, *,
                       recursion_desired: bool = True) -> Message: ...


@dataclass(eq=False)
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    response: Message | None = None
    failed: bool = False


class Resolver:
    """Answers DNS queries for the pods of one ztunnel (see the module docstring)."""

    def __init__(self, snapshots: Callable[[], Snapshot], config: DnsConfig, *,
                 clock: Callable[[], float] = trio.current_time,
                 upstream: UpstreamQuery | None = None) -> None:
        self.snapshots = snapshots
        self.config = config
        self.cache = DnsCache(max_entries=config.cache_entries,
                              max_ttl=config.max_cache_ttl,
                              max_negative_ttl=config.max_negative_ttl, clock=clock)
        self.upstream: UpstreamQuery = upstream if upstream is not None else UpstreamDns(
            config.upstreams, timeout=config.query_timeout, attempts=config.attempts).query
        self._inflight: dict[tuple[str, int, int], _Pending] = {}
        self._entries_source: object = None
        self._entries = EMPTY_SERVICE_ENTRIES

    # -- the wire-level entry points ------------------------------------------------------

    def answer_nowait(self, data: bytes, client_namespace: str, *, udp: bool
                      ) -> tuple[bytes | None, Outcome] | Message:
        """Response bytes (None: drop them) and outcome, if no upstream query is needed.

        Otherwise the parsed query, for :meth:`answer_upstream`.  Most queries (cluster
        names, search-path junk, cache hits) end here without a task or a socket.  Over
        UDP the response fits the client's announced size or comes back truncated (TC), so
        the client retries over TCP.
        """
        try:
            query = parse(data)
        except DnsFormatError as exc:
            _log.debug("malformed DNS query", error=str(exc), size=len(data))
            return formerr_for(data), Outcome.MALFORMED
        if query.is_response:
            return None, Outcome.MALFORMED
        done = self.resolve_nowait(query, client_namespace)
        if done is None:
            return query
        return _encode(done[0], query, udp), done[1]

    async def answer_upstream(self, query: Message, client_namespace: str,
                              open_socket: SocketFactory, *, udp: bool
                              ) -> tuple[bytes, Outcome]:
        """The rest of :meth:`answer_nowait` for a query it handed back."""
        response, outcome = await self.resolve(query, client_namespace, open_socket)
        return _encode(response, query, udp), outcome

    async def answer(self, data: bytes, client_namespace: str, open_socket: SocketFactory,
                     *, udp: bool) -> tuple[bytes | None, Outcome]:
        """Response bytes for request bytes (None: drop them), and how it was answered."""
        done = self.answer_nowait(data, client_namespace, udp=udp)
        if isinstance(done, Message):
            return await self.answer_upstream(done, client_namespace, open_socket, udp=udp)
        return done

    # -- the message-level entry points ----------------------------------------------------

    def resolve_nowait(self, query: Message, client_namespace: str
                       ) -> tuple[Message, Outcome] | None:
        """The response to ``query`` from the snapshot or the cache; None: ask upstream."""
        if query.opcode != OPCODE_QUERY:
            return _reply(query, RCODE_NOTIMP), Outcome.MALFORMED
        q = query.question
        if q is None:
            return _reply(query, RCODE_FORMERR), Outcome.MALFORMED
        if q.qclass == CLASS_IN and not any(b"." in label for label in q.name):
            snapshot = self.snapshots()
            found = lookup(snapshot, name_text(q.name), client_namespace,
                           self._service_entries(snapshot))
            if isinstance(found, NxDomain):
                return self._negative(query, snapshot, RCODE_NXDOMAIN), Outcome.LOCAL
            if isinstance(found, Hit) and q.qtype in (TYPE_A, TYPE_AAAA):
                return self._addresses(query, q, snapshot, found), Outcome.LOCAL
        cached = self.cache.get(q.key)
        if cached is not None:
            return _from_upstream(query, cached), Outcome.CACHED
        return None

    async def resolve(self, query: Message, client_namespace: str,
                      open_socket: SocketFactory) -> tuple[Message, Outcome]:
        """The response to ``query`` from a pod in ``client_namespace``."""
        done = self.resolve_nowait(query, client_namespace)
        if done is not None:
            return done
        q = query.question
        assert q is not None  # resolve_nowait answers FORMERR otherwise
        upstream, outcome = await self._upstream_answer(q, bool(query.flags & FLAG_RD),
                                                        open_socket)
        if upstream is None:
            return _reply(query, RCODE_SERVFAIL), outcome
        return _from_upstream(query, upstream), outcome

    # -- for the SOCKS5 listener -----------------------------------------------------------

    async def addresses(self, host: str, client_namespace: str,
                        open_socket: SocketFactory) -> tuple[str, ...]:
        """The addresses of ``host`` (IPv4 first); NameResolutionError when it has none."""
        try:
            name = name_from_text(host)
        except ValueError as exc:
            raise NameResolutionError(f"{host!r} is not a valid host name") from exc
        snapshot = self.snapshots()
        found = lookup(snapshot, name_text(name), client_namespace,
                       self._service_entries(snapshot))
        if isinstance(found, NxDomain):
            raise NameResolutionError(f"{host} does not exist in the cluster (NXDOMAIN)")
        if isinstance(found, Hit) and found.addresses:
            return tuple(sorted(found.addresses, key=lambda a: ":" in a))
        for qtype in (TYPE_A, TYPE_AAAA):
            response, _ = await self._upstream_answer(Question(name, qtype), True,
                                                      open_socket)
            if response is None:
                raise NameResolutionError(f"cannot resolve {host}: the upstream DNS did not "
                                          f"answer (check --dns-upstream)")
            if response.rcode == RCODE_NXDOMAIN:
                raise NameResolutionError(f"{host} does not exist (NXDOMAIN upstream)")
            found_ips = tuple(_address_of(r) for r in response.answers if r.rtype == qtype)
            if found_ips:
                return found_ips
        raise NameResolutionError(f"{host} has no A or AAAA record")

    # -- internals -------------------------------------------------------------------------

    def _service_entries(self, snapshot: Snapshot) -> ServiceEntryHosts:
        # Re-indexed only when the snapshot's ServiceEntry tuple is a different object.
        if snapshot.service_entries is not self._entries_source:
            self._entries = ServiceEntryHosts.of(snapshot) if snapshot.service_entries \
                else EMPTY_SERVICE_ENTRIES
            self._entries_source = snapshot.service_entries
        return self._entries

    def _addresses(self, query: Message, q: Question, snapshot: Snapshot, hit: Hit
                   ) -> Message:
        want_v6 = q.qtype == TYPE_AAAA
        records = tuple(address_record(q.name, a, self.config.ttl) for a in hit.addresses
                        if (":" in a) == want_v6)
        if not records:
            return self._negative(query, snapshot, RCODE_NOERROR)
        return _reply(query, RCODE_NOERROR, records, authoritative=True)

    def _negative(self, query: Message, snapshot: Snapshot, rcode: int) -> Message:
        q = query.question
        assert q is not None
        authority: tuple[Record, ...] = ()
        domain = snapshot.domain
        name = name_text(q.name)
        if name == domain or name.endswith("." + domain):
            zone = q.name[len(q.name) - len(domain.split(".")):]
            authority = (soa_record(zone, self.config.ttl, self.config.ttl),)
        return _reply(query, rcode, (), authority, authoritative=True)

    async def _upstream_answer(self, q: Question, recursion_desired: bool,
                               open_socket: SocketFactory) -> tuple[Message | None, Outcome]:
        key = q.key
        cached = self.cache.get(key)
        if cached is not None:
            return cached, Outcome.CACHED
        pending = self._inflight.get(key)
        if pending is not None:
            await pending.done.wait()
            if pending.response is not None:
                return pending.response, Outcome.CACHED
            if pending.failed:
                return None, Outcome.FAILED
            # The first asker was cancelled before an answer came: ask ourselves.
        pending = _Pending()
        self._inflight.setdefault(key, pending)
        try:
            response = await self.upstream(q, open_socket, recursion_desired=recursion_desired)
            self.cache.put(key, response)
            pending.response = response
            return response, Outcome.FORWARDED
        except DnsUpstreamError as exc:
            pending.failed = True
            _log.warning("DNS query failed upstream", name=key[0], qtype=key[1],
                         error=str(exc))
            return None, Outcome.FAILED
        finally:
            if self._inflight.get(key) is pending:
                del self._inflight[key]
            pending.done.set()


def udp_limit(query: Message) -> int:
    """How large a UDP response to ``query`` may be (RFC 1035, RFC 6891)."""
    payload = query.edns_payload()
    if payload is None:
        return _PLAIN_UDP
    return max(_PLAIN_UDP, min(payload, _MAX_UDP))


def _reply(query: Message, rcode: int, answers: tuple[Record, ...] = (),
           authorities: tuple[Record, ...] = (), additionals: tuple[Record, ...] = (),
           *, authoritative: bool = False) -> Message:
    """A response to ``query``: its id, opcode, RD and question (as the client spelled it)."""
    flags = FLAG_QR | (query.flags & (0x7800 | FLAG_RD)) | FLAG_RA | (rcode & 0xF)
    if authoritative:
        flags |= FLAG_AA
    if query.edns_payload() is not None:
        additionals = (*additionals, opt_record(_OUR_EDNS_PAYLOAD))
    return Message(query.id, flags, query.questions, answers, authorities, additionals)


def _from_upstream(query: Message, upstream: Message) -> Message:
    return _reply(query, upstream.rcode, upstream.answers, upstream.authorities,
                  tuple(r for r in upstream.additionals if r.rtype != TYPE_OPT))


def _encode(response: Message, query: Message, udp: bool) -> bytes:
    return build(response, limit=udp_limit(query) if udp else MAX_MESSAGE)


def _address_of(record: Record) -> str:
    return str(ipaddress.ip_address(record.rdata))
