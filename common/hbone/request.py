"""HBONE request building and checking: pure functions, no I/O.

A HBONE request is an HTTP/2 CONNECT (not extended CONNECT, so no ``:scheme``,
``:path`` or ``:protocol``) whose ``:authority`` is the destination ``ip:port``
(``[v6]:port``).  Istio's ztunnel also sends ``Forwarded: for="<src>"`` (RFC 7239),
``baggage`` (OpenTelemetry keys for the source workload) and a W3C ``traceparent``.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass, field

from common.errors import ProtocolError
from common.identity import SpiffeId


class BadRequestError(ProtocolError):
    """The peer's CONNECT request is malformed; the answer is ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True, kw_only=True)
class Baggage:
    """Who the source is, as Istio's ztunnel puts it in the ``baggage`` header."""

    namespace: str | None = None
    workload_name: str | None = None
    workload_type: str = "deployment"  # the ``k8s.<type>.name`` key ztunnel uses
    service_name: str | None = None
    service_version: str | None = None
    cluster: str | None = None

    def header_value(self) -> str:
        pairs = [
            ("k8s.cluster.name", self.cluster),
            ("k8s.namespace.name", self.namespace),
            (f"k8s.{self.workload_type}.name", self.workload_name),
            ("service.name", self.service_name),
            ("service.version", self.service_version),
        ]
        return ",".join(f"{key}={value}" for key, value in pairs if value)


def parse_baggage(value: str) -> dict[str, str]:
    """``k=v,k=v`` (W3C baggage, properties after ``;`` dropped) into a dict."""
    result: dict[str, str] = {}
    for member in value.split(","):
        key, sep, rest = member.partition("=")
        if sep and key.strip():
            result[key.strip()] = rest.split(";", 1)[0].strip()
    return result


def format_address(host: str, port: int) -> str:
    """``ip:port`` with an IPv6 address in brackets, as ``:authority`` and RFC 7239 want."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_authority(authority: str) -> tuple[str, int]:
    """``ip:port`` / ``[v6]:port`` into (ip, port); raise :class:`BadRequestError` (400)."""
    if authority.startswith("["):
        host, sep, port_text = authority[1:].partition("]:")
        if not sep:
            raise BadRequestError(400, f"authority {authority!r}: expected [ipv6]:port")
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            raise BadRequestError(400, f"authority {authority!r} has no port: expected ip:port")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise BadRequestError(
            400, f"authority {authority!r}: HBONE needs an IP address, not {host!r}") from None
    if (address.version == 6) != authority.startswith("["):
        raise BadRequestError(400, f"authority {authority!r}: IPv6 must be in brackets")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadRequestError(400, f"authority {authority!r}: port must be 1-65535")
    return str(address), int(port_text)


def new_traceparent() -> str:
    """A fresh W3C trace context (version 00, sampled flag off)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"


def build_request(authority: str, *, forwarded_for: str | None = None,
                  baggage: Baggage | str | None = None, traceparent: str | None = None,
                  extra: list[tuple[str, str]] | None = None) -> list[tuple[bytes, bytes]]:
    """The CONNECT request headers for ``authority`` (checked first)."""
    parse_authority(authority)
    headers = [(b":method", b"CONNECT"), (b":authority", authority.encode())]
    if forwarded_for:
        headers.append((b"forwarded", f'for="{forwarded_for}"'.encode()))
    if baggage is not None:
        text = baggage.header_value() if isinstance(baggage, Baggage) else baggage
        if text:
            headers.append((b"baggage", text.encode()))
    headers.append((b"traceparent", (traceparent or new_traceparent()).encode()))
    for name, value in extra or []:
        headers.append((name.lower().encode(), value.encode()))
    return headers


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectRequest:
    """A checked HBONE request as the server's handler sees it."""

    stream_id: int
    host: str
    port: int
    authority: str
    peer_identity: SpiffeId | None
    peer_address: tuple[str, int] | None
    forwarded_for: str | None
    baggage: dict[str, str]
    traceparent: str | None
    headers: dict[str, str] = field(repr=False)


def _forwarded_for(value: str) -> str | None:
    """The first ``for=`` of a ``Forwarded`` header, quotes and brackets as sent."""
    for element in value.split(","):
        for pair in element.split(";"):
            key, sep, val = pair.strip().partition("=")
            if sep and key.strip().lower() == "for":
                return val.strip().strip('"')
    return None


def parse_request(stream_id: int, raw: list[tuple[bytes, bytes]], *,
                  peer_identity: SpiffeId | None,
                  peer_address: tuple[str, int] | None) -> ConnectRequest:
    """Check a request's headers; raise :class:`BadRequestError` with the status to answer.

    Istio's ztunnel answers 400 to any method but CONNECT (and so do we).
    """
    headers: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("ascii", "replace")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]},{text}" if key in headers else text
    method = headers.get(":method", "")
    if method != "CONNECT":
        raise BadRequestError(400, f"method {method!r}: HBONE accepts only CONNECT")
    if ":protocol" in headers:
        raise BadRequestError(400, "extended CONNECT (:protocol) is not HBONE")
    authority = headers.get(":authority", "")
    host, port = parse_authority(authority)
    forwarded = headers.get("forwarded")
    return ConnectRequest(
        stream_id=stream_id, host=host, port=port, authority=authority,
        peer_identity=peer_identity, peer_address=peer_address,
        forwarded_for=_forwarded_for(forwarded) if forwarded else None,
        baggage=parse_baggage(headers.get("baggage", "")),
        traceparent=headers.get("traceparent"), headers=headers)
