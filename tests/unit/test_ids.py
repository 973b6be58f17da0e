"""SPIFFE IDs and trust domains: every rule of the SPIFFE ID standard, both ways."""

from __future__ import annotations

import dataclasses
import re
from typing import cast

import pytest

from authority.errors import InvalidArgument, InvalidSpiffeId
from authority.ids import MAX_ID_BYTES, MAX_TRUST_DOMAIN_BYTES, SpiffeId, TrustDomain

TD = TrustDomain("example.org")

VALID_IDS = [
    "spiffe://example.org",
    "spiffe://example.org/workload",
    "spiffe://example.org/ns/prod/sa/web",
    "spiffe://a",
    "spiffe://trust-domain_1.example.org/Path.With-Mixed_Case/0",
    "spiffe://example.org/...",  # three dots is an ordinary segment
    "spiffe://example.org/.hidden",
    "spiffe://example.org/a..b",
    "spiffe://1.2.3.4/x",  # an IP-like name is only characters to SPIFFE
]


@pytest.mark.parametrize("text", VALID_IDS)
def test_valid_ids_parse_and_round_trip(text: str) -> None:
    sid = SpiffeId.parse(text)
    assert sid.uri == text
    assert str(sid) == text
    assert SpiffeId.parse(sid.uri) == sid


INVALID_IDS = [
    ("", "empty"),
    ("example.org/workload", "scheme"),
    ("https://example.org/workload", "scheme"),
    ("SPIFFE://example.org/workload", "scheme"),
    ("Spiffe://example.org/workload", "scheme"),
    ("spiffe:/example.org/workload", "scheme"),
    ("spiffe:example.org", "scheme"),
    (" spiffe://example.org", "scheme"),
    ("spiffe://", "empty"),
    ("spiffe:///workload", "empty"),
    ("spiffe://Example.org/workload", "lower-case"),
    ("spiffe://EXAMPLE.ORG", "lower-case"),
    ("spiffe://example.org:8080/workload", "port"),
    ("spiffe://example.org:/workload", "port"),
    ("spiffe://user@example.org/workload", "user info"),
    ("spiffe://user:pass@example.org/workload", "trust domain"),
    ("spiffe://exa%6Dple.org/workload", "lower-case"),
    ("spiffe://exämple.org/workload", "lower-case"),
    ("spiffe://example org/workload", "lower-case"),
    ("spiffe://example.org/", "end with '/'"),
    ("spiffe://example.org/workload/", "end with '/'"),
    ("spiffe://example.org//workload", "empty segment"),
    ("spiffe://example.org/a//b", "empty segment"),
    ("spiffe://example.org/.", "'.' or '..'"),
    ("spiffe://example.org/..", "'.' or '..'"),
    ("spiffe://example.org/a/./b", "'.' or '..'"),
    ("spiffe://example.org/a/../b", "'.' or '..'"),
    ("spiffe://example.org/workload?x=1", "query"),
    ("spiffe://example.org?x=1", "query"),
    ("spiffe://example.org/workload#frag", "fragment"),
    ("spiffe://example.org#frag", "fragment"),
    ("spiffe://example.org/work%20load", "path segments"),
    ("spiffe://example.org/%2E%2E", "path segments"),
    ("spiffe://example.org/a b", "path segments"),
    ("spiffe://example.org/caf\u00e9", "path segments"),
    ("spiffe://example.org/a:b", "path segments"),
    ("spiffe://example.org/a@b", "path segments"),
    ("spiffe://example.org/a\\b", "path segments"),
    ("spiffe://example.org/a\nb", "path segments"),
]


@pytest.mark.parametrize(("text", "why"), INVALID_IDS)
def test_invalid_ids_are_refused(text: str, why: str) -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse(text)
    assert why in str(info.value)
    assert info.value.reason == "INVALID_SPIFFE_ID"
    assert isinstance(info.value, InvalidArgument)  # maps to INVALID_ARGUMENT


def test_length_limit_is_2048_bytes() -> None:
    prefix = "spiffe://example.org/"
    exact = prefix + "a" * (MAX_ID_BYTES - len(prefix))
    assert len(SpiffeId.parse(exact).uri.encode()) == MAX_ID_BYTES
    with pytest.raises(InvalidSpiffeId, match="2048 bytes"):
        SpiffeId.parse(exact + "a")


