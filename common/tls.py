"""Mesh mTLS: TLS contexts, peer identity, and a trio stream over a native TLS socket.

Theory of operation
-------------------
HBONE runs HTTP/2 over TLS 1.3 with a client certificate on both sides.  The byte
stream under it is :class:`TLSStream`: a non-blocking stdlib ``ssl.SSLSocket``
driven by trio's ``wait_readable``/``wait_writable``.  OpenSSL reads the kernel socket
itself, with no MemoryBIO copies and one call per record at most; ANCHORS.md measured
2.6x the bulk throughput of ``trio.SSLStream`` this way.

Large sends (with the libssl helper) go another way: OpenSSL writes their records into a
memory BIO, and the stream sends them on with one ``send`` per batch.  The socket BIO
makes a ``write()``, so a packet through the pod's veth, bridge and netfilter hooks, of
every 16 KiB record; the copy out of the memory BIO costs less than the 60,000 writes per
GiB it saves (bench/ztunnel_l4.py --bulk: 4.84 -> 4.07 CPU s/GiB for the ztunnel pair).
Small sends keep the socket BIO: for them the copy and the extra calls cost more than
they save (110 -> 120 us of CPU per small request in one comparison with every send
through memory; unchanged with only large ones).  While ciphertext of a batch waits for
the socket (``has_unsent``), the memory BIO stays OpenSSL's write BIO, so whatever
OpenSSL writes meanwhile (a read's KeyUpdate answer, the next send) queues behind it;
once it is all out the socket BIO is put back.  At most one batch is encrypted ahead of
the socket.

The rules of a non-blocking SSL socket that the stream follows:

* every operation is *attempted first*, and only when OpenSSL answers
  ``SSLWantRead``/``SSLWantWrite`` do we wait on the fd.  OpenSSL may hold whole
  records in its own buffer (``pending()``, read-ahead), so waiting on the fd
  before trying could sleep forever on data that already arrived;
* a read may want to write (a TLS 1.3 KeyUpdate answer) and a write may want to
  read; both are handled;
* a write that returned ``SSLWantWrite`` has been partly encrypted and sent, so it
  must be retried with the same bytes (the stdlib path; with the memory BIO a write
  never blocks).  A ``send_all`` cancelled mid-way leaves the TLS stream unusable for
  sending: it is marked broken, as trio does; a cancelled ``receive`` loses nothing and
  the stream stays usable;
* while a batch waits, what a read writes (a TLS 1.3 KeyUpdate answer) waits behind it
  for the next send, which RFC 8446 4.6.3 allows: the answer must precede our next data;
* one ``receive`` call drains as many records as are ready, up to the buffer size,
  because OpenSSL returns at most one record (16 KiB) per ``SSL_read`` and large
  reads are what make bulk transfer fast.

OpenSSL knobs the stdlib does not expose (this Python's ``ssl`` has no
``SSLContext.set_ciphersuites``, and ``SSLSocket.unwrap`` cannot half-close; see
:class:`_LibSSL`) are reached through ``ctypes`` on the very ``libssl`` the ``_ssl``
module uses, after a self-test.  Where that is unavailable (or disabled with
``PYAMBIENT_TLS_NATIVE=0``) the module still works: the cipher-suite policy is then
enforced after the handshake instead of during it, reads go without read-ahead,
and half-close falls back to the stdlib's racy shutdown (documented there).

Errors are translated once, here: handshake failures become :class:`HandshakeError`
with a message saying what to check, identity mismatches
:class:`PeerIdentityError`, a broken stream :class:`StreamBrokenError` (cause
chained), use after ``aclose`` :class:`StreamClosedError`.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import socket
import ssl
import sys
import tempfile
import threading
from collections.abc import Callable, Collection
from contextlib import suppress
from pathlib import Path
from typing import Final

import trio
from cryptography import x509

from common.ca import WorkloadCertificate
from common.errors import (
    CertificateError,
    ConfigError,
    ConnectRefusedError,
    ConnectTimeoutError,
    HandshakeError,
    IdentityError,
    NoSpiffeIdError,
    PeerIdentityError,
    StreamBrokenError,
    StreamClosedError,
    TransportError,
    TrustDomainError,
)
from common.identity import SpiffeId

ALPN_H2: Final = "h2"
# DESIGN.md 4: TLS 1.3 with AES-GCM suites only.  AES-128 first: it is what BoringSSL
# (Envoy) prefers too, and it is the faster of the two on AES-NI hardware.
CIPHERSUITES: Final = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384")
# Large reads are what make bulk transfer fast (ANCHORS.md): one receive drains many records.
DEFAULT_RECEIVE_SIZE: Final = 256 * 1024
# receive_some returns "up to max_bytes"; beyond this a read is not faster, only a
# bigger per-thread buffer.
_MAX_RECEIVE_SIZE: Final = 1024 * 1024
# OpenSSL's read buffer with read-ahead on: several 16 KiB records per recv() syscall.
_READ_BUFFER_LEN: Final = 128 * 1024
# ztunnel marks its own sockets so the in-pod nftables rules let them through (DESIGN.md 7).
ZTUNNEL_MARK: Final = 0x539
# Only when a read and a write both need the same fd direction (a TLS 1.3 KeyUpdate
# answer while a send is also blocked): trio allows one waiter per direction, so the
# second one polls at this period until the first one has made progress.
_SHARED_WAIT_POLL: Final = 0.001
# Plaintext encrypted into the memory BIO per batch: 64 records, one send.
_ENCRYPT_BATCH: Final = 1024 * 1024
# Sends from this size on are batched through the memory BIO (see the module doc).
_BATCH_FROM: Final = 64 * 1024
# The socket's own send, under SSLSocket's encrypting one: for ciphertext already made.
_raw_send = socket.socket.send


# --------------------------------------------------------------------------------------
# OpenSSL knobs the ssl module does not expose


class _LibSSL:
    """``libssl`` functions the ``ssl`` module lacks, called on its own objects.

    CPython's ``_ssl`` context object starts (after the object header) with its
    ``SSL_CTX *``, and its socket object with a weak reference then its ``SSL *``;
    that layout holds from 3.7 to 3.13, the only versions this is used on.
    :meth:`load` verifies it before trusting it: ``SSL_CTX_get_options`` read
    through the pointer must equal ``SSLContext.options`` (for two different
    values), and the ``SSL *`` of a probe socket must point back to that ``SSL_CTX``.
    """

    _SSL_CTRL_SET_READ_AHEAD: Final = 41
    _SSL_ERROR_WANT_WRITE: Final = 3

    def __init__(self, lib: ctypes.CDLL) -> None:
        vp, i, c_long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
        self._lib = lib
        lib.SSL_CTX_get_options.argtypes = [vp]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_set_ciphersuites.argtypes = [vp, ctypes.c_char_p]
        lib.SSL_CTX_set_ciphersuites.restype = i
        lib.SSL_CTX_ctrl.argtypes = [vp, i, c_long, vp]
        lib.SSL_CTX_ctrl.restype = c_long
        lib.SSL_CTX_set_default_read_buffer_len.argtypes = [vp, ctypes.c_size_t]
        lib.SSL_CTX_set_default_read_buffer_len.restype = None
        lib.SSL_get_SSL_CTX.argtypes = [vp]
        lib.SSL_get_SSL_CTX.restype = vp
        lib.SSL_shutdown.argtypes = [vp]
        lib.SSL_shutdown.restype = i
        lib.SSL_get_error.argtypes = [vp, i]
        lib.SSL_get_error.restype = i
        lib.ERR_clear_error.argtypes = []
        lib.ERR_clear_error.restype = None
        lib.SSL_set0_wbio.argtypes = [vp, vp]
        lib.SSL_set0_wbio.restype = None
        lib.SSL_get_rbio.argtypes = [vp]
        lib.SSL_get_rbio.restype = vp
        lib.BIO_up_ref.argtypes = [vp]
        lib.BIO_up_ref.restype = i
        lib.BIO_ctrl_pending.argtypes = [vp]
        lib.BIO_ctrl_pending.restype = ctypes.c_size_t

    @staticmethod
    def _field(obj: object, index: int) -> int:
        address = id(obj) + object.__basicsize__ + index * ctypes.sizeof(ctypes.c_void_p)
        return ctypes.c_void_p.from_address(address).value or 0

    @classmethod
    def load(cls) -> _LibSSL | None:
        """The helper, or ``None`` where it cannot be used safely (then the stdlib path)."""
        if (os.environ.get("PYAMBIENT_TLS_NATIVE", "1") == "0"
                or sys.implementation.name != "cpython"
                or not (3, 10) <= sys.version_info[:2] <= (3, 13)):
            return None
        try:
            import _ssl

            lib = cls(ctypes.CDLL(_ssl.__file__))
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            for flip in (0, ssl.OP_NO_TICKET):
                ctx.options ^= flip
                if lib._lib.SSL_CTX_get_options(lib._ctx_unchecked(ctx)) != int(ctx.options):
                    return None
            probe = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())
            if lib._lib.SSL_get_SSL_CTX(cls._field(probe._sslobj, 1)) != lib._ctx_unchecked(ctx):  # type: ignore[attr-defined]
                return None
            # A MemoryBIO object holds its BIO * first: what it was given must be pending.
            bio = ssl.MemoryBIO()
            bio.write(b"probe")
            if lib._lib.BIO_ctrl_pending(cls._field(bio, 0)) != len(b"probe"):
                return None
        except (OSError, AttributeError, ImportError):
            return None
        return lib

    def _ctx_unchecked(self, ctx: ssl.SSLContext) -> int:
        return self._field(ctx, 0)

    def _ssl_ptr(self, sock: ssl.SSLSocket) -> int:
        sslobj = getattr(sock, "_sslobj", None)
        if sslobj is None:
            raise StreamClosedError("the TLS socket is closed")
        return self._field(sslobj, 1)

    def tune_context(self, ctx: ssl.SSLContext) -> None:
        """AES-GCM suites only, and read-ahead with a large read buffer."""
        ptr = self._ctx_unchecked(ctx)
        if self._lib.SSL_CTX_set_ciphersuites(ptr, ":".join(CIPHERSUITES).encode()) != 1:
            self._lib.ERR_clear_error()
            raise CertificateError("OpenSSL refused the TLS 1.3 AES-GCM cipher suites")
        self._lib.SSL_CTX_ctrl(ptr, self._SSL_CTRL_SET_READ_AHEAD, 1, None)
        self._lib.SSL_CTX_set_default_read_buffer_len(ptr, _READ_BUFFER_LEN)

    def write_into(self, sock: ssl.SSLSocket, out: ssl.MemoryBIO) -> None:
        """Make ``out`` the BIO that ``sock``'s SSL object writes to.

        The SSL object takes a reference of its own (``out`` keeps its own too) and drops
        its write reference to the socket BIO, which it still reads from.
        """
        self._set_wbio(self._ssl_ptr(sock), self._field(out, 0))

    def write_to_socket(self, sock: ssl.SSLSocket) -> None:
        """Undo :meth:`write_into`: the SSL object writes the socket BIO it reads from."""
        ptr = self._ssl_ptr(sock)
        self._set_wbio(ptr, self._lib.SSL_get_rbio(ptr))

    def _set_wbio(self, ptr: int, bio: int) -> None:
        # SSL_set0_wbio takes over one reference and drops the one it held on the old BIO.
        self._lib.BIO_up_ref(bio)
        self._lib.SSL_set0_wbio(ptr, bio)

    def send_close_notify(self, sock: ssl.SSLSocket) -> bool:
        """Queue and try to flush our close_notify, without reading anything.

        Returns ``True`` when it is on the wire, ``False`` when the socket buffer was
        full (call again when writable: OpenSSL then only retries the flush).
        ``SSLSocket.unwrap`` cannot be used: it calls ``SSL_shutdown`` a second time,
        which reads, and OpenSSL fails the connection if application data is there.
        """
        ptr = self._ssl_ptr(sock)
        self._lib.ERR_clear_error()
        ret = self._lib.SSL_shutdown(ptr)
        if ret >= 0:
            return True
        err = self._lib.SSL_get_error(ptr, ret)
        self._lib.ERR_clear_error()
        if err == self._SSL_ERROR_WANT_WRITE:
            return False
        raise StreamBrokenError(f"sending TLS close_notify failed (SSL error {err})")


_libssl = _LibSSL.load()


# --------------------------------------------------------------------------------------
# Contexts


def _load_cert_chain(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    # ssl only loads keys from files.  An anonymous memory file keeps the private key
    # off every file system (DESIGN.md 5: keys never leave the process); where memfd or
    # /proc is unavailable, a private temporary directory that exists only for the load.
    try:
        _load_via_memfd(ctx, cert)
    except (OSError, AttributeError):
        with tempfile.TemporaryDirectory(prefix="pyambient-") as directory:  # mode 0700
            chain, key = Path(directory) / "chain.pem", Path(directory) / "key.pem"
            chain.write_bytes(cert.cert_pem)
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "wb") as f:
                f.write(cert.key_pem)
            _load_files(ctx, cert, str(chain), str(key))


def _load_via_memfd(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    fds = [os.memfd_create("pyambient-cert", os.MFD_CLOEXEC),
           os.memfd_create("pyambient-key", os.MFD_CLOEXEC)]
    try:
        for fd, data in zip(fds, (cert.cert_pem, cert.key_pem), strict=True):
            with open(fd, "wb", closefd=False) as f:
                f.write(data)
        paths = [f"/proc/self/fd/{fd}" for fd in fds]
        if not all(os.path.exists(p) for p in paths):
            raise FileNotFoundError("/proc is not mounted")
        _load_files(ctx, cert, *paths)
    finally:
        for fd in fds:
            os.close(fd)


def _load_files(ctx: ssl.SSLContext, cert: WorkloadCertificate, chain: str, key: str) -> None:
    try:
        ctx.load_cert_chain(chain, key)
    except ssl.SSLError as exc:
        raise CertificateError(
            f"cannot load the certificate and key of {cert.identity}: {exc}") from exc


def _context(cert: WorkloadCertificate, *, server_side: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # HBONE checks the peer's SPIFFE ID, never a DNS name (DESIGN.md 4).
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=cert.roots_pem.decode("ascii"))
    except (ssl.SSLError, ValueError) as exc:
        raise CertificateError(f"cannot load the mesh roots: {exc}") from exc
    _load_cert_chain(ctx, cert)
    ctx.set_alpn_protocols([ALPN_H2])
    if server_side:
        # No session resumption in the mesh: tickets would only cost a write per handshake.
        ctx.num_tickets = 0
    set_ciphersuites = getattr(ctx, "set_ciphersuites", None)  # in a future Python
    if set_ciphersuites is not None:
        set_ciphersuites(":".join(CIPHERSUITES))
    if _libssl is not None:
        _libssl.tune_context(ctx)
    return ctx


def client_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    """TLS 1.3 AES-GCM, ALPN h2, our certificate, the peer's chain verified against our roots."""
    return _context(cert, server_side=False)


