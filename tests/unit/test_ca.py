"""The mesh CA: root profile, leaf profile, CSR handling, persistence, rotation bundle."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from common.ca import CertificateAuthority, WorkloadCertificate, make_csr
from common.errors import CertificateError, IdentityError
from common.identity import SpiffeId

TD = "cluster.local"
ALICE = SpiffeId(TD, "default", "alice")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(TD)


def _leaf(wc: WorkloadCertificate) -> x509.Certificate:
    return x509.load_pem_x509_certificates(wc.cert_pem)[0]


def test_root_is_a_p256_ca_for_its_trust_domain(ca: CertificateAuthority) -> None:
    root = x509.load_pem_x509_certificate(ca.root_pem)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(root.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    assert ca.trust_domain == TD
    assert root.not_valid_after_utc - root.not_valid_before_utc > timedelta(days=3649)


def test_leaf_has_only_the_uri_san_and_the_svid_extensions(ca: CertificateAuthority) -> None:
    wc = ca.issue(ALICE)
    leaf = _leaf(wc)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # subject is empty
    assert list(san.value) == [x509.UniformResourceIdentifier(str(ALICE))]
    assert leaf.subject == x509.Name([])
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert wc.identity == ALICE
    assert wc.roots_pem == ca.roots_pem


def test_leaf_lifetime_is_24h_backdated_5min(ca: CertificateAuthority) -> None:
    before = datetime.now(UTC)
    wc = ca.issue(ALICE)
    leaf = _leaf(wc)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(hours=24)
    skew = before - leaf.not_valid_before_utc
    assert timedelta(minutes=4) < skew <= timedelta(minutes=5, seconds=1)
    assert (wc.not_before, wc.not_after) == (leaf.not_valid_before_utc, leaf.not_valid_after_utc)
    assert wc.renew_at() == wc.not_before + timedelta(hours=12)


def test_lifetime_and_not_before_are_configurable(ca: CertificateAuthority) -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    wc = ca.issue(ALICE, lifetime=timedelta(hours=1), not_before=start)
    assert (wc.not_before, wc.not_after) == (start, start + timedelta(hours=1))


def test_leaf_verifies_against_the_root(ca: CertificateAuthority) -> None:
    leaf = _leaf(ca.issue(ALICE))
    root = x509.load_pem_x509_certificate(ca.root_pem)
    leaf.verify_directly_issued_by(root)


def test_csr_names_are_ignored(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "admin")]))
           .add_extension(x509.SubjectAlternativeName([
               x509.UniformResourceIdentifier("spiffe://cluster.local/ns/kube-system/sa/admin"),
               x509.DNSName("evil.example")]), critical=False)
           .sign(key, hashes.SHA256()))
    pem = ca.sign_csr(csr.public_bytes(serialization.Encoding.PEM), ALICE)
    leaf = x509.load_pem_x509_certificate(pem)
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(str(ALICE))]


def test_other_trust_domain_is_refused(ca: CertificateAuthority) -> None:
    _, csr = make_csr(SpiffeId("other.td", "default", "alice"))
    with pytest.raises(CertificateError, match=r"serves trust domain 'cluster\.local'"):
        ca.sign_csr(csr, SpiffeId("other.td", "default", "alice"))


def test_non_p256_csr_is_refused(ca: CertificateAuthority) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        key, hashes.SHA256())
    with pytest.raises(CertificateError, match="P-256"):
        ca.sign_csr(csr.public_bytes(serialization.Encoding.PEM), ALICE)


def test_garbage_csr_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(CertificateError, match="certificate signing request"):
        ca.sign_csr(b"not a csr", ALICE)


def test_make_csr_key_matches_csr() -> None:
    key_pem, csr_pem = make_csr(ALICE)
    key = serialization.load_pem_private_key(key_pem, password=None)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert key.public_key() == csr.public_key()


def test_invalid_trust_domain_is_refused_at_generation() -> None:
    with pytest.raises(IdentityError):
        CertificateAuthority.generate("Bad Domain")


def test_save_and_load_round_trip_with_private_key_mode_0600(
        ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.save(tmp_path)
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    loaded = CertificateAuthority.load(tmp_path)
    assert loaded.trust_domain == TD
    assert loaded.root_pem == ca.root_pem
    leaf = _leaf(loaded.issue(ALICE))
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.root_pem))


def test_load_missing_directory_says_what_to_create(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match=r"ca\.pem"):
        CertificateAuthority.load(tmp_path / "nope")


def test_load_refuses_mismatched_key(tmp_path: Path) -> None:
    CertificateAuthority.generate(TD).save(tmp_path / "a")
    CertificateAuthority.generate(TD).save(tmp_path / "b")
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    with pytest.raises(CertificateError, match="does not match"):
        CertificateAuthority.load(tmp_path / "a")


def test_added_roots_join_the_bundle_and_persist(tmp_path: Path) -> None:
    old = CertificateAuthority.generate(TD)
    new = CertificateAuthority.generate(TD)
    new.add_trusted_root(old.root_pem)
    new.add_trusted_root(old.root_pem)  # idempotent
    assert new.roots_pem == new.root_pem + old.root_pem
    assert new.issue(ALICE).roots_pem == new.roots_pem
    new.save(tmp_path)
    assert CertificateAuthority.load(tmp_path).roots_pem == new.roots_pem


def test_leaf_never_outlives_the_root() -> None:
    short = CertificateAuthority.generate(TD, lifetime=timedelta(hours=1))
    wc = short.issue(ALICE)
    assert wc.not_after <= short.not_after


def test_from_pem_rejects_a_leaf_that_is_not_a_workload(ca: CertificateAuthority) -> None:
    # The root carries only the trust-domain URI spiffe://cluster.local.
    with pytest.raises(CertificateError, match="not a workload identity"):
        WorkloadCertificate.from_pem(b"", ca.root_pem, ca.root_pem)


def test_intermediate_ca_leaves_carry_the_chain_and_verify_to_the_root() -> None:
    root = CertificateAuthority.generate(TD)
    inter = root.intermediate()
    assert not inter.is_root and root.is_root
    wc = inter.issue(ALICE)
    leaf, intermediate = x509.load_pem_x509_certificates(wc.cert_pem)
    root_cert = x509.load_pem_x509_certificate(root.root_pem)
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root_cert)
    assert intermediate.extensions.get_extension_for_class(
        x509.BasicConstraints).value.path_length == 0
    assert wc.roots_pem == root.root_pem == inter.root_pem
    assert inter.trust_domain == TD


def test_istio_plugin_layout_round_trip(tmp_path: Path) -> None:
    root = CertificateAuthority.generate(TD)
    inter = root.intermediate()
    inter.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"}
    assert stat.S_IMODE((tmp_path / "ca-key.pem").stat().st_mode) == 0o600
    # Istio's cert-chain.pem: the CA certificate up to and including the root.
    assert len(x509.load_pem_x509_certificates((tmp_path / "cert-chain.pem").read_bytes())) == 2
    loaded = CertificateAuthority.load(tmp_path)
    assert loaded.root_pem == root.root_pem and not loaded.is_root
    leaf, intermediate = x509.load_pem_x509_certificates(loaded.issue(ALICE).cert_pem)
    leaf.verify_directly_issued_by(intermediate)


def test_intermediates_are_made_by_the_root_only() -> None:
    with pytest.raises(CertificateError, match="path length 0"):
        CertificateAuthority.generate(TD).intermediate().intermediate()


def test_ca_chain_that_does_not_reach_the_root_is_refused(tmp_path: Path) -> None:
    inter = CertificateAuthority.generate(TD).intermediate()
    inter.save(tmp_path)
    (tmp_path / "root-cert.pem").write_bytes(CertificateAuthority.generate(TD).root_pem)
    with pytest.raises(CertificateError, match="is not signed by"):
        CertificateAuthority.load(tmp_path)


def test_ca_certificate_without_spiffe_san_needs_the_trust_domain() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "corporate root")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    with pytest.raises(CertificateError, match="pass trust_domain="):
        CertificateAuthority(key, cert)
    assert CertificateAuthority(key, cert, trust_domain=TD).issue(ALICE).identity == ALICE


def test_private_key_stays_out_of_repr(ca: CertificateAuthority) -> None:
    wc = ca.issue(ALICE)
    assert b"PRIVATE KEY" in wc.key_pem
    assert "PRIVATE KEY" not in repr(wc) and "key_pem" not in repr(wc)
