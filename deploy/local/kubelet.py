"""The kubelet of one local node: pods bound to it become namespaces and processes.

For each pod on its node the kubelet runs one task: allocate an address from the node's
pod CIDR, create the pod's namespace and veth (:mod:`.network`), start every container
(:class:`~.runtime.ContainerRunner`), and write ``status`` back (phase, podIP, hostIP,
conditions, containerStatuses with restartCount).  A pod is Ready once each container's
``readinessProbe.httpGet`` answers 2xx/3xx or, without one, once its first port accepts a
TCP connection made from the node's namespace (the echo app without declared ports is
probed on 8080; other containers without ports are ready when started).
When the pod disappears from the API the task is cancelled and its cleanup, shielded,
stops the processes, deletes the namespace (the veth and route go with it) and frees the
address.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio
from structlog.typing import FilteringBoundLogger

from common.errors import KubeApiError
from common.kube import Backoff, KubeClient, Pod
from common.kube.objects import Container
from common.logging import get_logger
from common.translate import NETNS_ANNOTATION
from deploy.local import netns, network
from deploy.local.informer import Cache
from deploy.local.runtime import (
    ContainerRunner,
    ContainerState,
    Probe,
    container_argv,
    container_env,
    in_pod_argv,
)
from ztunnel.inpod.rules import PROBE_SOURCE

log = get_logger("local.kubelet")

PROBE_TIMEOUT = 0.5
# A pod whose sandbox could not be made is retried after this pause, not in a hot loop.
FAILED_POD_RETRY = 2.0
# A status write that failed (API server busy or restarting) is tried again this many
# times, with the watch client's jittered backoff capped at 2 s.
STATUS_WRITE_ATTEMPTS = 12


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_status(*, pod_ip: str, host_ip: str, started: str,
               containers: list[tuple[str, str, ContainerState]]) -> dict[str, Any]:
    """The pod's ``status`` from its containers' states (name, image, state)."""
    states = [s for _, _, s in containers]
    ready = bool(states) and all(s.ready for s in states)
    if states and all(s.terminated for s in states):
        phase = "Succeeded" if all(s.last_exit_code == 0 for s in states) else "Failed"
    elif any(s.running or s.restart_count or s.terminated for s in states):
        phase = "Running"
    else:
        phase = "Pending"

    def condition(kind: str, value: bool) -> dict[str, str]:
        return {"type": kind, "status": "True" if value else "False",
                "lastTransitionTime": started}

    def container_status(name: str, image: str, s: ContainerState) -> dict[str, Any]:
        if s.running:
            state: dict[str, Any] = {"running": {"startedAt": s.started_at}}
        elif s.terminated:
            state = {"terminated": {"exitCode": s.last_exit_code}}
        elif s.restart_count:
            state = {"waiting": {"reason": "CrashLoopBackOff"}}
        else:
            state = {"waiting": {"reason": "ContainerCreating"}}
        out = {"name": name, "image": image, "ready": s.ready, "started": s.running,
               "restartCount": s.restart_count, "state": state}
        if s.last_exit_code is not None:
            out["lastState"] = {"terminated": {"exitCode": s.last_exit_code}}
        return out

    return {
        "phase": phase, "podIP": pod_ip, "podIPs": [{"ip": pod_ip}], "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}], "startTime": started,
        "conditions": [condition("PodScheduled", True), condition("Initialized", True),
                       condition("ContainersReady", ready), condition("Ready", ready)],
        "containerStatuses": [container_status(*c) for c in containers],
    }


@dataclass
class _Sandbox:
    pod: Pod
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class Kubelet:
    """Runs the pods bound to node ``index`` (see the module docstring)."""

    def __init__(self, *, client: KubeClient, names: network.Names, index: int,
                 state_dir: Path, pods: Cache[Pod], api_host: str, api_port: int) -> None:
        self.client = client
        self.names = names
        self.index = index
        self.node = network.node_name(index)
        self.node_netns = names.node(index)
        self.host_ip = network.node_ip(index)
        self.state_dir = state_dir
        self.pods = pods
        self.api_host = api_host
        self.api_port = api_port
        self.ipam = network.PodIPAM(index)
        self.sandboxes: dict[str, _Sandbox] = {}
        self._nursery: trio.Nursery | None = None
        self.log = log.bind(node=self.node)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def reconcile(self) -> None:
        await self.pods.synced.wait()
        assert self._nursery is not None, "start Kubelet.run first"
        desired = {p.metadata.uid: p for p in self.pods.values()
                   if p.spec.node_name == self.node and p.metadata.uid
                   and not p.metadata.deletion_timestamp}
        for uid, sandbox in list(self.sandboxes.items()):
            if uid not in desired:
                sandbox.scope.cancel()
        for uid, pod in desired.items():
            if uid not in self.sandboxes:
                sandbox = _Sandbox(pod)
                self.sandboxes[uid] = sandbox
                self._nursery.start_soon(self._run_pod, uid, sandbox)

    async def _run_pod(self, uid: str, sandbox: _Sandbox) -> None:
        pod = sandbox.pod
        logger = self.log.bind(pod=f"{pod.metadata.namespace}/{pod.metadata.name}")
        pod_netns = self.names.pod(uid)
        ip: str | None = None
        try:
            ip = self.ipam.allocate()
            with sandbox.scope:
                await network.create_pod_network(self.node_netns, pod_netns, ip,
                                                 network.pod_gateway(self.index))
                await self._annotate_netns(pod, pod_netns)
                await self._run_containers(pod, pod_netns, ip, logger)
        except Exception:
            logger.exception("pod_failed", retry_in=FAILED_POD_RETRY)
            await trio.sleep(FAILED_POD_RETRY)  # then the finally clause lets reconcile retry
        finally:
            with trio.CancelScope(shield=True):
                if ip is not None:
                    await network.delete_pod_network(self.node_netns, pod_netns, ip)
                    self.ipam.release(ip)
                del self.sandboxes[uid]
                logger.info("pod_removed", ip=ip)
                # The pod may have been re-created meanwhile under a new uid: look again.
                self.pods.signal.notify()

    async def _annotate_netns(self, pod: Pod, pod_netns: str) -> None:
        """Tell the node's ztunnel where the pod's namespace is (it enters it to capture)."""
        path = str(netns.netns_path(pod_netns))
        await self.client.patch(Pod, pod.metadata.name,
                                {"metadata": {"annotations": {NETNS_ANNOTATION: path}}},
                                pod.metadata.namespace or "default")

    async def _run_containers(self, pod: Pod, pod_netns: str, ip: str,
                              logger: FilteringBoundLogger) -> None:
        ns = pod.metadata.namespace or "default"
        resolv = self.state_dir / "resolv" / f"{ns}.conf"
        resolv.parent.mkdir(parents=True, exist_ok=True)
        if not resolv.exists():
            resolv.write_text(network.resolv_conf(ns))
        log_path = self.state_dir / "logs" / ns / f"{pod.metadata.name}.log"
        started = now()
        entries: list[tuple[str, str, ContainerState]] = []
        lock = trio.Lock()

        async def report(_: ContainerState) -> None:
            # A lost write would leave the pod NotReady for good (nothing reports again
            # while the containers run), so a failed one is retried, each time with the
            # containers' latest state.
            async with lock:
                backoff = Backoff(base=0.1, cap=2.0)
                for attempt in range(STATUS_WRITE_ATTEMPTS):
                    status = pod_status(pod_ip=ip, host_ip=self.host_ip, started=started,
                                        containers=entries)
                    try:
                        await self.client.patch(Pod, pod.metadata.name, {"status": status},
                                                ns, status=True)
                        return
                    except KubeApiError as exc:
                        if exc.code == 404:
                            return
                        logger.warning("status_write_failed", error=str(exc),
                                       attempt=attempt + 1)
                    await trio.sleep(backoff.next_delay())

        async with trio.open_nursery() as nursery:
            for container in pod.spec.containers:
                ports = [p.container_port for p in container.ports or []
                         if (p.protocol or "TCP") == "TCP"]
                if not ports and not container.command:
                    ports = [8080]  # the echo app's default
                runner = ContainerRunner(
                    argv=in_pod_argv(pod_netns, resolv, container_argv(container)),
                    env=container_env(pod, container, pod_ip=ip, host_ip=self.host_ip,
                                      api_host=network.KUBERNETES_VIP,
                                      api_port=network.KUBERNETES_PORT),
                    log_path=log_path,
                    restart_policy=(pod.spec.model_extra or {}).get("restartPolicy"),
                    report=report, probe=self._prober(ip, *readiness_target(container, ports)),
                    clock=now)
                entries.append((container.name, container.image or "", runner.state))
                nursery.start_soon(runner.run)
            await report(ContainerState())
            logger.info("pod_started", ip=ip)

    def _prober(self, ip: str, ports: list[int], path: str | None) -> Probe:
        async def probe() -> bool:
            for port in ports:
                sock = await netns.trio_socket_in(self.node_netns)
                try:
                    # From the probe address, which in-pod capture spares (as on Istio).
                    await sock.bind((PROBE_SOURCE, 0))
                    with trio.move_on_after(PROBE_TIMEOUT):
                        await sock.connect((ip, port))
                        if path is None or await _http_ok(sock, f"{ip}:{port}", path):
                            continue
                    return False
                except OSError:
                    return False
                finally:
                    sock.close()
            return True
        return probe


def readiness_target(container: Container, ports: list[int]) -> tuple[list[int], str | None]:
    """Where readiness is probed: the container's ``readinessProbe.httpGet`` (port by
    number or name, and path) when it has one, else a TCP connect to its first port.

    A process often listens before it can serve (the waypoint opens its readiness port
    before its first configuration arrives), so an ``httpGet`` probe must be asked, not
    just connected to."""
    probe = (container.model_extra or {}).get("readinessProbe") or {}
    http_get = probe.get("httpGet") if isinstance(probe, dict) else None
    if not isinstance(http_get, dict) or "port" not in http_get:
        return ports[:1], None
    port = http_get["port"]
    if isinstance(port, str) and not port.isdigit():
        named = [p.container_port for p in container.ports or [] if p.name == port]
        if not named:
            return ports[:1], None  # a name no port has: keep the connect probe
        port = named[0]
    return [int(port)], str(http_get.get("path") or "/")


async def _http_ok(sock: trio.socket.SocketType, host: str, path: str) -> bool:
    """GET ``path`` on a connected socket: a 2xx or 3xx status means ready (Kubernetes)."""
    await sock.send(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    head = b""
    while b"\r\n" not in head and len(head) < 1024:
        chunk = await sock.recv(1024)
        if not chunk:
            break
        head += chunk
    parts = head.split(b" ", 2)
    return len(parts) > 1 and parts[0].startswith(b"HTTP/") and parts[1].isdigit() \
        and 200 <= int(parts[1]) < 400
