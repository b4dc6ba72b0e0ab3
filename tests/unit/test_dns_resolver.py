"""The DNS proxy's resolver: every search-path form, junk NXDOMAIN without a forward, NODATA,
ServiceEntry hosts, the cache in front of the upstream (fake clock), SERVFAIL, limits."""

from __future__ import annotations

import ipaddress

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import DnsUpstreamError, NameResolutionError
from ztunnel.dns.resolver import DnsConfig, Outcome, Resolver
from ztunnel.dns.upstream import SocketFactory, host_socket
from ztunnel.dns.wire import (
    FLAG_AA,
    FLAG_QR,
    FLAG_RD,
    FLAG_TC,
    RCODE_FORMERR,
    RCODE_NOERROR,
    RCODE_NOTIMP,
    RCODE_NXDOMAIN,
    RCODE_SERVFAIL,
    TYPE_A,
    TYPE_AAAA,
    TYPE_SOA,
    TYPE_SRV,
    Message,
    Question,
    address_record,
    build,
    name_from_text,
    name_text,
    parse,
    soa_record,
)

from .dns_helpers import query, query_bytes, service, service_entry, snapshot

SNAP = snapshot(
    [service("echo", "default", ["10.96.1.1"]),
     service("other", "prod", ["10.96.2.2", "fd00::2"]),
     service("db", "default", ready_ips=["10.1.0.5", "10.1.0.6"]),
     service("ext", "default")],
    namespaces=["kube-system"],
    service_entries=[
        service_entry("api", "default", {"hosts": ["api.example.org", "*.wild.example"],
                                         "addresses": ["240.0.0.7", "10.0.0.0/8"]}),
        service_entry("noaddr", "default", {"hosts": ["noaddr.example.org"]})])


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeUpstream:
    """Answers A questions with 192.0.2.1 (TTL 60); ``nx`` names with NXDOMAIN + SOA min 10."""

    def __init__(self, *, fail: bool = False, records: int = 1) -> None:
        self.asked: list[tuple[str, int]] = []
        self.fail = fail
        self.records = records
        self.nx: set[str] = set()
        self.gate: trio.Event | None = None

    async def __call__(self, question: Question, open_socket: SocketFactory, *,
                       recursion_desired: bool = True) -> Message:
        self.asked.append((name_text(question.name), question.qtype))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise DnsUpstreamError("no answer (test)")
        name = name_text(question.name)
        if name in self.nx:
            return Message(9, FLAG_QR | RCODE_NXDOMAIN, (question,),
                           authorities=(soa_record(question.name[-1:], 300, 10),))
        answers = tuple(address_record(question.name, f"192.0.2.{i + 1}", 60)
                        for i in range(self.records)) if question.qtype == TYPE_A else ()
        return Message(9, FLAG_QR | RCODE_NOERROR, (question,), answers)


def make(upstream: FakeUpstream | None = None, clock: Clock | None = None
         ) -> tuple[Resolver, FakeUpstream, Clock]:
    up = upstream or FakeUpstream()
    clk = clock or Clock()
    config = DnsConfig(upstreams=(("127.0.0.1", 53),), cache_entries=100)
    return Resolver(lambda: SNAP, config, clock=clk, upstream=up), up, clk


async def ask(resolver: Resolver, name: str, qtype: int = TYPE_A, ns: str = "default"
              ) -> tuple[Message, Outcome]:
    return await resolver.resolve(query(name, qtype), ns, host_socket)


def ips(msg: Message) -> list[str]:
    return sorted(str(ipaddress.ip_address(r.rdata)) for r in msg.answers)


@pytest.mark.parametrize("name", [
    "echo", "echo.default", "echo.default.svc", "echo.default.svc.cluster.local",
    "echo.default.svc.cluster.local.", "ECHO.Default.SVC.cluster.LOCAL",
])
async def test_every_search_form_of_a_service_is_answered_locally(name: str) -> None:
    resolver, up, _ = make()
    msg, outcome = await ask(resolver, name)
    assert outcome is Outcome.LOCAL and up.asked == []
    assert msg.rcode == RCODE_NOERROR and msg.flags & FLAG_AA
    assert ips(msg) == ["10.96.1.1"]
    assert {r.ttl for r in msg.answers} == {30}
    assert msg.answers[0].name == name_from_text(name)  # owner spelled as asked


