"""Where the API server is and how to authenticate: in-cluster, kubeconfig, or a URL.

:func:`load_config` picks, in order: an explicit server URL; the in-cluster service
account (``KUBERNETES_SERVICE_HOST``/``PORT`` and the files under
``/var/run/secrets/kubernetes.io/serviceaccount``); a kubeconfig (``KUBECONFIG``, which may
list several files, else ``~/.kube/config``).  Supported kubeconfig credentials: bearer
token (``token``, ``tokenFile``) and client certificates (file or ``-data``).  ``exec`` and
``auth-provider`` plugins are out of scope and rejected with a message that says so.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True, kw_only=True)
class KubeConfig:
    """Everything needed to open a connection to one API server."""

    server: str
    namespace: str = "default"
    token: str | None = None
    # Re-read on use: projected service-account tokens rotate under a running process.
    token_file: str | None = None
    ca_file: str | None = None
    ca_data: str | None = None  # PEM
    client_cert_file: str | None = None
    client_key_file: str | None = None
    client_cert_data: str | None = None  # PEM
    client_key_data: str | None = None  # PEM
    insecure_skip_tls_verify: bool = False

    @classmethod
    def for_server(cls, url: str, namespace: str = "default") -> KubeConfig:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"server {url!r} must be an http:// or https:// URL")
        return cls(server=url.rstrip("/"), namespace=namespace)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for an https server (None for http)."""
        if not self.server.startswith("https://"):
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)
        if self.insecure_skip_tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.client_cert_file or self.client_cert_data:
            _load_client_cert(ctx, self)
        return ctx


def _load_client_cert(ctx: ssl.SSLContext, config: KubeConfig) -> None:
    """Load the client certificate; ``-data`` forms go through a private temporary directory,
    because :meth:`ssl.SSLContext.load_cert_chain` only reads files."""
    if config.client_cert_file and config.client_key_file:
        ctx.load_cert_chain(config.client_cert_file, config.client_key_file)
        return
    with tempfile.TemporaryDirectory(prefix="pyambient-kube-") as tmp:
        cert = config.client_cert_file or _write_private(Path(tmp) / "cert.pem",
                                                         config.client_cert_data)
        key = config.client_key_file or _write_private(Path(tmp) / "key.pem",
                                                       config.client_key_data)
        ctx.load_cert_chain(cert, key)


def _write_private(path: Path, data: str | None) -> str:
    if data is None:
        raise ConfigError("a client certificate needs both the certificate and its key")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
    return str(path)


def in_cluster(env: Mapping[str, str] | None = None,
               root: Path = SERVICE_ACCOUNT_DIR) -> KubeConfig | None:
    """The in-cluster config when running in a pod, else None."""
    env = os.environ if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    token = root / "token"
    if not token.exists():
        raise ConfigError(f"KUBERNETES_SERVICE_HOST is set but {token} is missing: is "
                          "automountServiceAccountToken disabled for this pod?")
    namespace_file = root / "namespace"
    ca = root / "ca.crt"
    return KubeConfig(
        server=f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}",
        namespace=namespace_file.read_text().strip() if namespace_file.exists() else "default",
        token_file=str(token), ca_file=str(ca) if ca.exists() else None)


def _named(entries: Any, what: str, path: str) -> dict[str, dict[str, Any]]:
    if entries is None:
        return {}
    if not isinstance(entries, list):
        raise ConfigError(f"kubeconfig {path}: {what} must be a list")
    return {e["name"]: e.get(what[:-1]) or {} for e in entries
            if isinstance(e, dict) and "name" in e}


def _decode(value: str, field: str, path: str) -> str:
    try:
        return base64.b64decode(value).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"kubeconfig {path}: {field} is not valid base64 PEM") from exc


def from_kubeconfig(paths: list[Path] | None = None, context: str | None = None) -> KubeConfig:
    """Load the current (or named) context from kubeconfig files (first file wins per name)."""
    if paths is None:
        env = os.environ.get("KUBECONFIG")
        paths = ([Path(p) for p in env.split(os.pathsep) if p] if env
                 else [Path.home() / ".kube" / "config"])
    clusters: dict[str, dict[str, Any]] = {}
    users: dict[str, dict[str, Any]] = {}
    contexts: dict[str, dict[str, Any]] = {}
    current = context
    bases: dict[str, Path] = {}
    existing = [p for p in paths if p.exists()]
    if not existing:
        raise ConfigError(f"no kubeconfig found at {', '.join(map(str, paths))}: set KUBECONFIG, "
                          "or pass --server URL")
    for path in existing:
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"kubeconfig {path} is not valid YAML: {exc}") from exc
        if not isinstance(doc, dict):
            raise ConfigError(f"kubeconfig {path} must be a YAML mapping")
        for table, key in ((clusters, "clusters"), (users, "users"), (contexts, "contexts")):
            for name, entry in _named(doc.get(key), key, str(path)).items():
                if name not in table:
                    table[name] = entry
                    bases[f"{key}/{name}"] = path.parent
        current = current or doc.get("current-context") or None
    if not current:
        raise ConfigError("kubeconfig has no current-context: run `kubectl config use-context`")
    ctx = contexts.get(current)
    if ctx is None:
        raise ConfigError(f"kubeconfig has no context named {current!r}")
    cluster = clusters.get(ctx.get("cluster", ""))
    if cluster is None or not cluster.get("server"):
        raise ConfigError(f"kubeconfig context {current!r}: cluster {ctx.get('cluster')!r} "
                          "is missing or has no server")
    user = users.get(ctx.get("user", ""), {})
    if "exec" in user or "auth-provider" in user:
        raise ConfigError(f"kubeconfig user {ctx.get('user')!r} uses an exec or auth-provider "
                          "plugin, which pyambient does not run: use a token or client "
                          "certificate (e.g. a service-account token) instead")
    cbase = bases.get(f"clusters/{ctx.get('cluster')}", Path("."))
    ubase = bases.get(f"users/{ctx.get('user')}", Path("."))

    def rel(base: Path, value: str | None) -> str | None:
        return str(base / value) if value else None

    token_file = rel(ubase, user.get("tokenFile"))
    return KubeConfig(
        server=str(cluster["server"]).rstrip("/"),
        namespace=ctx.get("namespace") or "default",
        token=user.get("token"),
        token_file=token_file,
        ca_file=rel(cbase, cluster.get("certificate-authority")),
        ca_data=_decode(cluster["certificate-authority-data"], "certificate-authority-data",
                        current) if cluster.get("certificate-authority-data") else None,
        client_cert_file=rel(ubase, user.get("client-certificate")),
        client_key_file=rel(ubase, user.get("client-key")),
        client_cert_data=_decode(user["client-certificate-data"], "client-certificate-data",
                                 current) if user.get("client-certificate-data") else None,
        client_key_data=_decode(user["client-key-data"], "client-key-data", current)
        if user.get("client-key-data") else None,
        insecure_skip_tls_verify=bool(cluster.get("insecure-skip-tls-verify", False)),
    )


def load_config(server: str | None = None, *, kubeconfig: str | None = None,
                context: str | None = None) -> KubeConfig:
    """The config to use: ``server`` if given, else in-cluster, else kubeconfig."""
    if server:
        return KubeConfig.for_server(server)
    if kubeconfig is None and context is None and (cfg := in_cluster()) is not None:
        return cfg
    return from_kubeconfig([Path(kubeconfig)] if kubeconfig else None, context)