def server_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    """As :func:`client_context`, and a client certificate is required."""
    return _context(cert, server_side=True)


# --------------------------------------------------------------------------------------
# Peer identity and error translation


def peer_identity(ssl_obj: ssl.SSLSocket | ssl.SSLObject) -> SpiffeId:
    """The peer's SPIFFE ID: the single ``spiffe://`` URI SAN of its (verified) certificate."""
    der = ssl_obj.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError("the peer presented no certificate")
    return _identity_of_der(der)


# Peers reconnect with the same certificate until it is renewed: parse each one once.
@functools.lru_cache(maxsize=1024)
def _identity_of_der(der: bytes) -> SpiffeId:
    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise NoSpiffeIdError("the peer certificate has no SAN, so no SPIFFE ID") from exc
    except ValueError as exc:
        raise NoSpiffeIdError(f"the peer certificate cannot be parsed: {exc}") from exc
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.lower().startswith("spiffe://")]
    if len(uris) != 1:
        raise NoSpiffeIdError(
            f"the peer certificate has {len(uris)} spiffe:// URI SANs; a mesh workload "
            f"certificate has exactly one")
    try:
        return SpiffeId.parse(uris[0])
    except IdentityError as exc:
        raise NoSpiffeIdError(f"the peer certificate's URI SAN is not a workload identity: "
                              f"{exc}") from exc