async def test_short_names_are_relative_to_the_client_namespace() -> None:
    resolver, up, _ = make()
    msg, outcome = await ask(resolver, "other", ns="prod")
    assert outcome is Outcome.LOCAL and ips(msg) == ["10.96.2.2"]
    _, outcome = await ask(resolver, "other", ns="default")  # no such service in default
    assert outcome is Outcome.FORWARDED and up.asked == [("other", TYPE_A)]


@pytest.mark.parametrize("name", [
    "other.prod.default.svc.cluster.local",              # stub: "other.prod" + 1st search
    "echo.default.svc.cluster.local.default.svc.cluster.local",
    "echo.default.svc.cluster.local.svc.cluster.local",
    "echo.default.svc.cluster.local.cluster.local",
    "google.com.svc.cluster.local",                      # namespace "com" does not exist
    "google.com.cluster.local",
    "anything.nosuchns.svc.cluster.local",
    "svc.cluster.local",
])
async def test_search_path_junk_is_nxdomain_without_asking_upstream(name: str) -> None:
    resolver, up, _ = make()
    for qtype in (TYPE_A, TYPE_AAAA, TYPE_SRV):
        msg, outcome = await ask(resolver, name, qtype)
        assert msg.rcode == RCODE_NXDOMAIN and outcome is Outcome.LOCAL
        assert msg.flags & FLAG_AA
        assert [r.rtype for r in msg.authorities] == [TYPE_SOA]
        assert name_text(msg.authorities[0].name) == "cluster.local"
    assert up.asked == []


async def test_aaaa_answers_v6_vips_and_nodata_without_them() -> None:
    resolver, up, _ = make()
    msg, _ = await ask(resolver, "other.prod.svc.cluster.local", TYPE_AAAA)
    assert ips(msg) == ["fd00::2"] and msg.answers[0].rtype == TYPE_AAAA
    msg, outcome = await ask(resolver, "echo.default.svc.cluster.local", TYPE_AAAA)
    assert msg.rcode == RCODE_NOERROR and msg.answers == () and outcome is Outcome.LOCAL
    assert [r.rtype for r in msg.authorities] == [TYPE_SOA]
    msg, _ = await ask(resolver, "echo", TYPE_AAAA)  # NODATA outside the zone: no SOA
    assert msg.rcode == RCODE_NOERROR and msg.answers == ()
    assert up.asked == []


async def test_headless_service_answers_ready_endpoints_and_forwards_pod_hostnames() -> None:
    resolver, up, _ = make()
    msg, _ = await ask(resolver, "db")
    assert ips(msg) == ["10.1.0.5", "10.1.0.6"]
    _, outcome = await ask(resolver, "db-0.db.default.svc.cluster.local")
    assert outcome is Outcome.FORWARDED
    assert up.asked == [("db-0.db.default.svc.cluster.local", TYPE_A)]


@pytest.mark.parametrize(("name", "qtype"), [
    ("ext.default.svc.cluster.local", TYPE_A),          # no address known (ExternalName?)
    ("missing.default.svc.cluster.local", TYPE_A),      # a namespace we know: ask
    ("missing.kube-system.svc.cluster.local", TYPE_A),
    ("_http._tcp.echo.default.svc.cluster.local", TYPE_SRV),
    ("echo.default.svc.cluster.local", TYPE_SRV),        # our name, not our record type
    ("10-1-0-5.default.pod.cluster.local", TYPE_A),
    ("noaddr.example.org", TYPE_A),                     # ServiceEntry without addresses
    ("example.com", TYPE_A),
])
async def test_names_we_cannot_answer_are_forwarded(name: str, qtype: int) -> None:
    resolver, up, _ = make()
    _, outcome = await ask(resolver, name, qtype)
    assert outcome is Outcome.FORWARDED
    assert up.asked == [(name, qtype)]


async def test_service_entry_hosts_exact_and_wildcard() -> None:
    resolver, up, _ = make()
    msg, _ = await ask(resolver, "api.example.org")
    assert ips(msg) == ["240.0.0.7"]  # the /8 range cannot be an answer
    msg, _ = await ask(resolver, "deep.a.wild.example")
    assert ips(msg) == ["240.0.0.7"]
    assert up.asked == []


