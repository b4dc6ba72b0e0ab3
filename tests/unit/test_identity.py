"""SPIFFE identity parsing: strict, round-trips, says what is wrong."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import IdentityError
from common.identity import SpiffeId


def test_parse_and_format_round_trip() -> None:
    uri = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
    sid = SpiffeId.parse(uri)
    assert sid == SpiffeId("cluster.local", "default", "bookinfo-productpage")
    assert str(sid) == uri


def test_identity_is_a_hashable_value() -> None:
    a = SpiffeId.parse("spiffe://td/ns/a/sa/b")
    b = SpiffeId.parse("spiffe://td/ns/a/sa/b")
    assert a == b
    assert len({a, b}) == 1


def test_service_account_may_be_a_dns_subdomain() -> None:
    assert SpiffeId.parse("spiffe://td_1.x-y/ns/n/sa/a.b-c").service_account == "a.b-c"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "must start with 'spiffe://'"),
        ("https://td/ns/a/sa/b", "must start with 'spiffe://'"),
        ("SPIFFE://td/ns/a/sa/b", "must start with 'spiffe://'"),
        ("spiffe:///ns/a/sa/b", "trust domain is empty"),
        ("spiffe://TD/ns/a/sa/b", "may contain only lower-case"),
        ("spiffe://user@td/ns/a/sa/b", "userinfo"),
        ("spiffe://td:443/ns/a/sa/b", "port"),
        ("spiffe://td/ns/a/sa/b?x=1", "query"),
        ("spiffe://td/ns/a/sa/b#frag", "fragment"),
        ("spiffe://td/ns/a%2Fb/sa/c", "percent-encoding"),
        ("spiffe://td", "exactly the path /ns/<namespace>/sa/<service-account>"),
        ("spiffe://td/", "exactly the path"),
        ("spiffe://td/ns/a/sa/b/", "exactly the path"),
        ("spiffe://td/ns/a/sa/b/c", "exactly the path"),
        ("spiffe://td/ns/a/sa", "exactly the path"),
        ("spiffe://td/sa/b/ns/a", "exactly the path"),
        ("spiffe://td//ns/a/sa/b", "exactly the path"),
        ("spiffe://td/ns//sa/b", "namespace segment is empty"),
        ("spiffe://td/ns/a/sa/", "service account segment is empty"),
        ("spiffe://td/ns/A/sa/b", "not a Kubernetes namespace name"),
        ("spiffe://td/ns/-a/sa/b", "not a Kubernetes namespace name"),
        ("spiffe://td/ns/a.b/sa/c", "not a Kubernetes namespace name"),
        ("spiffe://td/ns/" + "a" * 64 + "/sa/b", "not a Kubernetes namespace name"),
        ("spiffe://td/ns/a/sa/B", "not a Kubernetes service account name"),
        ("spiffe://td/ns/a/sa/b..c", "not a Kubernetes service account name"),
        ("spiffe://td/ns/a/sa/b c", "not a Kubernetes service account name"),
        ("spiffe://" + "a" * 256 + "/ns/a/sa/b", "at most 255"),
        ("spiffe://td/ns/a/sa/" + "a" * 2100, "longer than 2048 bytes"),
    ],
)
def test_parse_rejects_with_a_message_saying_what_is_wrong(uri: str, message: str) -> None:
    with pytest.raises(IdentityError, match=message.replace("?", r"\?").replace("(", r"\(")):
        SpiffeId.parse(uri)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(IdentityError, match="must be a string"):
        SpiffeId.parse(b"spiffe://td/ns/a/sa/b")  # type: ignore[arg-type]


def test_direct_construction_validates() -> None:
    with pytest.raises(IdentityError, match="namespace"):
        SpiffeId("td", "a/b", "c")


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_identities = st.builds(
    SpiffeId,
    trust_domain=st.from_regex(r"[a-z0-9._-]{1,40}", fullmatch=True),
    namespace=_label,
    service_account=st.lists(_label, min_size=1, max_size=3).map(".".join),
)


@given(_identities)
def test_parse_of_str_is_identity(sid: SpiffeId) -> None:
    assert SpiffeId.parse(str(sid)) == sid
