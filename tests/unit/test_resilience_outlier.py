"""Outlier detection (Envoy "Outlier detection", Istio "Destination Rule" OutlierDetection)."""

from __future__ import annotations

import pytest

from waypoint.resilience.config import OutlierDetectionSettings
from waypoint.resilience.hosts import Host
from waypoint.resilience.outlier import LocalFailure, OutlierDetector


def hosts(n: int) -> list[Host]:
    return [Host(f"10.0.0.{i}:80") for i in range(n)]


def test_fifth_consecutive_5xx_ejects_immediately() -> None:
    hs = hosts(3)
    det = OutlierDetector(OutlierDetectionSettings(max_ejection_percent=100), hs)
    assert [det.report_response(hs[0], 500, 1.0) for _ in range(5)] == [False] * 4 + [True]
    assert det.is_ejected(hs[0], 1.0) and det.ejected_count == 1


def test_a_success_resets_the_streak() -> None:
    hs = hosts(3)
    det = OutlierDetector(OutlierDetectionSettings(), hs)
    for _ in range(4):
        det.report_response(hs[0], 503, 0.0)
    det.report_response(hs[0], 200, 0.0)
    assert not any(det.report_response(hs[0], 503, 0.0) for _ in range(4))


def test_local_failures_count_as_5xx_unless_split() -> None:
    hs = hosts(2)
    det = OutlierDetector(OutlierDetectionSettings(), hs)
    results = [det.report_local_failure(hs[0], LocalFailure.CONNECT_FAILURE, 0.0)
               for _ in range(5)]
    assert results[-1] is True
    split = OutlierDetector(OutlierDetectionSettings(split_external_local_origin_errors=True,
                                                     consecutive_local_origin_failures=2), hs[1:])
    split.report_local_failure(hs[1], LocalFailure.TIMEOUT, 0.0)
    split.report_connect_success(hs[1])
    assert not split.report_local_failure(hs[1], LocalFailure.TIMEOUT, 0.0)
    assert split.report_local_failure(hs[1], LocalFailure.TIMEOUT, 0.0)


def test_gateway_errors_detector_ignores_500() -> None:
    hs = hosts(2)
    det = OutlierDetector(OutlierDetectionSettings(consecutive_5xx=None,
                                                   consecutive_gateway_errors=2), hs)
    assert not det.report_response(hs[0], 500, 0.0)
    assert not det.report_response(hs[0], 500, 0.0)
    assert not det.report_response(hs[0], 502, 0.0)
    assert det.report_response(hs[0], 504, 0.0)


def test_ejection_time_is_base_times_ejections_and_host_returns() -> None:
    # Istio: baseEjectionTime 30 s "multiplied by the number of times the host has been ejected".
    h = hosts(1)[0]
    det = OutlierDetector(OutlierDetectionSettings(consecutive_5xx=1), [h])
    det.report_response(h, 500, 0.0)
    assert det.is_ejected(h, 29.9) and not det.is_ejected(h, 30.0)
    det.report_response(h, 500, 31.0)
    assert det.ejection_duration(h) == pytest.approx(60.0)
    assert det.is_ejected(h, 90.9) and not det.is_ejected(h, 91.0)


def test_ejection_time_is_capped_and_multiplier_decays() -> None:
    h = hosts(1)[0]
    det = OutlierDetector(OutlierDetectionSettings(consecutive_5xx=1, max_ejection_time=45.0), [h])
    for t in (0.0, 100.0, 200.0):
        det.report_response(h, 500, t)
        det.sweep(t + 50.0)
        assert not h.ejected
    assert h.num_ejections == 3 and det.ejection_duration(h) == pytest.approx(45.0)
    for i in range(3):
        det.sweep(300.0 + 10 * i)
    assert h.num_ejections == 0


def test_max_ejection_percent_allows_at_least_one() -> None:
    # Envoy: max_ejection_percent "will eject at least one host regardless of the value".
    hs = hosts(3)
    det = OutlierDetector(OutlierDetectionSettings(consecutive_5xx=1), hs)  # 10 %
    assert det.report_response(hs[0], 500, 0.0)
    assert not det.report_response(hs[1], 500, 0.0)
    assert det.ejected_count == 1


def test_max_ejection_percent_bounds_ejections() -> None:
    hs = hosts(10)
    det = OutlierDetector(OutlierDetectionSettings(consecutive_5xx=1, max_ejection_percent=30), hs)
    ejected = [det.report_response(h, 500, 0.0) for h in hs]
    assert sum(ejected) == 3


def test_sweep_returns_expired_and_bumps_version() -> None:
    hs = hosts(2)
    det = OutlierDetector(OutlierDetectionSettings(consecutive_5xx=1), hs)
    det.report_response(hs[0], 500, 0.0)
    v = det.version
    assert not det.sweep(10.0)
    assert det.sweep(30.0) and det.version > v and det.ejected_count == 0
