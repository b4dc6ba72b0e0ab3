"""``ambientctl apply|delete|get|label``: parsing and checks directly, commands end to end."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import ConfigError
from deploy import ambientctl
from deploy.ambientctl.objects import (
    check_document,
    format_table,
    load_documents,
    merged,
    parse_label_changes,
)

APP = """\
apiVersion: v1
kind: Namespace
metadata:
  name: demo
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: demo
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: app, image: ambient/echo}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: web, namespace: demo}
spec: {hosts: [web]}
"""


def test_load_documents_skips_empty_documents_and_expands_lists(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("---\n" + APP + "---\n")
    (tmp_path / "b.json").write_text('{"apiVersion": "v1", "kind": "List", "items": ['
                                     '{"apiVersion": "v1", "kind": "Pod", "metadata": '
                                     '{"name": "p"}}]}')
    (tmp_path / "notes.txt").write_text("ignored")
    docs = load_documents([str(tmp_path)])
    assert [d.body["kind"] for d in docs] == ["Namespace", "Deployment", "VirtualService", "Pod"]
    assert docs[1].where() == f"{tmp_path / 'a.yaml'} document 2 (Deployment demo/web)"


@pytest.mark.parametrize(("body", "message"), [
    ("kind: Pod\nmetadata: {name: a}", "apiVersion: required"),
    ("apiVersion: v1\nkind: Widget\nmetadata: {name: a}", "kind: unknown kind 'Widget'"),
    ("apiVersion: apps/v1\nkind: Pod\nmetadata: {name: a}", "apiVersion: 'apps/v1' does not"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {}", "metadata.name: required"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: A_b}", "metadata.name: Invalid value"),
    ("apiVersion: v1\nkind: Service\nmetadata: {name: a.b}", "metadata.name: Invalid value"),
    ("- 1", "not an object"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: 'a b'}}",
     "metadata.labels.app: Invalid value"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: a, annotations: {x: 1}}",
     "metadata.annotations.x: Invalid value"),
])
def test_check_document_names_document_and_field(body: str, message: str) -> None:
    doc = load_documents(["-"], stdin=body)[0]
    with pytest.raises(ConfigError) as err:
        check_document(doc, "default")
    assert str(err.value).startswith("<stdin> document 1")
    assert message in str(err.value)


def test_malformed_yaml_is_one_line_with_position() -> None:
    with pytest.raises(ConfigError, match=r"<stdin>: malformed YAML at line 2"):
        load_documents(["-"], stdin="a: 1\n  b: 2\n")


def test_apply_merge_is_three_way_and_keeps_other_writers_fields() -> None:
    first = {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "web", "labels": {"app": "web", "tier": "front"}},
             "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}
    # What the server holds after the first apply and a controller's writes.
    stored = merged({}, first)
    stored["metadata"].update(resourceVersion="7", uid="u1")
    stored["metadata"]["labels"]["controller"] = "added"
    stored["spec"]["clusterIP"] = "10.96.0.20"
    stored["status"] = {"loadBalancer": {}}
    second = {"apiVersion": "v1", "kind": "Service",
              "metadata": {"name": "web", "labels": {"app": "web"}},
              "spec": {"selector": {"app": "web"}, "ports": [{"port": 81}]}}
    result = merged(stored, second)
    assert result["spec"] == {"selector": {"app": "web"}, "ports": [{"port": 81}],
                              "clusterIP": "10.96.0.20"}
    assert result["metadata"]["labels"] == {"app": "web", "controller": "added"}
    assert result["metadata"]["resourceVersion"] == "7"
    assert result["status"] == {"loadBalancer": {}}
    assert merged(result, second) == result  # applying the same document again: unchanged


def test_label_changes_and_table_layout() -> None:
    assert parse_label_changes(["a=b", "c-", "d="]) == {"a": "b", "c": None, "d": ""}
    with pytest.raises(ConfigError):
        parse_label_changes(["nonsense"])
    table = {"columnDefinitions": [{"name": "Name", "priority": 0},
                                   {"name": "IP", "priority": 1}],
             "rows": [{"cells": ["web-1", "10.0.0.1"],
                       "object": {"metadata": {"namespace": "demo"}}}]}
    assert format_table(table, all_namespaces=True, wide=False) == \
        "NAMESPACE   NAME\ndemo        web-1"
    assert format_table(table, all_namespaces=False, wide=True) == \
        "NAME    IP\nweb-1   10.0.0.1"


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "deploy.local.apiserver",
                             "--db", str(tmp_path / "db.sqlite"), "--port-file", str(port_file),
                             "--log-level", "warning"])
    try:
        deadline = time.monotonic() + 15
        while not port_file.exists():
            assert proc.poll() is None, "API server exited"
            assert time.monotonic() < deadline, "API server did not start"
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        monkeypatch.setenv("AMBIENT_SERVER", url)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = ambientctl.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_apply_get_label_delete_round_trip(server: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    app = tmp_path / "app.yaml"
    app.write_text(APP)
    code, out, _ = run(capsys, "apply", "-f", str(app))
    assert code == 0 and out.splitlines() == [
        "namespace/demo created", "deployment.apps/web created",
        "virtualservice.networking.istio.io/web created"]
    code, out, _ = run(capsys, "apply", "-f", str(app))
    assert out.splitlines()[1] == "deployment.apps/web unchanged"
    app.write_text(APP.replace("replicas: 2", "replicas: 3"))
    code, out, _ = run(capsys, "apply", "-f", str(app))
    assert out.splitlines()[1] == "deployment.apps/web configured"

    code, out, _ = run(capsys, "get", "deploy", "-n", "demo")
    assert code == 0 and out.split()[:5] == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    assert "0/3" in out
    code, out, _ = run(capsys, "get", "deploy,vs", "-n", "demo")
    assert code == 0 and "deployment.apps/web" in out
    assert "virtualservice.networking.istio.io/web" in out and "\n\n" in out
    code, out, _ = run(capsys, "get", "vs", "-A", "-o", "name")
    assert out.strip() == "virtualservice.networking.istio.io/web"
    code, out, _ = run(capsys, "label", "ns", "demo", "istio.io/dataplane-mode=ambient")
    assert code == 0 and out.strip() == "namespace/demo labeled"
    code, out, _ = run(capsys, "get", "ns", "demo", "-o", "yaml")
    assert "istio.io/dataplane-mode: ambient" in out
    code, _, err = run(capsys, "label", "ns", "demo", "istio.io/dataplane-mode=none")
    assert code == 1 and "--overwrite" in err
    code, out, _ = run(capsys, "get", "ns", "-l", "istio.io/dataplane-mode=ambient")
    assert "demo" in out
    code, out, _ = run(capsys, "label", "deploy/web", "-n", "demo", "tier=front")
    assert code == 0 and out.strip() == "deployment.apps/web labeled"
    code, out, _ = run(capsys, "get", "deploy/web", "-n", "demo", "-o", "name")
    assert out.strip() == "deployment.apps/web"

    code, out, _ = run(capsys, "delete", "-f", str(app))
    assert code == 0 and len(out.splitlines()) == 3
    code, _, err = run(capsys, "get", "deploy", "-n", "demo")
    assert code == 0 and "No resources found in demo namespace." in err


def test_apply_is_all_or_nothing(server: str, capsys: pytest.CaptureFixture[str],
                                 tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(APP + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: nope}\n")
    code, out, err = run(capsys, "apply", "-f", str(bad))
    assert code == 1 and out == ""
    assert err.strip() == (f"error: {bad} document 4 (Pod nope/x): metadata.namespace: namespace "
                           "'nope' does not exist (create it first, or add a Namespace document "
                           "before this one)")
    code, _, err = run(capsys, "get", "ns")
    assert "No resources found" in err


def test_unknown_kind_and_unreachable_server_are_one_line_errors(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMBIENT_SERVER", "http://127.0.0.1:1")
    code, _, err = run(capsys, "get", "widgets")
    assert code == 1 and err.startswith("error: unknown resource type 'widgets'")
    code, _, err = run(capsys, "get", "pods")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "cannot reach the API server at http://127.0.0.1:1" in err


def test_server_comes_from_the_local_cluster_state(server: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("AMBIENT_SERVER")
    monkeypatch.delenv("AMBIENT_CLUSTER", raising=False)
    monkeypatch.setenv("AMBIENT_STATE_DIR", str(tmp_path / "state"))
    code, _, err = run(capsys, "get", "ns")
    assert code == 1 and "no local cluster named 'ambient' is up" in err and "--server" in err
    (tmp_path / "state" / "dev").mkdir(parents=True)
    (tmp_path / "state" / "dev" / "state.json").write_text(f'{{"server": "{server}"}}')
    code, _, err = run(capsys, "get", "ns", "--cluster", "dev")
    assert code == 0 and "No resources found" in err


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_apply_agrees_with_kubectl_apply(server: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    app = tmp_path / "app.yaml"
    app.write_text(APP)
    assert run(capsys, "apply", "-f", str(app))[0] == 0
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "KUBECONFIG": str(tmp_path / "none")}
    result = subprocess.run(["kubectl", "--server", server, "apply", "-f", str(app)],
                            capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert all(line.endswith(" unchanged") for line in result.stdout.splitlines())
    code, out, _ = run(capsys, "apply", "-f", str(app))
    assert code == 0 and all(line.endswith(" unchanged") for line in out.splitlines())