def test_length_limit_holds_for_ids_built_from_parts() -> None:
    segments = ["a" * 100] * 21  # 21 * 101 bytes of path, plus the prefix: over 2048
    with pytest.raises(InvalidSpiffeId, match="2048 bytes"):
        SpiffeId.from_segments(TD, *segments)


def test_trust_domain_length_limit_is_255_bytes() -> None:
    name = "a" * MAX_TRUST_DOMAIN_BYTES
    assert TrustDomain(name).name == name
    with pytest.raises(InvalidSpiffeId, match="255 bytes"):
        TrustDomain(name + "a")
    with pytest.raises(InvalidSpiffeId, match="255 bytes"):
        SpiffeId.parse(f"spiffe://{name}a/x")


def test_parse_refuses_non_strings() -> None:
    with pytest.raises(InvalidSpiffeId, match="string"):
        SpiffeId.parse(b"spiffe://example.org/x")  # type: ignore[arg-type]


def test_parts() -> None:
    sid = SpiffeId.parse("spiffe://example.org/ns/prod")
    assert sid.trust_domain == TD
    assert sid.path == "/ns/prod"
    assert sid.member_of(TD)
    assert not sid.member_of(TrustDomain("example.com"))


def test_trust_domain_id_has_no_path() -> None:
    assert TD.id == SpiffeId.parse("spiffe://example.org")
    assert TD.id.path == ""
    assert str(TD) == "example.org"


def test_from_segments() -> None:
    sid = SpiffeId.from_segments(TD, "ns", "prod", "sa", "web")
    assert sid.uri == "spiffe://example.org/ns/prod/sa/web"
    assert SpiffeId.from_segments(TD) == TD.id


@pytest.mark.parametrize(
    "segment", ["", ".", "..", "a/b", "/a", "a/", "a?b", "a#b", "a%2Fb", "caf\u00e9"]
)
def test_from_segments_validates_each_segment(segment: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.from_segments(TD, "ok", segment)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(InvalidSpiffeId, match="start with '/'"):
        SpiffeId(TD, "workload")
    with pytest.raises(InvalidSpiffeId, match=re.escape("'.' or '..'")):
        SpiffeId(TD, "/a/..")
    with pytest.raises(InvalidSpiffeId, match="TrustDomain"):
        SpiffeId("example.org", "/x")  # type: ignore[arg-type]
    with pytest.raises(InvalidSpiffeId, match="string"):
        TrustDomain(None)  # type: ignore[arg-type]


# --- TrustDomain.parse -----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["example.org", "spiffe://example.org"])
def test_trust_domain_parse_accepts_name_or_id(text: str) -> None:
    assert TrustDomain.parse(text) == TD


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("Example.org", "lower-case"),
        ("example.org:443", "port"),
        ("user@example.org", "user info"),
        ("example.org/", "lower-case"),
        ("spiffe://example.org/workload", "no path"),
        ("spiffe://example.org/", "end with '/'"),
        ("spiffe://", "empty"),
        ("https://example.org", "trust domain"),
        ("exa%6Dple.org", "lower-case"),
    ],
)
def test_trust_domain_parse_refuses(text: str, why: str) -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        TrustDomain.parse(text)
    assert why in str(info.value)


# --- value semantics -------------------------------------------------------------------------


def test_ids_are_frozen() -> None:
    sid = SpiffeId.parse("spiffe://example.org/a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        sid.path = "/b"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        TD.name = "other.org"  # type: ignore[misc]


def test_ids_are_hashable_values() -> None:
    a1 = SpiffeId.parse("spiffe://example.org/a")
    a2 = SpiffeId.from_segments(TrustDomain("example.org"), "a")
    b = SpiffeId.parse("spiffe://example.org/b")
    assert a1 == a2
    assert a1 is not a2
    assert hash(a1) == hash(a2)
    assert {a1, a2, b} == {a1, b}
    assert {TrustDomain("example.org"): 1}[TD] == 1
    assert sorted([b, a1]) == [a1, b]


def test_paths_are_case_sensitive() -> None:
    assert SpiffeId.parse("spiffe://example.org/A") != SpiffeId.parse("spiffe://example.org/a")


def test_an_id_never_equals_a_string() -> None:
    sid: object = SpiffeId.parse("spiffe://example.org/a")
    text: object = "spiffe://example.org/a"
    assert sid != text
    assert text != sid
    assert sid not in {text}
    trust_domain: object = TD
    assert trust_domain != "example.org"
    assert TD.id != cast(object, "spiffe://example.org")
