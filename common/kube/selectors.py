"""Label and field selectors: parsing and matching, as Kubernetes defines them.

Label selector syntax (``labelSelector=``): comma-separated requirements, each one of
``key``, ``!key``, ``key=value``, ``key==value``, ``key!=value``, ``key in (a,b)``,
``key notin (a,b)``.  ``!=`` and ``notin`` also match objects without the key.

Field selector syntax (``fieldSelector=``): ``path=value``, ``path==value``,
``path!=value`` joined by commas, where ``path`` is a dotted path into the object
(``metadata.name``, ``metadata.namespace``, ``spec.nodeName``, ``status.phase``).
A missing field compares as the empty string, as the API server does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from common.errors import ConfigError

Operator = Literal["exists", "notexists", "eq", "ne", "in", "notin"]

_KEY = r"(?:[A-Za-z0-9][-A-Za-z0-9_.]*/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_NOT_EXISTS = re.compile(rf"^!\s*({_KEY})$")
_EXISTS = re.compile(rf"^({_KEY})$")
_EQUALITY = re.compile(rf"^({_KEY})\s*(==|=|!=)\s*({_VALUE})$")
_SET = re.compile(rf"^({_KEY})\s+(in|notin)\s*\(([^()]*)\)$")
_VALUE_ONLY = re.compile(rf"^{_VALUE}$")


class SelectorError(ConfigError):
    """A label or field selector that does not parse."""


@dataclass(frozen=True)
class Requirement:
    """One clause of a label selector."""

    key: str
    op: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        match self.op:
            case "exists":
                return present
            case "notexists":
                return not present
            case "eq" | "in":
                return present and value in self.values
            case "ne" | "notin":
                return not present or value not in self.values
        raise AssertionError(self.op)  # pragma: no cover - Literal is exhaustive


@dataclass(frozen=True)
class LabelSelector:
    """A parsed label selector; the empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        return all(r.matches(labels or {}) for r in self.requirements)

    @classmethod
    def from_match_labels(cls, match_labels: Mapping[str, str]) -> LabelSelector:
        """The selector equal to a Service selector or a ``matchLabels`` map."""
        return cls(tuple(Requirement(k, "eq", frozenset({v}))
                         for k, v in sorted(match_labels.items())))


def _split_top_level(text: str) -> list[str]:
    """Split at commas that are not inside ``( )``."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_label_selector(text: str | None) -> LabelSelector:
    """Parse ``labelSelector`` text; :class:`SelectorError` says which clause is wrong."""
    if text is None or not text.strip():
        return LabelSelector()
    requirements: list[Requirement] = []
    for raw in _split_top_level(text):
        clause = raw.strip()
        if m := _NOT_EXISTS.match(clause):
            requirements.append(Requirement(m[1], "notexists"))
        elif m := _EXISTS.match(clause):
            requirements.append(Requirement(m[1], "exists"))
        elif m := _EQUALITY.match(clause):
            op: Operator = "ne" if m[2] == "!=" else "eq"
            requirements.append(Requirement(m[1], op, frozenset({m[3]})))
        elif m := _SET.match(clause):
            values = [v.strip() for v in m[3].split(",")]
            bad = [v for v in values if not _VALUE_ONLY.match(v)]
            if bad or not values:
                raise SelectorError(f"label selector {text!r}: invalid value {bad[0]!r} "
                                    f"in {clause!r}" if bad else f"empty set in {clause!r}")
            set_op: Operator = "in" if m[2] == "in" else "notin"
            requirements.append(Requirement(m[1], set_op, frozenset(values)))
        else:
            raise SelectorError(
                f"label selector {text!r}: cannot parse {clause!r}; expected key, !key, "
                "key=value, key!=value, key in (a,b) or key notin (a,b)")
    return LabelSelector(tuple(requirements))


@dataclass(frozen=True)
class FieldRequirement:
    """One clause of a field selector: a dotted path compared with a value."""

    path: tuple[str, ...]
    value: str
    negate: bool

    def matches(self, obj: Mapping[str, Any]) -> bool:
        current: Any = obj
        for part in self.path:
            current = current.get(part) if isinstance(current, Mapping) else None
        actual = "" if current is None else str(current)
        if isinstance(current, bool):
            actual = "true" if current else "false"
        return (actual != self.value) if self.negate else (actual == self.value)


@dataclass(frozen=True)
class FieldSelector:
    """A parsed field selector; the empty selector matches everything."""

    requirements: tuple[FieldRequirement, ...] = ()

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return all(r.matches(obj) for r in self.requirements)


_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9]*(?:\.[A-Za-z][A-Za-z0-9]*)*)\s*(==|=|!=)\s*(.*)$")


def parse_field_selector(text: str | None) -> FieldSelector:
    """Parse ``fieldSelector`` text; :class:`SelectorError` says which clause is wrong."""
    if text is None or not text.strip():
        return FieldSelector()
    requirements: list[FieldRequirement] = []
    for raw in text.split(","):
        m = _FIELD.match(raw.strip())
        if m is None:
            raise SelectorError(f"field selector {text!r}: cannot parse {raw.strip()!r}; "
                                "expected path=value or path!=value (e.g. spec.nodeName=node-1)")
        requirements.append(FieldRequirement(tuple(m[1].split(".")), m[3].strip(), m[2] == "!="))
    return FieldSelector(tuple(requirements))
