"""ztunnel's operator endpoints: readiness, Prometheus metrics, config dump, log level."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest
import trio

from common.admin import LogLevel
from common.ca import CertificateAuthority
from common.metrics import Metrics, TcpLabels, workload_name
from tests.unit.ztunnel_helpers import snapshot_of, workload
from ztunnel.app import Options, Ztunnel


def test_workload_names_are_bounded_to_the_workload_not_the_pod() -> None:
    assert workload_name("reviews-v1-5d8f7c9b6-x7k2p", {}) == "reviews-v1"
    assert workload_name("reviews-v1-5d8f7c9b6-x7k2p", {"app": "reviews"}) == "reviews"
    assert workload_name("db-0", {}) == "db-0"


def test_metrics_render_istio_names_and_labels() -> None:
    metrics = Metrics()
    labels = TcpLabels(reporter="destination", source_workload="sleep",
                       security_policy="mutual_tls")
    metrics.connection_opened(labels)
    metrics.connection_closed(labels, sent=10, received=20)
    text = metrics.render().decode()
    assert 'istio_tcp_connections_opened_total{' in text
    assert 'istio_tcp_sent_bytes_total{' in text and "} 10.0" in text
    assert 'reporter="destination"' in text and 'security_policy="mutual_tls"' in text


async def test_readiness_waits_for_the_snapshot_then_endpoints_answer(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate("cluster.local")
    options = Options(node="node1", ca_dir=tmp_path, bind_host="127.0.0.1", admin_port=0,
                      metrics_port=0, readiness_port=0)
    ztunnel = Ztunnel(options, ca, log_level=LogLevel("info"))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as http:
            await nursery.start(lambda task_status: ztunnel.run(task_status=task_status))

            def url(name: str, path: str) -> str:
                host, port = ztunnel.endpoints[name]
                return f"http://{host}:{port}{path}"

            response = await http.get(url("readiness", "/healthz/ready"))
            assert response.status_code == 503
            assert "first snapshot" in response.text
            ztunnel.holder.publish(snapshot_of(1, [workload("web", node="node1"),
                                                   workload("db", node="node2")]))
            while (await http.get(url("readiness", "/healthz/ready"))).status_code != 200:
                await ztunnel.agent.wait_reconciled()
            dump = (await http.get(url("admin", "/config_dump"))).json()
            assert dump["node"] == "node1" and dump["snapshot_version"] == 1
            assert {w["name"] for w in dump["workloads"]} == {"web", "db"}
            metrics = await http.get(url("metrics", "/stats/prometheus"))
            assert "ztunnel_enrolled_pods" in metrics.text
            assert (await http.post(url("admin", "/logging?level=debug"))).text == \
                "level: debug\n"
            assert ztunnel.log_level.level == "debug"
            assert (await http.get(url("admin", "/logging?level=loud"))).status_code == 400
            assert (await http.get(url("admin", "/nope"))).status_code == 404
            nursery.cancel_scope.cancel()


def test_inbound_source_ip_is_the_peer_unless_a_waypoint_forwards_it() -> None:
    from common.hbone.request import parse_request
    from common.model import WaypointRef
    from tests.unit.ztunnel_helpers import snapshot_of, workload
    from ztunnel.proxy.inbound import source_ip_of

    waypoint = workload("waypoint", namespace="shop", ip="10.0.0.9")
    waypoint = dataclasses.replace(waypoint, gateway=WaypointRef("shop", "waypoint"))
    client = workload("client", namespace="shop", ip="10.0.0.8")
    snap = snapshot_of(1, [waypoint, client])

    def source(peer: str, forwarded: str | None) -> str:
        headers = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.2:80")]
        if forwarded is not None:
            headers.append((b"forwarded", forwarded.encode()))
        return source_ip_of(parse_request(1, headers, peer_identity=None,
                                          peer_address=(peer, 4000)), snap)

    assert source("10.0.0.9", 'for="10.0.0.7:5555"') == "10.0.0.7"
    assert source("10.0.0.9", 'for="[fd00::7]:5555"') == "fd00::7"
    assert source("10.0.0.9", None) == "10.0.0.9"
    # A peer that is not a waypoint cannot choose the source address policy sees.
    assert source("10.0.0.8", 'for="10.0.0.7:5555"') == "10.0.0.8"
    assert source("10.0.0.50", 'for="10.0.0.7:5555"') == "10.0.0.50"


def test_log_level_changes_at_run_time(capsys: pytest.CaptureFixture[str]) -> None:
    import structlog

    from common.admin import Request
    from common.logging import configure, get_logger
    configure("debug")
    level = LogLevel("info")
    level.install()
    try:
        log = get_logger("test")
        log.debug("hidden-line")
        log.info("shown-line")
        level.route(Request("GET", "/logging", {"level": ["debug"]}))
        log.debug("now-shown-line")
        err = capsys.readouterr().err
        assert "hidden-line" not in err
        assert "shown-line" in err and "now-shown-line" in err
    finally:
        structlog.reset_defaults()


def test_main_reports_a_start_up_error_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import structlog

    from ztunnel.__main__ import main
    try:
        assert main(["--node", "n", "--ca-dir", str(tmp_path / "missing")]) == 1
    finally:
        structlog.reset_defaults()
    err = capsys.readouterr().err
    assert err.startswith("ztunnel: cannot read the CA from")
    assert "Traceback" not in err
