"""The pure cores of the local cluster: addressing, scheduling, endpoints, rules, DNS, runtime."""

from __future__ import annotations

import struct

import pytest

from common.kube import Deployment, EndpointSlice, Pod, Service
from common.kube.objects import Container
from deploy.local import network
from deploy.local.deployments import (
    TEMPLATE_HASH_LABEL,
    RoundRobin,
    new_pod,
    plan_deployment,
    template_hash,
)
from deploy.local.dns import (
    RCODE_NXDOMAIN,
    TYPE_A,
    TYPE_AAAA,
    answer,
    parse_query,
    service_records,
)
from deploy.local.endpoints import allocate_cluster_ip, desired_slice
from deploy.local.errors import ClusterError
from deploy.local.kubelet import pod_status
from deploy.local.kubeproxy import render, service_backends
from deploy.local.runtime import (
    ContainerState,
    backoff_delay,
    container_argv,
    container_env,
    in_pod_argv,
    is_echo,
    should_restart,
)

# -- network ------------------------------------------------------------------------------


def test_names_claim_only_their_own_cluster() -> None:
    names = network.Names("a")
    assert names.owns("pa-a-fabric") and names.owns("pa-a-node3")
    assert names.owns(names.pod("0123abcd-4567-89ef-0123-456789abcdef"))
    assert not names.owns("pa-a-2-fabric")  # cluster "a-2"
    assert not names.owns("pa-b-fabric") and not names.owns("other")


@pytest.mark.parametrize("bad", ["", "UPPER", "-x", "x-", "a" * 21, "a_b"])
def test_cluster_names_must_be_short_dns_labels(bad: str) -> None:
    with pytest.raises(ClusterError):
        network.check_cluster_name(bad)


def test_ipam_hands_out_addresses_in_turn_and_reuses_a_released_one_last() -> None:
    ipam = network.PodIPAM(1)
    assert [ipam.allocate() for _ in range(3)] == ["10.244.1.2", "10.244.1.3", "10.244.1.4"]
    ipam.release("10.244.1.3")
    assert ipam.allocate() == "10.244.1.5"  # not the one just released
    for _ in range(6, 255):
        ipam.allocate()  # .6 to .254
    assert ipam.allocate() == "10.244.1.3"  # wrapped round to the only free one
    assert ipam.used == set(range(2, 255))
    ipam.release("10.244.1.200")
    assert ipam.allocate() == "10.244.1.200"


def test_ipam_reports_exhaustion() -> None:
    ipam = network.PodIPAM(0, used=set(range(2, 255)))
    with pytest.raises(ClusterError, match="no free pod address"):
        ipam.allocate()


def test_nodes_route_each_others_pod_cidrs() -> None:
    lines = network.node_commands(0, 3)
    assert "route add 10.244.1.0/24 via 10.240.0.11" in lines
    assert "route add 10.244.2.0/24 via 10.240.0.12" in lines
    assert not any("10.244.0.0/24" in line for line in lines)
    assert "route add 10.244.2.0/24 via 10.240.0.12" in network.fabric_commands(3)


def test_pod_network_commands_are_routed_point_to_point() -> None:
    assert network.pod_node_side_commands("10.244.0.7", "pa-x-p-1")[-1] == \
        "route add 10.244.0.7/32 dev vp7"
    assert "route add default via 10.244.0.1 dev eth0 src 10.244.0.7" in \
        network.pod_side_commands("10.244.0.7", "10.244.0.1")


def test_resolv_conf_has_the_kubernetes_search_path() -> None:
    text = network.resolv_conf("demo")
    assert "search demo.svc.cluster.local svc.cluster.local cluster.local" in text
    assert "nameserver 10.96.0.10" in text


# -- deployments --------------------------------------------------------------------------


def _deployment(replicas: int, image: str = "ambient/echo") -> Deployment:
    return Deployment.model_validate({
        "metadata": {"name": "web", "namespace": "ns", "uid": "dep-uid"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "c", "image": image}]}}}})


def _pod_of(dep: Deployment, name: str, ready: bool = True, created: str = "2026-01-01T00:00:00Z",
            template: str | None = None) -> Pod:
    pod = new_pod(dep, "node-0")
    pod.metadata.name = name
    pod.metadata.creation_timestamp = created
    if template is not None:
        pod.metadata.labels[TEMPLATE_HASH_LABEL] = template
    pod.status.conditions = []
    if ready:
        pod.status = pod.status.model_validate(
            {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]})
    return pod


def test_new_pods_carry_template_labels_owner_and_node() -> None:
    dep = _deployment(1)
    pod = new_pod(dep, "node-1")
    assert pod.metadata.labels == {"app": "web", TEMPLATE_HASH_LABEL: template_hash(dep)}
    assert pod.metadata.generate_name == f"web-{template_hash(dep)}-"
    assert pod.metadata.owner_references[0].uid == "dep-uid"
    assert pod.spec.node_name == "node-1"


def test_plan_creates_missing_replicas() -> None:
    dep = _deployment(3)
    assert plan_deployment(dep, [_pod_of(dep, "a")]).create == 2


