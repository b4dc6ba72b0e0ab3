"""TLS origination at the waypoint: a DestinationRule's ``tls.mode: SIMPLE`` for an external host.

Theory of operation.  Istio's egress recipe lets a client speak plain HTTP to a
ServiceEntry port (often 80 with ``targetPort: 443``) while the egress point opens TLS
to the external endpoint, because a DestinationRule for the host says
``trafficPolicy.tls.mode: SIMPLE`` (or says it in ``portLevelSettings`` for that
port).  The route translator already merges the *mode* into each cluster
(``Cluster.tls_mode``, subsets included); :func:`origination_for` adds the details it
does not keep, read from the same DestinationRule sections (port level over top
level): ``sni`` (default: the host), the CA to verify the server with --
``credentialName`` (a Secret in the DestinationRule's namespace, key ``cacert`` or
``ca.crt``) over ``caCertificates`` (a PEM file readable by the waypoint) over the
system roots -- and ``insecureSkipVerify``.  That part is pure.

The I/O part is :func:`originate`: a ``trio.SSLStream`` over the TCP stream to the
endpoint, ALPN ``http/1.1`` (the waypoint speaks HTTP/1.1 upstream), the server
certificate verified against the CA and the SNI name unless ``insecureSkipVerify``.
Egress carries far less traffic than the mesh's HBONE data path, so the MemoryBIO
stream's cost (ANCHORS.md) buys simplicity here.  :class:`ContextCache` builds one SSL
context per distinct setting (reading the file or the Secret off the request path's
hot loop) and builds it again after :data:`CONTEXT_TTL`, so a rotated CA is picked up.
"""

from __future__ import annotations

import base64
import binascii
import os
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

import trio
from pydantic import ValidationError

from common.api.istio_networking import ClientTLSSettings, DestinationRuleSpec
from common.errors import CertificateError, HandshakeError, KubeApiError
from common.kube.objects import KubeObject

__all__ = ["CONTEXT_TTL", "SIMPLE", "ContextCache", "Origination", "originate",
           "origination_for", "tls_section"]

SIMPLE = "SIMPLE"
_ALPN = ["http/1.1"]
#: Seconds an SSL context is used before its CA (file or Secret) is read again.
CONTEXT_TTL = 60.0
#: Keys of a credentialName Secret that may hold the CA bundle (Istio's generic and TLS forms).
CA_KEYS = ("cacert", "ca.crt")


@dataclass(frozen=True, slots=True)
class Origination:
    """How to open TLS to an external endpoint: the name sent (SNI) and verified, the
    CA bundle (``credential``: a Secret as (namespace, name); else ``ca_file``; else the
    system roots), and whether verification is skipped."""

    sni: str
    ca_file: str | None = None
    insecure: bool = False
    credential: tuple[str, str] | None = None

    @property
    def ca_source(self) -> str:
        if self.credential is not None:
            return f"Secret {self.credential[0]}/{self.credential[1]}"
        return self.ca_file or "the system roots"


def _host_matches(pattern: str, host: str) -> int:
    """How specifically ``pattern`` (a DestinationRule host) names ``host``: 0 not at all."""
    pattern = pattern.lower()
    if pattern == host:
        return 1 << 16
    if pattern.startswith("*") and host.endswith(pattern[1:]):
        return len(pattern)
    return 0


def tls_section(rules: Iterable[KubeObject], host: str, port: int
                ) -> tuple[ClientTLSSettings, str] | None:
    """The ``tls`` section in force for ``host:port`` and its rule's namespace: the most
    specific DestinationRule host (exact over the longest wildcard, then the oldest
    rule), its ``portLevelSettings`` for ``port`` over its top-level ``trafficPolicy``."""
    best: tuple[int, tuple[str, str, str]] | None = None
    chosen: DestinationRuleSpec | None = None
    namespace = ""
    for obj in rules:
        pattern = obj.spec.get("host")
        if not isinstance(pattern, str):
            continue
        score = _host_matches(pattern, host)
        if not score:
            continue
        age = (obj.metadata.creation_timestamp or "", obj.metadata.namespace or "",
               obj.metadata.name)
        if best is not None and (score < best[0] or (score == best[0] and age >= best[1])):
            continue
        try:
            spec = DestinationRuleSpec.model_validate(dict(obj.spec))
        except ValidationError:
            continue  # the route translator reports it on the object
        best, chosen, namespace = (score, age), spec, age[1]
    if chosen is None or chosen.traffic_policy is None:
        return None
    policy = chosen.traffic_policy
    for level in policy.port_level_settings:
        if level.port is not None and level.port.number == port and level.tls is not None:
            return level.tls, namespace
    return (policy.tls, namespace) if policy.tls is not None else None


