"""Find a Kubernetes pod's network namespace on this node, from its IP.

On the local cluster a pod's namespace path is in its ``pyambient.io/netns`` annotation;
on Kubernetes nothing in the API says where it is, so the node agent looks on the node:

1. the container runtime's named namespaces: containerd and CRI-O bind-mount each pod
   sandbox's namespace under ``/var/run/netns`` (``cni-<uuid>``), which the ztunnel
   DaemonSet mounts from the host;
2. failing that, ``/proc/<pid>/ns/net`` of every process this process can see (useful
   only with ``hostPID``, or on a plain host such as the local cluster).

A namespace is the pod's when one of its interfaces carries the pod IP.  The addresses
are read with one netlink ``RTM_GETADDR`` dump from a socket opened inside the namespace
(:func:`common.netns.call_in_netns`), so no process is started per namespace.  Each
namespace is looked at once (deduplicated by its nsfs inode), and this process's own
namespace is never returned: a pod whose IP is the node's is a host-network pod, which
is never captured.

Everything here blocks (``setns`` on the calling thread): from trio, use
:func:`resolve_pod_netns` (one pod) or :class:`PodNetnsResolver` (the node agent: all
of a node's pods with one scan, answers kept while valid), which run on a worker thread.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence

import trio

from common.errors import ConfigError
from common.logging import get_logger
from common.netns import call_in_netns

_log = get_logger("ztunnel.k8s_netns")

NETNS_DIRS: tuple[str, ...] = ("/var/run/netns", "/run/netns")
"""Where container runtimes bind-mount pod network namespaces (often the same directory)."""

# linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_RTM_NEWADDR = 20
_RTM_GETADDR = 22
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_IFA_ADDRESS = 1
_IFA_LOCAL = 2
_NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")  # len, type
# Bounds a dump from a namespace that keeps answering (never seen; a pod has few addresses).
_MAX_DUMP_MESSAGES = 4096
_RECV_SIZE = 65536


def _align(n: int) -> int:
    return (n + 3) & ~3


def addr_dump_request(seq: int = 1, family: int = socket.AF_UNSPEC) -> bytes:
    """The netlink message asking for every address of every interface (of ``family``;
    both with ``AF_UNSPEC``)."""
    body = _IFADDRMSG.pack(family, 0, 0, 0, 0)
    return _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(body), _RTM_GETADDR,
                              _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0) + body


def parse_addr_messages(data: bytes) -> tuple[set[str], bool]:
    """The addresses in one netlink read, and whether the dump is complete (``NLMSG_DONE``).

    Raises ConfigError for an ``NLMSG_ERROR`` answer or a truncated message.
    """
    found: set[str] = set()
    offset = 0
    while offset + _NLMSG_HEADER.size <= len(data):
        length, kind, _, _, _ = _NLMSG_HEADER.unpack_from(data, offset)
        if length < _NLMSG_HEADER.size or offset + length > len(data):
            raise ConfigError(f"truncated netlink message ({length} bytes at {offset})")
        body = data[offset + _NLMSG_HEADER.size:offset + length]
        if kind == _NLMSG_DONE:
            return found, True
        if kind == _NLMSG_ERROR:
            errno = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else 0
            raise ConfigError(f"netlink address dump failed: {os.strerror(errno)}")
        if kind == _RTM_NEWADDR and len(body) >= _IFADDRMSG.size:
            family = body[0]
            found.update(_addresses(family, body[_IFADDRMSG.size:]))
        offset += _align(length)
    return found, False


def _addresses(family: int, attrs: bytes) -> Iterator[str]:
    offset = 0
    while offset + _RTATTR.size <= len(attrs):
        length, kind = _RTATTR.unpack_from(attrs, offset)
        if length < _RTATTR.size:
            return
        value = attrs[offset + _RTATTR.size:offset + length]
        if kind in (_IFA_ADDRESS, _IFA_LOCAL):
            if family == socket.AF_INET and len(value) == 4:
                yield socket.inet_ntop(socket.AF_INET, value)
            elif family == socket.AF_INET6 and len(value) == 16:
                yield socket.inet_ntop(socket.AF_INET6, value)
        offset += _align(length)


def current_addresses(family: int = socket.AF_UNSPEC) -> set[str]:
    """Every IP address (of ``family``) of the calling thread's network namespace."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        sock.sendall(addr_dump_request(family=family))
        found: set[str] = set()
        for _ in range(_MAX_DUMP_MESSAGES):
            part, done = parse_addr_messages(sock.recv(_RECV_SIZE))
            found |= part
            if done:
                return found
    raise ConfigError("netlink address dump did not finish")


def netns_addresses(path: str, family: int = socket.AF_UNSPEC) -> set[str]:
    """Every IP address (of ``family``) of the network namespace at ``path``."""
    return call_in_netns(path, lambda: current_addresses(family))


def _pod_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast)


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:  # gone, or another user's process without ptrace rights
        return None
    return st.st_dev, st.st_ino


