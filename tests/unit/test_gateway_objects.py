"""``ambientctl gateway`` objects: listeners from flags, dependants, refusals."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from deploy.ambientctl import build_parser
from deploy.gateway_objects import GatewaySpec, gateway_objects, listener_ports
from waypoint.ingress import listeners_of


def test_objects_for_http_and_https_are_what_the_ingress_serves() -> None:
    spec = GatewaySpec(namespace="shop", name="edge", tls_secrets=("a", "b"),
                       hostname="*.example.com")
    gw, account, dep, svc = gateway_objects(spec)
    assert gw["spec"]["gatewayClassName"] == "pyambient"
    listeners, issues = listeners_of(gw["spec"], "shop")
    assert not issues
    assert [(x.protocol, x.port, x.hostname) for x in listeners] == [
        ("HTTP", 80, "*.example.com"), ("HTTPS", 443, "*.example.com")]
    assert listeners[1].certificates == (("shop", "a"), ("shop", "b"))
    assert listener_ports(gw["spec"]) == [80, 443]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-6:] == ["--mode", "ingress", "--name", "edge",
                                         "--namespace", "shop"]
    assert [p["containerPort"] for p in container["ports"]] == [15021, 80, 443, 15020]
    assert [p["port"] for p in svc["spec"]["ports"]] == [80, 443]
    assert account["kind"] == "ServiceAccount"
    assert dep["spec"]["template"]["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"


@pytest.mark.parametrize("kwargs, words", [
    ({"http_port": None}, "no listener"),
    ({"http_port": 443, "tls_secrets": ("a",)}, "distinct"),
    ({"http_port": 15008}, "15008"),
    ({"name": "Bad_Name"}, "--name"),
])
def test_bad_flags_are_refused_naming_the_flag(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        GatewaySpec(namespace="shop", **kwargs).check()  # type: ignore[arg-type]


def test_gateway_group_is_registered() -> None:
    args = build_parser().parse_args(["gateway", "apply", "-n", "shop", "--dry-run"])
    assert args.gateway_command == "apply" and args.dry_run
