"""The kind path, checked without Docker: the script, the cluster config, the test
manifests, the in-pod probe and the metric parser the kind tests rely on."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from common.metrics import Metrics, TcpLabels
from deploy.install import KUBERNETES_VERSION
from deploy.local.echo import Identity, Server, serve
from tests.kind.conftest import unavailable
from tests.kind.support import counter, manifest_objects
from tests.manifest_checks import problems

REPO = Path(__file__).resolve().parents[2]
E2E = REPO / "deploy" / "kind" / "e2e.sh"
MANIFESTS = sorted((REPO / "tests" / "kind" / "manifests").glob("*.yaml"))


def test_e2e_script_is_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", "-x", str(E2E)], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stdout


def test_e2e_script_parses_and_stops_on_the_first_error() -> None:
    subprocess.run(["bash", "-n", str(E2E)], check=True, timeout=30)
    lines = [ln for ln in E2E.read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "set -euo pipefail"
    assert os.stat(E2E).st_mode & stat.S_IXUSR


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def test_e2e_script_says_why_without_a_docker_engine(tmp_path: Path) -> None:
    _fake(tmp_path, "docker", "echo 'Cannot connect to the Docker daemon' >&2; exit 1")
    _fake(tmp_path, "kind", "echo kind called >&2; exit 1")
    _fake(tmp_path, "kubectl", "exit 1")
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
           "TMPDIR": str(tmp_path)}
    result = subprocess.run(["bash", str(E2E)], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 2
    assert "no Docker engine answers" in result.stderr
    assert "kind called" not in result.stderr  # nothing was created
    assert not list(tmp_path.glob("pyambient-e2e.*"))


def test_kind_tests_skip_with_the_reason_when_tools_are_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    reason = unavailable()
    assert reason is not None and "is not on PATH" in reason and "e2e.sh" in reason


def test_cluster_has_three_nodes_in_two_zones_on_a_pinned_image() -> None:
    config = yaml.safe_load((REPO / "deploy" / "kind" / "cluster.yaml").read_text())
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    nodes = config["nodes"]
    assert [n["role"] for n in nodes] == ["control-plane", "worker", "worker"]
    workers = [n for n in nodes if n["role"] == "worker"]
    assert len({n["labels"]["topology.kubernetes.io/zone"] for n in workers}) == 2
    assert len({n["labels"]["topology.kubernetes.io/region"] for n in nodes}) == 1
    images = {n["image"] for n in nodes}
    assert len(images) == 1
    version = re.escape(KUBERNETES_VERSION)
    assert re.fullmatch(rf"kindest/node:v{version}\.\d+@sha256:[0-9a-f]{{64}}", images.pop())


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kind_test_manifests_validate(path: Path) -> None:
    objects = manifest_objects(path.name)
    assert objects
    assert [p for obj in objects for p in problems(obj, KUBERNETES_VERSION)] == []


def test_test_apps_cross_nodes_and_run_the_projects_echo() -> None:
    objects = manifest_objects("apps.yaml")
    zones = {}
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue
        pod = obj["spec"]["template"]["spec"]
        zones[obj["metadata"]["name"]] = pod["nodeSelector"]["topology.kubernetes.io/zone"]
        for container in pod["containers"]:
            if "deploy.local.echo" in container["command"]:
                assert container["command"][:3] == ["python", "-m", "deploy.local.echo"]
    assert zones["client"] != zones["echo-v1"] == zones["echo-v2"]
    namespaces = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Namespace"}
    assert namespaces["mesh-e2e"]["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"
    assert "labels" not in namespaces["mesh-e2e-late"]["metadata"]


async def test_probe_reports_each_answer_and_unreachable_servers() -> None:
    server = Server(Identity(pod="echo-x", version="v7"))
    async with trio.open_nursery() as nursery:
        (port,) = await nursery.start(serve, [0], server, "127.0.0.1")
        url = f"http://127.0.0.1:{port}/p?status=201"
        with trio.fail_after(30):
            result = await trio.run_process(
                [sys.executable, str(REPO / "tests" / "kind" / "probe.py"), url, "3", "POST",
                 "x-fault:abort"], capture_stdout=True)
        nursery.cancel_scope.cancel()
    answers: list[dict[str, Any]] = [json.loads(ln) for ln in result.stdout.splitlines()]
    assert [a["status"] for a in answers] == [201, 201, 201]
    body = answers[0]["body"]
    assert (body["method"], body["version"], body["headers"]["x-fault"]) == \
        ("POST", "v7", "abort")
    with trio.fail_after(30):
        closed = await trio.run_process(
            [sys.executable, str(REPO / "tests" / "kind" / "probe.py"),
             f"http://127.0.0.1:{port}/", "1"], capture_stdout=True)
    assert json.loads(closed.stdout)["status"] == 0


def test_counter_reads_ztunnel_metrics() -> None:
    metrics = Metrics()
    labels = TcpLabels(reporter="destination", security_policy="mutual_tls",
                       source_workload="client")
    for _ in range(3):
        metrics.opened.labels(*labels.values()).inc()
    metrics.opened.labels(*TcpLabels(reporter="source").values()).inc()
    text = metrics.render().decode()
    assert counter(text, "istio_tcp_connections_opened", reporter="destination",
                   security_policy="mutual_tls") == 3
    assert counter(text, "istio_tcp_connections_opened") == 4
