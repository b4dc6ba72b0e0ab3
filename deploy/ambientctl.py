"""``ambientctl``: the operator's tool (stub until the local-cluster issue lands)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Print usage."""
    args = sys.argv[1:] if argv is None else argv
    print("usage: ambientctl COMMAND ...\n\ncommands land with their issues", file=sys.stderr)
    return 0 if args in ([], ["--help"], ["-h"]) else 2


if __name__ == "__main__":
    sys.exit(main())