# Reasons OpenSSL reports for a peer that rejected *our* side of the handshake.  In
# TLS 1.3 the client finishes first, so a server's verdict on the client certificate
# arrives as an alert on the client's first read, after connect_tls returned.
_PEER_REJECTED: Final = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        "the peer requires a client certificate and we sent none",
    "TLSV1_ALERT_UNKNOWN_CA":
        "the peer does not trust the CA of our certificate: check that both sides share "
        "the mesh root (trust bundle)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED":
        "the peer says our certificate has expired or is not yet valid: check certificate "
        "renewal and both clocks",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer rejected our certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the peer rejected our certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer rejected our certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "the peer could not verify our certificate's signature",
    "TLSV1_ALERT_ACCESS_DENIED": "the peer denied access",
}
_REASONS: Final = {
    **_PEER_REJECTED,
    "WRONG_VERSION_NUMBER":
        "the peer did not speak TLS (plaintext on the HBONE port 15008?)",
    "HTTP_REQUEST": "the peer sent a plaintext HTTP request to a TLS port (HBONE needs mTLS)",
    "HTTPS_PROXY_REQUEST": "the peer sent a plaintext proxy CONNECT to a TLS port",
    "UNKNOWN_PROTOCOL": "the peer did not speak TLS (plaintext on the HBONE port 15008?)",
    "RECORD_LAYER_FAILURE": "the peer did not speak TLS (plaintext on the HBONE port 15008?)",
    "UNSUPPORTED_PROTOCOL": "the peer does not offer TLS 1.3, which HBONE requires",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the peer does not accept TLS 1.3, which HBONE requires",
    "NO_PROTOCOLS_AVAILABLE": "no TLS 1.3 available, which HBONE requires",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        "the client presented no certificate; HBONE clients must present their mesh "
        "workload certificate",
    "NO_SHARED_CIPHER": "no shared cipher suite; HBONE needs TLS 1.3 with AES-GCM",
    "SSLV3_ALERT_HANDSHAKE_FAILURE":
        "the peer aborted the handshake (no shared cipher suite, or it rejected our "
        "certificate)",
    "NO_APPLICATION_PROTOCOL": "no shared ALPN protocol; HBONE needs ALPN h2",
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": "the peer does not accept ALPN h2, which HBONE needs",
}


