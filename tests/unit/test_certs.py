"""The certificate store: fetch on first use, contexts per certificate, renewal at half-life."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import trio
import trio.testing
from cryptography import x509

from common.ca import CertificateAuthority, WorkloadCertificate
from common.certs import CertificateStore, local_issuer
from common.errors import CertificateError
from common.identity import SpiffeId
from common.tls import TLSStream, accept_tls, connect_tls

TD = "cluster.local"
CLIENT = SpiffeId(TD, "default", "client")
SERVER = SpiffeId(TD, "default", "server")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(TD)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def io_clock() -> trio.testing.MockClock:
    # Jump only after real idleness, so that real loopback I/O in a test never sees
    # virtual time leap (and time out) while the kernel is moving its bytes.
    return trio.testing.MockClock(autojump_threshold=0.1)


def _virtual_wall_clock() -> Callable[[], datetime]:
    """Wall time that advances with trio's (mock) clock, starting now."""
    start_wall, start_trio = datetime.now(UTC), trio.current_time()
    return lambda: start_wall + timedelta(seconds=trio.current_time() - start_trio)


class CountingIssuer:
    def __init__(self, ca: CertificateAuthority, now: Callable[[], datetime],
                 lifetime: timedelta = timedelta(hours=24)) -> None:
        self.ca, self.now, self.lifetime = ca, now, lifetime
        self.calls: list[SpiffeId] = []
        self.failures = 0
        self.hang = False

    async def __call__(self, identity: SpiffeId) -> WorkloadCertificate:
        self.calls.append(identity)
        await trio.sleep(0.001)
        if self.hang:
            await trio.sleep_forever()
        if self.failures:
            self.failures -= 1
            raise OSError("CA unreachable")
        return self.ca.issue(identity, lifetime=self.lifetime,
                             not_before=self.now() - timedelta(minutes=5))


async def test_get_fetches_once_and_caches(ca: CertificateAuthority) -> None:
    issuer = CountingIssuer(ca, lambda: datetime.now(UTC))
    store = CertificateStore(issuer)
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(store.get, CLIENT)
    cert = await store.get(CLIENT)
    assert issuer.calls == [CLIENT]
    assert cert.identity == CLIENT
    assert store.cached(CLIENT) is cert


async def test_contexts_need_get_first_and_are_cached(ca: CertificateAuthority) -> None:
    store = CertificateStore(local_issuer(ca))
    with pytest.raises(CertificateError, match=r"get\(\) for it first"):
        store.client_context(CLIENT)
    await store.get(CLIENT)
    assert store.client_context(CLIENT) is store.client_context(CLIENT)
    assert store.server_context(CLIENT) is store.server_context(CLIENT)
    store.forget(CLIENT)
    with pytest.raises(CertificateError):
        store.server_context(CLIENT)


async def test_issuer_failure_is_a_certificate_error(ca: CertificateAuthority) -> None:
    issuer = CountingIssuer(ca, lambda: datetime.now(UTC))
    issuer.failures = 1
    store = CertificateStore(issuer)
    with pytest.raises(CertificateError, match="CA unreachable"):
        await store.get(CLIENT)
    assert (await store.get(CLIENT)).identity == CLIENT  # the next call tries again


async def test_issuer_returning_another_identity_is_refused(ca: CertificateAuthority) -> None:
    async def wrong(identity: SpiffeId) -> WorkloadCertificate:
        return ca.issue(SERVER)

    with pytest.raises(CertificateError, match=re.escape(f"not {CLIENT}")):
        await CertificateStore(wrong).get(CLIENT)


async def test_renews_at_half_life(ca: CertificateAuthority,
                                   clock: trio.testing.MockClock) -> None:
    now = _virtual_wall_clock()
    issuer = CountingIssuer(ca, now)
    store = CertificateStore(issuer, clock=now)
    first = await store.get(CLIENT)
    first_ctx = store.client_context(CLIENT)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run_renewals)
        # Issued backdated 5 min with 24 h: half-life is 11 h 55 min from now.
        await trio.sleep(11 * 3600 + 54 * 60)
        assert store.cached(CLIENT) is first
        await trio.sleep(2 * 60)
        second = store.cached(CLIENT)
        assert second is not None and second is not first
        assert second.not_after - first.not_after == pytest.approx(
            timedelta(hours=11, minutes=55), abs=timedelta(minutes=1))
        assert store.client_context(CLIENT) is not first_ctx
        # And again at the second certificate's half-life, not before.
        await trio.sleep(11 * 3600)
        assert store.cached(CLIENT) is second
        await trio.sleep(3600)
        assert store.cached(CLIENT) is not second
        assert len(issuer.calls) == 3
        nursery.cancel_scope.cancel()


