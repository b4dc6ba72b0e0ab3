"""A private redis-server for tests: loopback (or a given address), no persistence.

Started with its configuration on the command line (no file under /etc is read),
``--save ''`` and ``--appendonly no`` so nothing is written, and its working
directory in the test's tmp_path.  :meth:`RedisServer.kill` is SIGKILL, for
fail-mode tests; :meth:`stop` is the teardown.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
import trio

REDIS_SERVER = Path("/usr/bin/redis-server")

needs_redis = pytest.mark.skipif(not REDIS_SERVER.exists(),
                                 reason="redis-server not installed (scripts/bootstrap.sh "
                                 "installs the Debian package redis-server)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int | None = None,
                 netns: str | None = None) -> None:
        """``netns``: a named network namespace to run in (e.g. the local cluster's fabric,
        which every pod can reach); then ``port`` must be given."""
        self.host = host
        self.port = port or free_port(host)
        self.workdir = workdir
        self.netns = netns
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def spawn(self) -> subprocess.Popen[bytes]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "redis.log", "wb") as log:
            prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
            self.proc = subprocess.Popen(
                [*prefix, str(REDIS_SERVER), "--bind", self.host, "--port", str(self.port),
                 "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                 "--daemonize", "no", "--protected-mode", "no", "--loglevel", "warning"],
                stdout=log, stderr=subprocess.STDOUT)
        return self.proc

    async def start(self) -> RedisServer:
        """Spawn and wait (bounded) until it answers PING."""
        self.spawn()
        assert self.proc is not None
        with trio.fail_after(10):
            while not await self._pong():
                if self.proc.poll() is not None:
                    raise RuntimeError("redis-server exited: "
                                       + (self.workdir / "redis.log").read_text())
                await trio.sleep(0.05)
        return self

    async def _pong(self) -> bool:
        try:
            if self.netns is None:
                stream = await trio.open_tcp_stream(self.host, self.port)
            else:
                from deploy.local import netns
                sock = await netns.trio_socket_in(self.netns)
                try:
                    await sock.connect((self.host, self.port))
                except OSError:
                    sock.close()
                    raise
                stream = trio.SocketStream(sock)
        except OSError:
            return False
        async with stream:
            await stream.send_all(b"PING\r\n")
            return (await stream.receive_some(64)).startswith(b"+PONG")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
