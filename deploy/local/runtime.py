"""The container runtime of the local cluster: a pod's container is a host process.

The process runs inside the pod's network namespace with a private mount namespace in
which the pod's ``resolv.conf`` (a file in the cluster's state directory) is bind-mounted
over ``/etc/resolv.conf``: ``ip netns exec`` provides both namespaces, the mount never
reaches the host.  Output goes to one log file per pod, appended across restarts.  Each
process leads its own session, so stopping a pod signals its whole process group.

Pure parts (command line, environment, restart decisions, backoff) are functions here;
:class:`ContainerRunner` is the trio shell that starts, watches, restarts and stops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from common.kube import Pod
from common.kube.objects import Container
from common.logging import get_logger

log = get_logger("local.runtime")

ECHO_IMAGE = "ambient/echo"
# Shell run inside the pod's fresh mount namespace: $0 is the pod's resolv.conf.
_MOUNT_RESOLV = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
# Kubernetes starts at 10 s and caps at 5 min; a local cluster is for quick iteration.
BACKOFF_BASE = 1.0
BACKOFF_CAP = 30.0
# A container that ran this long before exiting starts again without delay, like the
# kubelet's backoff reset after a stretch of healthy running.
BACKOFF_RESET_AFTER = 60.0
STOP_GRACE = 2.0
# Readiness probes start fast (the echo app listens within a few hundred ms) and back
# off, so a hundred pods starting at once do not spend the CPU on probing.
PROBE_FIRST_INTERVAL = 0.05
PROBE_MAX_INTERVAL = 0.5
_PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "PYAMBIENT_LOG")


def in_pod_argv(pod_netns: str, resolv_conf: Path | str, argv: list[str]) -> list[str]:
    """``argv`` wrapped to run in the pod's network namespace with the pod's DNS config."""
    return ["ip", "netns", "exec", pod_netns, "sh", "-c", _MOUNT_RESOLV, str(resolv_conf), *argv]


def is_echo(container: Container) -> bool:
    """The built-in echo app runs for image ``ambient/echo[:tag]`` or when there is no command."""
    image = (container.image or "").split("@", 1)[0]
    if ":" in image.rsplit("/", 1)[-1]:
        image = image.rsplit(":", 1)[0]
    return image == ECHO_IMAGE or not container.command


def container_argv(container: Container, python: str = sys.executable) -> list[str]:
    """What to execute for ``container``: its command and args (``python`` being this
    interpreter), or the built-in echo app."""
    if is_echo(container) or not container.command:
        ports = [a for p in container.ports or [] if (p.protocol or "TCP") == "TCP"
                 for a in ("--port", str(p.container_port))]
        return [python, "-m", "deploy.local.echo", *ports, *(container.args or [])]
    command = list(container.command)
    # The local cluster's one "image" is this Python environment with the project installed,
    # so a container's ``python`` (the project image's entry point) is this interpreter.
    if command[0] in ("python", "python3"):
        command[0] = python
    return [*command, *(container.args or [])]


def container_env(pod: Pod, container: Container, *, pod_ip: str, host_ip: str,
                  api_host: str, api_port: int,
                  host_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process environment: a few host variables, the container's, then the pod's facts."""
    source = os.environ if host_env is None else host_env
    env = {k: source[k] for k in _PASSED_ENV if k in source}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["HOME"] = "/root"
    env["PYTHONUNBUFFERED"] = "1"
    for var in container.env or []:
        env[var.name] = var.value or ""
    env.update({
        "POD_NAME": pod.metadata.name, "POD_NAMESPACE": pod.metadata.namespace or "default",
        "POD_IP": pod_ip, "HOST_IP": host_ip, "NODE_NAME": pod.spec.node_name or "",
        "SERVICE_ACCOUNT": pod.spec.service_account_name or "default",
        "KUBERNETES_SERVICE_HOST": api_host, "KUBERNETES_SERVICE_PORT": str(api_port),
        # Our API server speaks plain HTTP; clients that honour this skip in-cluster TLS.
        "AMBIENT_SERVER": f"http://{api_host}:{api_port}",
    })
    return env


def should_restart(policy: str | None, exit_code: int) -> bool:
    """Kubernetes' ``restartPolicy``: Always (default), OnFailure, Never."""
    if policy == "Never":
        return False
    if policy == "OnFailure":
        return exit_code != 0
    return True


def backoff_delay(restarts: int, ran_for: float) -> float:
    """Seconds to wait before restart number ``restarts`` (1-based) after a run of ``ran_for``."""
    if ran_for >= BACKOFF_RESET_AFTER:
        return 0.0
    return min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** max(0, restarts - 1))


@dataclass
class ContainerState:
    """What the kubelet reports for the container."""

    running: bool = False
    ready: bool = False
    restart_count: int = 0
    started_at: str | None = None
    last_exit_code: int | None = None
    terminated: bool = False  # exited and will not be restarted


Report = Callable[[ContainerState], Awaitable[None]]
Probe = Callable[[], Awaitable[bool]]


class ContainerRunner:
    """Runs one container of one pod until cancelled; restarts it with backoff.

    ``report`` is awaited on every state change; ``probe`` returns True once the process
    serves (the kubelet connects to its ports).  Cancellation stops the process group:
    SIGTERM, then SIGKILL after :data:`STOP_GRACE`.
    """

    def __init__(self, *, argv: list[str], env: dict[str, str], log_path: Path,
                 restart_policy: str | None, report: Report, probe: Probe,
                 clock: Callable[[], str]) -> None:
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.restart_policy = restart_policy
        self.report = report
        self.probe = probe
        self.clock = clock
        self.state = ContainerState()

    async def run(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            started = trio.current_time()
            exit_code = await self._run_once()
            ran_for = trio.current_time() - started
            self.state.running = self.state.ready = False
            self.state.last_exit_code = exit_code
            if not should_restart(self.restart_policy, exit_code):
                self.state.terminated = True
                await self.report(self.state)
                return
            self.state.restart_count += 1
            await self.report(self.state)
            await trio.sleep(backoff_delay(self.state.restart_count, ran_for))

    async def _run_once(self) -> int:
        # Opening an append-only local file does not block in any way that matters.
        with open(self.log_path, "ab", buffering=0) as logf:  # noqa: ASYNC230
            proc = await trio.lowlevel.open_process(
                self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True)
        try:
            self.state.running = True
            self.state.started_at = self.clock()
            await self.report(self.state)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_ready, proc)
                code = await proc.wait()
                nursery.cancel_scope.cancel()
            log.info("container_exited", argv=self.argv[-3:], pid=proc.pid, exit_code=code)
            return code
        finally:
            with trio.CancelScope(shield=True):
                await _stop(proc)

    async def _watch_ready(self, proc: trio.Process) -> None:
        interval = PROBE_FIRST_INTERVAL
        while proc.returncode is None:
            if await self.probe():
                self.state.ready = True
                await self.report(self.state)
                return
            await trio.sleep(interval)
            interval = min(PROBE_MAX_INTERVAL, interval * 2)


async def _stop(proc: trio.Process) -> None:
    """Stop the process group: TERM, a grace period, then KILL."""
    if proc.returncode is not None:
        _killpg(proc.pid, signal.SIGKILL)  # children it left behind in its group
        return
    _killpg(proc.pid, signal.SIGTERM)
    with trio.move_on_after(STOP_GRACE):
        await proc.wait()
    _killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
