"""One enrolled pod: its listeners inside its network namespace and its HBONE pool.

:meth:`EnrolledPod.run` fetches the pod's certificate, opens 15001 (outbound), 15006
(inbound plaintext) and 15008 (inbound HBONE) inside the pod's namespace, starts any
extra per-pod services (:data:`PodHook`, e.g. the DNS proxy and SOCKS5 listener), and
serves until its cancel scope is cancelled (the pod left the mesh) or it is drained
(ztunnel is stopping).  The pool's connections are dialled from the pod's namespace
with the pod's identity, so a tunnel leaves with the pod's IP; they are shared by every
connection from this pod to the same destination and identity (DESIGN.md section 4).
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Sequence

import trio

from common.errors import ConnectRefusedError, ConnectTimeoutError
from common.hbone import HbonePool, HboneServer, PoolKey, tls_handshake
from common.hbone.client import HBONE_PORT
from common.hbone.client import Transport as PoolTransport
from common.identity import SpiffeId
from common.logging import get_logger
from common.model import Snapshot, Workload
from common.tls import connect_tls
from ztunnel.proxy.dial import PodNetns, accept, family_of, reset
from ztunnel.proxy.inbound import inbound_handler
from ztunnel.proxy.outbound import handle_outbound
from ztunnel.proxy.passthrough import handle_plaintext
from ztunnel.proxy.state import ProxyState

PodHook = Callable[["EnrolledPod"], Awaitable[None]]
"""A per-pod service started with the pod's listeners and cancelled with them.