def origination_for(mode: str | None, rules: Iterable[KubeObject], host: str,
                    port: int) -> Origination | None:
    """The origination for a cluster whose merged TLS mode is ``mode`` (None unless SIMPLE)."""
    if mode != SIMPLE:
        return None
    found = tls_section(rules, host, port)
    if found is None:  # the mode came from a subset: no details, the defaults apply
        return Origination(sni=host)
    tls, namespace = found
    return Origination(sni=tls.sni or host, ca_file=tls.ca_certificates or None,
                       insecure=bool(tls.insecure_skip_verify),
                       credential=(namespace, tls.credential_name) if tls.credential_name
                       else None)


# --- I/O -------------------------------------------------------------------------------------

#: Reads a Secret's ``data`` (base64 values) by namespace and name.
SecretReader = Callable[[str, str], Awaitable[Mapping[str, str]]]


async def read_secret(namespace: str, name: str) -> Mapping[str, str]:
    """A Secret from the API server the waypoint watches (``$AMBIENT_SERVER``, else
    in-cluster, else kubeconfig), with a client of its own: CA reads are rare."""
    from common.kube import KubeClient, Secret
    from common.kube.config import load_config

    async with KubeClient(load_config(os.environ.get("AMBIENT_SERVER"))) as client:
        secret = await client.get(Secret, name, namespace)
    return secret.data or {}


def ca_from_secret(data: Mapping[str, str], where: str) -> str:
    """The PEM CA bundle of a credentialName Secret's ``data``."""
    for key in CA_KEYS:
        if key in data:
            try:
                return base64.b64decode(data[key], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise CertificateError(f"{where} key {key} is not base64 PEM: {exc}") from exc
    raise CertificateError(f"{where} has no CA bundle: add key {' or '.join(CA_KEYS)} "
                           f"(PEM) for the DestinationRule's credentialName")


def build_context(origination: Origination, ca_pem: str | None = None) -> ssl.SSLContext:
    """An SSL client context: the CA from ``ca_pem`` (a Secret's), else the file, else
    the system roots.  Reads the file: call it off the trio thread."""
    try:
        if ca_pem is not None:
            ctx = ssl.create_default_context(cadata=ca_pem)
        else:
            ctx = ssl.create_default_context(cafile=origination.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(
            f"the CA ({origination.ca_source}) of the DestinationRule cannot be loaded: {exc} "
            f"(a caCertificates path is read by the waypoint process: is the file there, "
            f"and PEM?)") from exc
    if origination.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(_ALPN)
    return ctx


class ContextCache:
    """One SSL context per :class:`Origination`, rebuilt after ``ttl`` seconds."""

    def __init__(self, secrets: SecretReader = read_secret, ttl: float = CONTEXT_TTL) -> None:
        self._secrets = secrets
        self._ttl = ttl
        self._contexts: dict[Origination, tuple[float, ssl.SSLContext]] = {}

    async def get(self, origination: Origination) -> ssl.SSLContext:
        now = trio.current_time()
        cached = self._contexts.get(origination)
        if cached is not None and cached[0] > now:
            return cached[1]
        ca_pem = None
        if origination.credential is not None:
            namespace, name = origination.credential
            where = f"Secret {namespace}/{name}"
            try:
                data = await self._secrets(namespace, name)
            except KubeApiError as exc:
                raise CertificateError(f"{where} (credentialName) cannot be read: {exc}") from exc
            ca_pem = ca_from_secret(data, where)
        ctx = await trio.to_thread.run_sync(build_context, origination, ca_pem)
        self._contexts[origination] = (now + self._ttl, ctx)
        return ctx


#: The contexts every egress transport shares unless given its own.
SHARED_CONTEXTS = ContextCache()


async def originate(stream: trio.abc.Stream, origination: Origination, where: str,
                    contexts: ContextCache = SHARED_CONTEXTS) -> trio.SSLStream[trio.abc.Stream]:
    """TLS client handshake over ``stream`` (consumed: closed on failure).

    Raises :class:`~common.errors.HandshakeError` saying what to check, or
    :class:`~common.errors.CertificateError` when the CA does not load.
    """
    try:
        ctx = await contexts.get(origination)
        tls = trio.SSLStream(stream, ctx, server_hostname=origination.sni,
                             https_compatible=True)
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            what = (f"the certificate of {where} does not verify for {origination.sni!r} "
                    f"against {origination.ca_source}: {cause.verify_message} (check the "
                    f"DestinationRule's caCertificates/credentialName and sni, or the "
                    f"server's certificate)")
        else:
            what = (f"TLS handshake with {where} failed: {cause or exc} (does it speak TLS "
                    f"on that port? check the ServiceEntry's targetPort)")
        raise HandshakeError(what) from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return tls
