"""The mesh certificate authority and the workload certificates it issues.

One ECDSA P-256 root per trust domain signs short-lived leaf certificates
(X.509-SVIDs).  A leaf carries exactly one name, the URI SAN with the workload's
SPIFFE ID, whatever the certificate signing request asked for: the CA decides the
identity (the caller proved it some other way, e.g. the node-authorization rule),
the CSR only proves possession of the key.  Private keys are generated where they
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

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import CertificateError, IdentityError
from common.identity import SpiffeId

DEFAULT_ROOT_LIFETIME = timedelta(days=3650)
DEFAULT_LEAF_LIFETIME = timedelta(hours=24)
# Istio backdates workload certificates by a few minutes for the same reason: clock skew.
DEFAULT_BACKDATE = timedelta(minutes=5)

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
EXTRA_ROOTS_FILE = "extra-roots.pem"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _pem_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CertificateError(f"{what} is not a PEM certificate bundle: {exc}") from exc
    return certs


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
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
    key_pem: bytes
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
    """A root CA for one trust domain: signs workload CSRs, owns the trust bundle."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, *,
                 backdate: timedelta = DEFAULT_BACKDATE) -> None:
        uris = spiffe_uris(cert)
        if len(uris) != 1 or not uris[0].startswith("spiffe://") or "/" in uris[0][9:]:
            raise CertificateError(
                "root certificate must carry exactly one URI SAN spiffe://<trust-domain>; "
                "was it made by CertificateAuthority.generate?")
        bc = _basic_constraints(cert)
        if bc is None or not bc.ca:
            raise CertificateError(
                "root certificate is not a CA (basicConstraints CA:true missing)")
        pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        if pub != cert.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo):
            raise CertificateError("CA key does not match the CA certificate: check ca.key/ca.pem")
        self.trust_domain = uris[0][len("spiffe://"):]
        self._key = key
        self._cert = cert
        self._backdate = backdate
        self.root_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._extra_roots: list[bytes] = []

    @classmethod
    def generate(cls, trust_domain: str, *, lifetime: timedelta = DEFAULT_ROOT_LIFETIME,
                 backdate: timedelta = DEFAULT_BACKDATE) -> CertificateAuthority:
        """A fresh self-signed ECDSA P-256 root for ``trust_domain``."""
        # Validates the trust domain with the identity rules.
        SpiffeId(trust_domain, "default", "default")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                          x509.NameAttribute(NameOID.COMMON_NAME, "pyambient mesh root CA")])
        now = _utcnow()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - backdate).not_valid_after(now + lifetime)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(key, cert, backdate=backdate)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """Load ``ca.pem``, ``ca.key`` and, if present, ``extra-roots.pem`` from ``directory``."""
        try:
            cert_pem = (directory / CA_CERT_FILE).read_bytes()
            key_pem = (directory / CA_KEY_FILE).read_bytes()
        except OSError as exc:
            raise CertificateError(
                f"cannot read the CA from {directory}: {exc} (expected {CA_CERT_FILE} and "
                f"{CA_KEY_FILE}; create them with CertificateAuthority.generate(...).save())"
            ) from exc
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise CertificateError(f"{directory / CA_KEY_FILE} is not an unencrypted PEM key: {exc}"
                                   ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"{directory / CA_KEY_FILE} is not an ECDSA key")
        ca = cls(key, _pem_certs(cert_pem, str(directory / CA_CERT_FILE))[0])
        extra = directory / EXTRA_ROOTS_FILE
        if extra.exists():
            for cert in _pem_certs(extra.read_bytes(), str(extra)):
                ca.add_trusted_root(cert.public_bytes(serialization.Encoding.PEM))
        return ca

    def save(self, directory: Path) -> None:
        """Write ``ca.pem`` and ``ca.key`` (mode 0600) and any extra roots into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CA_CERT_FILE).write_bytes(self.root_pem)
        key_path = directory / CA_KEY_FILE
        # Create with 0600 from the start: the key is never readable by others, not even briefly.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(_key_pem(self._key))
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

        ``not_before`` defaults to now minus the backdate; the leaf never outlives the root.
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
        return cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, identity: SpiffeId, *, lifetime: timedelta = DEFAULT_LEAF_LIFETIME,
              not_before: datetime | None = None) -> WorkloadCertificate:
        """Generate a key and a CSR and sign it: a ready certificate (tests, local cluster)."""
        key_pem, csr_pem = make_csr(identity)
        cert_pem = self.sign_csr(csr_pem, identity, lifetime=lifetime, not_before=not_before)
        return WorkloadCertificate.from_pem(key_pem, cert_pem, self.roots_pem)


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None
