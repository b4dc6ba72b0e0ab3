"""The netlink address dump used to find a pod's namespace, without any namespace."""

from __future__ import annotations

import socket
import struct

import pytest

from common.errors import ConfigError
from ztunnel.inpod.k8s_netns import addr_dump_request, find_pod_netns, parse_addr_messages


def _attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _newaddr(family: int, *attrs: bytes) -> bytes:
    body = struct.pack("=BBBBI", family, 24, 0, 0, 2) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), 20, 2, 1, 0) + body


def _done() -> bytes:
    return struct.pack("=IHHII", 20, 3, 2, 1, 0) + struct.pack("=i", 0)


def test_dump_request_asks_for_every_address_of_both_families() -> None:
    msg = addr_dump_request(seq=7)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert (length, kind, seq) == (len(msg), 22, 7)
    assert flags & 0x1 and flags & 0x300 == 0x300
    assert msg[16] == socket.AF_UNSPEC


def test_addresses_of_both_families_are_read_until_done() -> None:
    v4 = socket.inet_aton("10.244.1.7")
    v6 = socket.inet_pton(socket.AF_INET6, "fd00:10:244::7")
    data = (_newaddr(socket.AF_INET, _attr(1, v4), _attr(2, v4), _attr(3, b"eth0\0"))
            + _newaddr(socket.AF_INET6, _attr(1, v6)))
    found, done = parse_addr_messages(data)
    assert found == {"10.244.1.7", "fd00:10:244::7"} and not done
    found, done = parse_addr_messages(_done())
    assert found == set() and done


def test_a_netlink_error_is_reported() -> None:
    error = struct.pack("=IHHII", 20, 2, 0, 1, 0) + struct.pack("=i", -1)
    with pytest.raises(ConfigError, match="Operation not permitted"):
        parse_addr_messages(error)


def test_a_truncated_message_is_refused() -> None:
    with pytest.raises(ConfigError, match="truncated"):
        parse_addr_messages(struct.pack("=IHHII", 99, 20, 0, 0, 0))  # says 99, has 16


def test_a_bad_pod_ip_says_so() -> None:
    with pytest.raises(ConfigError, match="not an IP address"):
        find_pod_netns("10.244.1", netns_dirs=[], scan_proc=False)
