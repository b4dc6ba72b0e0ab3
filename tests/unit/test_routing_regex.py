"""Route regexes: RE2 syntax only, no exponential backtracking shapes, full-match use."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ConfigError
from waypoint.routing.regex import MAX_PATTERN_LENGTH, compile_safe


@pytest.mark.parametrize("pattern", [
    "/v[0-9]+/.*", "(/[^/]+)*", "[^/]*(/[^/]*)*", "(,[0-9]+)*", "(ab|cd)*", "(a|b)+",
    "(a+b)*", "(ab|ac)*", "(a*ab)*", "(/a*-a*)*", "([A-Z][a-z]*)*", "/api/(v1|v2)/.*", "^abc$",
    "(?P<x>a)", "(?i)abc",
    r"\d{1,3}(\.\d{1,3}){3}",
])
def test_safe_re2_patterns_are_accepted(pattern: str) -> None:
    compile_safe(pattern)


@pytest.mark.parametrize(("pattern", "why"), [
    ("(a+)+", "nested"), ("(x+x+)+y", "nested"), ("(.*)*", "nested"), (r"(\w+\s?)+", "nested"),
    ("((ab)*)*", "nested"), ("(a|ab)*", "refused"), ("(a|a)*", "refused"),
    ("(ab|[ab]c)*", "same character"),
    ("(a|)*", "empty alternative"),
    ("(a*(a?)b)*", "variable-width parts"), ("(a*a*b)*", "variable-width parts"),
    ("(a*b?a*c)*", "variable-width parts"), ("(a*[ab]b*c)*", "variable-width parts"),
    (r"(a)\1", "backreferences"), ("(?P<n>a)(?P=n)", "backreferences"),
    ("(?=a)a", "lookahead"), ("(?<!a)b", "lookahead"), ("a++", "possessive"),
    ("(?>a)", "atomic"), (r"a\Z", r"\Z"), ("[a-z]{2000}", "above 1000"), ("(?x)a b", "x"),
    ("(", "invalid regex"), ("a" * (MAX_PATTERN_LENGTH + 1), "characters long"),
])
def test_unsafe_or_non_re2_patterns_are_refused_with_a_reason(pattern: str, why: str) -> None:
    with pytest.raises(ConfigError, match="regex") as info:
        compile_safe(pattern)
    assert why in str(info.value)


def test_ignore_case_flag() -> None:
    assert compile_safe("/abc", ignore_case=True).fullmatch("/ABC") is not None


_ATOMS = st.sampled_from(["a", "b", ".", "[ab]", "[^a]", r"\d", "(a|b)", "(ab)", "x"])
_QUANT = st.sampled_from(["", "*", "+", "?", "{2}", "{1,3}"])


@st.composite
def _patterns(draw: st.DrawFn, depth: int = 0) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        if depth < 2 and draw(st.booleans()):
            inner = draw(_patterns(depth + 1))
            parts.append(f"({inner})" + draw(_QUANT))
        else:
            parts.append(draw(_ATOMS) + draw(_QUANT))
    return "".join(parts)


@settings(max_examples=300, deadline=None)
@given(_patterns())
def test_accepted_patterns_match_adversarial_input_quickly(pattern: str) -> None:
    try:
        compiled = compile_safe(pattern)
    except ConfigError:
        return
    # The classic blow-up input: a long run that almost matches, then a mismatch.
    # Measured in this process's CPU time, not wall-clock time, so that other
    # work on a busy machine does not count.  The runs are long enough that an
    # exponential shape is far past the bound (``(a*a?b)*`` on "ab" * 24 takes
    # over 3 s) while every accepted pattern here takes milliseconds.
    for text in ("a" * 48 + "!", "ab" * 24 + "!", "1" * 48 + "!"):
        start = time.process_time()
        compiled.fullmatch(text)
        assert time.process_time() - start < 1.0, pattern
