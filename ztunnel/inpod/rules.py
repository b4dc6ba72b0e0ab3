"""The nftables ruleset and policy routes that capture an enrolled pod's traffic.

Theory of operation (Istio's in-pod model, expressed in nftables):

* Everything lives in the *pod's* network namespace, so the node is untouched and
  the same rules serve the local cluster and Kubernetes.
* ztunnel's own sockets carry ``SO_MARK`` 0x539; they are never redirected, so
  ztunnel's outbound HBONE dials and its inbound connects to the application leave
  as they are.
* Outbound: TCP from the application (not to ``lo``) is redirected to 15001,
  where ztunnel reads the original destination with ``SO_ORIGINAL_DST``; DNS
  (UDP and TCP 53) goes to the DNS proxy on 15053.
* Inbound: TCP arriving on any interface but ``lo`` is redirected to the plaintext
  port 15006, except HBONE (15008), which ztunnel serves directly.
* Health probes: the kubelet's probes come from the link-local address
  ``PROBE_SOURCE`` (Istio's CNI plugin rewrites them to it; the local cluster's kubelet
  dials from it) and are never redirected, so a pod is Ready only when its own
  application answers, and STRICT mTLS or an ALLOW policy cannot fail its probes.
* Source-IP preservation: ztunnel connects to the application from the *original
  source IP* with ``IP_TRANSPARENT``.  The application's replies are addressed to
  a remote IP, so they would leave by the pod's default route; the connection is
  tagged (conntrack mark) as its first packet arrives over ``lo`` with ztunnel's
  mark, the tag is copied onto each reply packet, and a policy route sends packets
  with that mark to ``lo``, where the transparent socket receives them.  ztunnel's
  outbound dials leave by eth0 and never pass this namespace's prerouting, so they
  are not tagged.
* HBONE (port 15008 in and ztunnel's marked dials to 15008 out) is exempt from
  connection tracking: no rule here needs its state, and the lookup on every packet
  of the tunnel cost about a tenth of the CPU of a 1 GiB transfer through a ztunnel
  pair (bench/ztunnel_l4.py --bulk, 5.00 -> 4.52 CPU s/GiB).  Everything the rules
  redirect or mark stays tracked.
"""

from __future__ import annotations

from dataclasses import dataclass

TABLE = "pyambient_inpod"

ZTUNNEL_MARK = 0x539
"""SO_MARK on every socket ztunnel opens in a pod: such packets are never captured."""

CONN_MARK = 0x111
"""Conntrack mark of connections ztunnel opened towards the pod's application."""

ROUTE_TABLE = 133
"""Policy-routing table that delivers marked replies locally (to ztunnel's socket)."""

RULE_PRIORITY = 32764

PROBE_SOURCE = "169.254.7.127"
"""Source address of kubelet health probes, spared by the inbound capture (as in Istio)."""


@dataclass(frozen=True, slots=True)
class CapturePorts:
    """The ztunnel ports inside the pod (DESIGN.md section 3)."""

    outbound: int = 15001
    inbound_plaintext: int = 15006
    inbound_hbone: int = 15008
    dns: int = 15053


DEFAULT_PORTS = CapturePorts()


def nft_ruleset(ports: CapturePorts = DEFAULT_PORTS, capture_dns: bool = True) -> str:
    """The ``nft -f`` script that installs the capture table (replacing an older one)."""
    p = ports
    skip_ports = f"{{ {p.inbound_hbone}, {p.inbound_plaintext}, {p.outbound}, {p.dns} }}"
    dns_rules = (
        f"        udp dport 53 redirect to :{p.dns}\n"
        f"        tcp dport 53 redirect to :{p.dns}\n"
        if capture_dns else ""
    )
    return (
        f"table inet {TABLE}\n"
        f"delete table inet {TABLE}\n"
        f"table inet {TABLE} {{\n"
        # HBONE untracked (see the module doc).
        "    chain hbone_untracked_in {\n"
        "        type filter hook prerouting priority raw; policy accept;\n"
        f"        tcp dport {p.inbound_hbone} notrack\n"
        f"        tcp sport {p.inbound_hbone} notrack\n"
        "    }\n"
        "    chain hbone_untracked_out {\n"
        "        type filter hook output priority raw; policy accept;\n"
        f"        tcp sport {p.inbound_hbone} notrack\n"
        f"        meta mark {ZTUNNEL_MARK:#x} tcp dport {p.inbound_hbone} notrack\n"
        "    }\n"
        # Tag connections ztunnel opens to the application: only those come back in
        # through this namespace's own prerouting (over lo) still carrying its mark.
        "    chain tag_ztunnel {\n"
        "        type filter hook prerouting priority mangle; policy accept;\n"
        f"        meta mark {ZTUNNEL_MARK:#x} ct mark set {CONN_MARK:#x}\n"
        "    }\n"
        # The application's replies on a tagged connection take the mark, so the
        # policy route hands them to ztunnel's transparent socket instead of eth0.
        "    chain restore_mark {\n"
        "        type route hook output priority mangle; policy accept;\n"
        f"        meta mark != {ZTUNNEL_MARK:#x} ct mark {CONN_MARK:#x} "
        f"meta mark set {CONN_MARK:#x}\n"
        "    }\n"
        "    chain outbound {\n"
        "        type nat hook output priority -100; policy accept;\n"
        f"        meta mark {ZTUNNEL_MARK:#x} return\n"
        "        oifname \"lo\" return\n"
        f"{dns_rules}"
        f"        meta l4proto tcp redirect to :{p.outbound}\n"
        "    }\n"
        "    chain inbound {\n"
        "        type nat hook prerouting priority dstnat; policy accept;\n"
        "        iifname \"lo\" return\n"
        f"        ip saddr {PROBE_SOURCE} return\n"
        f"        tcp dport {skip_ports} return\n"
        f"        meta l4proto tcp redirect to :{p.inbound_plaintext}\n"
        "    }\n"
        "}\n"
    )


def nft_delete_script() -> str:
    """The ``nft -f`` script that removes the capture table (no error if absent)."""
    return f"table inet {TABLE}\ndelete table inet {TABLE}\n"


def ip_route_commands(add: bool) -> list[list[str]]:
    """``ip`` commands (run inside the pod's netns) for the reply-steering policy route.

    Installing removes nothing first: the route is replaced in place and the rule added
    (where an identical rule is already there ``ip`` answers "File exists", which
    install_capture accepts).  A ztunnel that installs over a live pod's existing rules
    (after a restart) so never opens a window in which replies to its transparent
    connections are routed away: before, a delete-then-add could cut a request in flight.
    """
    cmds = []
    for family in ("-4", "-6"):
        local = "0.0.0.0/0" if family == "-4" else "::/0"
        route = ["ip", family, "route", "replace" if add else "del", "local", local, "dev",
                 "lo", "table", str(ROUTE_TABLE)]
        rule = ["ip", family, "rule", "add" if add else "del", "fwmark", f"{CONN_MARK:#x}",
                "pref", str(RULE_PRIORITY), "lookup", str(ROUTE_TABLE)]
        # The route before the rule that sends packets to it, and away in reverse.
        cmds += [route, rule] if add else [rule, route]
    return cmds
