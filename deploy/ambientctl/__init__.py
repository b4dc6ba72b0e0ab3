"""``ambientctl``: the operator's tool.

Each command group lives in its own module exposing ``register(subparsers)``;
the module adds its sub-commands and sets ``func`` on each parser to a function
taking the parsed arguments and returning the exit code.  Adding a group means
adding its module name to ``_GROUPS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from common.errors import MeshError

# Modules under deploy.ambientctl that contribute commands, in --help order.
_GROUPS: tuple[str, ...] = ("objects", "cluster", "waypoint", "gateway", "install")

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every group's commands."""
    parser = argparse.ArgumentParser(
        prog="ambientctl",
        description="Run and operate the pyambient mesh: a local cluster, waypoints, installs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _GROUPS:
        importlib.import_module(f"deploy.ambientctl.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ambientctl`` console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse exits 0 on --help and 2 on bad usage
        return int(exc.code or 0)
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 0 if args.command is None else 2
    try:
        return func(args)
    except MeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
