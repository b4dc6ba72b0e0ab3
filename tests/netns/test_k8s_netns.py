"""Finding a pod's network namespace by its IP, in namespaces this test creates."""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trio

from ztunnel.inpod.k8s_netns import (
    PodNetnsResolver,
    candidates,
    find_pod_netns,
    pod_netns_index,
    resolve_pod_netns,
)

pytestmark = pytest.mark.netns


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@dataclass
class Pods:
    directory: str  # a private "runtime" netns directory holding bind mounts of the two
    paths: dict[str, str]  # pod IP -> path under directory
    v6: str


@pytest.fixture
def pods() -> Iterator[Pods]:
    """Two pod-like namespaces with a documentation address each (TEST-NET-2, 2001:db8::/32),
    exposed through their own directory, as a runtime's /var/run/netns would."""
    tag = secrets.token_hex(3)
    octet = int(tag[:2], 16) % 200 + 10
    ips = {f"pa-k{tag}-a": f"198.51.100.{octet}", f"pa-k{tag}-b": f"198.51.100.{octet + 1}"}
    # Canonical text (no leading zeros in a group), as the kernel reports it.
    v6 = str(ipaddress.ip_address(f"2001:db8:{tag[:4]}::7"))
    directory = tempfile.mkdtemp(prefix="pa-netns-")
    made: list[str] = []
    try:
        for name, ip in ips.items():
            _sh("ip", "netns", "add", name)
            made.append(name)
            # A veth pair inside the namespace: dummy links need a module containers lack.
            _sh("ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
            _sh("ip", "-n", name, "addr", "add", f"{ip}/32", "dev", "eth0")
            _sh("ip", "-n", name, "link", "set", "eth0", "up")
        first = next(iter(ips))
        _sh("ip", "-n", first, "addr", "add", f"{v6}/128", "dev", "eth0", "nodad")
        paths = {}
        for name, ip in ips.items():
            # Like containerd's cni-<uuid>: a bind mount of the namespace in a directory.
            target = os.path.join(directory, f"cni-{name}")
            open(target, "w").close()
            _sh("mount", "--bind", f"/run/netns/{name}", target)
            paths[ip] = target
        yield Pods(directory, paths, v6)
    finally:
        for entry in os.listdir(directory):
            subprocess.run(["umount", os.path.join(directory, entry)], check=False)
            os.unlink(os.path.join(directory, entry))
        os.rmdir(directory)
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)


def test_finds_each_pod_by_its_ipv4_address(pods: Pods) -> None:
    for ip, path in pods.paths.items():
        assert find_pod_netns(ip, netns_dirs=[pods.directory], scan_proc=False) == path


def test_finds_a_pod_by_its_ipv6_address_in_any_spelling(pods: Pods) -> None:
    first = next(iter(pods.paths.values()))
    long_form = ipaddress.ip_address(pods.v6).exploded
    assert find_pod_netns(long_form, netns_dirs=[pods.directory], scan_proc=False) == first


def test_an_address_no_namespace_has_is_none(pods: Pods) -> None:
    assert find_pod_netns("203.0.113.254", netns_dirs=[pods.directory], scan_proc=False) is None
    assert find_pod_netns("127.0.0.1", netns_dirs=[pods.directory], scan_proc=False) is None


def test_the_same_namespace_under_two_names_is_looked_at_once(pods: Pods) -> None:
    listed = list(candidates([pods.directory, "/run/netns"], scan_proc=False))
    inodes = [os.stat(p).st_ino for p in listed]
    assert len(inodes) == len(set(inodes))
    assert set(pods.paths.values()) <= set(listed)  # the first directory's names win


def test_this_process_namespace_is_never_a_candidate() -> None:
    own = os.stat("/proc/self/ns/net").st_ino
    assert all(os.stat(p).st_ino != own for p in candidates([], scan_proc=True))


def test_falls_back_to_a_process_inside_the_namespace(pods: Pods) -> None:
    ip = next(iter(pods.paths))
    name = os.path.basename(pods.paths[ip])[len("cni-"):]
    # The shell says "in" once it runs inside the namespace, then becomes the sleeper.
    proc = subprocess.Popen(["ip", "netns", "exec", name, "sh", "-c", "echo in; exec sleep 30"],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"in\n"
        expected = os.stat(f"/run/netns/{name}").st_ino
        path = find_pod_netns(ip, netns_dirs=[], scan_proc=True)
        assert path is not None and path.startswith("/proc/")
        assert os.stat(path).st_ino == expected
    finally:
        proc.kill()
        proc.wait()


def test_index_maps_every_pod_address(pods: Pods) -> None:
    index = pod_netns_index([pods.directory])
    for ip, path in pods.paths.items():
        assert index[ip] == path
    assert index[pods.v6] == next(iter(pods.paths.values()))
    assert not any(ip.startswith(("127.", "fe80:")) or ip == "::1" for ip in index)


async def test_resolve_runs_off_the_trio_thread(pods: Pods) -> None:
    ip, path = next(iter(pods.paths.items()))
    with trio.fail_after(10):
        assert await resolve_pod_netns(ip, netns_dirs=[pods.directory], scan_proc=False) == path


async def test_resolver_scans_once_for_many_pods_and_reuses_answers(pods: Pods) -> None:
    resolver = PodNetnsResolver([pods.directory], scan_proc=False)
    asked = {f"uid-{i}": [ip] for i, ip in enumerate(pods.paths)}
    asked["uid-elsewhere"] = ["203.0.113.254"]  # a pod on another node
    with trio.fail_after(10):
        found = await resolver.resolve(asked)
        assert found == {f"uid-{i}": path for i, path in enumerate(pods.paths.values())}
        assert resolver.scans == 1
        del asked["uid-elsewhere"]
        assert await resolver.resolve(asked) == found
        assert resolver.scans == 1  # every answer reused, nothing scanned


async def test_resolver_looks_again_when_the_namespace_file_is_gone(pods: Pods) -> None:
    resolver = PodNetnsResolver([pods.directory], scan_proc=False)
    ip, path = next(iter(pods.paths.items()))
    with trio.fail_after(10):
        assert await resolver.resolve({"uid-a": [ip]}) == {"uid-a": path}
        await trio.run_process(["umount", path])
        await trio.Path(path).unlink()  # the runtime removed the sandbox
        assert await resolver.resolve({"uid-a": [ip]}) == {}
    assert resolver.scans == 2