def candidates(netns_dirs: Iterable[str] = NETNS_DIRS, scan_proc: bool = True,
               proc: str = "/proc") -> Iterator[str]:
    """Paths of distinct network namespaces other than this process's own, runtime
    directories first, then ``/proc/<pid>/ns/net``."""
    seen = {_inode(f"{proc}/self/ns/net")}
    for directory in netns_dirs:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            ino = _inode(path)
            if ino is not None and ino not in seen:
                seen.add(ino)
                yield path
    if not scan_proc:
        return
    try:
        pids = sorted((p for p in os.listdir(proc) if p.isdigit()), key=int)
    except OSError:
        return
    for pid in pids:
        path = f"{proc}/{pid}/ns/net"
        ino = _inode(path)
        if ino is not None and ino not in seen:
            seen.add(ino)
            yield path


def find_pod_netns(pod_ip: str, *, netns_dirs: Iterable[str] = NETNS_DIRS,
                   scan_proc: bool = True) -> str | None:
    """The path of the network namespace on this node whose interfaces carry ``pod_ip``.

    None when no namespace has it (the pod is on another node, not started yet, or
    uses the host network).  Blocking: see :func:`resolve_pod_netns`.  A ``/proc``
    path is valid only while that process lives; a runtime path for the pod's life.
    """
    try:
        address = ipaddress.ip_address(pod_ip)
    except ValueError as exc:
        raise ConfigError(f"{pod_ip!r} is not an IP address") from exc
    if not _pod_address(address):
        return None  # every namespace has these: they name no pod
    wanted = str(address)
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    for path in candidates(netns_dirs, scan_proc):
        try:
            addresses = netns_addresses(path, family)
        except (ConfigError, OSError) as exc:
            # A pod torn down while we looked, or a namespace we may not enter.
            _log.debug("netns skipped", netns=path, reason=str(exc))
            continue
        if wanted in addresses:
            return path
    return None


async def resolve_pod_netns(pod_ip: str, *, netns_dirs: Iterable[str] = NETNS_DIRS,
                            scan_proc: bool = True) -> str | None:
    """:func:`find_pod_netns` on a worker thread (for the trio node agent)."""
    dirs = tuple(netns_dirs)
    return await trio.to_thread.run_sync(
        lambda: find_pod_netns(pod_ip, netns_dirs=dirs, scan_proc=scan_proc))


def pod_netns_index(netns_dirs: Iterable[str] = NETNS_DIRS, scan_proc: bool = False
                    ) -> dict[str, str]:
    """IP -> namespace path for every namespace on this node (one scan for many pods)."""
    index: dict[str, str] = {}
    for path in candidates(netns_dirs, scan_proc):
        try:
            addresses = netns_addresses(path)
        except (ConfigError, OSError):
            continue
        for ip in addresses:
            if _pod_address(ipaddress.ip_address(ip)):
                index.setdefault(ip, path)
    return index


class PodNetnsResolver:
    """The node agent's lookup: pod uid -> the path of its namespace on this node.

    ``await resolve({uid: pod_ips})`` for this node's pods that have no ``netns`` yet
    (on Kubernetes: all of them).  An answer is kept while its path exists (the runtime
    removes a pod's netns file with its sandbox; a ``/proc`` path goes with its
    process) and the pod keeps its IPs; the pods not known are looked up together with
    one scan of every namespace (one netlink dump each) on a worker thread, so a
    reconcile that meets many new pods costs one scan, not one per pod.  Pods not asked
    for again are forgotten.  A pod whose namespace is not found yet (its IP not
    configured yet, or on another node) is simply absent from the answer: ask again on
    the next snapshot.
    """

    def __init__(self, netns_dirs: Iterable[str] = NETNS_DIRS, scan_proc: bool = True) -> None:
        self.netns_dirs = tuple(netns_dirs)
        self.scan_proc = scan_proc
        self.scans = 0
        self._known: dict[tuple[str, tuple[str, ...]], str] = {}

    async def resolve(self, pods: Mapping[str, Sequence[str]]) -> dict[str, str]:
        """uid -> namespace path for each of ``pods`` (uid -> its IPs) found on this node.

        Runs on a worker thread (stat, setns, netlink); one call at a time.
        """
        wanted = {uid: tuple(_canonical(ip) for ip in ips) for uid, ips in pods.items()}
        return await trio.to_thread.run_sync(self._resolve, wanted)

    def _resolve(self, wanted: dict[str, tuple[str, ...]]) -> dict[str, str]:
        found: dict[str, str] = {}
        unknown: dict[str, tuple[str, ...]] = {}
        for uid, ips in wanted.items():
            path = self._known.get((uid, ips))
            if path is not None and os.path.exists(path):
                found[uid] = path
            elif ips:
                unknown[uid] = ips
        if unknown:
            self.scans += 1
            index = pod_netns_index(self.netns_dirs, self.scan_proc)
            for uid, ips in unknown.items():
                path = next((index[ip] for ip in ips if ip in index), None)
                if path is not None:
                    found[uid] = path
        self._known = {(uid, wanted[uid]): path for uid, path in found.items()}
        return found


def _canonical(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


__all__ = ["NETNS_DIRS", "PodNetnsResolver", "find_pod_netns", "pod_netns_index",
           "resolve_pod_netns"]