# X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED
_VERIFY_EXPIRED: Final = (9, 10)
# no issuer / self-signed in chain / no local issuer / cannot verify the leaf
_VERIFY_UNKNOWN_CA: Final = (2, 19, 20, 21)
# OpenSSL's reasons for bytes that are not a TLS handshake at all.
_NOT_TLS: Final = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST",
                             "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"})


def _explain_verify(exc: ssl.SSLCertVerificationError, peer: str) -> str:
    message = exc.verify_message or str(exc)
    if exc.verify_code in _VERIFY_EXPIRED:
        return (f"the {peer} certificate is expired or not yet valid ({message}): check its "
                f"renewal and both clocks")
    if exc.verify_code in _VERIFY_UNKNOWN_CA:
        return (f"the {peer} certificate is not signed by a trusted mesh root ({message}): "
                f"another CA? check that both sides share the trust bundle")
    return f"the {peer} certificate did not verify: {message}"


def _handshake_error(exc: BaseException, *, server_side: bool) -> HandshakeError:
    peer = "client" if server_side else "server"
    if isinstance(exc, ssl.SSLCertVerificationError):
        text = _explain_verify(exc, peer)
    elif isinstance(exc, ssl.SSLError) and exc.reason in _REASONS:
        text = _REASONS[exc.reason]
    elif isinstance(exc, ssl.SSLEOFError | ConnectionError | ssl.SSLZeroReturnError):
        text = (f"the {peer} closed the connection during the TLS handshake (it may have "
                f"rejected our certificate, or it is not an HBONE {peer})")
    else:
        text = f"{type(exc).__name__}: {exc}"
    error = HandshakeError(f"TLS handshake with the {peer} failed: {text}")
    error.__cause__ = exc
    return error


