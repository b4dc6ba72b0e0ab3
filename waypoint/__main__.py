"""`waypoint` command line entry point (stub until its issue lands)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Print usage; the waypoint service is not implemented yet."""
    args = sys.argv[1:] if argv is None else argv
    print("usage: waypoint [--help]\n\nnot implemented yet", file=sys.stderr)
    return 0 if args in ([], ["--help"], ["-h"]) else 2


if __name__ == "__main__":
    sys.exit(main())
