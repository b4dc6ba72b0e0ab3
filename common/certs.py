"""The certificate store: one workload certificate per identity, renewed at half-life.

A process (ztunnel for its node's workloads, a waypoint for itself) asks the store
for an identity's certificate the first time it needs it; the store fetches it
through the ``issuer`` it was given (a local CA, or a CSR sent to the mesh CA) and
keeps it.  :meth:`CertificateStore.run_renewals` then renews every held
certificate at half its lifetime, so there is always a long margin for a CA that
is briefly down: failures are logged and retried with capped exponential backoff.

Renewal never disturbs live connections: an established TLS connection holds its
own ``SSL`` object, which keeps the old certificate alive; the store only swaps
the contexts that *new* handshakes are made from.

Time: deadlines are trio deadlines, so tests drive renewals with ``MockClock``.
Certificate validity is wall time; ``clock`` maps one to the other (wall-clock UTC
by default; a test passes a clock that advances with trio's).
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import trio

from common import tls
from common.ca import DEFAULT_LEAF_LIFETIME, CertificateAuthority, WorkloadCertificate
from common.errors import CertificateError, MeshError
from common.identity import SpiffeId
from common.logging import get_logger

Issuer = Callable[[SpiffeId], Awaitable[WorkloadCertificate]]

# A CA outage should not turn into a storm of requests from every node, nor leave a
# renewal waiting long once the CA is back: 1 s doubling to 1 min.
RETRY_INITIAL = timedelta(seconds=1)
RETRY_MAX = timedelta(minutes=1)
# One hung CA request must not hold up the other identities' renewals for long.
RENEW_TIMEOUT = 30.0

_log = get_logger("certs")


def utcnow() -> datetime:
    return datetime.now(UTC)


def local_issuer(ca: CertificateAuthority, *,
                 lifetime: timedelta = DEFAULT_LEAF_LIFETIME) -> Issuer:
    """An issuer signing with an in-process CA (local cluster, tests), off the event loop."""
    async def issue(identity: SpiffeId) -> WorkloadCertificate:
        return await trio.to_thread.run_sync(lambda: ca.issue(identity, lifetime=lifetime))
    return issue


@dataclass
class _Held:
    cert: WorkloadCertificate
    next_attempt: datetime
    backoff: timedelta = RETRY_INITIAL
    client_ctx: ssl.SSLContext | None = None
    server_ctx: ssl.SSLContext | None = None


@dataclass
class _Fetch:
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class CertificateStore:
    """Certificates and TLS contexts per workload identity, fetched on first use."""

    def __init__(self, issuer: Issuer, *, clock: Callable[[], datetime] = utcnow) -> None:
        self._issuer = issuer
        self._clock = clock
        self._held: dict[SpiffeId, _Held] = {}
        self._fetching: dict[SpiffeId, _Fetch] = {}
        self._changed = trio.Event()

    # -- access -----------------------------------------------------------------------

    async def get(self, identity: SpiffeId) -> WorkloadCertificate:
        """The identity's certificate, fetched on first use or once expired (renewal failed
        for too long); concurrent callers share one fetch."""
        while True:
            held = self._held.get(identity)
            if held is not None and self._clock() < held.cert.not_after:
                await trio.lowlevel.checkpoint()
                return held.cert
            fetch = self._fetching.get(identity)
            if fetch is None:
                break
            await fetch.done.wait()
            if fetch.error is not None:
                raise CertificateError(f"cannot get a certificate for {identity}: "
                                       f"{fetch.error}") from fetch.error
            # Otherwise the certificate is held now, or the fetching task was cancelled
            # and this caller takes over.
        fetch = _Fetch()
        self._fetching[identity] = fetch
        try:
            cert = await self._issue(identity)
        except Exception as exc:
            fetch.error = exc
            raise
        finally:
            del self._fetching[identity]
            fetch.done.set()
        self._hold(identity, cert)
        return cert

    def cached(self, identity: SpiffeId) -> WorkloadCertificate | None:
        """The held certificate, without fetching."""
        held = self._held.get(identity)
        return held.cert if held is not None else None

    def client_context(self, identity: SpiffeId) -> ssl.SSLContext:
        """The context for new outbound handshakes as ``identity`` (after :meth:`get`)."""
        held = self._require(identity)
        if held.client_ctx is None:
            held.client_ctx = tls.client_context(held.cert)
        return held.client_ctx

    def server_context(self, identity: SpiffeId) -> ssl.SSLContext:
        """The context for new inbound handshakes as ``identity`` (after :meth:`get`)."""
        held = self._require(identity)
        if held.server_ctx is None:
            held.server_ctx = tls.server_context(held.cert)
        return held.server_ctx

    def forget(self, identity: SpiffeId) -> None:
        """Drop the identity (its workload left the node); live connections are unaffected."""
        if self._held.pop(identity, None) is not None:
            self._wake()

    def _require(self, identity: SpiffeId) -> _Held:
        held = self._held.get(identity)
        if held is None:
            raise CertificateError(f"no certificate held for {identity}: await "
                                   f"CertificateStore.get() for it first")
        return held

    # -- issuing and renewing ---------------------------------------------------------

    async def _issue(self, identity: SpiffeId) -> WorkloadCertificate:
        try:
            cert = await self._issuer(identity)
        except MeshError:
            raise
        except Exception as exc:
            raise CertificateError(f"the issuer failed for {identity}: {exc!r}") from exc
        if cert.identity != identity:
            raise CertificateError(
                f"the issuer returned a certificate for {cert.identity}, not {identity}")
        return cert

    def _hold(self, identity: SpiffeId, cert: WorkloadCertificate) -> None:
        # An issuer handing out certificates already past half-life must not make the
        # renewal loop spin against the CA.
        next_attempt = max(cert.renew_at(), self._clock() + RETRY_INITIAL)
        self._held[identity] = _Held(cert, next_attempt=next_attempt)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run_renewals(self, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew held certificates at half-life, forever; cancel to stop."""
        task_status.started()
        while True:
            changed = self._changed
            now = self._clock()
            due = [i for i, h in self._held.items() if h.next_attempt <= now]
            if due:
                async with trio.open_nursery() as nursery:
                    for identity in due:
                        nursery.start_soon(self._renew, identity)
                continue
            wait = math.inf
            if self._held:
                soonest = min(h.next_attempt for h in self._held.values())
                wait = max((soonest - now).total_seconds(), 0.0)
            with trio.move_on_after(wait):
                await changed.wait()

    async def _renew(self, identity: SpiffeId) -> None:
        old = self._held.get(identity)
        if old is None:
            return
        try:
            with trio.fail_after(RENEW_TIMEOUT):
                cert = await self._issue(identity)
        except (MeshError, trio.TooSlowError) as exc:
            if isinstance(exc, trio.TooSlowError):
                exc = CertificateError(f"the issuer did not answer within {RENEW_TIMEOUT} s")
            now = self._clock()
            retry_in = old.backoff
            old.next_attempt = now + retry_in
            old.backoff = min(old.backoff * 2, RETRY_MAX)
            expired = now >= old.cert.not_after
            (_log.error if expired else _log.warning)(
                "certificate renewal failed", identity=str(identity), error=str(exc),
                retry_in_s=retry_in.total_seconds(), expires=old.cert.not_after.isoformat(),
                expired=expired)
            return
        if self._held.get(identity) is not old:
            return  # forgotten (or replaced) while we were renewing
        self._hold(identity, cert)
        _log.info("certificate renewed", identity=str(identity),
                  not_after=cert.not_after.isoformat())
