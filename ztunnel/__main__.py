"""``python -m ztunnel --node NAME --server URL --ca-dir DIR [--node-netns PATH]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from common.admin import LogLevel
from common.errors import MeshError
from common.logging import configure
from ztunnel.app import Options, main_async
from ztunnel.dns.server import default_upstreams, parse_upstream


def parse(argv: list[str]) -> tuple[Options, str, bool]:
    p = argparse.ArgumentParser(prog="ztunnel", description=(
        "Per-node L4 proxy of the pyambient mesh: captures enrolled pods' traffic in their "
        "network namespaces and carries it over HBONE (mTLS) between nodes."))
    p.add_argument("--node", required=True, help="this node's name (spec.nodeName of its pods)")
    p.add_argument("--server", help="API server URL (default: in-cluster, then kubeconfig)")
    p.add_argument("--ca-dir", required=True, type=Path,
                   help="directory with the mesh CA (ca.pem + ca.key, or Istio's plug-in files)")
    p.add_argument("--node-netns", help="open the admin/metrics/readiness ports inside this "
                   "network namespace (local cluster: several ztunnels on one host)")
    p.add_argument("--find-netns", action="store_true",
                   help="find pods' network namespaces on this node by pod IP (Kubernetes); "
                   "without it only the pyambient.io/netns annotation is used (local cluster)")
    p.add_argument("--trust-domain", help="only needed when the CA has no spiffe:// SAN")
    p.add_argument("--drain-seconds", type=float, default=5.0,
                   help="on SIGTERM, how long live connections may finish (default 5)")
    p.add_argument("--admin-port", type=int, default=15000)
    p.add_argument("--metrics-port", type=int, default=15020)
    p.add_argument("--readiness-port", type=int, default=15021)
    p.add_argument("--dns-upstream", action="append", default=[], metavar="IP[:PORT]",
                   help="where the in-pod DNS proxy forwards names it does not answer "
                   "(repeatable; default: the nameservers of this host's resolv.conf)")
    p.add_argument("--log-level", default="info", help="debug, info, warning, error")
    p.add_argument("--log-json", action="store_true", help="JSON log lines")
    a = p.parse_args(argv)
    try:
        upstreams = (tuple(parse_upstream(u) for u in a.dns_upstream) if a.dns_upstream
                     else default_upstreams())
    except ValueError as exc:
        p.error(f"--dns-upstream: {exc}")
    options = Options(node=a.node, server=a.server, ca_dir=a.ca_dir, node_netns=a.node_netns,
                      find_netns=a.find_netns,
                      trust_domain=a.trust_domain, drain_seconds=a.drain_seconds,
                      admin_port=a.admin_port, metrics_port=a.metrics_port,
                      readiness_port=a.readiness_port, dns_upstreams=upstreams)
    return options, a.log_level, a.log_json


def main(argv: list[str] | None = None) -> int:
    try:
        options, level, json_logs = parse(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, or a usage error argparse already explained
        return exc.code if isinstance(exc.code, int) else 2
    configure("debug", json=json_logs)
    log_level = LogLevel(level)
    log_level.install()
    try:
        trio.run(main_async, options, log_level)
    except (MeshError, BaseExceptionGroup) as exc:
        errors = _mesh_errors(exc)
        if not errors:
            raise
        for error in errors:
            print(f"ztunnel: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _mesh_errors(exc: BaseException) -> list[MeshError]:
    """The MeshErrors in ``exc`` (a start-up failure arrives wrapped in nursery groups)."""
    if isinstance(exc, MeshError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        found = [e for sub in exc.exceptions for e in _mesh_errors(sub)]
        leaves = sum(1 for _ in _leaves(exc))
        return found if len(found) == leaves else []
    return []


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


if __name__ == "__main__":
    sys.exit(main())
