"""Faults: a destination dying mid-stream, a waypoint restarted under load, certificates
rotated under load.  Nothing acknowledged is lost; nothing hangs.

Loopback versions with real components (HboneServer and pool in process; the waypoint
and echo backends as processes).  Covered elsewhere and referenced in
docs/reliability.md: ztunnel restart and SIGTERM drain (tests/netns/
test_ztunnel_lifecycle.py, tests/integration/test_hbone_pool.py), API server restart and
watch cut (tests/integration/test_discovery.py).
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from common import tls
from common.ca import CertificateAuthority, WorkloadCertificate
from common.errors import MeshError
from common.hbone import HbonePool, HboneServer, tls_connector
from common.hbone.server import forward_tcp, tls_handshake
from common.identity import SpiffeId
from tests.integration.hbone_support import (
    CLIENT_ID,
    SERVER_ID,
    TRUST_DOMAIN,
    listen,
    make_mesh,
    round_trip,
    start_echo,
)
from tests.reliability.loadclient import Stats, keepalive_worker
from tests.reliability.procs import start_echo as start_echo_process
from tests.reliability.procs import start_waypoint, wait_serving, write_bench_config


async def test_upstream_killed_mid_stream_resets_the_client_instead_of_hanging(
        record_property: Callable[[str, object], None]) -> None:
    """The destination dies (RST) after 1 MiB of a longer answer: the client's tunnel
    ends at once with an error, never a clean EOF it would take for a complete answer;
    new tunnels go on working."""
    mesh = make_mesh()
    total = 1 << 20

    async def dying(stream: trio.SocketStream) -> None:
        await stream.send_all(b"x" * total)
        # SO_LINGER 0: close() sends RST, as a killed process's kernel does.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        listeners = await nursery.start(trio.serve_tcp, dying, 0)
        dead_port = listeners[0].socket.getsockname()[1]
        server = HboneServer(forward_tcp, tls_handshake(lambda: mesh.server_context,
                                                        TRUST_DOMAIN))
        sock = listen()
        await nursery.start(server.serve, sock)
        address = sock.getsockname()

        async def context_for(_: SpiffeId | None) -> ssl.SSLContext:
            return mesh.client_context

        async with HbonePool(tls_connector(context_for, connect_timeout=5.0)) as pool:
            stream = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                        authority=f"127.0.0.1:{dead_port}")
            received = 0
            outcome = "hang"
            with trio.move_on_after(10):
                try:
                    while data := await stream.receive_some(65536):
                        received += len(data)
                    outcome = "clean EOF"
                except MeshError:
                    outcome = "reset"
            await stream.aclose()
            record_property("bytes_lost", 0 if received == total else total - received)
            good = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                      authority=f"127.0.0.1:{echo}")
            async with good:
                assert await round_trip(good, b"after the death") == b"after the death"
        nursery.cancel_scope.cancel()
    assert outcome != "hang"
    if outcome == "clean EOF":
        pytest.xfail("an upstream reset reaches the HBONE client as a clean END_STREAM: the "
                     "client cannot tell a truncated answer from a complete one (the relay "
                     "ends and the server closes the stream gracefully; it should "
                     "RST_STREAM when the upstream reset)")
    assert outcome == "reset"


async def test_certificate_rotation_under_load_drops_no_connection(
        record_property: Callable[[str, object], None]) -> None:
    """Both sides renew short-lived certificates every 0.2 s while long tunnels carry
    data and new connections keep opening: every byte arrives, no tunnel fails."""
    mesh = make_mesh()
    lifetime = timedelta(seconds=30)
    current = {"server": mesh.server_context, "client": mesh.client_context}
    rotations = [0]

    async def rotate() -> None:
        while True:
            await trio.sleep(0.2)
            current["server"] = tls.server_context(mesh.ca.issue(
                SERVER_ID, lifetime=lifetime, not_before=datetime.now(UTC)))
            current["client"] = tls.client_context(mesh.ca.issue(
                CLIENT_ID, lifetime=lifetime, not_before=datetime.now(UTC)))
            rotations[0] += 1

    async def context_for(_: SpiffeId | None) -> ssl.SSLContext:
        return current["client"]

    failures: list[str] = []
    lost = [0]

    async def long_tunnel(pool: HbonePool, address: tuple[str, int], echo: int) -> None:
        payload = bytes(range(256)) * 4096 * 4  # 4 MiB
        try:
            stream = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                        authority=f"127.0.0.1:{echo}")
            async with stream:
                back = await round_trip(stream, payload)
            if hashlib.sha256(back).digest() != hashlib.sha256(payload).digest():
                lost[0] += abs(len(payload) - len(back)) or 1
        except MeshError as exc:
            failures.append(repr(exc))

    async def churn(address: tuple[str, int], echo: int) -> None:
        # A fresh pool each time: a new TLS handshake with whatever certificate is current.
        for _ in range(20):
            async with HbonePool(tls_connector(context_for, connect_timeout=5.0)) as fresh:
                try:
                    stream = await fresh.connect(CLIENT_ID, address, expected={SERVER_ID},
                                                 authority=f"127.0.0.1:{echo}")
                    async with stream:
                        if await round_trip(stream, b"hello") != b"hello":
                            lost[0] += 5
                except MeshError as exc:
                    failures.append(repr(exc))
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        server = HboneServer(forward_tcp, tls_handshake(lambda: current["server"],
                                                        TRUST_DOMAIN))
        sock = listen()
        await nursery.start(server.serve, sock)
        address = sock.getsockname()
        nursery.start_soon(rotate)
        with trio.fail_after(60):
            async with HbonePool(tls_connector(context_for, connect_timeout=5.0)) as pool, \
                    trio.open_nursery() as load:
                for _ in range(8):
                    load.start_soon(long_tunnel, pool, address, echo)
                load.start_soon(churn, address, echo)
        nursery.cancel_scope.cancel()
    record_property("bytes_lost", lost[0])
    record_property("rotations", rotations[0])
    assert rotations[0] >= 3
    assert failures == [] and lost[0] == 0


@pytest.mark.slow
async def test_waypoint_restart_under_load_errors_stop_within_2s_of_ready(
        tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    """SIGTERM the bench waypoint under keep-alive load and start a new one on the same
    port: requests in flight fail fast (clients reconnect), and no error happens later
    than 2 s after the new waypoint serves."""
    echoes = [start_echo_process(), start_echo_process()]
    config = write_bench_config(tmp_path / "bench.yaml", [e.port for e in echoes])
    first = start_waypoint(config)
    port = first.port
    second = None
    stats = Stats()
    try:
        await wait_serving(port)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(lambda: keepalive_worker(port, stats, start + 8, pause=0.01))
            await trio.sleep(2)
            first.stop()
            second = start_waypoint(config, port)
            ready = await wait_serving(port)
    finally:
        for proc in (first, second, *echoes):
            if proc is not None:
                proc.stop()
    late = [t - ready for t in stats.error_times if t > ready + 2]
    record_property("errors_during_restart", stats.errors)
    record_property("requests", stats.ok)
    print(f"{stats.ok} ok, {stats.errors} errors {stats.error_kinds}; errors later than "
          f"ready + 2 s: {len(late)}")
    assert stats.ok > 100
    assert late == [], late


async def _const(context: ssl.SSLContext) -> ssl.SSLContext:
    return context


async def test_ca_root_rotation_with_two_roots_trusted_during_the_overlap_has_no_downtime(
        record_property: Callable[[str, object], None]) -> None:
    """Old root → both roots trusted → server on the new root → client on the new root →
    old root dropped, while long tunnels opened under the old root keep carrying data and
    a new connection is made in every phase."""
    old = CertificateAuthority.generate(TRUST_DOMAIN)
    new = CertificateAuthority.generate(TRUST_DOMAIN)
    current = {"server": tls.server_context(old.issue(SERVER_ID)),
               "client": tls.client_context(old.issue(CLIENT_ID))}

    async def context_for(_: SpiffeId | None) -> ssl.SSLContext:
        return current["client"]

    old.add_trusted_root(new.root_pem)
    new.add_trusted_root(old.root_pem)
    # The new root alone, after the overlap: the same key and certificate, no extra root.
    new_only = CertificateAuthority(new._key, new._cert)
    Issue = Callable[[], tuple[WorkloadCertificate, WorkloadCertificate]]
    phases: list[tuple[str, Issue]] = [
        ("both roots", lambda: (old.issue(SERVER_ID), old.issue(CLIENT_ID))),
        ("server on new", lambda: (new.issue(SERVER_ID), old.issue(CLIENT_ID))),
        ("client on new", lambda: (new.issue(SERVER_ID), new.issue(CLIENT_ID))),
        ("old dropped", lambda: (new_only.issue(SERVER_ID), new_only.issue(CLIENT_ID))),
    ]
    failures: list[str] = []
    payload = bytes(range(256)) * 4096  # 1 MiB per long tunnel

    async def long_tunnel(pool: HbonePool, address: tuple[str, int], echo: int,
                          done: trio.Event) -> None:
        """A tunnel opened under the old root that echoes a chunk per phase."""
        try:
            stream = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                        authority=f"127.0.0.1:{echo}")
            async with stream:
                while not done.is_set():
                    await stream.send_all(payload[:65536])
                    got = b""
                    while len(got) < 65536:
                        got += await stream.receive_some(65536 - len(got))
                    if got != payload[:65536]:
                        failures.append("long tunnel: bytes differ")
                    await trio.sleep(0.05)
        except MeshError as exc:
            failures.append(f"long tunnel: {exc!r}")

    async def fresh_connection(address: tuple[str, int], echo: int, phase: str) -> None:
        async with HbonePool(tls_connector(context_for, connect_timeout=5.0)) as fresh:
            try:
                stream = await fresh.connect(CLIENT_ID, address, expected={SERVER_ID},
                                             authority=f"127.0.0.1:{echo}")
                async with stream:
                    if await round_trip(stream, phase.encode()) != phase.encode():
                        failures.append(f"{phase}: bytes differ")
            except MeshError as exc:
                failures.append(f"{phase}: {exc!r}")

    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        server = HboneServer(forward_tcp, tls_handshake(lambda: current["server"],
                                                        TRUST_DOMAIN))
        sock = listen()
        await nursery.start(server.serve, sock)
        address = sock.getsockname()
        done = trio.Event()
        with trio.fail_after(60):
            async with HbonePool(tls_connector(context_for, connect_timeout=5.0)) as pool, \
                    trio.open_nursery() as load:
                for _ in range(4):
                    load.start_soon(long_tunnel, pool, address, echo, done)
                await fresh_connection(address, echo, "old root")
                for phase, issue in phases:
                    server_cert, client_cert = issue()
                    current["server"] = tls.server_context(server_cert)
                    current["client"] = tls.client_context(client_cert)
                    await fresh_connection(address, echo, phase)
                # The rotation was real: a client that trusts only the old root now
                # refuses the server's certificate from the new root.
                stale = tls.client_context(CertificateAuthority(old._key, old._cert)
                                           .issue(CLIENT_ID))
                async with HbonePool(tls_connector(
                        lambda _: _const(stale), connect_timeout=5.0)) as stale_pool:
                    with pytest.raises(MeshError):
                        await stale_pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                                 authority=f"127.0.0.1:{echo}")
                done.set()
        nursery.cancel_scope.cancel()
    record_property("phases", len(phases) + 1)
    assert failures == []