def handshake_refusal(exc: BaseException) -> str:
    """Why :func:`accept_tls` refused a client, as one word of a closed set (a metric
    label, see ``common.metrics.HBONE_REFUSAL_REASONS``): ``not_tls``, ``no_client_cert``,
    ``unknown_ca``, ``expired_cert``, ``wrong_trust_domain``, ``not_spiffe``,
    ``handshake_timeout`` or ``tls_failed`` (anything else: ALPN, cipher, a client that
    hung up).  Decided from the error's type and its chained ``ssl`` cause, not its text."""
    if isinstance(exc, TrustDomainError):
        return "wrong_trust_domain"
    if isinstance(exc, NoSpiffeIdError):
        return "not_spiffe"
    cause = exc.__cause__
    if isinstance(exc, trio.TooSlowError) or isinstance(cause, trio.TooSlowError):
        return "handshake_timeout"
    if isinstance(cause, ssl.SSLCertVerificationError):
        if cause.verify_code in _VERIFY_EXPIRED:
            return "expired_cert"
        if cause.verify_code in _VERIFY_UNKNOWN_CA:
            return "unknown_ca"
    elif isinstance(cause, ssl.SSLError):
        if cause.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no_client_cert"
        if cause.reason in _NOT_TLS:
            return "not_tls"
    return "tls_failed"