def test_plan_scales_down_unready_then_youngest_first() -> None:
    dep = _deployment(1)
    pods = [_pod_of(dep, "old", created="2026-01-01T00:00:00Z"),
            _pod_of(dep, "young", created="2026-01-02T00:00:00Z"),
            _pod_of(dep, "sick", ready=False, created="2025-01-01T00:00:00Z")]
    plan = plan_deployment(dep, pods)
    assert plan.create == 0
    assert [p.metadata.name for p in plan.delete] == ["sick", "young"]


def test_plan_replaces_pods_of_an_old_template() -> None:
    dep = _deployment(1)
    plan = plan_deployment(dep, [_pod_of(dep, "stale", template="0ld")])
    assert plan.create == 1 and [p.metadata.name for p in plan.delete] == ["stale"]


def test_round_robin_alternates_nodes() -> None:
    rr = RoundRobin()
    assert [rr.pick(["node-1", "node-0"]) for _ in range(4)] == [
        "node-0", "node-1", "node-0", "node-1"]
    assert rr.pick([]) is None


# -- endpoints and kube-proxy ---------------------------------------------------------------


def _service(ip: str | None = "10.96.0.5", target: object = 8080) -> Service:
    return Service.model_validate({
        "metadata": {"name": "echo", "namespace": "ns", "uid": "svc-uid"},
        "spec": {"selector": {"app": "echo"}, "clusterIP": ip,
                 "ports": [{"name": "http", "port": 80, "targetPort": target}]}})


def _running(name: str, ip: str, node: str, ready: bool = True) -> Pod:
    return Pod.model_validate({
        "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}",
                     "labels": {"app": "echo"}},
        "spec": {"nodeName": node, "containers": [
            {"name": "c", "ports": [{"containerPort": 9090, "name": "web"}]}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}})


def test_slice_lists_pods_with_readiness_node_zone_and_target() -> None:
    pods = [_running("b", "10.244.1.2", "node-1", ready=False), _running("a", "10.244.0.2",
                                                                          "node-0")]
    sl = desired_slice(_service(), pods, {"node-0": "zone-a", "node-1": "zone-b"})
    assert [e.addresses for e in sl.endpoints] == [["10.244.0.2"], ["10.244.1.2"]]
    assert [e.conditions.ready for e in sl.endpoints] == [True, False]
    assert [e.zone for e in sl.endpoints] == ["zone-a", "zone-b"]
    assert sl.endpoints[0].target_ref is not None
    assert sl.endpoints[0].target_ref.name == "a"
    assert sl.ports is not None and sl.ports[0].port == 8080
    assert sl.metadata.labels["kubernetes.io/service-name"] == "echo"


def test_named_target_port_resolves_through_container_ports() -> None:
    sl = desired_slice(_service(target="web"), [_running("a", "10.244.0.2", "node-0")], {})
    assert sl.ports is not None and sl.ports[0].port == 9090


def test_cluster_ip_allocation_skips_reserved_and_used() -> None:
    assert allocate_cluster_ip(set()) == "10.96.0.2"
    assert allocate_cluster_ip({"10.96.0.2", "10.96.0.3"}) == "10.96.0.4"


def _slice(svc: Service, pods: list[Pod]) -> EndpointSlice:
    return desired_slice(svc, pods, {})


def test_rules_dnat_only_to_ready_endpoints() -> None:
    svc = _service()
    pods = [_running("a", "10.244.0.2", "node-0"),
            _running("b", "10.244.1.2", "node-1", ready=False)]
    assert service_backends(svc, [_slice(svc, pods)]) == [
        ("10.96.0.5", 80, "tcp", [("10.244.0.2", 8080)])]
    script = render([svc], [_slice(svc, pods)], "10.244.0.1")
    assert "10.96.0.5 . tcp . 80 : jump svc_" in script
    assert "numgen random mod 1" in script
    assert "meta l4proto tcp dnat to 10.244.0.2:8080" in script
    assert "10.244.1.2" not in script
    assert script.startswith("table ip pyambient_proxy\ndelete table ip pyambient_proxy\n")


def test_rules_without_services_still_define_an_empty_table() -> None:
    script = render([], [], "10.244.0.1")
    assert "elements" not in script and "hook prerouting" in script


# -- DNS ----------------------------------------------------------------------------------


def _query(name: str, qtype: int = TYPE_A, qid: int = 0x1234) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)


def _records() -> dict[str, list[str]]:
    return service_records([_service()], [])


def test_dns_answers_a_record_for_service_fqdn() -> None:
    reply = answer(_query("Echo.NS.svc.cluster.local"), _records())
    assert reply is not None
    qid, flags, qd, an, _, _ = struct.unpack_from("!HHHHHH", reply)
    assert qid == 0x1234 and flags & 0x8000 and flags & 0xF == 0 and (qd, an) == (1, 1)
    assert reply[-4:] == bytes([10, 96, 0, 5])


def test_dns_aaaa_for_existing_name_is_empty_success() -> None:
    reply = answer(_query("echo.ns.svc.cluster.local", TYPE_AAAA), _records())
    assert reply is not None
    _, flags, _, an, _, _ = struct.unpack_from("!HHHHHH", reply)
    assert flags & 0xF == 0 and an == 0


