"""The local cluster's ztunnels: one ``python -m ztunnel`` process per node.

The mesh CA is generated once per cluster into ``<state dir>/ca`` (``ca.pem`` and
``ca.key``, the key mode 0600) and handed to every ztunnel with ``--ca-dir``.  Each
ztunnel runs in the host namespace (it reaches the API server on 127.0.0.1 and enters
pod namespaces itself) and opens its operator ports (15000/15020/15021) inside its
node's namespace, so the nodes' ztunnels do not collide.  A ztunnel that exits is
restarted after a pause (it re-enrols its node's pods on start); stopping the
supervisor sends SIGTERM, which drains it.  The cluster is reported ready only once
every ztunnel answers ``/healthz/ready``, so pods enrolled right after ``cluster up``
are captured at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from common.ca import CertificateAuthority
from common.logging import get_logger
from deploy.local import netns, network

log = get_logger("local.ztunnels")

RESTART_PAUSE = 2.0
STOP_TIMEOUT = 10.0
READINESS_PORT = 15021
READY_WITHIN = 30.0
REPO = Path(__file__).resolve().parents[2]


def ensure_ca(state_dir: Path) -> Path:
    """The cluster's CA directory, generating the CA on first use."""
    directory = state_dir / "ca"
    if not (directory / "ca.key").exists():
        CertificateAuthority.generate("cluster.local").save(directory)
        log.info("mesh_ca_generated", dir=str(directory))
    return directory


def ztunnel_argv(node: str, server: str, ca_dir: Path, node_netns: str) -> list[str]:
    return [sys.executable, "-m", "ztunnel", "--node", node, "--server", server,
            "--ca-dir", str(ca_dir), "--node-netns", node_netns, "--drain-seconds", "2",
            # The in-pod DNS proxy forwards to the cluster DNS, as the pods' resolv.conf does.
            "--dns-upstream", network.DNS_VIP]


def _open_log(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)


async def run_ztunnel(node: str, server: str, ca_dir: Path, node_netns: str,
                      log_path: Path) -> None:
    """Keep one node's ztunnel running until cancelled; then SIGTERM it and wait."""
    argv = ztunnel_argv(node, server, ca_dir, node_netns)
    while True:
        fd = _open_log(log_path)
        try:
            proc = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL, stdout=fd,
                                                    stderr=subprocess.STDOUT, cwd=str(REPO))
        finally:
            os.close(fd)
        log.info("ztunnel_started", node=node, pid=proc.pid)
        try:
            code = await proc.wait()
        finally:
            if proc.returncode is None:
                with trio.CancelScope(shield=True):
                    proc.send_signal(signal.SIGTERM)
                    with trio.move_on_after(STOP_TIMEOUT):
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
        log.warning("ztunnel_exited", node=node, code=code, log=str(log_path))
        await trio.sleep(RESTART_PAUSE)


async def _ready(node_netns_name: str) -> bool:
    sock = await netns.trio_socket_in(node_netns_name)
    try:
        with trio.move_on_after(1.0):
            await sock.connect(("127.0.0.1", READINESS_PORT))
            await sock.send(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            return (await sock.recv(64)).startswith(b"HTTP/1.1 200")
        return False
    except OSError:
        return False
    finally:
        sock.close()


async def wait_ready(node_netns_names: list[str], within: float = READY_WITHIN) -> bool:
    """Until every node's ztunnel answers ``/healthz/ready`` (or ``within`` s passed)."""
    with trio.move_on_after(within):
        for name in node_netns_names:
            # Polling another process's HTTP endpoint: nothing here to wait on instead.
            while not await _ready(name):  # noqa: ASYNC110
                await trio.sleep(0.1)
        return True
    log.warning("ztunnels_not_ready", within_s=within, hint="see logs/ztunnel-<node>.log")
    return False
