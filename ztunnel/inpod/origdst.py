"""The original destination of a redirected connection (``SO_ORIGINAL_DST``)."""

from __future__ import annotations

import socket
import struct

from common.errors import ConfigError

_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """``(ip, port)`` the client dialled before nftables redirected it to us."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, _SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
        raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    except OSError as exc:
        raise ConfigError(
            f"no original destination on this connection ({exc.strerror}): "
            "was it redirected by the capture rules?") from exc
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port
