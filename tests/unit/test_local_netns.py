"""The setns helper: a socket opened through it lives in the other namespace."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
import trio

from deploy.local import netns

pytestmark = [pytest.mark.netns]


@pytest.fixture
def scratch_netns() -> Iterator[str]:
    name = f"pa-unit{os.getpid()}-fabric"
    netns.add(name)
    try:
        yield name
    finally:
        netns.delete(name)


async def test_listener_opened_in_a_namespace_stays_there(scratch_netns: str) -> None:
    listener = await netns.listen_in(scratch_netns, "127.0.0.1", 0)
    port = listener.socket.getsockname()[1]
    async with listener:
        # From the host namespace nothing listens on that port...
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)

        # ...but a socket made inside the namespace reaches it.
        def connect_inside() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                return sock.recv(2)

        async with trio.open_nursery() as nursery:
            async def serve_one() -> None:
                stream = await listener.accept()
                await stream.send_all(b"ok")
                await stream.aclose()
            nursery.start_soon(serve_one)
            got = await trio.to_thread.run_sync(netns.in_netns, scratch_netns, connect_inside)
        assert got == b"ok"


def test_pids_in_finds_processes_of_a_namespace(scratch_netns: str) -> None:
    inode = netns.inode(scratch_netns)
    assert inode is not None
    assert os.getpid() not in netns.pids_in({inode})