def test_dns_unknown_name_is_nxdomain() -> None:
    reply = answer(_query("nosuch.ns.svc.cluster.local"), _records())
    assert reply is not None and struct.unpack_from("!H", reply, 2)[0] & 0xF == RCODE_NXDOMAIN


def test_dns_truncates_large_udp_answers() -> None:
    records = {"big.ns.svc.cluster.local": [f"10.244.0.{i}" for i in range(2, 100)]}
    reply = answer(_query("big.ns.svc.cluster.local"), records, max_size=512)
    assert reply is not None and reply[2] & 0x02 and struct.unpack_from("!H", reply, 6)[0] == 0


def test_dns_garbage_gets_formerr_or_nothing() -> None:
    assert answer(b"\x00", {}) is None
    reply = answer(b"\x12\x34garbage", {})
    assert reply is not None and reply[:2] == b"\x12\x34"
    assert parse_query(_query("a.b")).name == "a.b"


def test_headless_service_resolves_to_ready_pods() -> None:
    svc = _service(ip="None")
    pods = [_running("a", "10.244.0.2", "node-0"),
            _running("b", "10.244.1.2", "node-1", ready=False)]
    assert service_records([svc], [_slice(svc, pods)]) == {
        "echo.ns.svc.cluster.local": ["10.244.0.2"]}


# -- runtime and kubelet status -----------------------------------------------------------


def test_echo_image_or_no_command_runs_the_builtin_echo_app() -> None:
    assert is_echo(Container(name="c", image="ambient/echo:1.0"))
    assert is_echo(Container(name="c", image="busybox"))  # no command
    assert not is_echo(Container(name="c", image="busybox", command=["sleep", "1"]))
    argv = container_argv(Container.model_validate(
        {"name": "c", "image": "ambient/echo", "args": ["--tcp"],
         "ports": [{"containerPort": 7000}, {"containerPort": 53, "protocol": "UDP"}]}),
        python="py")
    assert argv == ["py", "-m", "deploy.local.echo", "--port", "7000", "--tcp"]
    assert container_argv(Container(name="c", command=["sh", "-c"], args=["exit 1"])) == [
        "sh", "-c", "exit 1"]


def test_in_pod_argv_enters_netns_and_mounts_resolv_conf() -> None:
    argv = in_pod_argv("pa-x-p-1", "/state/resolv/ns.conf", ["curl", "x"])
    assert argv[:4] == ["ip", "netns", "exec", "pa-x-p-1"]
    assert argv[-3:] == ["/state/resolv/ns.conf", "curl", "x"]


def test_container_env_has_pod_facts_over_container_values() -> None:
    pod = Pod.model_validate({"metadata": {"name": "p", "namespace": "ns"},
                              "spec": {"nodeName": "node-1", "serviceAccountName": "sa",
                                       "containers": [{"name": "c"}]}})
    container = Container.model_validate(
        {"name": "c", "env": [{"name": "A", "value": "1"}, {"name": "POD_NAME", "value": "x"}]})
    env = container_env(pod, container, pod_ip="10.244.1.5", host_ip="10.240.0.11",
                        api_host="10.96.0.1", api_port=443, host_env={"PATH": "/bin", "X": "y"})
    assert env["A"] == "1" and env["POD_NAME"] == "p" and env["POD_NAMESPACE"] == "ns"
    assert env["POD_IP"] == "10.244.1.5" and env["NODE_NAME"] == "node-1"
    assert env["SERVICE_ACCOUNT"] == "sa" and env["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"
    assert env["KUBERNETES_SERVICE_PORT"] == "443" and env["PATH"] == "/bin" and "X" not in env


def test_restart_policy_and_backoff() -> None:
    assert should_restart(None, 0) and should_restart("Always", 0)
    assert should_restart("OnFailure", 1) and not should_restart("OnFailure", 0)
    assert not should_restart("Never", 1)
    assert [backoff_delay(n, 0.1) for n in (1, 2, 3, 10)] == [1.0, 2.0, 4.0, 30.0]
    assert backoff_delay(5, 3600) == 0.0


def test_pod_status_reflects_containers() -> None:
    running = ContainerState(running=True, ready=True, started_at="t")
    status = pod_status(pod_ip="10.244.0.2", host_ip="10.240.0.10", started="t",
                        containers=[("c", "ambient/echo", running)])
    assert status["phase"] == "Running" and status["podIP"] == "10.244.0.2"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    crashed = ContainerState(restart_count=2, last_exit_code=1)
    status = pod_status(pod_ip="ip", host_ip="h", started="t", containers=[("c", "", crashed)])
    assert status["phase"] == "Running"
    assert status["containerStatuses"][0]["state"] == {"waiting": {"reason": "CrashLoopBackOff"}}
    assert status["containerStatuses"][0]["restartCount"] == 2
    done = ContainerState(terminated=True, last_exit_code=0)
    assert pod_status(pod_ip="ip", host_ip="h", started="t",
                      containers=[("c", "", done)])["phase"] == "Succeeded"
