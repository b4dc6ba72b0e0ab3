"""Compile route regexes with Python ``re``, accepting only what is safe and RE2-compatible.

Envoy (and so Istio and the Gateway API conformance suite) matches with RE2:
full-match semantics, linear time, no backreferences or lookarounds.  The
waypoint matches with ``re.fullmatch``; to keep the same meaning and to keep a
route author from stalling the proxy with a backtracking bomb, a pattern is
refused when it

* uses a construct RE2 rejects (backreference, lookahead/lookbehind,
  conditional, atomic group, possessive quantifier, ``\\Z``, verbose flag) or a
  repeat count above 1000 (RE2's limit);
* nests a variable-width repeat inside another repeat (``(a+)+``, ``(a*b?)*``);
* repeats a body that can split one text between its parts in several ways:
  two variable-width parts that can match the same character with no
  separator between them (``(a*a?b)*``, ``(a*[ab]b*c)*``);
* repeats an alternation whose branches can start with the same character or
  can match the empty string (``(a|ab)*``, ``(a|)*``).

The last three are the shapes behind exponential backtracking; the check is
conservative (it may refuse a harmless pattern, and says how to rewrite it).
Inputs are bounded elsewhere (header and path sizes), which keeps the
remaining polynomial cases (``.*x.*y``) cheap.  The refusal is a
:class:`~common.errors.ConfigError` the translator reports on the object.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from common.errors import ConfigError

_parser: Any = importlib.import_module("re._parser")
_c: Any = importlib.import_module("re._constants")

#: Longest pattern accepted (the Gateway API bounds path values to 1024 characters).
MAX_PATTERN_LENGTH = 1024
#: RE2 refuses repeat counts above this.
MAX_REPEAT_COUNT = 1000

_MAX_CHAR = 0x10FFFF
_Ranges = list[tuple[int, int]]
_ALL: _Ranges = [(0, _MAX_CHAR)]
_CATEGORY_RANGES: dict[Any, _Ranges] = {
    _c.CATEGORY_DIGIT: [(48, 57)],
    _c.CATEGORY_WORD: [(48, 57), (65, 90), (95, 95), (97, 122), (128, _MAX_CHAR)],
    _c.CATEGORY_SPACE: [(9, 13), (32, 32)],
}


def compile_safe(pattern: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    """Compile ``pattern`` for ``fullmatch`` or raise ConfigError saying why it is refused."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ConfigError(f"regex is {len(pattern)} characters long; at most "
                          f"{MAX_PATTERN_LENGTH} are accepted")
    try:
        parsed = _parser.parse(pattern)
    except re.error as exc:
        raise ConfigError(f"invalid regex {pattern!r}: {exc}") from exc
    if parsed.state.flags & (re.VERBOSE | re.LOCALE):
        raise ConfigError(f"regex {pattern!r} uses the x or L flag, which RE2 does not support")
    if parsed.state.groupdict and any(not n.isidentifier() for n in parsed.state.groupdict):
        raise ConfigError(f"regex {pattern!r} has an invalid group name")
    _check(parsed, pattern)
    return re.compile(pattern, re.IGNORECASE if ignore_case else 0)


def _refuse(pattern: str, why: str) -> ConfigError:
    return ConfigError(f"regex {pattern!r} refused: {why}")


