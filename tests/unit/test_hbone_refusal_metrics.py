"""``pyambient_hbone_refused_total{reason}``: bounded labels, exposed with ztunnel's metrics."""

from __future__ import annotations

import ssl

import trio

from common.errors import HandshakeError, NoSpiffeIdError, PeerIdentityError, TrustDomainError
from common.metrics import HBONE_REFUSAL_REASONS, Metrics
from common.tls import handshake_refusal


def test_every_reason_is_exposed_at_zero_before_the_first_refusal() -> None:
    body = Metrics().render().decode()
    for reason in HBONE_REFUSAL_REASONS:
        assert f'pyambient_hbone_refused_total{{reason="{reason}"}} 0.0' in body


def test_a_refusal_counts_once_under_its_reason() -> None:
    metrics = Metrics()
    metrics.hbone_refused("unknown_ca")
    metrics.hbone_refused("unknown_ca")
    metrics.hbone_refused("rapid_reset")
    value = metrics.registry.get_sample_value
    assert value("pyambient_hbone_refused_total", {"reason": "unknown_ca"}) == 2
    assert value("pyambient_hbone_refused_total", {"reason": "rapid_reset"}) == 1
    assert value("pyambient_hbone_refused_total", {"reason": "not_tls"}) == 0


def test_a_word_outside_the_closed_set_is_counted_as_other_not_as_a_new_label() -> None:
    metrics = Metrics()
    metrics.hbone_refused("peer sent 10.0.0.1:4711 something odd")
    assert metrics.registry.get_sample_value("pyambient_hbone_refused_total",
                                             {"reason": "other"}) == 1
    assert "4711" not in metrics.render().decode()


def _caused(cause: BaseException) -> HandshakeError:
    error = HandshakeError("TLS handshake with the client failed")
    error.__cause__ = cause
    return error


def _verify_error(code: int) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_code = code
    return error


def _ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, reason)
    error.reason = reason
    return error


def test_handshake_refusals_are_classified_by_type_and_cause_not_text() -> None:
    cases = {
        "wrong_trust_domain": TrustDomainError("x"),
        "not_spiffe": NoSpiffeIdError("x"),
        "handshake_timeout": trio.TooSlowError(),
        "expired_cert": _caused(_verify_error(10)),
        "unknown_ca": _caused(_verify_error(20)),
        "no_client_cert": _caused(_ssl_error("PEER_DID_NOT_RETURN_A_CERTIFICATE")),
        "not_tls": _caused(_ssl_error("HTTP_REQUEST")),
    }
    for want, error in cases.items():
        assert handshake_refusal(error) == want, (want, error)
    timed_out = HandshakeError("no TLS handshake within 10 s")
    timed_out.__cause__ = trio.TooSlowError()
    assert handshake_refusal(timed_out) == "handshake_timeout"
    # Everything else is one bucket: another verify failure, ALPN, a peer that hung up.
    for other in (_caused(_verify_error(7)), _caused(_ssl_error("NO_APPLICATION_PROTOCOL")),
                  _caused(ConnectionResetError()), PeerIdentityError("x"), OSError()):
        assert handshake_refusal(other) == "tls_failed"
    assert {*cases, "tls_failed"} <= set(HBONE_REFUSAL_REASONS)
