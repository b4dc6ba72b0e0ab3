from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from common.errors import ConfigError
from common.kube.config import KubeConfig, from_kubeconfig, in_cluster, load_config


def write_kubeconfig(path: Path, user: dict[str, object], cluster: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dev",
        "clusters": [{"name": "c1", "cluster": cluster}],
        "users": [{"name": "u1", "user": user}],
        "contexts": [{"name": "dev", "context": {"cluster": "c1", "user": "u1",
                                                 "namespace": "demo"}},
                     {"name": "other", "context": {"cluster": "c1", "user": "u1"}}],
    }))
    return path


def test_kubeconfig_token_and_ca_data(tmp_path: Path) -> None:
    ca = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nX\n").decode()
    path = write_kubeconfig(tmp_path / "config", {"token": "abc"},
                            {"server": "https://10.0.0.1:6443/",
                             "certificate-authority-data": ca})
    cfg = from_kubeconfig([path])
    assert cfg.server == "https://10.0.0.1:6443" and cfg.token == "abc"
    assert cfg.namespace == "demo" and cfg.ca_data == "-----BEGIN CERTIFICATE-----\nX\n"
    assert from_kubeconfig([path], context="other").namespace == "default"


def test_kubeconfig_relative_files_resolve_against_its_directory(tmp_path: Path) -> None:
    path = write_kubeconfig(tmp_path / "config",
                            {"client-certificate": "certs/c.pem", "client-key": "certs/k.pem"},
                            {"server": "https://k:6443", "certificate-authority": "ca.pem"})
    cfg = from_kubeconfig([path])
    assert cfg.ca_file == str(tmp_path / "ca.pem")
    assert cfg.client_cert_file == str(tmp_path / "certs/c.pem")


def test_kubeconfig_exec_plugin_is_refused_with_a_reason(tmp_path: Path) -> None:
    path = write_kubeconfig(tmp_path / "config", {"exec": {"command": "aws"}},
                            {"server": "https://k:6443"})
    with pytest.raises(ConfigError, match="exec or auth-provider plugin"):
        from_kubeconfig([path])


def test_missing_kubeconfig_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--server"):
        from_kubeconfig([tmp_path / "absent"])


def test_in_cluster_reads_service_account_files(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("tok\n")
    (tmp_path / "namespace").write_text("istio-system")
    (tmp_path / "ca.crt").write_text("pem")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    cfg = in_cluster(env, tmp_path)
    assert cfg is not None and cfg.server == "https://10.96.0.1:443"
    assert cfg.namespace == "istio-system" and cfg.token_file == str(tmp_path / "token")
    assert in_cluster({}, tmp_path) is None
    v6 = in_cluster({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"},
                    tmp_path)
    assert v6 is not None and v6.server == "https://[fd00::1]:443"


def test_explicit_server_wins_and_must_be_a_url() -> None:
    assert load_config("http://127.0.0.1:8080").server == "http://127.0.0.1:8080"
    assert KubeConfig.for_server("http://x:1").ssl_context() is None
    with pytest.raises(ConfigError):
        load_config("127.0.0.1:8080")
