"""The mesh CA on Kubernetes: the Secret ``ambient-system/ambient-ca``, created on first start.

Every node's ztunnel signs its own pods' certificates with the one mesh root, so every
ztunnel needs the same CA.  :func:`load_or_create_ca` reads it from the Secret; when the
Secret does not exist yet (the first ztunnel of a new install), it generates a root
(ECDSA P-256, :meth:`~common.ca.CertificateAuthority.generate`) and creates the Secret.
Several ztunnels starting together race on that create: exactly one create succeeds,
the others get ``409 AlreadyExists`` and read the winner's Secret, so all end up with
the same root.

The Secret holds ``ca.pem``/``ca.key`` (what this module creates) or Istio's plug-in
layout (``ca-cert.pem``, ``ca-key.pem``, ``root-cert.pem``, ``cert-chain.pem``), so an
operator can create it beforehand from their own CA, as with Istio's ``cacerts``.

The files are written into a directory (keys mode 0600) and loaded from there with
:meth:`~common.ca.CertificateAuthority.load`: the DaemonSet's init container runs
``python -m ztunnel.k8s_ca --out DIR`` into a memory-backed volume that the ztunnel
container reads with ``--ca-dir DIR``; ztunnel's own start-up can call
:func:`load_or_create_ca` directly with a private directory.  RBAC lets ztunnel get
only this Secret, and create Secrets only in its own namespace.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import sys
import tempfile
from pathlib import Path

import trio

from common.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    EXTRA_ROOTS_FILE,
    ISTIO_CA_CERT_FILE,
    ISTIO_CA_KEY_FILE,
    ISTIO_CERT_CHAIN_FILE,
    ISTIO_ROOT_CERT_FILE,
    CertificateAuthority,
)
from common.errors import CertificateError, KubeApiError, MeshError
from common.kube import KubeClient, ObjectMeta, Secret, load_config
from common.logging import configure, get_logger

_log = get_logger("ztunnel.k8s_ca")

NAMESPACE = "ambient-system"
SECRET_NAME = "ambient-ca"
# Secret keys that are private keys (written 0600); the others are certificates.
_KEY_FILES = (CA_KEY_FILE, ISTIO_CA_KEY_FILE)
_KNOWN_FILES = (CA_CERT_FILE, CA_KEY_FILE, EXTRA_ROOTS_FILE, ISTIO_CA_CERT_FILE,
                ISTIO_CA_KEY_FILE, ISTIO_ROOT_CERT_FILE, ISTIO_CERT_CHAIN_FILE)


def secret_from_directory(directory: Path, namespace: str = NAMESPACE,
                          name: str = SECRET_NAME) -> Secret:
    """The Secret holding the CA files :meth:`CertificateAuthority.save` wrote there."""
    data = {key: base64.b64encode((directory / key).read_bytes()).decode()
            for key in _KNOWN_FILES if (directory / key).exists()}
    return Secret(metadata=ObjectMeta(name=name, namespace=namespace,
                                      labels={"app.kubernetes.io/part-of": "pyambient"}),
                  type="Opaque", data=data)


def secret_for(ca: CertificateAuthority, namespace: str = NAMESPACE,
               name: str = SECRET_NAME) -> Secret:
    """The Secret holding ``ca`` (by way of a private temporary directory)."""
    with tempfile.TemporaryDirectory(prefix="pyambient-ca-") as tmp:
        ca.save(Path(tmp))
        return secret_from_directory(Path(tmp), namespace, name)


def write_secret_files(secret: Secret, directory: Path) -> list[str]:
    """Write the Secret's CA files into ``directory`` (keys 0600), removing CA files the
    Secret does not have; the names written."""
    where = f"Secret {secret.metadata.namespace}/{secret.metadata.name}"
    data = secret.data or {}
    if not any(k in data for k in (CA_KEY_FILE, ISTIO_CA_KEY_FILE)):
        raise CertificateError(
            f"{where} has no CA key: expected {CA_CERT_FILE} and {CA_KEY_FILE}, or Istio's "
            f"{ISTIO_CA_CERT_FILE}, {ISTIO_CA_KEY_FILE} and {ISTIO_ROOT_CERT_FILE}; delete it "
            "to have ztunnel create a new CA, or fix its keys")
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for key in _KNOWN_FILES:
        if key not in data:
            # A file left from an earlier Secret would change what load() picks.
            (directory / key).unlink(missing_ok=True)
            continue
        try:
            content = base64.b64decode(data[key], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CertificateError(f"{where}: data.{key} is not base64") from exc
        path = directory / key
        mode = 0o600 if key in _KEY_FILES else 0o644
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.chmod(path, mode)  # an existing file keeps its mode through O_CREAT
        written.append(key)
    return written


async def _get(client: KubeClient, namespace: str, name: str) -> Secret | None:
    try:
        return await client.get(Secret, name, namespace)
    except KubeApiError as exc:
        if exc.code == 404:
            return None
        if exc.code == 403:
            raise CertificateError(
                f"not allowed to read Secret {namespace}/{name}: {exc} (is ztunnel's Role "
                f"'ztunnel-ca' in {namespace} installed and bound to its ServiceAccount?)"
            ) from exc
        raise


async def load_or_create_ca(client: KubeClient, directory: Path, *,
                            namespace: str = NAMESPACE, name: str = SECRET_NAME,
                            trust_domain: str = "cluster.local") -> CertificateAuthority:
    """The mesh CA from Secret ``namespace/name``, creating it from a new root when absent.

    The CA's files are written into ``directory`` (which should be private: memory-backed
    and readable by this process only) and loaded from there.  Raises CertificateError
    when the Secret holds no usable CA, KubeApiError when the API refuses.
    """
    secret = await _get(client, namespace, name)
    if secret is None:
        ca = CertificateAuthority.generate(trust_domain)
        for key in _KNOWN_FILES:  # the Secret is made from what this directory holds
            (directory / key).unlink(missing_ok=True)
        ca.save(directory)  # the key goes only where it will be used
        try:
            secret = await client.create(secret_from_directory(directory, namespace, name))
            _log.info("mesh CA created", secret=f"{namespace}/{name}",
                      trust_domain=trust_domain, expires=ca.not_after.isoformat())
        except KubeApiError as exc:
            if exc.code != 409:
                raise CertificateError(
                    f"cannot create Secret {namespace}/{name}: {exc} (ztunnel's Role "
                    f"'ztunnel-ca' must allow create on secrets in {namespace})") from exc
            # Another node's ztunnel created it first: use theirs, so all share one root.
            secret = await _get(client, namespace, name)
            if secret is None:
                raise CertificateError(
                    f"Secret {namespace}/{name} was reported to exist but cannot be read: "
                    "was it deleted just now? Restart ztunnel") from exc
            _log.info("mesh CA created by another ztunnel", secret=f"{namespace}/{name}")
    write_secret_files(secret, directory)
    try:
        ca = CertificateAuthority.load(directory)
    except CertificateError:
        # A plug-in CA without a spiffe:// SAN: it serves the trust domain we are given.
        ca = CertificateAuthority.load(directory, trust_domain=trust_domain)
    if ca.trust_domain != trust_domain:
        raise CertificateError(
            f"Secret {namespace}/{name} holds a CA for trust domain {ca.trust_domain!r}, "
            f"not {trust_domain!r}: pass --trust-domain {ca.trust_domain} or replace the "
            "Secret")
    return ca


def main(argv: list[str] | None = None) -> int:
    """``python -m ztunnel.k8s_ca --out DIR``: the init container of the ztunnel DaemonSet."""
    parser = argparse.ArgumentParser(
        prog="python -m ztunnel.k8s_ca",
        description="Write the mesh CA from its Secret into DIR, creating the Secret first "
                    "when it does not exist.")
    parser.add_argument("--out", type=Path, required=True, help="directory for the CA files")
    parser.add_argument("--namespace", default=NAMESPACE)
    parser.add_argument("--secret", default=SECRET_NAME)
    parser.add_argument("--trust-domain", default="cluster.local")
    parser.add_argument("--server", help="API server URL (default: in-cluster, then kubeconfig)")
    args = parser.parse_args(argv)
    configure("info", json=True)

    async def run() -> CertificateAuthority:
        async with KubeClient(load_config(args.server)) as client:
            return await load_or_create_ca(client, args.out, namespace=args.namespace,
                                           name=args.secret, trust_domain=args.trust_domain)

    try:
        ca = trio.run(run)
    except MeshError as exc:
        print(f"ztunnel.k8s_ca: {exc}", file=sys.stderr)
        return 1
    print(f"mesh CA for {ca.trust_domain} written to {args.out} "
          f"(expires {ca.not_after.isoformat()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
