from __future__ import annotations

import pytest

from common.kube.selectors import (
    LabelSelector,
    SelectorError,
    parse_field_selector,
    parse_label_selector,
)

LABELS = {"app": "web", "version": "v1", "istio.io/rev": "default"}


@pytest.mark.parametrize(("selector", "expected"), [
    ("", True),
    ("app=web", True),
    ("app==web", True),
    ("app!=web", False),
    ("missing!=x", True),
    ("app=web,version=v2", False),
    ("version in (v1, v2)", True),
    ("version notin (v1)", False),
    ("missing notin (v1)", True),
    ("missing in (v1)", False),
    ("istio.io/rev", True),
    ("!istio.io/rev", False),
    ("!missing", True),
    ("app=web, version in (v1,v3), !missing", True),
])
def test_label_selector_semantics(selector: str, expected: bool) -> None:
    assert parse_label_selector(selector).matches(LABELS) is expected


def test_empty_value_matches_empty_label() -> None:
    assert parse_label_selector("app=").matches({"app": ""})
    assert not parse_label_selector("app=").matches({"app": "web"})


@pytest.mark.parametrize("selector", ["a b", "version in v1", "=x", "app=we b",
                                      "version in (v1,", "k in (a b)"])
def test_label_selector_rejects_garbage(selector: str) -> None:
    with pytest.raises(SelectorError):
        parse_label_selector(selector)


def test_match_labels_selector_equals_service_selector() -> None:
    selector = LabelSelector.from_match_labels({"app": "web"})
    assert selector.matches(LABELS) and not selector.matches({"app": "db"})
    assert not selector.matches(None)


def test_field_selector_paths_and_negation() -> None:
    pod = {"metadata": {"name": "a", "namespace": "demo"}, "spec": {"nodeName": "n1",
                                                                   "hostNetwork": True}}
    assert parse_field_selector("spec.nodeName=n1").matches(pod)
    assert parse_field_selector("metadata.namespace==demo,metadata.name!=b").matches(pod)
    assert not parse_field_selector("spec.nodeName=n2").matches(pod)
    assert parse_field_selector("status.phase=").matches(pod)  # missing compares as ""
    assert parse_field_selector("spec.hostNetwork=true").matches(pod)
    with pytest.raises(SelectorError):
        parse_field_selector("spec.nodeName")
