"""TLS origination at the waypoint: a DestinationRule's ``tls.mode: SIMPLE`` for an external host.

Theory of operation.  Istio's egress recipe lets a client speak plain HTTP to a
ServiceEntry port (often 80 with ``targetPort: 443``) while the egress point opens TLS
to the external endpoint, because a DestinationRule for the host says
``trafficPolicy.tls.mode: SIMPLE`` (or says it in ``portLevelSettings`` for that
port).  The route translator already merges the *mode* into each cluster
(``Cluster.tls_mode``, subsets included); :func:`origination_for` adds the details it
does not keep, read from the same DestinationRule sections (port level over top
level): ``sni`` (default: the host), ``caCertificates`` (a PEM file readable by the
waypoint; default: the system roots) and ``insecureSkipVerify``.  That part is pure.

The I/O part is :func:`originate`: a ``trio.SSLStream`` over the TCP stream to the
endpoint, ALPN ``http/1.1`` (the waypoint speaks HTTP/1.1 upstream), the server
certificate verified against the CA and the SNI name unless ``insecureSkipVerify``.
Egress carries far less traffic than the mesh's HBONE data path, so the MemoryBIO
stream's cost (ANCHORS.md) buys simplicity here.  SSL contexts are built once per
distinct setting (reading the CA file off the trio thread) and shared.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from dataclasses import dataclass

import trio
from pydantic import ValidationError

from common.api.istio_networking import ClientTLSSettings, DestinationRuleSpec
from common.errors import CertificateError, HandshakeError
from common.kube.objects import KubeObject

__all__ = ["SIMPLE", "Origination", "originate", "origination_for", "tls_section"]

SIMPLE = "SIMPLE"
_ALPN = ["http/1.1"]


@dataclass(frozen=True, slots=True)
class Origination:
    """How to open TLS to an external endpoint: the name sent (SNI) and verified, the
    CA bundle (None: the system roots), and whether verification is skipped."""

    sni: str
    ca_file: str | None = None
    insecure: bool = False


def _host_matches(pattern: str, host: str) -> int:
    """How specifically ``pattern`` (a DestinationRule host) names ``host``: 0 not at all."""
    pattern = pattern.lower()
    if pattern == host:
        return 1 << 16
    if pattern.startswith("*") and host.endswith(pattern[1:]):
        return len(pattern)
    return 0


def tls_section(rules: Iterable[KubeObject], host: str, port: int) -> ClientTLSSettings | None:
    """The ``tls`` section in force for ``host:port``: the most specific DestinationRule
    host (exact over the longest wildcard, then the oldest rule), its
    ``portLevelSettings`` for ``port`` over its top-level ``trafficPolicy``."""
    best: tuple[int, tuple[str, str, str]] | None = None
    chosen: DestinationRuleSpec | None = None
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
        best, chosen = (score, age), spec
    if chosen is None or chosen.traffic_policy is None:
        return None
    policy = chosen.traffic_policy
    for level in policy.port_level_settings:
        if level.port is not None and level.port.number == port and level.tls is not None:
            return level.tls
    return policy.tls


def origination_for(mode: str | None, rules: Iterable[KubeObject], host: str,
                    port: int) -> Origination | None:
    """The origination for a cluster whose merged TLS mode is ``mode`` (None unless SIMPLE)."""
    if mode != SIMPLE:
        return None
    tls = tls_section(rules, host, port)
    if tls is None:  # the mode came from a subset: no details, the defaults apply
        return Origination(sni=host)
    return Origination(sni=tls.sni or host, ca_file=tls.ca_certificates or None,
                       insecure=bool(tls.insecure_skip_verify))


# --- I/O -------------------------------------------------------------------------------------

_contexts: dict[Origination, ssl.SSLContext] = {}


def _build_context(origination: Origination) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=origination.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(
            f"caCertificates {origination.ca_file} of the DestinationRule cannot be loaded: "
            f"{exc} (the path is read by the waypoint process: is the file there and PEM?)"
        ) from exc
    if origination.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(_ALPN)
    return ctx


async def context_for(origination: Origination) -> ssl.SSLContext:
    """The shared SSL context for ``origination`` (built off the trio thread once)."""
    ctx = _contexts.get(origination)
    if ctx is None:
        ctx = await trio.to_thread.run_sync(_build_context, origination)
        _contexts[origination] = ctx
    return ctx


async def originate(stream: trio.abc.Stream, origination: Origination,
                    where: str) -> trio.SSLStream[trio.abc.Stream]:
    """TLS client handshake over ``stream`` (consumed: closed on failure).

    Raises :class:`~common.errors.HandshakeError` saying what to check, or
    :class:`~common.errors.CertificateError` when the CA file does not load.
    """
    try:
        ctx = await context_for(origination)
        tls = trio.SSLStream(stream, ctx, server_hostname=origination.sni,
                             https_compatible=True)
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            what = (f"the certificate of {where} does not verify for {origination.sni!r} "
                    f"against {origination.ca_file or 'the system roots'}: "
                    f"{cause.verify_message} (check the DestinationRule's caCertificates "
                    f"and sni, or the server's certificate)")
        else:
            what = (f"TLS handshake with {where} failed: {cause or exc} (does it speak TLS "
                    f"on that port? check the ServiceEntry's targetPort)")
        raise HandshakeError(what) from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return tls
