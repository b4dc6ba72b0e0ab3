"""Install and remove the capture rules in a pod's network namespace.

The namespace is named by a path (``/run/netns/<name>`` on the local cluster,
``/proc/<pid>/ns/net`` or the runtime's netns file on Kubernetes) and entered with
``nsenter``, so the same code serves both.  Installing is idempotent: the table is
replaced atomically by one ``nft -f`` transaction, and the policy route is
replaced in place rather than removed and added again (no window without it).
"""

from __future__ import annotations

import subprocess

import trio

from common.errors import ConfigError
from common.logging import get_logger
from ztunnel.inpod.rules import (
    DEFAULT_PORTS,
    CapturePorts,
    ip_route_commands,
    nft_delete_script,
    nft_ruleset,
)

log = get_logger("inpod")


async def _run(netns_path: str, argv: list[str], stdin: bytes = b"", check: bool = True,
               accept: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` in the namespace; with ``check`` a failure raises, unless its error
    output contains ``accept``."""
    cmd = ["nsenter", f"--net={netns_path}", *argv]
    result = await trio.run_process(cmd, stdin=stdin, capture_stdout=True,
                                    capture_stderr=True, check=False)
    if (check and result.returncode != 0
            and not (accept is not None and accept in result.stderr)):
        raise ConfigError(
            f"{' '.join(argv)} failed in {netns_path}: "
            f"{result.stderr.decode(errors='replace').strip()} "
            "(does this process have CAP_NET_ADMIN and is nftables installed?)")
    return result


async def install_capture(netns_path: str, ports: CapturePorts = DEFAULT_PORTS) -> None:
    """Install (or replace) the capture rules in the namespace at ``netns_path``; safe
    over a pod whose rules are in use (see ``ip_route_commands``)."""
    await _run(netns_path, ["nft", "-f", "-"], stdin=nft_ruleset(ports).encode())
    for cmd in ip_route_commands(add=True):
        # A pod without IPv6 (disabled by sysctl) cannot take v6 routes; v4 still works.
        await _run(netns_path, cmd, check="-6" not in cmd, accept=b"File exists")
    log.info("capture installed", netns=netns_path)


async def remove_capture(netns_path: str) -> None:
    """Remove the capture rules from the namespace (absent rules are not an error)."""
    await _run(netns_path, ["nft", "-f", "-"], stdin=nft_delete_script().encode())
    for cmd in ip_route_commands(add=False):
        await _run(netns_path, cmd, check=False)
    log.info("capture removed", netns=netns_path)
