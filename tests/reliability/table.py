"""Run the reliability and security suites and write docs/reliability.md from the results.

``python -m tests.reliability.table [pytest args]`` (what ``scripts/reliability`` runs):
pytest runs over this suite's directories plus the existing tests the table references,
with a small plugin recording each test's outcome and the figures tests attach with
``record_property`` (``bytes_lost``, ``p99_ms``, ...); then each case row of
:data:`CASES` gathers the results of its tests.  The exit status is pytest's.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "reliability.md"
OWN = ["tests/security", "tests/reliability"]


@dataclass(frozen=True)
class Case:
    section: str
    name: str
    tests: tuple[str, ...]  # node-id prefixes
    expect: str  # what "as expected" means for this row


def case(section: str, name: str, expect: str, *tests: str) -> Case:
    return Case(section, name, tests, expect)


HB = "tests/security/test_hbone_port.py::"
HBI = "tests/integration/test_hbone_bad_input.py::"
WP = "tests/security/test_waypoint_http.py::"
API = "tests/reliability/test_api_objects.py::"
FLT = "tests/reliability/test_faults.py::"
LOAD = "tests/reliability/test_load.py::"
CF = "tests/integration/test_cluster_faults.py::"
KILLED = CF + "test_destination_pod_killed_mid_stream_ends_the_stream_and_others_serve["
SMUGGLE = WP + "test_hostile_request_is_refused_and_nothing_reaches_the_backend["

CASES: list[Case] = [
    case("HBONE port", "plaintext on 15008", "handshake refused, logged once, counted not_tls",
         HBI + "test_handshake_failures_are_refused_and_logged_once_each"),
    case("HBONE port", "TLS without client cert; cert from another CA",
         "handshake refused, logged once, counted no_client_cert / unknown_ca",
         HBI + "test_handshake_failures_are_refused_and_logged_once_each",
         HBI + "test_client_with_wrong_ca_roots_fails_the_handshake"),
    case("HBONE port", "expired client cert", "refused, reason 'expired', counted expired_cert",
         HB + "test_expired_client_certificate_is_refused"),
    case("HBONE port", "wrong trust domain (root trusted)",
         "refused, reason names trust domain, counted wrong_trust_domain",
         HB + "test_client_from_another_trust_domain"),
    case("HBONE port", "SAN not SPIFFE (DNS, https URI, email)",
         "refused, reason names spiffe://, counted not_spiffe",
         HB + "test_client_certificate_without_a_spiffe_san_is_refused"),
    case("HBONE port", "client that never completes the handshake",
         "closed at the handshake deadline, counted handshake_timeout",
         HB + "test_client_that_never_completes_the_handshake"),
    case("HBONE port", "CONNECT to a pod not on this node", "400 (decide_inbound)",
         "tests/unit/test_decide.py::test_inbound_authority_must_be_the_pods_ip"),
    case("HBONE port", "non-CONNECT methods, bad authority",
         "400 on a live connection, counted not_connect / bad_authority",
         HBI + "test_non_connect_and_malformed_authority_get_400_on_a_live_connection"),
    case("HBONE port", "new stream after GOAWAY (draining)", "REFUSED_STREAM, counted draining",
         HB + "test_new_stream_on_a_draining_connection"),
    case("HBONE port", "h2 rapid reset (CVE-2023-44487)",
         "GOAWAY ENHANCE_YOUR_CALM, counted rapid_reset",
         HBI + "test_rapid_reset_flood_gets_goaway_while_good_client_keeps_working",
         "tests/unit/test_hbone_protocol.py::test_rapid_reset_flood_gets_enhance_your_calm"),
    case("HBONE port", "SETTINGS and PING floods, never reading; SETTINGS over 32 entries",
         "cut at 10,000 owed ACKs / at once, counted flood",
         HB + "test_control_frame_flood",
         "tests/unit/test_hbone_protocol.py::test_settings_frame_with_many_entries"),
    case("HBONE port", "stream that never reads", "window exhausted, memory < 16 MiB",
         HB + "test_a_stream_that_never_reads",
         "tests/integration/test_hbone_tunnel.py::test_slow_reader_bounds_memory_and_keeps_bytes_intact"),
    case("HBONE port", "header list over 64 KiB (CONTINUATIONs, one frame, HPACK bomb)",
         "GOAWAY ENHANCE_YOUR_CALM, counted header_list_too_large",
         HB + "test_header_list_over_the_limit",
         "tests/unit/test_hbone_protocol.py::test_header_list_that_decodes_over_the_limit",
         "tests/unit/test_hbone_protocol.py::test_header_block_over_the_limit_in_one_frame",
         "tests/unit/test_hbone_protocol.py::test_continuation_flood"),
    case("HBONE port", "frames over 16 KiB up to the advertised 1 MiB (HEADERS, unknown types)",
         "accepted (RFC 9113 4.2): tunnel answers 200; unknown frames skipped",
         HB + "test_headers_frame_over_16_kib_within_the_advertised_size_is_served",
         "tests/unit/test_hbone_protocol.py::test_headers_frame_larger_than_16_kib",
         "tests/unit/test_hbone_protocol.py::test_headers_and_continuation_frames_over_16_kib",
         "tests/unit/test_hbone_protocol.py::test_unknown_frame_of_the_advertised_size"),
    case("HBONE port", "refusal counter on ztunnel's /metrics",
         "pyambient_hbone_refused_total{reason}, bounded labels, 1 per refusal",
         "tests/unit/test_hbone_refusal_metrics.py",
         "tests/netns/test_ztunnel_hbone_refusals.py"),
    case("Waypoint HTTP", "smuggling: CL+TE, duplicate CL, obs-fold, TE look-alike",
         "400 + close, nothing reaches the backend",
         SMUGGLE + "cl",
         SMUGGLE + "dup",
         SMUGGLE + "obs",
         SMUGGLE + "te",
         "tests/unit/test_h1_errors.py::test_invalid_input_is_refused_with_its_status"),
    case("Waypoint HTTP", "invalid header bytes (NUL, bare CR, non-ASCII name)", "400 + close",
         SMUGGLE + "nul",
         SMUGGLE + "bare",
         SMUGGLE + "non"),
    case("Waypoint HTTP", "1 MiB of headers", "431, memory < 4 MiB",
         WP + "test_a_megabyte_of_headers"),
    case("Waypoint HTTP", "slowloris (header timeout 0.5 s in the test)", "408 at the timeout",
         WP + "test_slowloris"),
    case("Waypoint HTTP", "body that stops halfway / half-closed",
         "closed at stream idle / at once",
         WP + "test_a_body_that_stops_halfway", WP + "test_a_body_cut_by_a_client_half_close"),
    case("Waypoint HTTP", "pipelined requests", "answered in order",
         WP + "test_pipelined_requests_are_answered_in_order"),
    case("Waypoint HTTP", "h2c CONTINUATION flood (CVE-2024-27316)", "GOAWAY, < 4 MiB accepted",
         WP + "test_h2c_continuation_flood"),
    case("Waypoint HTTP", "h2c rapid reset", "GOAWAY, others unaffected",
         "tests/integration/test_waypoint_h2.py::test_rapid_reset_flood_gets_goaway_and_others_unaffected"),
    case("API objects", "malformed routes, catastrophic regexes, VS weights 0, unknown VS field",
         "issue reported, good route still routes",
         API + "test_bad_route_object_is_an_issue", API + "test_a_live_waypoint"),
    case("API objects", "HTTPRoute weights all 0", "500 for that rule only (Gateway API)",
         API + "test_httproute_weights_summing_to_0"),
    case("API objects", "policy with unknown fields", "issue, enforced fail-safe (deny)",
         API + "test_policy_with_unknown_fields"),
    case("API objects", "update that breaks a live route", "last good version kept",
         API + "test_an_update_that_breaks_a_route_keeps_its_last_good_version"),
    case("API objects", "random route objects (hypothesis)", "reported, never raised",
         "tests/unit/test_routing_robustness.py"),
    case("Faults", "upstream killed mid-stream", "client sees a reset, not a hang",
         FLT + "test_upstream_killed_mid_stream"),
    case("Faults", "cluster: pod behind a Service deleted / SIGKILLed mid-stream, via the waypoint",
         "stream ends (EOF/reset) within 10 s short of its length, bytes intact, "
         "new requests answered by the pods left",
         KILLED + "waypoint-"),
    case("Faults", "cluster: the same, L4 only (Service with use-waypoint=none)",
         "stream ends (EOF/reset) within 10 s short of its length, bytes intact, "
         "new requests answered by the pods left",
         KILLED + "l4-"),
    case("Faults", "waypoint restarted under load", "errors stop within 2 s of ready",
         FLT + "test_waypoint_restart"),
    case("Faults", "cluster: waypoint pod deleted under GET load, Deployment replaces it",
         "no request past its 5 s deadline, none around the waypoint, "
         "0 errors from 2 s after the new pod is Ready",
         CF + "test_waypoint_restarted_under_load_errors_stop_within_2s_of_ready"),
    case("Faults", "ztunnel restarted / SIGTERM drain", "streams finish up to the deadline",
         "tests/netns/test_ztunnel_lifecycle.py",
         "tests/integration/test_hbone_pool.py::test_server_drain_lets_streams_finish_then_stops"),
    case("Faults", "cluster: a node's ztunnel SIGKILLed / SIGTERMed, its supervisor restarts it",
         "pods re-enrolled, new connections succeed",
         CF + "test_ztunnel_restarted_on_a_node_new_connections_succeed_once_back"),
    case("Faults", "API server restarted / watch cut", "last snapshot served, converges",
         "tests/integration/test_discovery.py::test_last_snapshot_is_served_while_the_server_is_down_and_watches_resume",
         "tests/integration/test_discovery.py::test_relist_after_410_converges"),
    case("Faults", "certificate rotation under load", "no connection dropped, bytes intact",
         FLT + "test_certificate_rotation"),
    case("Faults", "CA root rotation (two roots during the overlap)",
         "no downtime, long tunnels survive, old-only client refused after",
         FLT + "test_ca_root_rotation"),
    case("Faults", "packet loss and delay between two namespaces", "bytes intact, slower",
         "tests/reliability/test_netem.py"),
    case("Faults", "cluster: 5 ms + 0.5 % loss, then 300 ms per packet, on one node's fabric veth",
         "8 MiB over HBONE intact and slower; 0.5 s route timeout: 504 in 0.45-1.5 s; "
         "raised to 10 s: 200",
         "tests/integration/test_cluster_netem.py"),
    case("Load", "2,000 keep-alive connections through the waypoint, 60 s",
         "0 errors, RSS flat", LOAD + "test_2000_keepalive"),
    case("Load", "200 new connections/s for 60 s", "no fd or memory leak, errors < 1 %",
         LOAD + "test_connection_churn"),
    case("Load", "cluster: short GETs through the waypoint as fast as they come back, 8 s",
         "0 errors: ztunnel keeps its pooled HBONE connection to the waypoint",
         CF + "test_short_requests_at_a_steady_rate_keep_the_pooled_waypoint_connection"),
]


@dataclass
class Result:
    nodeid: str
    outcome: str  # passed, failed, skipped, xfailed, xpassed, error
    seconds: float
    props: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


class Collector:
    """pytest plugin: one :class:`Result` per test."""

    def __init__(self) -> None:
        self.results: dict[str, Result] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        node = report.nodeid
        outcome: str = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            reason = ""
            if report.skipped and isinstance(report.longrepr, tuple):
                reason = str(report.longrepr[2])
            elif hasattr(report, "wasxfail"):
                reason = str(report.wasxfail)
            elif report.failed:
                reason = _failure_line(str(report.longreprtext))
            if report.when == "setup" and report.failed:
                outcome = "error"
            self.results[node] = Result(node, outcome, report.duration,
                                        dict(report.user_properties), reason)


def _failure_line(text: str) -> str:
    """The line of a failure report that says what went wrong (exception groups nest)."""
    for line in reversed(text.splitlines()):
        line = line.strip(" |+-")
        if line.startswith("E "):
            line = line[2:].strip()
        if ("Error" in line or "assert" in line or "Exception" in line) and \
                not line.startswith(("File ", "raise ", "During handling")):
            return line[:200]
    return "failed"


def _targets() -> list[str]:
    paths = list(OWN)
    for row in CASES:
        for test in row.tests:
            path = test.split("::")[0]
            if not path.startswith(tuple(OWN)) and path not in paths:
                paths.append(path)
    return [p for p in paths if (REPO / p).exists()]


def _row(row: Case, results: list[Result]) -> str:
    mine = [r for r in results if any(r.nodeid.startswith(t) for t in row.tests)]
    counts: dict[str, int] = defaultdict(int)
    for r in mine:
        counts[r.outcome] += 1
    lost = [r.props["bytes_lost"] for r in mine if "bytes_lost" in r.props]
    figures = sorted({f"{k}={v}" for r in mine for k, v in r.props.items()
                      if k != "bytes_lost"})
    tried = len(mine)
    if not tried:
        verdict = "not run"
    elif counts["failed"] or counts["error"]:
        verdict = "FAIL"
    elif counts["passed"] + counts["xpassed"] == tried:
        # xpassed: a non-strict xfail (timing-dependent) that held this time.
        verdict = "ok" if not counts["xpassed"] else "ok (xfail passed this run)"
    elif counts["passed"]:
        verdict = "ok (part)"
    else:
        verdict = "skipped" if counts["skipped"] else "known gap"
    notes = [r.reason for r in mine if r.outcome in ("skipped", "xfailed", "failed") and r.reason]
    command = "; ".join(f"`pytest {t.split('::')[0]} -k {t.split('::')[1].split('[')[0]}`"
                        if "::" in t else f"`pytest {t}`" for t in row.tests[:2])
    extra = "; ".join(sorted(set(notes)))[:300].replace("|", "/")
    return (f"| {row.name} | {row.expect} | {command} | {tried} | {counts['passed']} | "
            f"{sum(lost) if lost else '-'} | {counts['failed'] + counts['error']} | "
            f"{counts['skipped']} | {counts['xfailed']} | {verdict} | "
            f"{', '.join(figures)} {extra} |")


def render(results: list[Result], argv: list[str], seconds: float) -> str:
    lines = [
        "# Reliability and security",
        "",
        "Generated by `scripts/reliability` (do not edit by hand): each case, the tests that",
        "pin it, and what they found on the last run.  *tried* = test items run (a",
        "parametrized test counts each case), *as expected* = passed, *bytes lost* = sum of",
        "what the tests measured (`-` where a test checks integrity by assertion only),",
        "*errors* = failed, *xfail* = known gaps marked in the code with the reason (a",
        "non-strict, timing-dependent one that held counts as passed, with a note).",
        "",
        f"Last run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"`{shlex.join(['scripts/reliability', *argv])}`, {seconds:.0f} s.",
        "",
    ]
    section = ""
    for row in CASES:
        if row.section != section:
            section = row.section
            lines += ["", f"## {section}", "",
                      "| case | expected | command | tried | as expected | bytes lost | errors "
                      "| skipped | xfail | verdict | figures / notes |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines.append(_row(row, results))
    lines += ["", (REPO / "tests" / "reliability" / "notes.md").read_text().rstrip()
              if (REPO / "tests" / "reliability" / "notes.md").exists() else "", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    collector = Collector()
    started = time.monotonic()
    status = pytest.main(["-q", "-p", "no:cacheprovider", *argv, *_targets()],
                         plugins=[collector])
    DOC.write_text(render(list(collector.results.values()), argv, time.monotonic() - started))
    print(f"wrote {DOC.relative_to(REPO)}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