async def test_forwarded_answers_are_cached_for_their_ttl() -> None:
    resolver, up, clock = make()
    first, outcome = await ask(resolver, "example.com")
    assert outcome is Outcome.FORWARDED and ips(first) == ["192.0.2.1"]
    assert not first.flags & FLAG_AA
    clock.now = 59.0
    again, outcome = await ask(resolver, "Example.COM")
    assert outcome is Outcome.CACHED and len(up.asked) == 1
    assert again.answers[0].ttl == 1
    assert again.questions[0].name == name_from_text("Example.COM")
    clock.now = 60.5
    _, outcome = await ask(resolver, "example.com")
    assert outcome is Outcome.FORWARDED and len(up.asked) == 2


async def test_negative_upstream_answers_are_cached_per_soa_minimum() -> None:
    up = FakeUpstream()
    up.nx.add("nope.example")
    resolver, _, clock = make(up)
    msg, _ = await ask(resolver, "nope.example")
    assert msg.rcode == RCODE_NXDOMAIN
    clock.now = 9.0
    _, outcome = await ask(resolver, "nope.example")
    assert outcome is Outcome.CACHED
    clock.now = 10.5
    _, outcome = await ask(resolver, "nope.example")
    assert outcome is Outcome.FORWARDED and len(up.asked) == 2


async def test_upstream_failure_is_servfail_and_not_cached() -> None:
    resolver, up, _ = make(FakeUpstream(fail=True))
    for _ in range(2):
        msg, outcome = await ask(resolver, "example.com")
        assert msg.rcode == RCODE_SERVFAIL and outcome is Outcome.FAILED
    assert len(up.asked) == 2


async def test_concurrent_identical_questions_share_one_upstream_query() -> None:
    up = FakeUpstream()
    up.gate = trio.Event()
    resolver, _, _ = make(up)
    results: list[Outcome] = []

    async def one() -> None:
        results.append((await ask(resolver, "example.com"))[1])

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        up.gate.set()
    assert len(up.asked) == 1
    assert sorted(r.value for r in results) == ["cached"] * 4 + ["forwarded"]


async def test_wire_entry_point_handles_garbage_responses_and_odd_queries() -> None:
    resolver, up, _ = make()
    reply, outcome = await resolver.answer(b"\x00\x07\x01\x00\x00\x01", "default", host_socket,
                                           udp=True)
    assert reply is not None and parse(reply).rcode == RCODE_FORMERR
    assert outcome is Outcome.MALFORMED
    response = build(Message(5, FLAG_QR, (Question(name_from_text("x"), TYPE_A),)))
    assert (await resolver.answer(response, "default", host_socket, udp=True))[0] is None
    status = build(Message(6, 2 << 11, ()))
    reply, _ = await resolver.answer(status, "default", host_socket, udp=True)
    assert reply is not None and parse(reply).rcode == RCODE_NOTIMP
    two = build(Message(8, FLAG_RD, (Question(name_from_text("a"), TYPE_A),
                                     Question(name_from_text("b"), TYPE_A))))
    reply, _ = await resolver.answer(two, "default", host_socket, udp=True)
    assert reply is not None and parse(reply).rcode == RCODE_FORMERR
    assert up.asked == []


async def test_udp_answers_respect_the_client_payload_size() -> None:
    resolver, _, _ = make(FakeUpstream(records=40))  # 40 A records: ~660 bytes
    plain, _ = await resolver.answer(query_bytes("big.example", TYPE_A), "default",
                                     host_socket, udp=True)
    assert plain is not None and len(plain) <= 512
    assert parse(plain).flags & FLAG_TC and parse(plain).id == 4242
    edns, _ = await resolver.answer(query_bytes("big.example", TYPE_A, edns=4096), "default",
                                    host_socket, udp=True)
    assert edns is not None and not parse(edns).flags & FLAG_TC
    assert len(parse(edns).answers) == 40 and parse(edns).edns_payload() == 1232
    tcp, _ = await resolver.answer(query_bytes("big.example", TYPE_A), "default",
                                   host_socket, udp=False)
    assert tcp is not None and len(parse(tcp).answers) == 40


