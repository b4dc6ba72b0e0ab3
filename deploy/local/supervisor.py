"""The local cluster's background process: API server, controllers, DNS, kubelets.

``python -m deploy.local.supervisor --name NAME --nodes N --state-dir DIR`` is started
(detached) by ``ambientctl cluster up`` once the namespaces of the fabric and the nodes
exist.  One trio program runs:

- the API server (:mod:`deploy.local.apiserver`) on 127.0.0.1 of the host and on
  10.240.0.1:6443 inside the fabric namespace, which the ``kubernetes`` Service points at;
- the informer caches every controller shares (one watch per kind);
- the Deployment controller and scheduler, the endpoints controller, the namespace
  controller (deleting a Namespace deletes its contents), the waypoint Gateway
  controller (status, and deleting what a deleted Gateway owned), kube-proxy, the DNS
  server (10.240.0.1:53 in the fabric, behind the ``kube-dns`` VIP 10.96.0.10) and one
  kubelet per node;
- one ztunnel per node, in the node's namespace, with the mesh CA kept in the state
  directory (:mod:`deploy.local.ztunnels`).

Progress is published in ``state.json`` of the state directory (written atomically):
``server`` once the API answers, ``ready: true`` once the built-in objects exist and
every cache is in sync.  SIGTERM stops it cleanly: every pod's cleanup runs (processes
stopped, pod namespaces deleted) before the process exits.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import trio

from common.errors import KubeApiError
from common.kube import (
    Deployment,
    EndpointSlice,
    Gateway,
    KubeClient,
    KubeConfig,
    Namespace,
    Node,
    Pod,
    Service,
    ServiceAccount,
)
from common.kube.objects import Resource
from common.logging import configure, get_logger
from deploy.local import netns, network
from deploy.local.apiserver import ApiServer, Store
from deploy.local.deployments import DeploymentController
from deploy.local.dns import DnsServer
from deploy.local.endpoints import MANAGED_BY_LABEL, SERVICE_NAME_LABEL, EndpointsController
from deploy.local.gateways import GatewayController
from deploy.local.informer import Cache, Signal, reconcile_forever
from deploy.local.kubelet import Kubelet
from deploy.local.kubeproxy import KubeProxy
from deploy.local.namespaces import NamespaceController
from deploy.local.ztunnels import ensure_ca, run_ztunnel
from deploy.local.ztunnels import wait_ready as wait_ztunnels_ready

log = get_logger("local.supervisor")

REGION = "region1"
ZONES = ("zone-a", "zone-b")
BUILTIN_MANAGER = "pyambient-cluster"


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def node_object(index: int) -> Node:
    name = network.node_name(index)
    return Node.model_validate({
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            "topology.kubernetes.io/region": REGION,
            "topology.kubernetes.io/zone": ZONES[index % len(ZONES)]}},
        "spec": {"podCIDR": str(network.pod_cidr(index)),
                 "podCIDRs": [str(network.pod_cidr(index))]},
        "status": {"addresses": [{"type": "InternalIP", "address": network.node_ip(index)},
                                 {"type": "Hostname", "address": name}],
                   "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]},
    })


def builtin_objects(nodes: int) -> list[Resource]:
    """Namespaces, Nodes, and the ``kubernetes`` and ``kube-dns`` Services with their slices."""
    gateway = str(network.FABRIC_GATEWAY)

    def manual_slice(name: str, ns: str, ports: list[dict[str, Any]]) -> EndpointSlice:
        return EndpointSlice.model_validate({
            "metadata": {"name": name, "namespace": ns, "labels": {
                SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: BUILTIN_MANAGER}},
            "addressType": "IPv4", "ports": ports,
            "endpoints": [{"addresses": [gateway], "conditions": {"ready": True}}]})

    objects: list[Resource] = [
        Namespace.model_validate({"metadata": {"name": ns}})
        for ns in ("default", "kube-system")]
    objects += [node_object(i) for i in range(nodes)]
    objects += [
        Service.model_validate({
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"clusterIP": network.KUBERNETES_VIP, "clusterIPs": [network.KUBERNETES_VIP],
                     "ports": [{"name": "https", "port": network.KUBERNETES_PORT,
                                "targetPort": network.APISERVER_FABRIC_PORT,
                                "protocol": "TCP"}]}}),
        manual_slice("kubernetes", "default", [
            {"name": "https", "port": network.APISERVER_FABRIC_PORT, "protocol": "TCP"}]),
        Service.model_validate({
            "metadata": {"name": "kube-dns", "namespace": "kube-system",
                         "labels": {"k8s-app": "kube-dns"}},
            "spec": {"clusterIP": network.DNS_VIP, "clusterIPs": [network.DNS_VIP],
                     "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                               {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}}),
        manual_slice("kube-dns", "kube-system", [
            {"name": "dns", "port": network.DNS_FABRIC_PORT, "protocol": "UDP"},
            {"name": "dns-tcp", "port": network.DNS_FABRIC_PORT, "protocol": "TCP"}]),
    ]
    return objects


async def ensure(client: KubeClient, obj: Resource) -> None:
    """Create ``obj`` unless it exists (a restarted supervisor finds them in the store)."""
    try:
        await client.create(obj)
    except KubeApiError as exc:
        if exc.code != 409:
            raise


class Supervisor:
    def __init__(self, name: str, nodes: int, state_dir: Path) -> None:
        self.name = name
        self.nodes = nodes
        self.state_dir = state_dir
        self.names = network.Names(name)
        self.state_path = state_dir / "state.json"
        self.state: dict[str, Any] = {"name": name, "nodes": nodes, "pid": os.getpid(),
                                      "ready": False}

    def publish(self, **changes: Any) -> None:
        self.state.update(changes)
        write_json_atomically(self.state_path, self.state)

    async def run(self) -> None:
        store = Store(self.state_dir / "apiserver.db")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_on_signal, nursery.cancel_scope)
                await self._serve(nursery, store)
        finally:
            store.close()

    async def _stop_on_signal(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("stopping", signal=signum)
                scope.cancel()
                return

    async def _serve(self, nursery: trio.Nursery, store: Store) -> None:
        gateway = str(network.FABRIC_GATEWAY)
        api = ApiServer(store)
        listeners = [
            *await trio.open_tcp_listeners(int(os.environ.get("AMBIENT_API_PORT", "0")),
                                           host="127.0.0.1"),
            await netns.listen_in(self.names.fabric, gateway, network.APISERVER_FABRIC_PORT),
        ]
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, api.handle_connection, listeners)
        server = f"http://127.0.0.1:{port}"
        self.publish(server=server, api_port=port,
                     fabric_server=f"http://{gateway}:{network.APISERVER_FABRIC_PORT}")
        log.info("apiserver_listening", server=server)

        client = KubeClient(KubeConfig.for_server(server))
        for obj in builtin_objects(self.nodes):
            await ensure(client, obj)

        signal_ = Signal()
        pods = Cache(Pod, signal_)
        deployments = Cache(Deployment, signal_)
        services = Cache(Service, signal_)
        slices = Cache(EndpointSlice, signal_)
        nodes = Cache(Node, signal_)
        namespaces = Cache(Namespace, signal_)
        gateways = Cache(Gateway, signal_)
        accounts = Cache(ServiceAccount, signal_)
        caches: tuple[Cache[Any], ...] = (pods, deployments, services, slices, nodes,
                                           namespaces, gateways, accounts)
        for cache in caches:
            nursery.start_soon(cache.run, client)

        dns = DnsServer(services, slices)
        udp = await netns.trio_socket_in(self.names.fabric, socket.AF_INET, socket.SOCK_DGRAM)
        await udp.bind((gateway, network.DNS_FABRIC_PORT))
        nursery.start_soon(dns.serve_udp, udp)
        nursery.start_soon(dns.serve_tcp, await netns.listen_in(
            self.names.fabric, gateway, network.DNS_FABRIC_PORT))

        proxy = KubeProxy({network.node_name(i): (self.names.node(i), network.pod_gateway(i))
                           for i in range(self.nodes)}, services, slices)
        controllers: list[tuple[str, Any]] = [
            ("deployments", DeploymentController(client, deployments, pods, nodes, namespaces)),
            ("endpoints", EndpointsController(client, services, pods, slices, nodes)),
            ("namespaces", NamespaceController(client, namespaces)),
            ("gateways", GatewayController(client, gateways, services, deployments,
                                           accounts)),
            ("kube-proxy", proxy), ("dns", dns)]
        for i in range(self.nodes):
            kubelet = Kubelet(client=client, names=self.names, index=i, state_dir=self.state_dir,
                              pods=pods, api_host=network.KUBERNETES_VIP,
                              api_port=network.KUBERNETES_PORT)
            await nursery.start(kubelet.run)
            controllers.append((f"kubelet/{network.node_name(i)}", kubelet))
        for name, controller in controllers:
            nursery.start_soon(reconcile_forever, name, signal_, controller.reconcile)
        ca_dir = ensure_ca(self.state_dir)
        for i in range(self.nodes):
            node = network.node_name(i)
            nursery.start_soon(run_ztunnel, node, server, ca_dir,
                               str(netns.netns_path(self.names.node(i))),
                               self.state_dir / "logs" / f"ztunnel-{node}.log")

        for cache in caches:
            await cache.synced.wait()
        # Ready means a pod could resolve and reach kube-dns right now.
        await proxy.synced.wait()
        await dns.synced.wait()
        await wait_ztunnels_ready([self.names.node(i) for i in range(self.nodes)])
        self.publish(ready=True)
        log.info("cluster_ready", name=self.name, nodes=self.nodes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.supervisor")
    parser.add_argument("--name", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--state-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    configure()
    supervisor = Supervisor(args.name, args.nodes, args.state_dir)
    try:
        trio.run(supervisor.run)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