def _stream_error(exc: BaseException) -> TransportError:
    if isinstance(exc, ssl.SSLError) and exc.reason in _PEER_REJECTED:
        error: TransportError = HandshakeError(
            f"the peer rejected the TLS session: {_PEER_REJECTED[exc.reason]}")
    elif isinstance(exc, ssl.SSLEOFError):
        error = StreamBrokenError(
            "the peer closed the connection without TLS close_notify (crashed, reset, or "
            "a truncation attempt)")
    else:
        error = StreamBrokenError(f"the TLS stream broke: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


# --------------------------------------------------------------------------------------
# The stream

_WANT_READ: Final = -1
_WANT_WRITE: Final = -2
_scratch_local = threading.local()


def _scratch(size: int) -> memoryview:
    """A reusable receive buffer of ``size`` bytes (at most ``_MAX_RECEIVE_SIZE``) for this
    thread: trio runs one loop per thread, and the buffer is used only between two awaits."""
    size = min(size, _MAX_RECEIVE_SIZE)
    buf: bytearray | None = getattr(_scratch_local, "buf", None)
    if buf is None or len(buf) < size:
        buf = _scratch_local.buf = bytearray(max(size, DEFAULT_RECEIVE_SIZE))
    return memoryview(buf)[:size]


class _Guard:
    """``with guard:`` raises ``trio.BusyResourceError`` when two tasks use one direction
    at once.  A plain class rather than a generator: it is entered on every call."""

    __slots__ = ("_what", "busy")

    def __init__(self, what: str) -> None:
        self.busy = False
        self._what = what

    def __enter__(self) -> None:
        if self.busy:
            raise trio.BusyResourceError(f"another task is already {self._what} on this stream")
        self.busy = True

    def __exit__(self, *exc_info: object) -> None:
        self.busy = False


async def _wait(sock: socket.socket, *, readable: bool) -> None:
    try:
        if readable:
            await trio.lowlevel.wait_readable(sock)
        else:
            await trio.lowlevel.wait_writable(sock)
    except trio.BusyResourceError:
        # The other direction of this stream waits on the same fd direction (see
        # _SHARED_WAIT_POLL); its retry will make our progress possible too.
        await trio.sleep(_SHARED_WAIT_POLL)
    except trio.ClosedResourceError as exc:
        raise StreamClosedError("the stream was closed while waiting on it") from exc


class TLSStream(trio.abc.HalfCloseableStream):
    """A trio stream over an established non-blocking TLS socket.

    Attributes: ``peer_identity`` (the verified peer SPIFFE ID), ``alpn`` (``"h2"``),
    ``cipher`` (the TLS 1.3 suite), ``socket`` (the ``ssl.SSLSocket``, for
    ``getsockname``/``getpeername``/``fileno``; do not read or write it directly).

    ``try_send`` writes synchronously what the socket takes now (the HBONE
    connection's fast path); the rest must be sent next, starting with the same bytes.
    With the memory BIO it may also take bytes whose ciphertext is not all out yet:
    ``has_unsent()`` then says so, and the next ``send_all`` (``b""`` will do) sends it.

    ``send_eof`` sends TLS close_notify and keeps the receive side open (TLS 1.3
    half-close); the peer's ``receive_some`` then returns ``b""``.  After a
    cancelled ``send_all`` the send side is broken (part of a record may be out);
    after a cancelled receive nothing is lost.
    """

    def __init__(self, sock: ssl.SSLSocket, identity: SpiffeId, alpn: str | None) -> None:
        self.socket = sock
        self.peer_identity = identity
        self.alpn = alpn
        cipher = sock.cipher()
        self.cipher = cipher[0] if cipher else ""
        self._send_guard = _Guard("sending")
        self._receive_guard = _Guard("receiving")
        self._closed = False
        self._eof_sent = False
        self._eof_received = False
        self._send_broken: TransportError | None = None
        self._receive_error: TransportError | None = None
        self._drained = False  # the last read ended on "want read" (see _receive)
        # Batched sends (see the module doc): the memory BIO (None on the stdlib path),
        # whether it is OpenSSL's write BIO now, and ciphertext taken from it that the
        # socket has not accepted yet.
        self._out: ssl.MemoryBIO | None = ssl.MemoryBIO() if _libssl is not None else None
        self._batching = False
        self._unsent: memoryview | None = None

    def _check_open(self) -> None:
        if self._closed:
            raise StreamClosedError("the TLS stream was closed by this side")

    # -- sending ----------------------------------------------------------------------

    def _check_can_send(self) -> None:
        self._check_open()
        if self._send_broken is not None:
            raise StreamBrokenError("the send side of this TLS stream is broken"
                                    ) from self._send_broken
        if self._eof_sent:
            raise StreamClosedError("send after send_eof")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``; a cancelled call breaks the send side (see class doc)."""
        with self._send_guard:
            self._check_can_send()
            await trio.lowlevel.checkpoint_if_cancelled()
            view = memoryview(data)
            if view.itemsize != 1 or view.ndim != 1:
                view = view.cast("B")
            try:
                if self._out is not None and (self._batching or len(view) >= _BATCH_FROM):
                    waited = await self._send_batched(view)
                else:
                    waited = await self._send_direct(view)
            except trio.Cancelled as exc:
                self._send_broken = StreamBrokenError("send_all was cancelled mid-write")
                self._send_broken.__cause__ = exc
                raise
            except (ssl.SSLError, OSError) as exc:
                self._send_broken = _stream_error(exc)
                raise self._send_broken from exc
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def _send_batched(self, view: memoryview) -> bool:
        """Encrypt ``view`` into the memory BIO a batch at a time, sending each batch
        (and any ciphertext left from before) first; True when it had to wait."""
        write = self.socket._sslobj.write  # type: ignore[attr-defined]
        total, waited = 0, False
        while True:
            while not self._push():
                waited = True
                await _wait(self.socket, readable=False)
            if total >= len(view):
                return waited
            self._write_to_memory()
            total += write(view[total:total + _ENCRYPT_BATCH])

    def _write_to_memory(self) -> None:
        if not self._batching:
            assert _libssl is not None and self._out is not None
            _libssl.write_into(self.socket, self._out)
            self._batching = True

    async def _send_direct(self, view: memoryview) -> bool:
        """The stdlib path: OpenSSL writes the socket, retried with the same bytes."""
        total, waited = 0, False
        while total < len(view):
            try:
                total += self.socket.send(view[total:])
            except ssl.SSLWantWriteError:
                waited = True
                await _wait(self.socket, readable=False)
            except ssl.SSLWantReadError:
                waited = True
                await _wait(self.socket, readable=True)
        return waited

    def _push(self) -> bool:
        """Hand the ciphertext waiting in memory to the socket, without waiting; True
        when none is left, and OpenSSL writes the socket again.  Raises the socket's
        error (a reset peer); the caller then marks the send side broken, so what was
        left unsent is never looked at again."""
        if not self._batching:
            return True
        out = self._out
        assert out is not None and _libssl is not None
        unsent = self._unsent
        while True:
            if unsent is None:
                if not out.pending:
                    self._unsent = None
                    _libssl.write_to_socket(self.socket)
                    self._batching = False
                    return True
                unsent = memoryview(out.read())
            try:
                sent = _raw_send(self.socket, unsent)
            except BlockingIOError:
                self._unsent = unsent
                return False
            unsent = unsent[sent:] if sent < len(unsent) else None

    def has_unsent(self) -> bool:
        """Ciphertext of bytes already taken is still waiting for the socket (see
        ``try_send``)."""
        return self._batching

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the socket takes now, without waiting; returns the byte count.

        TLS rule: when this returns less than ``len(data)``, OpenSSL may hold part of
        a record of the rest, so the next ``try_send``/``send_all`` must start with
        ``data[returned:]`` (it may be longer).  Raises as :meth:`send_all` does.
        """
        # Called once per message on the HBONE fast path: the guard is inlined, and
        # bytes (the usual framed message) go to OpenSSL as they are, with no view.
        guard = self._send_guard
        if guard.busy:
            raise trio.BusyResourceError("another task is already sending on this stream")
        if self._closed or self._send_broken is not None or self._eof_sent:
            self._check_can_send()
        guard.busy = True
        try:
            view: bytes | memoryview
            if type(data) is bytes:
                view = data
            else:
                view = memoryview(data)
                if view.itemsize != 1 or view.ndim != 1:
                    view = view.cast("B")
            size = len(view)
            # The SSL object itself, as in _read_ready: SSLSocket.send only adds checks.
            write = self.socket._sslobj.write  # type: ignore[attr-defined]
            total = 0
            try:
                if self._batching and not self._push():
                    # Nothing new is encrypted while older ciphertext waits: at most
                    # one batch is ever ahead of the socket.
                    return 0
                if self._out is not None and size >= _BATCH_FROM:
                    self._write_to_memory()
                    taken: int = write(view if size <= _ENCRYPT_BATCH
                                       else memoryview(view)[:_ENCRYPT_BATCH])
                    self._push()
                    return taken
                total = write(view)
                while total < size:
                    total += write(memoryview(view)[total:])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                pass
            except (ssl.SSLError, OSError) as exc:
                self._send_broken = _stream_error(exc)
                raise self._send_broken from exc
            return total
        finally:
            guard.busy = False

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_guard:
            self._check_can_send()
            await _wait(self.socket, readable=False)

    async def send_eof(self) -> None:
        """Send TLS close_notify; receiving continues until the peer's own EOF."""
        with self._send_guard:
            self._check_open()
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._eof_sent:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            if self._send_broken is not None:
                raise StreamBrokenError("the send side of this TLS stream is broken"
                                        ) from self._send_broken
            try:
                await self._send_close_notify()
            except (ssl.SSLError, OSError) as exc:
                self._send_broken = _stream_error(exc)
                raise self._send_broken from exc
            self._eof_sent = True
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _send_close_notify(self) -> None:
        if _libssl is not None:
            while not self._push():  # a batch still waiting goes first
                await _wait(self.socket, readable=False)
            while not _libssl.send_close_notify(self.socket):
                await _wait(self.socket, readable=False)
            return
        # Stdlib fallback: SSLObject.shutdown sends close_notify, then immediately tries
        # to read the peer's; that read fails the connection if the peer's application
        # data is already waiting.  Racy, hence only a fallback.
        with suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError):
            self.socket._sslobj.shutdown()  # type: ignore[attr-defined]

    # -- receiving --------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Up to ``max_bytes`` (default 256 KiB) bytes; ``b""`` once the peer sent EOF."""
        size = DEFAULT_RECEIVE_SIZE if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be at least 1")
        data = b""

        def into_scratch() -> int:
            # Read into the thread's scratch buffer and copy out only what arrived, all
            # before the next await; a fresh 256 KiB buffer per call would cost an
            # mmap, page faults and zeroing each time, whatever the size of the data.
            nonlocal data
            scratch = _scratch(size)
            n = self._read_ready(scratch)
            if n > 0:
                data = bytes(scratch[:n])
            return n

        await self._receive(into_scratch)
        return data

    async def receive_into(self, buf: memoryview) -> int:
        """Fill ``buf`` with what is ready (at least one byte); 0 once the peer sent EOF."""
        if len(buf) == 0:
            self._check_open()
            await trio.lowlevel.checkpoint()
            return 0
        return await self._receive(lambda: self._read_ready(buf))

    async def _receive(self, read: Callable[[], int]) -> int:
        """Run ``read`` until it gets data or EOF, waiting on the fd as OpenSSL asks."""
        with self._receive_guard:
            self._check_open()
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._receive_error is not None:
                raise self._receive_error
            if self._eof_received:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return 0
            waited = False
            if self._drained:
                # The last read ended on "want read": OpenSSL holds no complete record
                # and the socket was empty, so a read now would most likely fail (a
                # syscall and an exception per message of request/response traffic).
                self._drained = False
                waited = True
                await _wait(self.socket, readable=True)
                # aclose() from another task may have run while we waited (after a
                # shared-fd poll, _wait returns without noticing): the SSL object is gone.
                self._check_open()
            while (n := read()) < 0:
                waited = True
                await _wait(self.socket, readable=n == _WANT_READ)
                self._check_open()
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return n

    def _read_ready(self, buf: memoryview) -> int:
        """Read the records that are ready into ``buf``, without waiting.

        Returns the byte count (0 at EOF), or ``_WANT_READ``/``_WANT_WRITE`` when nothing
        was ready.  An error after some data keeps the data for now and is raised by
        the next call.
        """
        total = 0
        size = len(buf)
        # The SSL object itself: SSLSocket.recv_into adds two Python calls per record
        # (16 KiB at most) and checks that do not apply to a stream that is open.
        read = self.socket._sslobj.read  # type: ignore[attr-defined]
        while total < size:
            try:
                n = read(size - total, buf[total:] if total else buf)
            except ssl.SSLZeroReturnError:
                # The peer's close_notify.  The ssl module returns 0 for it only while
                # we have not sent ours; after our send_eof it raises this instead.
                n = 0
            except ssl.SSLWantReadError:
                self._drained = total > 0
                return total or _WANT_READ
            except ssl.SSLWantWriteError:
                return total or _WANT_WRITE
            except (ssl.SSLError, OSError) as exc:
                self._receive_error = _stream_error(exc)
                if total:
                    return total
                raise self._receive_error from exc
            if n == 0:
                self._eof_received = True
                return total
            total += n
        return total

    # -- closing ----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Send close_notify if we can without waiting, then close; closes even if cancelled."""
        if not self._closed:
            self._closed = True
            # Not while a send is in progress: it may have half a record out, and a
            # close_notify after that would be garbage to the peer.
            if not self._eof_sent and self._send_broken is None and not self._send_guard.busy:
                # Best effort, without waiting: a failure means the peer is gone already
                # (or, on the stdlib path, had data in flight), and closing is all that is left.
                with suppress(TransportError, ssl.SSLError, OSError):
                    if _libssl is not None:
                        # Only behind a batch that is all out: after its first bytes
                        # the close_notify would be garbage to the peer.
                        if self._push():
                            _libssl.send_close_notify(self.socket)
                    else:
                        self.socket._sslobj.shutdown()  # type: ignore[attr-defined]
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()


