"""The mesh CA Secret on Kubernetes: created on first start, shared by every ztunnel."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.ca import CertificateAuthority
from common.errors import CertificateError
from common.kube import KubeClient, KubeConfig
from ztunnel.k8s_ca import load_or_create_ca, main, secret_for

PATH = "/api/v1/namespaces/ambient-system/secrets"


class FakeSecrets:
    """An API server holding Secrets in ambient-system; ``winner`` is created by
    "another ztunnel" just before our create arrives."""

    def __init__(self, winner: dict[str, Any] | None = None, forbid: bool = False) -> None:
        self.stored: dict[str, dict[str, Any]] = {}
        self.winner = winner
        self.forbid = forbid
        self.creates = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.forbid:
            return _status(403, "Forbidden", 'secrets "ambient-ca" is forbidden')
        if request.method == "GET" and request.url.path.startswith(PATH + "/"):
            name = request.url.path.rsplit("/", 1)[1]
            if name in self.stored:
                return httpx.Response(200, json=self.stored[name])
            return _status(404, "NotFound", f'secrets "{name}" not found')
        if request.method == "POST" and request.url.path == PATH:
            self.creates += 1
            body = json.loads(request.content)
            name = body["metadata"]["name"]
            if self.winner is not None:
                self.stored[name] = self.winner
                return _status(409, "AlreadyExists", f'secrets "{name}" already exists')
            body["metadata"]["uid"] = "u-1"
            self.stored[name] = body
            return httpx.Response(201, json=body)
        return _status(405, "MethodNotAllowed", request.method)


def _status(code: int, reason: str, message: str) -> httpx.Response:
    return httpx.Response(code, json={"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "code": code, "reason": reason, "message": message})


def _client(api: FakeSecrets) -> KubeClient:
    return KubeClient(KubeConfig.for_server("http://apiserver.test"),
                      transport=httpx.MockTransport(api))


async def test_first_start_creates_the_secret_and_writes_private_files(tmp_path: Path) -> None:
    api = FakeSecrets()
    async with _client(api) as client:
        ca = await load_or_create_ca(client, tmp_path / "ca")
    assert api.creates == 1
    stored = api.stored["ambient-ca"]
    assert set(stored["data"]) == {"ca.pem", "ca.key"}
    assert base64.b64decode(stored["data"]["ca.pem"]) == ca.root_pem
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    assert CertificateAuthority.load(tmp_path / "ca").root_pem == ca.root_pem


async def test_a_later_start_loads_the_same_root_without_creating(tmp_path: Path) -> None:
    api = FakeSecrets()
    async with _client(api) as client:
        first = await load_or_create_ca(client, tmp_path / "a")
        second = await load_or_create_ca(client, tmp_path / "b")
    assert api.creates == 1 and second.root_pem == first.root_pem


async def test_losing_the_create_race_uses_the_winners_root(tmp_path: Path) -> None:
    theirs = CertificateAuthority.generate("cluster.local")
    api = FakeSecrets(winner=secret_for(theirs).to_dict())
    async with _client(api) as client:
        ca = await load_or_create_ca(client, tmp_path)
    assert api.creates == 1 and ca.root_pem == theirs.root_pem


async def test_forbidden_names_the_role_to_check(tmp_path: Path) -> None:
    async with _client(FakeSecrets(forbid=True)) as client:
        with pytest.raises(CertificateError, match="ztunnel-ca"):
            await load_or_create_ca(client, tmp_path)


async def test_a_secret_without_a_key_is_refused_with_a_way_out(tmp_path: Path) -> None:
    api = FakeSecrets()
    api.stored["ambient-ca"] = {"apiVersion": "v1", "kind": "Secret",
                                "metadata": {"name": "ambient-ca",
                                             "namespace": "ambient-system"},
                                "data": {"ca.pem": base64.b64encode(b"x").decode()}}
    async with _client(api) as client:
        with pytest.raises(CertificateError, match="delete it"):
            await load_or_create_ca(client, tmp_path)


async def test_a_plug_in_ca_in_istio_layout_is_used(tmp_path: Path) -> None:
    root = CertificateAuthority.generate("cluster.local")
    intermediate = root.intermediate()
    api = FakeSecrets()
    api.stored["ambient-ca"] = secret_for(intermediate).to_dict()
    assert "ca-cert.pem" in api.stored["ambient-ca"]["data"]
    async with _client(api) as client:
        ca = await load_or_create_ca(client, tmp_path)
    assert ca.root_pem == root.root_pem and not ca.is_root


async def test_files_of_an_earlier_secret_do_not_linger(tmp_path: Path) -> None:
    CertificateAuthority.generate("cluster.local").intermediate().save(tmp_path)
    assert (tmp_path / "ca-cert.pem").exists()  # a plug-in CA written by an earlier start
    api = FakeSecrets()
    async with _client(api) as client:
        ca = await load_or_create_ca(client, tmp_path)
    assert ca.is_root and not (tmp_path / "ca-cert.pem").exists()
    assert base64.b64decode(api.stored["ambient-ca"]["data"]["ca.pem"]) == ca.root_pem


async def test_another_trust_domain_is_refused(tmp_path: Path) -> None:
    api = FakeSecrets()
    api.stored["ambient-ca"] = secret_for(CertificateAuthority.generate("other.mesh")).to_dict()
    async with _client(api) as client:
        with pytest.raises(CertificateError, match=r"other\.mesh"):
            await load_or_create_ca(client, tmp_path)


def test_the_init_container_command_fails_clearly_without_an_api_server(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--server", "http://127.0.0.1:9"]) == 1
    assert "cannot reach the API server" in capsys.readouterr().err
