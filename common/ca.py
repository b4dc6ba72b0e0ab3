"""The mesh certificate authority and the workload certificates it issues.

One root per trust domain (ours are ECDSA P-256; an operator's plug-in CA may be
RSA), directly or through intermediates such as Istio's plug-in CA files, signs
short-lived ECDSA P-256 leaf certificates (X.509-SVIDs).
A leaf carries exactly one name, the URI SAN with the workload's SPIFFE ID,
whatever the certificate signing request asked for: the CA decides the identity
(the caller proved it some other way, e.g. the node-authorization rule), the CSR
only proves possession of the key.  Private keys are generated where they
are used (:func:`make_csr`) and never cross a process boundary.

Leaf profile (SPIFFE X.509-SVID, as Istio issues them): empty subject, so the SAN
extension is critical (RFC 5280 4.2.1.6); ``basicConstraints CA:false`` (critical);
``keyUsage digitalSignature, keyEncipherment`` (critical); ``extendedKeyUsage
serverAuth, clientAuth``; 24 h lifetime by default; ``notBefore`` backdated a few
minutes so that peers whose clocks lag a little accept a fresh certificate.

Root rotation: :meth:`CertificateAuthority.add_trusted_root` adds another root to
``roots_pem``, the bundle every workload trusts, so certificates from the old and
the new root verify during the overlap.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import CertificateError, IdentityError
from common.identity import SpiffeId

# Our own CAs are P-256; RSA is accepted for plug-in CAs (Istio's sample tooling makes RSA).
CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

DEFAULT_ROOT_LIFETIME = timedelta(days=3650)
DEFAULT_LEAF_LIFETIME = timedelta(hours=24)
# Istio backdates workload certificates by a few minutes for the same reason: clock skew.
DEFAULT_BACKDATE = timedelta(minutes=5)

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
EXTRA_ROOTS_FILE = "extra-roots.pem"
# Istio's plug-in CA layout (the `cacerts` secret), so operators can bring their own.
ISTIO_CA_CERT_FILE = "ca-cert.pem"
ISTIO_CA_KEY_FILE = "ca-key.pem"
ISTIO_ROOT_CERT_FILE = "root-cert.pem"
ISTIO_CERT_CHAIN_FILE = "cert-chain.pem"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _pem_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CertificateError(f"{what} is not a PEM certificate bundle: {exc}") from exc
    return certs


def _key_pem(key: CAKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def spiffe_uris(cert: x509.Certificate) -> list[str]:
    """The ``spiffe://`` URI SANs of a certificate (possibly none)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.lower().startswith("spiffe://")]


@dataclass(frozen=True)
class WorkloadCertificate:
    """A workload's key and certificate chain, with the roots it trusts.

    ``cert_pem`` is the leaf followed by any intermediates; ``roots_pem`` is every
    trusted root, concatenated.  The key is held in memory only.
    """

    identity: SpiffeId
    key_pem: bytes = field(repr=False)  # never in a log line
    cert_pem: bytes
    roots_pem: bytes
    not_before: datetime
    not_after: datetime

    def renew_at(self) -> datetime:
        """When to fetch the next certificate: half-way through this one's validity."""
        return self.not_before + (self.not_after - self.not_before) / 2

    @classmethod
    def from_pem(cls, key_pem: bytes, cert_pem: bytes, roots_pem: bytes) -> WorkloadCertificate:
        """Assemble from PEM, taking identity and validity from the leaf (first certificate)."""
        leaf = _pem_certs(cert_pem, "certificate chain")[0]
        _pem_certs(roots_pem, "trusted roots")
        uris = spiffe_uris(leaf)
        if len(uris) != 1:
            raise CertificateError(
                f"leaf certificate has {len(uris)} spiffe:// URI SANs; a workload certificate "
                f"has exactly one")
        try:
            identity = SpiffeId.parse(uris[0])
        except IdentityError as exc:
            raise CertificateError(f"leaf certificate URI SAN is not a workload identity: {exc}"
                                   ) from exc
        return cls(identity, key_pem, cert_pem, roots_pem,
                   leaf.not_valid_before_utc, leaf.not_valid_after_utc)