It receives the pod (``pod.netns.listen(...)`` opens sockets in the pod's namespace,
``pod.state`` is the shared state, ``pod.current()`` the pod's newest Workload) and runs
until cancelled.  ztunnel's DNS proxy (15053) and SOCKS5 listener (15080) plug in here.
"""

ConnectionHandler = Callable[["EnrolledPod", socket.socket, tuple[str, int]], Awaitable[None]]


class EnrolledPod:
    """The listeners and pool of one captured pod on this node."""

    def __init__(self, state: ProxyState, workload: Workload, *,
                 hooks: Sequence[PodHook] = ()) -> None:
        if workload.netns is None:
            raise ValueError(f"pod {workload.namespace}/{workload.name} has no netns")
        self.state = state
        self.workload = workload
        self.uid = workload.uid
        self.name = f"{workload.namespace}/{workload.name}"
        self.hooks = tuple(hooks)
        self.netns = PodNetns(workload.netns)
        self.scope = trio.CancelScope()
        self.log = get_logger("ztunnel.pod").bind(pod=self.name)
        self.ready = trio.Event()
        self._pool: HbonePool | None = None
        self._server: HboneServer | None = None
        self._accept_scopes: list[trio.CancelScope] = []
        self._draining = False
        self._active = 0
        self._idle = trio.lowlevel.ParkingLot()
        self.listen_ports: dict[str, int] = {}

    @property
    def identity(self) -> SpiffeId:
        return self.workload.identity

    @property
    def pool(self) -> HbonePool:
        assert self._pool is not None, "the pod is not running"
        return self._pool

    def current(self, snapshot: Snapshot | None = None) -> Workload:
        """The pod as the newest snapshot has it (labels may have changed since enrolment)."""
        snap = snapshot if snapshot is not None else self.state.snapshot()
        return snap.workloads_by_uid.get(self.uid, self.workload)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve the pod until :attr:`scope` is cancelled; ``started`` once listening."""
        state = self.state
        cfg = state.config
        listeners: list[socket.socket] = []
        try:
            with self.scope:
                await state.certs.get(self.identity)
                hosts = ["0.0.0.0"] + (["::"] if any(":" in ip for ip in self.workload.ips)
                                       else [])
                for host in hosts:
                    for role, port in (("outbound", cfg.outbound_port),
                                       ("inbound_plaintext", cfg.inbound_plaintext_port),
                                       ("inbound_hbone", cfg.inbound_hbone_port)):
                        sock = self.netns.listen(host, port)
                        listeners.append(sock)
                        self.listen_ports[role] = sock.getsockname()[1]
                trust_domain = self.identity.trust_domain
                self._server = HboneServer(
                    inbound_handler(self),
                    tls_handshake(lambda: state.certs.server_context(self.identity),
                                  trust_domain, timeout=cfg.handshake_timeout),
                    handshake_timeout=cfg.handshake_timeout,
                    on_refused=state.metrics.hbone_refused)
                async with HbonePool(self._connect, idle_timeout=cfg.hbone_idle_timeout
                                     ) as pool, trio.open_nursery() as nursery:
                    self._pool = pool
                    per_host = 3
                    for i in range(0, len(listeners), per_host):
                        out_l, plain_l, hbone_l = listeners[i:i + per_host]
                        await nursery.start(self._server.serve, hbone_l)
                        nursery.start_soon(self._accept_loop, out_l, handle_outbound, nursery)
                        nursery.start_soon(self._accept_loop, plain_l, handle_plaintext,
                                           nursery)
                    for hook in self.hooks:
                        nursery.start_soon(hook, self)
                    self.log.info("pod enrolled", netns=self.netns.path,
                                  identity=str(self.identity), ips=list(self.workload.ips))
                    self.ready.set()
                    task_status.started()
        finally:
            for sock in listeners:
                sock.close()
            self.netns.close()
            self._pool = None
            self.log.info("pod listeners closed")

    def close(self) -> None:
        """Stop serving at once: listeners closed, live connections cancelled."""
        self.scope.cancel()

    async def drain(self, grace: float) -> None:
        """Stop accepting; let connections finish for up to ``grace`` s; then cancel."""
        self._draining = True
        for scope in self._accept_scopes:
            scope.cancel()
        with trio.move_on_after(grace):
            async with trio.open_nursery() as nursery:
                if self._server is not None:
                    nursery.start_soon(self._server.drain, grace)
                while self._active:
                    await self._idle.park()
        self.scope.cancel()

    async def _accept_loop(self, listener: socket.socket, handler: ConnectionHandler,
                           nursery: trio.Nursery) -> None:
        with trio.CancelScope() as scope:
            self._accept_scopes.append(scope)
            if self._draining:
                return
            while True:
                sock, address = await accept(listener)
                self._active += 1
                nursery.start_soon(self._handle, handler, sock, address)

    async def _handle(self, handler: ConnectionHandler, sock: socket.socket,
                      address: tuple[str, int]) -> None:
        try:
            await handler(self, sock, address)
        except Exception as exc:
            # A bug or an unforeseen OS error costs this connection only, never the
            # pod's listeners.
            self.log.error("connection handler failed", src=address, error=repr(exc),
                           exc_info=exc)
            reset(sock)
        finally:
            sock.close()  # no-op when the handler took it over
            self._active -= 1
            if not self._active:
                self._idle.unpark_all()

    async def _connect(self, key: PoolKey) -> tuple[PoolTransport, SpiffeId | None]:
        """The pool's connector: mTLS as the pod, from inside the pod's namespace."""
        assert key.source is not None, "pod tunnels always carry the pod's identity"
        await self.state.certs.get(key.source)
        context = self.state.certs.client_context(key.source)
        host, port = key.address
        sock = self.netns.tcp_socket(family_of(host))
        try:
            stream = await connect_tls(host, port, context, expected=key.expected or None,
                                       connect_timeout=self.state.config.connect_timeout,
                                       sock=sock)
        except (ConnectRefusedError, ConnectTimeoutError) as exc:
            if port == HBONE_PORT:
                raise type(exc)(
                    f"{exc}; is HBONE port {HBONE_PORT} blocked on {host}, e.g. by a "
                    f"NetworkPolicy, or is the destination node's ztunnel down?") from exc
            raise
        return stream, stream.peer_identity
