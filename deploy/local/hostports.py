"""Host ports for an ingress gateway of the local cluster.

The gateway's pod lives in a pod network namespace that the host cannot route to.
This small forwarder runs in the host's namespace: for every HTTP/HTTPS listener port
of the Gateway it listens on ``127.0.0.1:<host port>``, and for every connection it
opens a socket *created inside the cluster's fabric namespace* (which routes every
pod CIDR), connects it to a Ready gateway pod at the listener port, and copies bytes
both ways, each direction closed on its own.

It writes ``{"pid", "forwards": {listener port: "127.0.0.1:P"}}`` to ``--state``
(a path under the cluster's state directory, so ``ambientctl cluster down`` kills it
with the cluster's other helpers) and exits by itself when the fabric namespace is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import trio

from common.errors import KubeApiError, MeshError
from common.kube import Gateway, KubeClient, KubeConfig, Pod
from common.logging import configure, get_logger
from deploy.gateway_objects import listener_ports
from deploy.local import cluster, netns
from deploy.local.network import Names
from deploy.waypoint_objects import GATEWAY_NAME_LABEL, pod_ready

_log = get_logger("local.hostports")

CONNECT_TIMEOUT = 5.0
CHUNK = 65536
#: How often the forwarder checks that its cluster still exists.
ALIVE_POLL = 2.0


async def _pump(src: trio.abc.Stream, dst: trio.SocketStream) -> None:
    try:
        while data := await src.receive_some(CHUNK):
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await dst.send_eof()


class Forwarder:
    def __init__(self, client: KubeClient, fabric: str, namespace: str, name: str) -> None:
        self.client = client
        self.fabric = fabric
        self.namespace = namespace
        self.name = name

    async def pod_ip(self) -> str | None:
        pods = await self.client.list(Pod, self.namespace,
                                      label_selector=f"{GATEWAY_NAME_LABEL}={self.name}")
        ready = [p for p in pods.items if pod_ready(p) and p.status.pod_ip]
        return ready[0].status.pod_ip if ready else None

    async def handle(self, down: trio.SocketStream, port: int) -> None:
        async with down:
            try:
                ip = await self.pod_ip()
            except KubeApiError as exc:
                _log.warning("cannot find the gateway pod", reason=str(exc))
                return
            if ip is None:
                _log.warning("no Ready gateway pod", gateway=f"{self.namespace}/{self.name}")
                return
            sock = await netns.trio_socket_in(self.fabric)
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    await sock.connect((ip, port))
            except (OSError, trio.TooSlowError) as exc:
                sock.close()
                _log.warning("gateway pod unreachable", pod=f"{ip}:{port}", reason=str(exc))
                return
            async with trio.SocketStream(sock) as up, trio.open_nursery() as nursery:
                nursery.start_soon(_pump, down, up)
                nursery.start_soon(_pump, up, down)

    async def serve(self, port: int, listener: trio.SocketListener) -> None:
        async def handler(stream: trio.SocketStream) -> None:
            await self.handle(stream, port)
        await trio.serve_listeners(handler, [listener])


async def run(cluster_name: str, namespace: str, name: str, state: Path,
              host_ports: dict[int, int]) -> None:
    server = str(cluster.read_state(cluster_name)["server"])
    fabric = Names(cluster_name).fabric
    async with KubeClient(KubeConfig.for_server(server)) as client:
        gw = await client.get(Gateway, name, namespace)
        forwarder = Forwarder(client, fabric, namespace, name)
        forwards: dict[str, str] = {}
        async with trio.open_nursery() as nursery:
            for port in listener_ports(gw.spec):
                (listener,) = await trio.open_tcp_listeners(host_ports.get(port, 0),
                                                            host="127.0.0.1")
                bound = listener.socket.getsockname()[1]
                forwards[str(port)] = f"127.0.0.1:{bound}"
                nursery.start_soon(forwarder.serve, port, listener)
            tmp = state.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), "forwards": forwards}))
            tmp.replace(state)
            _log.info("forwarding", gateway=f"{namespace}/{name}", forwards=forwards)
            # A namespace's removal sends no event to wait on: poll.
            while netns.exists(fabric):  # noqa: ASYNC110
                await trio.sleep(ALIVE_POLL)
            _log.info("cluster gone; stopping")
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.hostports")
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--port", action="append", default=[],
                        help="LISTENER:HOST fixed host port for a listener (default: any)")
    args = parser.parse_args(argv)
    configure(None)
    fixed = {int(a.split(":")[0]): int(a.split(":")[1]) for a in args.port}
    try:
        trio.run(run, args.cluster, args.namespace, args.name, args.state, fixed)
    except MeshError as exc:
        print(f"hostports: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