def _check(sub: Any, pattern: str) -> None:
    for op, av in sub:
        if op in (_c.GROUPREF, _c.GROUPREF_EXISTS):
            raise _refuse(pattern, "backreferences and conditionals are not RE2 syntax")
        if op in (_c.ASSERT, _c.ASSERT_NOT):
            raise _refuse(pattern, "lookahead/lookbehind are not RE2 syntax")
        if op in (_c.ATOMIC_GROUP, _c.POSSESSIVE_REPEAT):
            raise _refuse(pattern, "atomic groups and possessive quantifiers are not RE2 syntax")
        if op is _c.AT and av is _c.AT_END_STRING:
            raise _refuse(pattern, r"\Z is not RE2 syntax (matching is anchored already)")
        if op is _c.SUBPATTERN:
            _group, add_flags, _del_flags, body = av
            if add_flags & (re.VERBOSE | re.LOCALE):
                raise _refuse(pattern, "the x and L flags are not RE2 syntax")
            _check(body, pattern)
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            low, high, body = av
            bounded = high is not _c.MAXREPEAT
            if low > MAX_REPEAT_COUNT or (bounded and high > MAX_REPEAT_COUNT):
                raise _refuse(pattern, f"repeat counts above {MAX_REPEAT_COUNT} are not RE2 syntax")
            if not bounded or high > 1:
                _check_branches_disjoint(body, pattern)
                _check_no_ambiguous_nesting(body, pattern)
                _check_one_split(body, pattern)
            _check(body, pattern)
        elif op is _c.BRANCH:
            for branch in av[1]:
                _check(branch, pattern)


def _check_no_ambiguous_nesting(body: Any, pattern: str) -> None:
    """A repeated body holding a variable-width repeat needs a separator character.

    ``(a+)+`` can split a run of ``a`` in exponentially many ways; ``(/[^/]+)*``
    cannot, because every iteration starts with ``/``, which the inner repeat
    never matches.  So: the body must begin or end with a single-character
    element that no nested variable-width repeat can match.
    """
    inner = _variable_repeat_chars(body)
    if inner is None:
        return
    items = list(body)
    while len(items) == 1 and items[0][0] is _c.SUBPATTERN:
        items = list(items[0][1][3])
    for op, av in (items[:1] + items[-1:]) if items else []:
        separator = _single_char(op, av)
        if separator is not None and not _overlaps(separator, inner):
            return
    raise _refuse(pattern, "a variable-width repeat nested in another repeat can backtrack "
                  "exponentially; rewrite it without the nesting (e.g. '(a+)+' as 'a+') or "
                  "start each repetition with a separator the inner part never matches "
                  "(e.g. '(/[^/]+)*')")


def _check_one_split(sub: Any, pattern: str) -> None:
    """Under a repeat, each sequence (at any depth) must divide its text one way only.

    ``(a*a?b)*`` passes the separator rule (every repetition ends with ``b``),
    yet ``a*`` and ``a?`` can share each run of ``a`` two ways, and the outer
    repeat multiplies the choices: ``abab...ab!`` takes 2**n steps.  So, reading
    a sequence left to right from each variable-width part, no later
    variable-width part may match a character that the run so far can match,
    until a part that always consumes a character outside that run ends it
    (``(/a*-a*)*`` is fine, ``(a*b?a*c)*`` and ``(a*[ab]b*c)*`` are not).
    Conservative: characters are over-approximated.
    """
    items = [(op, av) for op, av in sub if op is not _c.AT]
    parts = []
    for item in items:
        low, high = _parser.SubPattern(sub.state, [item]).getwidth()
        parts.append((_chars([item]), low, low != high))
        op, av = item
        nested: list[Any] = []
        if op is _c.SUBPATTERN:
            nested = [av[3]]
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            nested = [av[2]]
        elif op is _c.BRANCH:
            nested = list(av[1])
        for body in nested:
            _check_one_split(body, pattern)
    for i, (run, _low, variable) in enumerate(parts):
        if not variable:
            continue
        for chars, low, later_variable in parts[i + 1:]:
            if _overlaps(run, chars):
                if later_variable:
                    raise _refuse(pattern, "two variable-width parts of a repeated group can "
                                  "match the same characters with nothing between them to "
                                  "tell where one ends, which can backtrack exponentially; "
                                  "merge them (e.g. 'a*a?' as 'a*') or separate them with a "
                                  "character neither matches (e.g. 'a*-a?')")
                run = run + chars
            elif low > 0:
                break


