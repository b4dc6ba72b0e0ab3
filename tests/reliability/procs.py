"""Processes for the fault and load tests: an echo backend and a bench-mode waypoint,
each a real process on loopback (so a test can kill, restart and measure them)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import trio
import yaml

from tests.reliability.support import http_get

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Proc:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


async def wait_serving(port: int, within: float = 20.0) -> float:
    """Poll until a GET through ``port`` answers 200; returns the trio time it did."""
    with trio.fail_after(within):
        while True:
            try:
                if (await http_get(port, "/ready", within=2.0)).status == 200:
                    return trio.current_time()
            except (OSError, trio.TooSlowError, ValueError, IndexError):
                pass
            await trio.sleep(0.02)


def start_echo(port: int | None = None) -> Proc:
    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "deploy.local.echo", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "POD_NAME": f"echo-{port}"})
    return Proc(process, port)


def write_bench_config(path: Path, backends: list[int]) -> Path:
    path.write_text(yaml.safe_dump({
        "namespace": "bench", "destination": "10.96.0.1:80",
        "services": [{"name": "backend", "ports": [80], "vips": ["10.96.0.1"],
                      "endpoints": [{"address": f"127.0.0.1:{p}"} for p in backends]}]}))
    return path


def start_waypoint(config: Path, port: int | None = None) -> Proc:
    """The waypoint's log (info level) goes to ``waypoint-<port>.log`` beside ``config``."""
    port = port or free_port()
    log = (config.parent / f"waypoint-{port}.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "waypoint", "--name", "waypoint", "--namespace", "bench",
         "--bench-config", str(config), "--bench-listen", f"127.0.0.1:{port}",
         "--no-access-log", "--log-level", "info"],
        cwd=REPO, stdout=log, stderr=log)
    log.close()
    return Proc(process, port)
