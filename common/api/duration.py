"""Duration strings of the two APIs the mesh reads, parsed to float seconds.

* Istio (``networking.istio.io``): protobuf ``Duration`` fields are validated by
  the CRD with CEL ``duration()``, which takes Go ``time.ParseDuration`` syntax:
  one or more ``<decimal><unit>`` terms, units ``h m s ms us µs ns`` (``"1.5s"``,
  ``"300ms"``, ``"1h30m"``).  A bare number is not a duration.
* Gateway API (GEP-2257): ``^([0-9]{1,5}(h|m|s|ms)){1,4}$``: integers only, at
  most four terms (``"1h2m3s4ms"``), no fractions, no ``us``/``ns``.

Both parsers raise :class:`~common.errors.ConfigError` naming the accepted form,
so a translator can put the message on the offending field.
"""

from __future__ import annotations

import re

from common.errors import ConfigError

_UNIT_SECONDS = {
    "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6,
    "ns": 1e-9,
}

# "ms" must be tried before "m" and "s"; the alternation order below does that.
_GO_TERM = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|μs|ns|h|m|s)")
_GATEWAY_DURATION = re.compile(r"(?:[0-9]{1,5}(?:h|ms|m|s)){1,4}")
_GATEWAY_TERM = re.compile(r"([0-9]{1,5})(h|ms|m|s)")

#: Longest duration string accepted; protects the regex scan from absurd input.
_MAX_LEN = 64


def parse_istio_duration(text: str) -> float:
    """Parse an Istio duration (Go syntax, e.g. ``"1.5s"``, ``"1h30m"``) to seconds.

    ``"0s"`` parses to ``0.0``; what zero means (usually "disabled") is the caller's call.
    """
    if not isinstance(text, str) or not text or len(text) > _MAX_LEN:
        raise ConfigError(f"invalid duration {text!r}: expected a string like '1.5s', "
                          "'300ms' or '1h30m'")
    pos = 0
    total = 0.0
    for term in _GO_TERM.finditer(text):
        if term.start() != pos:
            break
        total += float(term.group(1)) * _UNIT_SECONDS[term.group(2)]
        pos = term.end()
    if pos != len(text):
        raise ConfigError(f"invalid duration {text!r}: expected <number><unit> terms with "
                          "units h, m, s, ms, us, ns (e.g. '1.5s', '300ms', '1h30m')")
    return total


def parse_gateway_duration(text: str) -> float:
    """Parse a Gateway API duration (GEP-2257, e.g. ``"1h2m3s4ms"``) to seconds."""
    if not isinstance(text, str) or _GATEWAY_DURATION.fullmatch(text) is None:
        raise ConfigError(f"invalid Gateway API duration {text!r}: expected 1-4 terms of "
                          "up to 5 digits with unit h, m, s or ms (GEP-2257), e.g. '1h2m3s4ms'")
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _GATEWAY_TERM.findall(text))
