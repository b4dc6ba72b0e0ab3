"""``python -m deploy.local.apiserver``: run the local API server in the foreground."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import trio

from common.logging import configure, get_logger

from .server import DEFAULT_BOOKMARK_INTERVAL, serve


def _write_atomically(path: Path, text: str) -> None:
    """Readers polling for the file never see it half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def _run(args: argparse.Namespace) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(
            serve, args.db, args.host, args.port, retain_events=args.retain_events,
            bookmark_interval=args.bookmark_interval))
        if args.port_file:
            _write_atomically(Path(args.port_file), f"{port}\n")
        get_logger("apiserver").info("apiserver_ready", url=f"http://{args.host}:{port}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.apiserver",
                                     description="The local cluster's Kubernetes-style API server.")
    parser.add_argument("--db", required=True, help="SQLite file holding objects and history")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks one")
    parser.add_argument("--port-file", help="write the port listened on to this file")
    parser.add_argument("--retain-events", type=int, default=10_000,
                        help="watch history kept; older resourceVersions get 410 Gone")
    parser.add_argument("--bookmark-interval", type=float, default=DEFAULT_BOOKMARK_INTERVAL,
                        help="seconds between BOOKMARK events on watches that allow them")
    parser.add_argument("--log-level", default=None, help="debug, info, warning or error")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    configure(args.log_level)
    try:
        trio.run(_run, args)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
