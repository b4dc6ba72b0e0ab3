"""The one error hierarchy of pyambient.

Every error the mesh raises on purpose is a :class:`MeshError`.  Library
exceptions (``OSError``, ``ssl.SSLError``, ``h2.exceptions.*``) are translated
into these at the I/O boundary, once, with the cause chained, so callers above
that boundary handle only the kinds below::

    MeshError
    ├── ConfigError              bad input from a person or an API object
    │   ├── IdentityError        not a valid SPIFFE identity
    │   └── InvalidObjectError   an API object that cannot be translated
    ├── CertificateError         cannot issue, load or verify a certificate
    ├── TransportError           the byte stream itself failed
    │   ├── StreamClosedError    we closed it ourselves, then used it
    │   ├── StreamBrokenError    the peer or the network broke it
    │   └── HandshakeError       TLS handshake failed (cert, ALPN, version)
    │       └── PeerIdentityError  the handshake succeeded but the peer is not who we expect
    │           ├── NoSpiffeIdError      the certificate names no single SPIFFE workload ID
    │           └── TrustDomainError     the SPIFFE ID is from another trust domain
    ├── ProtocolError            the peer violated HTTP/2, HBONE, HTTP/1.1, DNS or SOCKS5
    │   ├── Http1Error           bad HTTP/1.x from the peer; ``status`` is the answer it earns
    │   │   ├── Http1TooLargeError     a line, head or body over its bound (413, 414, 431)
    │   │   └── Http1UnsupportedError  a transfer coding or version not implemented (501, 505)
    │   ├── DnsFormatError       a DNS message that cannot be parsed (answered with FORMERR)
    │   ├── Socks5Error          a SOCKS5 handshake we refuse; ``reply`` is the code it earns
    │   └── Http2ViolationError  HTTP/2 broken or abused (flood, rapid reset); ``reason`` a word
    ├── LocalProtocolError       this side asked a codec for a message the protocol forbids
    ├── UpstreamError            could not reach the destination
    │   ├── ConnectRefusedError  connection refused / unreachable
    │   ├── ConnectTimeoutError  no answer within the connect timeout
    │   ├── TunnelRejectedError  the HBONE peer answered non-200 (``status`` holds it)
    │   ├── DnsUpstreamError     the upstream DNS server gave no usable answer in time
    │   ├── NameResolutionError  a host name has no address (NXDOMAIN, no A/AAAA, SERVFAIL)
    │   └── RateLimitStoreError  the global rate-limit store (Redis) gave no usable answer
    ├── PolicyDeniedError        authorization said no
    └── KubeApiError             the Kubernetes API answered a failure ``Status`` (``code``)
        ├── ResourceExpiredError   410: the resourceVersion was compacted away; list again
        └── ApiServerUnreachableError  no answer from the API server at all (``code`` 0)

Messages say what to check, not just what happened.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error pyambient raises on purpose."""


class ConfigError(MeshError):
    """Bad input from a person or an API object."""


class IdentityError(ConfigError):
    """A string that is not a valid ``spiffe://<td>/ns/<ns>/sa/<sa>`` identity."""


class InvalidObjectError(ConfigError):
    """An API object that cannot be translated; the previous good config stays in force."""


class CertificateError(MeshError):
    """A certificate cannot be issued, loaded or verified."""


class TransportError(MeshError):
    """The byte stream failed."""


class StreamClosedError(TransportError):
    """The stream was closed by this side and then used."""


class StreamBrokenError(TransportError):
    """The peer or the network broke the stream (reset, EOF mid-handshake, ...)."""


class HandshakeError(TransportError):
    """The TLS handshake failed."""


class PeerIdentityError(HandshakeError):
    """The peer proved an identity, but not one we accept."""


class ProtocolError(MeshError):
    """The peer violated the protocol (HTTP/2, HBONE, HTTP/1.1)."""


class UpstreamError(MeshError):
    """The destination could not be reached."""


class ConnectRefusedError(UpstreamError):
    """The destination refused the connection or is unreachable."""


class ConnectTimeoutError(UpstreamError):
    """The destination did not answer within the connect timeout."""


class TunnelRejectedError(UpstreamError):
    """The HBONE peer answered the CONNECT with a non-200 status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class PolicyDeniedError(MeshError):
    """Authorization denied the connection or request."""


class KubeApiError(MeshError):
    """The Kubernetes API answered with a failure ``Status`` (or could not be asked).

    ``code`` is the HTTP status (0 when no answer came), ``reason`` the Status reason
    (``NotFound``, ``Conflict``, ``Invalid``...), ``status`` the whole Status object.
    """

    def __init__(self, code: int, reason: str, message: str,
                 status: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.status: dict[str, object] = status if status is not None else {}


class ResourceExpiredError(KubeApiError):
    """410 Gone/Expired: a watch asked for a resourceVersion older than the server keeps."""


class ApiServerUnreachableError(KubeApiError):
    """The API server could not be reached (refused, timed out, reset): retry with backoff."""


class Http1Error(ProtocolError):
    """The peer sent HTTP/1.x the codec refuses (malformed, ambiguous framing, smuggling shapes).

    ``status`` is the response it earns when the peer is a client (400 unless a
    subclass says otherwise); a codec parsing responses sets 502, the answer a
    proxy gives its own client when the upstream misbehaves.
    """

    default_status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = self.default_status if status is None else status


class Http1TooLargeError(Http1Error):
    """A request line (414), header section (431) or body (413) over its configured bound."""

    default_status = 431


class Http1UnsupportedError(Http1Error):
    """A transfer coding (501) or HTTP version (505) this codec does not implement."""

    default_status = 501


class LocalProtocolError(MeshError):
    """This side asked a codec to send something HTTP forbids: a bug here, not the peer's."""


class DnsFormatError(ProtocolError):
    """A DNS message that is truncated, loops in its name compression or breaks RFC 1035."""


class Socks5Error(ProtocolError):
    """A SOCKS5 handshake this proxy refuses; ``reply`` is the RFC 1928 reply code it earns."""

    def __init__(self, message: str, reply: int) -> None:
        super().__init__(message)
        self.reply = reply


class DnsUpstreamError(UpstreamError):
    """The upstream DNS server did not answer usefully within the per-query timeout and retry."""


class NameResolutionError(UpstreamError):
    """A host name resolved to no address (NXDOMAIN, no A/AAAA records, or upstream failure)."""


class RateLimitStoreError(UpstreamError):
    """The global rate-limit store (Redis) could not be reached or answered an error."""


class NoSpiffeIdError(PeerIdentityError):
    """The peer's verified certificate carries no single ``spiffe://`` workload identity
    (no SAN, a DNS or e-mail SAN only, several SPIFFE URIs, or a malformed one)."""


class TrustDomainError(PeerIdentityError):
    """The peer's SPIFFE identity is from a trust domain this side does not accept."""


class Http2ViolationError(ProtocolError):
    """The peer broke or abused HTTP/2 and the connection was closed with GOAWAY.

    ``reason`` names the kind in one word from a closed set (a metric label):
    ``rapid_reset``, ``flood``, ``header_list_too_large`` or ``protocol_error``.
    """

    def __init__(self, message: str, *, reason: str = "protocol_error") -> None:
        super().__init__(message)
        self.reason = reason