# --------------------------------------------------------------------------------------
# Connecting and accepting


async def _handshake(sock: ssl.SSLSocket) -> None:
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(sock)
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(sock)


def _check_session(sock: ssl.SSLSocket) -> str:
    cipher = sock.cipher()
    if cipher is None or cipher[0] not in CIPHERSUITES:
        raise HandshakeError(f"negotiated cipher suite {cipher and cipher[0]!r} is not one "
                             f"of {', '.join(CIPHERSUITES)}, which HBONE requires")
    alpn = sock.selected_alpn_protocol()
    if alpn != ALPN_H2:
        raise HandshakeError(f"the peer negotiated ALPN {alpn!r}, not 'h2': it is not an HBONE "
                             f"peer (or it does not offer ALPN)")
    return alpn


async def _tcp_connect(host: str, port: int, *, so_mark: int | None,
                       source: tuple[str, int] | None,
                       sock: socket.socket | None = None) -> socket.socket:
    try:
        infos = await trio.socket.getaddrinfo(
            host, port, family=sock.family if sock is not None else 0,
            type=socket.SOCK_STREAM)
    except BaseException as exc:  # a given socket is consumed, even on cancellation
        if sock is not None:
            sock.close()
        if isinstance(exc, socket.gaierror):
            raise ConnectRefusedError(f"cannot resolve {host!r}: {exc}") from exc
        raise
    family, _, _, _, address = infos[0]
    if sock is None:
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if so_mark is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, so_mark)
            except PermissionError as exc:
                raise ConfigError("setting SO_MARK needs CAP_NET_ADMIN: run with that "
                                  "capability or without a mark") from exc
        if source is not None:
            sock.bind(source)
        err = sock.connect_ex(address)
        if err == errno.EINPROGRESS:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise ConnectRefusedError(
                f"TCP connect to {host}:{port} failed: {os.strerror(err)} (is anything "
                f"listening there, and is the port reachable from here?)"
            ) from OSError(err, os.strerror(err))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_tls(host: str, port: int, ctx: ssl.SSLContext, *,
                      expected: Collection[SpiffeId] | None,
                      connect_timeout: float = 10.0, so_mark: int | None = None,
                      source: tuple[str, int] | None = None,
                      sock: socket.socket | None = None) -> TLSStream:
    """TCP connect and TLS handshake to ``host:port`` within ``connect_timeout``.

    ``sock``, when given, is a fresh unconnected TCP socket to connect from instead of
    a new one: ztunnel creates it inside a pod's network namespace so the connection
    leaves with the pod's address.  It is consumed (closed on any failure).

    The server must negotiate ALPN h2 and, when ``expected`` is given, prove one of
    those identities.  Raises :class:`ConnectRefusedError`/:class:`ConnectTimeoutError`
    for TCP, :class:`HandshakeError`/:class:`PeerIdentityError` for TLS.

    In TLS 1.3 the client finishes its handshake before the server has judged the
    client certificate, so a server that rejects ours (no certificate, unknown CA,
    expired) is reported by the first receive on the stream, as :class:`HandshakeError`.
    """
    tls: ssl.SSLSocket | None = None
    phase = "tcp"
    with trio.move_on_after(connect_timeout) as scope:
        sock = await _tcp_connect(host, port, so_mark=so_mark, source=source, sock=sock)
        phase = "tls"
        try:
            tls = ctx.wrap_socket(sock, server_side=False, do_handshake_on_connect=False,
                                  suppress_ragged_eofs=False)
            await _handshake(tls)
        except (ssl.SSLError, OSError) as exc:
            (tls or sock).close()
            raise _handshake_error(exc, server_side=False) from exc
        except BaseException:
            (tls or sock).close()
            raise
    if scope.cancelled_caught:
        if tls is not None:
            tls.close()
        if phase == "tcp":
            raise ConnectTimeoutError(
                f"no TCP connection to {host}:{port} within {connect_timeout} s (is a firewall "
                f"or a NetworkPolicy dropping packets to port {port}?)")
        raise HandshakeError(f"no TLS handshake with {host}:{port} within {connect_timeout} s "
                             f"(is it a TLS server?)")
    assert tls is not None
    try:
        alpn = _check_session(tls)
        identity = peer_identity(tls)
        if expected is not None and identity not in expected:
            names = ", ".join(sorted(str(e) for e in expected)) or "(none)"
            raise PeerIdentityError(
                f"{host}:{port} presented identity {identity}, but we expected one of: {names}")
    except BaseException:
        tls.close()
        raise
    return TLSStream(tls, identity, alpn)


async def accept_tls(sock: socket.socket, ctx: ssl.SSLContext, *, trust_domain: str,
                     handshake_timeout: float = 10.0) -> TLSStream:
    """Server-side handshake on an accepted socket; the client's trust domain must be ours.

    ``sock`` is consumed: closed on any failure.
    """
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # HTTP/2 frames small requests; Nagle would hold them back for an ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False,
                              suppress_ragged_eofs=False)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise _handshake_error(exc, server_side=True) from exc
    try:
        try:
            with trio.fail_after(handshake_timeout):
                await _handshake(tls)
        except (ssl.SSLError, OSError) as exc:
            raise _handshake_error(exc, server_side=True) from exc
        except trio.TooSlowError as exc:
            raise HandshakeError(
                f"the client did not complete a TLS handshake within {handshake_timeout} s "
                f"(slow client, or plaintext that never looks like TLS)") from exc
        alpn = _check_session(tls)
        identity = peer_identity(tls)
        if identity.trust_domain != trust_domain:
            raise TrustDomainError(
                f"client identity {identity} is from trust domain {identity.trust_domain!r}; "
                f"this server accepts only {trust_domain!r}")
    except BaseException:
        tls.close()
        raise
    return TLSStream(tls, identity, alpn)
