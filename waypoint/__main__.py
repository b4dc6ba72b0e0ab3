"""``waypoint --name NAME --namespace NS [--server URL] [--bench-config FILE]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import trio

from common.errors import MeshError
from common.logging import configure
from waypoint.app import Options, Waypoint, _address, load_bench_config, run_until_signal


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="waypoint", description="pyambient L7 waypoint proxy")
    parser.add_argument("--name", required=True, help="the waypoint's Gateway name "
                        "(also its service account)")
    parser.add_argument("--namespace", required=True, help="the waypoint's namespace")
    parser.add_argument("--mode", choices=("mesh", "ingress"), default="mesh",
                        help="ingress: serve the ingress Gateway NAME's HTTP/HTTPS listeners "
                        "(waypoint.ingress)")
    parser.add_argument("--server", default=os.environ.get("AMBIENT_SERVER"),
                        help="Kubernetes API server URL (default: $AMBIENT_SERVER, which the "
                        "local cluster sets in pods, else in-cluster or kubeconfig)")
    parser.add_argument("--trust-domain", default="cluster.local")
    parser.add_argument("--csr-url", default="http://127.0.0.1:15012",
                        help="the node ztunnel's CSR endpoint")
    parser.add_argument("--hbone-port", type=int, default=15008)
    parser.add_argument("--metrics-port", type=int, default=15020)
    parser.add_argument("--ready-port", type=int, default=15021)
    parser.add_argument("--admin-port", type=int, default=15000)
    parser.add_argument("--drain-seconds", type=float, default=5.0)
    parser.add_argument("--no-access-log", action="store_true",
                        help="do not log a line per request")
    parser.add_argument("--bench-config", type=Path,
                        help="bench mode: plain HTTP, static routes and endpoints from this YAML")
    parser.add_argument("--bench-listen", default="127.0.0.1:18080",
                        help="bench mode: address to serve plain HTTP on")
    parser.add_argument("--ratelimit-redis", default=os.environ.get("RATELIMIT_REDIS"),
                        help="HOST:PORT of the Redis holding global rate-limit counters "
                        "(default: $RATELIMIT_REDIS; without it global limits fail by their "
                        "failMode)")
    parser.add_argument("--ratelimit-timeout", type=float,
                        default=float(os.environ.get("RATELIMIT_TIMEOUT", "0.25")),
                        help="seconds a Redis call may take before the limit's failMode "
                        "applies")
    parser.add_argument("--log-level", default=None)
    args = parser.parse_args(argv)
    configure(args.log_level)
    return Options(name=args.name, namespace=args.namespace, server=args.server,
                   trust_domain=args.trust_domain, csr_url=args.csr_url,
                   hbone_port=args.hbone_port, metrics_port=args.metrics_port,
                   ready_port=args.ready_port, admin_port=args.admin_port,
                   drain_seconds=args.drain_seconds, access_log=not args.no_access_log,
                   bench_config=args.bench_config, bench_listen=_address(args.bench_listen),
                   mode=args.mode,
                   ratelimit_redis=(_address(args.ratelimit_redis) if args.ratelimit_redis
                                    else None),
                   ratelimit_timeout=args.ratelimit_timeout,
                   pod_ip=os.environ.get("POD_IP") or None)


def main(argv: list[str] | None = None) -> int:
    try:
        options = parse_args(argv)
    except SystemExit as exc:  # --help, or bad arguments (argparse printed why)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        bench = (load_bench_config(options.bench_config) if options.bench_config is not None
                 else None)
        if options.mode == "ingress":
            from waypoint.ingress import Ingress
            trio.run(run_until_signal, Ingress(options), None)
        else:
            trio.run(run_until_signal, Waypoint(options), bench)
    except MeshError as exc:
        print(f"waypoint: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