def _variable_repeat_chars(sub: Any) -> _Ranges | None:
    """Characters the variable-width repeats inside ``sub`` match, or None if it has none."""
    found: _Ranges | None = None
    for op, av in sub:
        nested: list[Any] = []
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            low, high, body = av
            width = body.getwidth()
            if low != high or width[0] != width[1]:
                found = (found or []) + _chars(body)
            nested = [body]
        elif op is _c.SUBPATTERN:
            nested = [av[3]]
        elif op is _c.BRANCH:
            nested = list(av[1])
            widths = {b.getwidth() for b in av[1]}
            if len(widths) > 1:
                found = (found or []) + _chars(sub)
        for part in nested:
            more = _variable_repeat_chars(part)
            if more is not None:
                found = (found or []) + more
    return found


def _single_char(op: Any, av: Any) -> _Ranges | None:
    if op is _c.LITERAL:
        return [(av, av)]
    if op is _c.NOT_LITERAL:
        return _complement([(av, av)])
    if op is _c.IN:
        return _class_ranges(av)
    return None


def _chars(sub: Any) -> _Ranges:
    """Every character ``sub`` can match anywhere (over-approximation)."""
    out: _Ranges = []
    for op, av in sub:
        if op is _c.LITERAL:
            out.append((av, av))
        elif op is _c.NOT_LITERAL:
            out.extend(_complement([(av, av)]))
        elif op is _c.IN:
            out.extend(_class_ranges(av))
        elif op is _c.SUBPATTERN:
            out.extend(_chars(av[3]))
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            out.extend(_chars(av[2]))
        elif op is _c.BRANCH:
            for branch in av[1]:
                out.extend(_chars(branch))
        elif op is not _c.AT:
            return _ALL
    return out


def _check_branches_disjoint(sub: Any, pattern: str) -> None:
    """Under a repeat, alternatives must not overlap in their first character nor be empty."""
    for op, av in sub:
        if op is _c.SUBPATTERN:
            _check_branches_disjoint(av[3], pattern)
            continue
        if op is not _c.BRANCH:
            continue
        seen: _Ranges = []
        for branch in av[1]:
            if branch.getwidth()[0] == 0:
                raise _refuse(pattern, "a repeated alternation with an empty alternative can "
                              "backtrack exponentially; make the alternative non-empty")
            first = _first_chars(branch)
            if _overlaps(seen, first):
                raise _refuse(pattern, "the alternatives of a repeated group can start with the "
                              "same character, which can backtrack exponentially; make them "
                              "start differently")
            seen.extend(first)


def _first_chars(sub: Any) -> _Ranges:
    """The characters a (non-empty) pattern can start with, as code-point ranges (over-approx)."""
    for op, av in sub:
        if op is _c.LITERAL:
            return [(av, av)]
        if op is _c.IN:
            return _class_ranges(av)
        if op is _c.SUBPATTERN:
            inner = av[3]
            if inner.getwidth()[0] == 0:
                return _ALL
            return _first_chars(inner)
        if op is _c.BRANCH:
            out: _Ranges = []
            for branch in av[1]:
                out.extend(_first_chars(branch))
            return out
        if op is _c.AT:
            continue
        # ANY, NOT_LITERAL, repeats, categories: assume anything.
        return _ALL
    return _ALL


def _class_ranges(items: Any) -> _Ranges:
    ranges: _Ranges = []
    negate = False
    for op, av in items:
        if op is _c.NEGATE:
            negate = True
        elif op is _c.LITERAL:
            ranges.append((av, av))
        elif op is _c.RANGE:
            ranges.append((av[0], av[1]))
        elif op is _c.CATEGORY and av in _CATEGORY_RANGES:
            ranges.extend(_CATEGORY_RANGES[av])
        else:
            return _ALL
    return _complement(ranges) if negate else ranges


def _complement(ranges: _Ranges) -> _Ranges:
    out: _Ranges = []
    nxt = 0
    for lo, hi in sorted(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = max(nxt, hi + 1)
    if nxt <= _MAX_CHAR:
        out.append((nxt, _MAX_CHAR))
    return out


def _overlaps(a: _Ranges, b: _Ranges) -> bool:
    return any(lo1 <= hi2 and lo2 <= hi1 for lo1, hi1 in a for lo2, hi2 in b)