async def test_addresses_for_socks5_cluster_first_then_upstream() -> None:
    up = FakeUpstream()
    up.nx.add("nope.example")
    resolver, _, _ = make(up)
    assert await resolver.addresses("other.prod", "default", host_socket) == (
        "10.96.2.2", "fd00::2")
    assert await resolver.addresses("example.com", "default", host_socket) == ("192.0.2.1",)
    with pytest.raises(NameResolutionError):
        await resolver.addresses("x.echo.default.svc.cluster.local.svc.cluster.local",
                                 "default", host_socket)
    with pytest.raises(NameResolutionError):
        await resolver.addresses("nope.example", "default", host_socket)
    with pytest.raises(NameResolutionError):
        await resolver.addresses("bad..name", "default", host_socket)


async def test_answer_nowait_needs_no_task_for_local_and_cached_answers() -> None:
    resolver, up, _ = make()
    local = resolver.answer_nowait(query_bytes("echo", TYPE_A), "default", udp=True)
    assert isinstance(local, tuple) and local[1] is Outcome.LOCAL
    pending = resolver.answer_nowait(query_bytes("example.com", TYPE_A), "default", udp=True)
    assert isinstance(pending, Message)
    _, outcome = await resolver.answer_upstream(pending, "default", host_socket, udp=True)
    assert outcome is Outcome.FORWARDED
    cached = resolver.answer_nowait(query_bytes("example.com", TYPE_A), "default", udp=True)
    assert isinstance(cached, tuple) and cached[1] is Outcome.CACHED
    assert len(up.asked) == 1


async def test_without_any_upstream_forwarded_names_get_servfail() -> None:
    resolver = Resolver(lambda: SNAP, DnsConfig(upstreams=()))
    msg, outcome = await resolver.resolve(query("example.com", TYPE_A), "default", host_socket)
    assert msg.rcode == RCODE_SERVFAIL and outcome is Outcome.FAILED
    msg, outcome = await resolver.resolve(query("echo", TYPE_A), "default", host_socket)
    assert ips(msg) == ["10.96.1.1"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120) | st.builds(
    lambda q, at, junk: q[:at] + junk + q[at + len(junk):],
    st.sampled_from([query_bytes("echo", TYPE_A), query_bytes("example.com", TYPE_AAAA),
                     query_bytes("x.echo.default.svc.cluster.local", TYPE_A, edns=4096)]),
    st.integers(min_value=0, max_value=40), st.binary(min_size=1, max_size=3)))
def test_any_bytes_get_an_answer_a_drop_or_an_upstream_query_never_an_exception(
        data: bytes) -> None:
    resolver = Resolver(lambda: SNAP, DnsConfig(upstreams=()), clock=lambda: 0.0)
    done = resolver.answer_nowait(data, "default", udp=True)
    if isinstance(done, tuple) and done[0] is not None:
        reply = parse(done[0])
        assert reply.is_response and len(done[0]) <= 512


def _stub_sequence(name: str, namespace: str) -> list[str]:
    """What glibc tries for ``name`` with ndots:5 and a pod's search path, in order."""
    search = [f"{namespace}.svc.cluster.local", "svc.cluster.local", "cluster.local"]
    return [f"{name}.{suffix}" for suffix in search] + [name]


async def test_a_stub_walking_the_search_path_sends_only_the_real_name_upstream() -> None:
    resolver, up, _ = make()
    for qtype in (TYPE_A, TYPE_AAAA):
        for name in _stub_sequence("example.com", "default"):
            msg, _ = await ask(resolver, name, qtype)
            if msg.rcode != RCODE_NXDOMAIN:
                break
    # 8 queries from the stub; the 6 search-path expansions never left ztunnel.
    assert up.asked == [("example.com", TYPE_A), ("example.com", TYPE_AAAA)]
    # A cluster name is found on the first try and nothing goes upstream.
    for name in _stub_sequence("other.prod", "default"):
        msg, _ = await ask(resolver, name)
        if msg.rcode != RCODE_NXDOMAIN:
            break
    assert ips(msg) == ["10.96.2.2"] and len(up.asked) == 2
