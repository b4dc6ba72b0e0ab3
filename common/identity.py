"""Workload identity: the SPIFFE ID ``spiffe://<trust-domain>/ns/<namespace>/sa/<account>``.

This is the only identity shape the mesh accepts, in certificates (the URI SAN), in
policy and in configuration.  Parsing is strict on purpose: an identity is compared
as a value everywhere (authorization, expected-peer checks, pool keys), so two
spellings of one identity (percent-encoding, upper case, a port, a trailing slash)
must not both be accepted.

Rules (SPIFFE ID spec plus Kubernetes naming):

* scheme exactly ``spiffe://`` (lower case);
* trust domain: lower-case letters, digits, ``.``, ``-``, ``_``; at most 255 characters;
  no userinfo (``@``), no port (``:``);
* path exactly ``/ns/<namespace>/sa/<service-account>``;
* namespace: a DNS-1123 label (what Kubernetes allows for a Namespace name);
* service account: a DNS-1123 subdomain (what Kubernetes allows for a ServiceAccount name);
* no percent-encoding, query or fragment anywhere; the whole URI at most 2048 bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import IdentityError

_SCHEME = "spiffe://"
# SPIFFE ID spec: "SPIFFE IDs MUST NOT be longer than 2048 bytes"; trust domain at most 255.
_MAX_URI_BYTES = 2048
_MAX_TRUST_DOMAIN = 255
_MAX_NAMESPACE = 63  # DNS-1123 label
_MAX_SERVICE_ACCOUNT = 253  # DNS-1123 subdomain

_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


def _check_trust_domain(td: str) -> None:
    if not td:
        raise IdentityError("trust domain is empty: expected spiffe://<trust-domain>/ns/<ns>/sa/<sa>")
    if "@" in td:
        raise IdentityError(f"trust domain {td!r} contains userinfo ('@'), which SPIFFE forbids")
    if ":" in td:
        raise IdentityError(f"trust domain {td!r} contains a port (':'), which SPIFFE forbids")
    if len(td) > _MAX_TRUST_DOMAIN:
        raise IdentityError(
            f"trust domain is {len(td)} characters long; SPIFFE allows at most {_MAX_TRUST_DOMAIN}")
    if not _TRUST_DOMAIN_RE.fullmatch(td):
        raise IdentityError(
            f"trust domain {td!r} may contain only lower-case letters, digits, '.', '-' and '_'")


def _check_namespace(ns: str) -> None:
    if not ns:
        raise IdentityError("namespace segment is empty")
    if len(ns) > _MAX_NAMESPACE or not _LABEL_RE.fullmatch(ns):
        raise IdentityError(
            f"namespace {ns!r} is not a Kubernetes namespace name (DNS-1123 label: lower-case "
            f"letters, digits and '-', starting and ending with a letter or digit, "
            f"at most {_MAX_NAMESPACE} characters)")


def _check_service_account(sa: str) -> None:
    if not sa:
        raise IdentityError("service account segment is empty")
    if len(sa) > _MAX_SERVICE_ACCOUNT or not all(_LABEL_RE.fullmatch(p) for p in sa.split(".")):
        raise IdentityError(
            f"service account {sa!r} is not a Kubernetes service account name (DNS-1123 "
            f"subdomain: dot-separated labels of lower-case letters, digits and '-', "
            f"at most {_MAX_SERVICE_ACCOUNT} characters)")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A workload identity; ``str()`` gives the URI, :meth:`parse` reads it back.

    Constructing one directly validates the parts with the same rules as :meth:`parse`.
    """

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        _check_trust_domain(self.trust_domain)
        _check_namespace(self.namespace)
        _check_service_account(self.service_account)

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse ``spiffe://<td>/ns/<ns>/sa/<sa>``; :class:`IdentityError` says what is wrong."""
        if not isinstance(uri, str):
            raise IdentityError(f"a SPIFFE ID must be a string, not {type(uri).__name__}")
        if len(uri.encode("utf-8", "surrogatepass")) > _MAX_URI_BYTES:
            raise IdentityError(f"SPIFFE ID is longer than {_MAX_URI_BYTES} bytes")
        if not uri.startswith(_SCHEME):
            raise IdentityError(
                f"{uri!r} is not a SPIFFE ID: it must start with {_SCHEME!r} (lower case)")
        for char, what in (("%", "percent-encoding"), ("?", "a query"), ("#", "a fragment")):
            if char in uri:
                raise IdentityError(f"{uri!r} contains {what} ({char!r}), which SPIFFE forbids")
        authority, slash, path = uri[len(_SCHEME):].partition("/")
        _check_trust_domain(authority)
        segments = path.split("/") if slash else []
        if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
            shown = "/" + path if slash else "no path"
            raise IdentityError(
                f"{uri!r} has {shown!r}; a workload identity has exactly the path "
                f"/ns/<namespace>/sa/<service-account>")
        return cls(authority, segments[1], segments[3])

    def __str__(self) -> str:
        return f"{_SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"