def make_csr(identity: SpiffeId) -> tuple[bytes, bytes]:
    """Generate a P-256 key here and a CSR for ``identity``: ``(key_pem, csr_pem)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName(
               [x509.UniformResourceIdentifier(str(identity))]), critical=True)
           .sign(key, hashes.SHA256()))
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


class CertificateAuthority:
    """Signs workload CSRs for one trust domain and owns the trust bundle.

    The signing certificate is either the self-signed root (:meth:`generate`, files
    ``ca.pem``/``ca.key``) or an intermediate under it (:meth:`intermediate`, or
    Istio's plug-in CA files ``ca-cert.pem``, ``ca-key.pem``, ``root-cert.pem``,
    ``cert-chain.pem``); leaves signed by an intermediate carry the intermediates
    after them, and peers trust only the root.
    """

    def __init__(self, key: CAKey, cert: x509.Certificate, *,
                 root_pem: bytes | None = None, chain_pem: bytes = b"",
                 trust_domain: str | None = None,
                 backdate: timedelta = DEFAULT_BACKDATE) -> None:
        """``cert`` signs; ``chain_pem`` holds the intermediates above it, below ``root_pem``.

        Without ``root_pem``, ``cert`` is the (self-signed) root.  The trust domain is
        ``trust_domain`` or else the ``spiffe://<td>`` URI SAN of ``cert``.
        """
        bc = _basic_constraints(cert)
        if bc is None or not bc.ca:
            raise CertificateError(
                "the CA certificate is not a CA (basicConstraints CA:true missing)")
        if _public_der(key.public_key()) != _public_der(cert.public_key()):
            raise CertificateError("the CA key does not match the CA certificate: check that "
                                   "the key and certificate files belong together")
        root = cert if root_pem is None else _pem_certs(root_pem, "root certificate")[0]
        intermediates = _pem_certs(chain_pem, "CA chain") if chain_pem else []
        path = [cert, *intermediates, root]
        for child, parent in itertools.pairwise(path):
            try:
                child.verify_directly_issued_by(parent)
            except (ValueError, TypeError, InvalidSignature) as exc:
                raise CertificateError(
                    f"the CA certificate {child.subject.rfc4514_string()!r} is not signed by "
                    f"{parent.subject.rfc4514_string()!r}: check the chain and root files"
                ) from exc
        self.trust_domain = trust_domain or _trust_domain_of(cert)
        SpiffeId(self.trust_domain, "default", "default")  # validates it
        self._key = key
        self._cert = cert
        self._root = root
        self._backdate = backdate
        self.root_pem = root.public_bytes(serialization.Encoding.PEM)
        # What a leaf carries after itself: nothing under a root, else the intermediates.
        self._leaf_chain_pem = b"" if cert is root else b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in [cert, *intermediates])
        self._extra_roots: list[bytes] = []

    @classmethod
    def generate(cls, trust_domain: str, *, lifetime: timedelta = DEFAULT_ROOT_LIFETIME,
                 backdate: timedelta = DEFAULT_BACKDATE) -> CertificateAuthority:
        """A fresh self-signed ECDSA P-256 root for ``trust_domain``."""
        SpiffeId(trust_domain, "default", "default")  # validates the trust domain
        key = ec.generate_private_key(ec.SECP256R1())
        name = _ca_name(trust_domain, "pyambient mesh root CA")
        now = _utcnow()
        cert = (_ca_builder(name, name, key.public_key(), trust_domain, path_length=None)
                .not_valid_before(now - backdate).not_valid_after(now + lifetime)
                .sign(key, hashes.SHA256()))
        return cls(key, cert, trust_domain=trust_domain, backdate=backdate)

    def intermediate(self, *, lifetime: timedelta = timedelta(days=365)) -> CertificateAuthority:
        """A new P-256 CA signed by this root (e.g. one per cluster), for the same trust domain."""
        if not self.is_root:
            raise CertificateError("intermediates here have path length 0: make further "
                                   "intermediates from the root")
        key = ec.generate_private_key(ec.SECP256R1())
        now = _utcnow()
        cert = (_ca_builder(_ca_name(self.trust_domain, "pyambient mesh intermediate CA"),
                            self._cert.subject, key.public_key(), self.trust_domain,
                            path_length=0)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._key.public_key()), critical=False)
                .not_valid_before(now - self._backdate)
                .not_valid_after(min(now + lifetime, self._cert.not_valid_after_utc))
                .sign(self._key, hashes.SHA256()))
        ca = CertificateAuthority(key, cert, root_pem=self.root_pem,
                                  trust_domain=self.trust_domain, backdate=self._backdate)
        for extra in self._extra_roots:
            ca.add_trusted_root(extra)
        return ca

    @property
    def is_root(self) -> bool:
        return self._cert is self._root

    @classmethod
    def load(cls, directory: Path, *, trust_domain: str | None = None) -> CertificateAuthority:
        """Load a CA from ``directory``: ``ca.pem`` + ``ca.key`` (a root, as :meth:`save`
        writes it), or Istio's plug-in CA files ``ca-cert.pem``, ``ca-key.pem``,
        ``root-cert.pem`` and ``cert-chain.pem``; plus ``extra-roots.pem`` if present.

        ``trust_domain`` is needed only when the CA certificate has no ``spiffe://`` SAN.
        """
        istio = (directory / ISTIO_CA_CERT_FILE).exists()
        cert_file, key_file = ((ISTIO_CA_CERT_FILE, ISTIO_CA_KEY_FILE) if istio
                               else (CA_CERT_FILE, CA_KEY_FILE))
        try:
            cert_pem = (directory / cert_file).read_bytes()
            key_pem = (directory / key_file).read_bytes()
            root_pem = (directory / ISTIO_ROOT_CERT_FILE).read_bytes() if istio else None
            chain_pem = ((directory / ISTIO_CERT_CHAIN_FILE).read_bytes()
                         if istio and (directory / ISTIO_CERT_CHAIN_FILE).exists() else b"")
        except OSError as exc:
            raise CertificateError(
                f"cannot read the CA from {directory}: {exc} (expected {CA_CERT_FILE} and "
                f"{CA_KEY_FILE}, or Istio's {ISTIO_CA_CERT_FILE}, {ISTIO_CA_KEY_FILE} and "
                f"{ISTIO_ROOT_CERT_FILE}; create a CA with CertificateAuthority.generate(...)"
                f".save(directory))") from exc
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise CertificateError(f"{directory / key_file} is not an unencrypted PEM key: {exc}"
                                   ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise CertificateError(f"{directory / key_file} is neither an ECDSA nor an RSA key")
        cert = _pem_certs(cert_pem, str(directory / cert_file))[0]
        if root_pem is not None and _pem_certs(root_pem, "root")[0] == cert:
            root_pem = None  # Istio layout holding a root CA directly
        # Istio's cert-chain.pem runs from ca-cert.pem up to the root: keep what is between.
        skip = {cert, *(_pem_certs(root_pem, "root") if root_pem else [])}
        between = b"".join(c.public_bytes(serialization.Encoding.PEM)
                           for c in (_pem_certs(chain_pem, "cert-chain.pem") if chain_pem else [])
                           if c not in skip)
        ca = cls(key, cert, root_pem=root_pem, chain_pem=between, trust_domain=trust_domain)
        extra = directory / EXTRA_ROOTS_FILE
        if extra.exists():
            for root in _pem_certs(extra.read_bytes(), str(extra)):
                ca.add_trusted_root(root.public_bytes(serialization.Encoding.PEM))
        return ca

    def save(self, directory: Path) -> None:
        """Write the CA into ``directory`` (keys mode 0600), in the layout :meth:`load` reads:
        ``ca.pem``/``ca.key`` for a root, Istio's plug-in files for an intermediate."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_pem = self._cert.public_bytes(serialization.Encoding.PEM)
        if self.is_root:
            (directory / CA_CERT_FILE).write_bytes(cert_pem)
            _write_private(directory / CA_KEY_FILE, _key_pem(self._key))
        else:
            (directory / ISTIO_CA_CERT_FILE).write_bytes(cert_pem)
            _write_private(directory / ISTIO_CA_KEY_FILE, _key_pem(self._key))
            (directory / ISTIO_ROOT_CERT_FILE).write_bytes(self.root_pem)
            (directory / ISTIO_CERT_CHAIN_FILE).write_bytes(self._leaf_chain_pem + self.root_pem)
        extra = directory / EXTRA_ROOTS_FILE
        if self._extra_roots:
            extra.write_bytes(b"".join(self._extra_roots))
        elif extra.exists():
            extra.unlink()

    @property
    def roots_pem(self) -> bytes:
        """The trust bundle: this CA's root, then every root added for rotation."""
        return self.root_pem + b"".join(self._extra_roots)

    @property
    def not_after(self) -> datetime:
        return self._cert.not_valid_after_utc

    def add_trusted_root(self, pem: bytes) -> None:
        """Also trust another root (the next or the previous one during a rotation)."""
        for cert in _pem_certs(pem, "added root"):
            bc = _basic_constraints(cert)
            if bc is None or not bc.ca:
                raise CertificateError("added root is not a CA certificate (basicConstraints)")
            cert_pem = cert.public_bytes(serialization.Encoding.PEM)
            if cert_pem != self.root_pem and cert_pem not in self._extra_roots:
                self._extra_roots.append(cert_pem)

    def sign_csr(self, csr_pem: bytes, identity: SpiffeId, *,
                 lifetime: timedelta = DEFAULT_LEAF_LIFETIME,
                 not_before: datetime | None = None) -> bytes:
        """Sign a leaf for ``identity`` over the CSR's key; the CSR's own names are ignored.

        Returns the leaf PEM, followed by the intermediates when this CA is one.
        ``not_before`` defaults to now minus the backdate; the leaf never outlives its CA.
        """
        if identity.trust_domain != self.trust_domain:
            raise CertificateError(
                f"refusing to sign {identity}: this CA serves trust domain "
                f"{self.trust_domain!r}, not {identity.trust_domain!r}")
        if lifetime <= timedelta(0):
            raise CertificateError(f"certificate lifetime must be positive, got {lifetime}")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CertificateError(f"not a PEM certificate signing request: {exc}") from exc
        if not csr.is_signature_valid:
            raise CertificateError("CSR signature does not verify: proof of key possession failed")
        public_key = csr.public_key()
        if not (isinstance(public_key, ec.EllipticCurvePublicKey)
                and isinstance(public_key.curve, ec.SECP256R1)):
            raise CertificateError("CSR key must be ECDSA P-256 (the mesh's only leaf key type)")
        start = not_before if not_before is not None else _utcnow() - self._backdate
        end = min(start + lifetime, self._cert.not_valid_after_utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([]))
                .issuer_name(self._cert.subject)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=True,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                    critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._key.public_key()), critical=False)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(str(identity))]), critical=True)
                .sign(self._key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM) + self._leaf_chain_pem

    def issue(self, identity: SpiffeId, *, lifetime: timedelta = DEFAULT_LEAF_LIFETIME,
              not_before: datetime | None = None) -> WorkloadCertificate:
        """Generate a key and a CSR and sign it: a ready certificate (tests, local cluster)."""
        key_pem, csr_pem = make_csr(identity)
        cert_pem = self.sign_csr(csr_pem, identity, lifetime=lifetime, not_before=not_before)
        return WorkloadCertificate.from_pem(key_pem, cert_pem, self.roots_pem)


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the start: the key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def _public_der(key: object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CertificateError("a CA key must be ECDSA or RSA")
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _trust_domain_of(cert: x509.Certificate) -> str:
    uris = spiffe_uris(cert)
    if len(uris) != 1 or "/" in uris[0][len("spiffe://"):]:
        raise CertificateError(
            "the CA certificate has no single URI SAN spiffe://<trust-domain>: pass "
            "trust_domain= explicitly")
    return uris[0][len("spiffe://"):]


def _ca_name(trust_domain: str, common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca_builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
                trust_domain: str, *, path_length: int | None) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length),
                           critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False))


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None
