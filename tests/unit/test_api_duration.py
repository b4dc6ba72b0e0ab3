"""Duration strings of Istio (Go syntax) and the Gateway API (GEP-2257)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.api.duration import parse_gateway_duration, parse_istio_duration
from common.errors import ConfigError


@pytest.mark.parametrize(("text", "seconds"), [
    ("1.5s", 1.5), ("300ms", 0.3), ("1h", 3600.0), ("1h30m", 5400.0), ("0s", 0.0),
    ("2m3s", 123.0), ("10us", 1e-5), ("5ns", 5e-9), (".5s", 0.5), ("1h2m3s4ms", 3723.004),
])
def test_istio_duration_parses_go_syntax(text: str, seconds: float) -> None:
    assert parse_istio_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "1x", "s", "1.5", "-1s", "1 s", "1s ", "1h-2m",
                                  "1" * 70 + "s"])
def test_istio_duration_rejects_malformed_strings(text: str) -> None:
    with pytest.raises(ConfigError, match="duration"):
        parse_istio_duration(text)


@pytest.mark.parametrize(("text", "seconds"), [
    ("1h2m3s4ms", 3723.004), ("0s", 0.0), ("10s", 10.0), ("500ms", 0.5), ("99999ms", 99.999),
])
def test_gateway_duration_parses_gep_2257(text: str, seconds: float) -> None:
    assert parse_gateway_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["1.5s", "1us", "100000s", "1h1m1s1ms1h", "", "1", "1d"])
def test_gateway_duration_rejects_what_gep_2257_forbids(text: str) -> None:
    with pytest.raises(ConfigError, match="GEP-2257"):
        parse_gateway_duration(text)


@given(st.integers(0, 99999), st.integers(0, 99999), st.integers(0, 99999))
def test_gateway_duration_sums_its_terms(h: int, s: int, ms: int) -> None:
    assert parse_gateway_duration(f"{h}h{s}s{ms}ms") == pytest.approx(h * 3600 + s + ms / 1000)
    assert parse_istio_duration(f"{h}h{s}s{ms}ms") == pytest.approx(h * 3600 + s + ms / 1000)