async def test_renewal_failures_back_off_then_recover(
        ca: CertificateAuthority, clock: trio.testing.MockClock) -> None:
    now = _virtual_wall_clock()
    issuer = CountingIssuer(ca, now)
    store = CertificateStore(issuer, clock=now)
    first = await store.get(CLIENT)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run_renewals)
        issuer.failures = 4
        await trio.sleep((first.renew_at() - now()).total_seconds() + 0.5)
        assert len(issuer.calls) == 2  # the first failed attempt, right at half-life
        assert store.cached(CLIENT) is first
        # Retries after 1, 2, 4 and 8 s: the fifth attempt succeeds.
        await trio.sleep(1 + 2 + 4 + 8 + 0.5)
        assert len(issuer.calls) == 6
        assert store.cached(CLIENT) is not first
        nursery.cancel_scope.cancel()


async def test_forget_stops_renewing(ca: CertificateAuthority,
                                     clock: trio.testing.MockClock) -> None:
    now = _virtual_wall_clock()
    issuer = CountingIssuer(ca, now)
    store = CertificateStore(issuer, clock=now)
    await store.get(CLIENT)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run_renewals)
        store.forget(CLIENT)
        await trio.sleep(48 * 3600)
        assert issuer.calls == [CLIENT]
        nursery.cancel_scope.cancel()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    yield sock
    sock.close()


async def _accept(lsock: socket.socket) -> socket.socket:
    while True:
        try:
            return lsock.accept()[0]
        except BlockingIOError:
            await trio.lowlevel.wait_readable(lsock)


async def _connect(store: CertificateStore, lsock: socket.socket) -> tuple[TLSStream, TLSStream]:
    accepted: list[TLSStream] = []

    async def serve() -> None:
        accepted.append(await accept_tls(await _accept(lsock), store.server_context(SERVER),
                                         trust_domain=TD))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        client = await connect_tls("127.0.0.1", lsock.getsockname()[1],
                                   store.client_context(CLIENT), expected={SERVER})
    return client, accepted[0]


async def test_live_connection_survives_renewal_and_new_handshakes_use_the_new_cert(
        ca: CertificateAuthority, io_clock: trio.testing.MockClock,
        listener: socket.socket) -> None:
    now = _virtual_wall_clock()
    # OpenSSL checks validity against the real clock while renewals follow the virtual
    # one, so the certificate is short enough (20 min, backdated 5) that the renewed
    # one, issued 5 virtual minutes from now, is already valid in real time.
    issuer = CountingIssuer(ca, now, lifetime=timedelta(minutes=20))
    store = CertificateStore(issuer, clock=now)
    old_server = await store.get(SERVER)
    await store.get(CLIENT)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run_renewals)
        old_client_side, old_server_side = await _connect(store, listener)
        assert old_server_side.socket.getpeercert(binary_form=True) is not None
        assert _serial(old_client_side) == _serial_of(old_server)

        await trio.sleep(5 * 60 + 1)
        new_server = store.cached(SERVER)
        assert new_server is not None and new_server is not old_server

        # The old connection still carries data both ways.
        await old_client_side.send_all(b"still here")
        assert await old_server_side.receive_some() == b"still here"
        await old_server_side.send_all(b"yes")
        assert await old_client_side.receive_some() == b"yes"

        new_client_side, new_server_side = await _connect(store, listener)
        assert _serial(new_client_side) == _serial_of(new_server)
        for stream in (old_client_side, old_server_side, new_client_side, new_server_side):
            await stream.aclose()
        nursery.cancel_scope.cancel()


def _serial(stream: TLSStream) -> int:
    der = stream.socket.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _serial_of(cert: WorkloadCertificate) -> int:
    return x509.load_pem_x509_certificates(cert.cert_pem)[0].serial_number


async def test_a_hung_issuer_times_out_and_is_retried(
        ca: CertificateAuthority, clock: trio.testing.MockClock) -> None:
    now = _virtual_wall_clock()
    issuer = CountingIssuer(ca, now)
    store = CertificateStore(issuer, clock=now)
    first = await store.get(CLIENT)
    issuer.hang = True
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run_renewals)
        await trio.sleep((first.renew_at() - now()).total_seconds() + 31)
        assert store.cached(CLIENT) is first  # timed out after 30 s, retry due in 1 s
        issuer.hang = False
        await trio.sleep(2)
        assert store.cached(CLIENT) is not first
        nursery.cancel_scope.cancel()


async def test_get_fetches_anew_once_the_held_certificate_expired(
        ca: CertificateAuthority, clock: trio.testing.MockClock) -> None:
    now = _virtual_wall_clock()
    issuer = CountingIssuer(ca, now)
    store = CertificateStore(issuer, clock=now)
    first = await store.get(CLIENT)  # no renewal loop running: it will expire
    await trio.sleep(25 * 3600)
    assert store.cached(CLIENT) is first
    second = await store.get(CLIENT)
    assert second is not first and second.not_after > now()
