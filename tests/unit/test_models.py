"""The authority's nouns check their invariants in their constructors."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from authority.errors import InvalidArgument
from authority.ids import SpiffeId
from authority.models import (
    MAX_SELECTOR_VALUE,
    AuthorityKeyInfo,
    JoinToken,
    KeyKind,
    KeyState,
    RegistrationEntry,
    Selector,
    check_dns_name,
    token_digest,
)

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)
APP = SpiffeId.parse("spiffe://example.org/app")


# --- selectors -------------------------------------------------------------------------------


def test_selector_parse_splits_on_the_first_colon() -> None:
    sel = Selector.parse("unix:uid:1000")
    assert sel == Selector("unix", "uid:1000")
    assert str(sel) == "unix:uid:1000"
    assert Selector.parse(str(sel)) == sel


def test_selector_without_a_type_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="TYPE:VALUE"):
        Selector.parse("uid1000")


@pytest.mark.parametrize("kind", ["", "Unix", "-unix", "un ix", "a" * 65, "unix:x"])
def test_selector_type_must_be_an_attestor_name(kind: str) -> None:
    with pytest.raises(InvalidArgument, match="attestor name"):
        Selector(kind, "uid:1")


@pytest.mark.parametrize(
    "value", ["", "x" * (MAX_SELECTOR_VALUE + 1), "uid:*", "path:/a?", "a\nb", "a\x00", "a\tb"]
)
def test_selector_values_are_bounded_and_exact(value: str) -> None:
    with pytest.raises(InvalidArgument):
        Selector("unix", value)


def test_selector_value_at_the_limit_is_accepted() -> None:
    assert len(Selector("unix", "x" * MAX_SELECTOR_VALUE).value) == MAX_SELECTOR_VALUE


def test_selectors_are_frozen_and_hashable() -> None:
    a = Selector("unix", "uid:1")
    assert {a, Selector("unix", "uid:1")} == {a}
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.value = "uid:0"  # type: ignore[misc]


# --- DNS names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("example.org", "example.org"),
        ("API.Example.ORG", "api.example.org"),
        ("a-b.c1", "a-b.c1"),
        ("localhost", "localhost"),
        ("x" * 63 + ".org", "x" * 63 + ".org"),
    ],
)
def test_dns_names_are_lower_cased(name: str, expected: str) -> None:
    assert check_dns_name(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "",
        "*.example.org",
        "example.org.",
        "-a.example.org",
        "a-.example.org",
        "a..b",
        "a_b.org",
        "x" * 64 + ".org",
        ".".join(["a" * 63] * 4) + ".org",  # over 253
        "10.0.0.1",
        "::1",
        "exa mple.org",
    ],
)
def test_bad_dns_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        check_dns_name(name)


# --- registration entries --------------------------------------------------------------------


def make_entry(**changes: object) -> RegistrationEntry:
    fields: dict[str, object] = {
        "id": "e1",
        "spiffe_id": APP,
        "selectors": frozenset({Selector("unix", "uid:1000"), Selector("unix", "gid:10")}),
        "x509_ttl": 5 * MINUTE,
        "jwt_ttl": 5 * MINUTE,
    }
    fields.update(changes)
    return RegistrationEntry(**fields)  # type: ignore[arg-type]


def test_entry_matches_when_all_its_selectors_are_present() -> None:
    entry = make_entry()
    both = frozenset({Selector("unix", "uid:1000"), Selector("unix", "gid:10")})
    assert entry.matches(both)
    assert entry.matches(both | {Selector("unix", "pid:7")})
    assert not entry.matches(frozenset({Selector("unix", "uid:1000")}))
    assert not entry.matches(frozenset())
    # Another attestor's selector with the same value is a different selector.
    assert not entry.matches(frozenset({Selector("unix", "uid:1000"), Selector("other", "gid:10")}))


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"id": ""}, "id is empty"),
        ({"selectors": frozenset()}, "at least one selector"),
        ({"spiffe_id": SpiffeId.parse("spiffe://example.org")}, "must have a path"),
        ({"x509_ttl": dt.timedelta(0)}, "positive"),
        ({"jwt_ttl": -MINUTE}, "positive"),
        ({"dns_names": ("Web.example.org",)}, "lower case"),
        ({"dns_names": ("*.example.org",)}, "wildcards"),
    ],
)
def test_entry_invariants(changes: dict[str, object], why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        make_entry(**changes)


def test_entry_defaults() -> None:
    entry = make_entry(dns_names=("web.example.org",))
    assert entry.admin is False
    assert entry.dns_names == ("web.example.org",)
    assert entry.created_at.tzinfo is not None


# --- join tokens -----------------------------------------------------------------------------


def test_token_digest_is_sha256_hex() -> None:
    # sha256("abc"), a published test vector.
    assert token_digest("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_join_token_holds_a_digest_only() -> None:
    token = JoinToken(token_digest("secret"), APP, NOW + MINUTE, NOW)
    assert token.used_at is None
    assert "secret" not in repr(token)


@pytest.mark.parametrize(
    "token_id",
    ["", "secret", "a" * 63, "a" * 65, "A" * 64, "g" * 64, token_digest("x").upper()],
)
def test_join_token_id_must_be_a_hex_digest(token_id: str) -> None:
    with pytest.raises(InvalidArgument, match="sha256"):
        JoinToken(token_id, APP, NOW + MINUTE, NOW)


# --- authority keys --------------------------------------------------------------------------


def test_x509_keys_and_only_they_carry_a_certificate() -> None:
    AuthorityKeyInfo(KeyKind.X509, "k", KeyState.ACTIVE, NOW, NOW + MINUTE, certificate=b"der")
    AuthorityKeyInfo(KeyKind.JWT, "k", KeyState.ACTIVE, NOW, NOW + MINUTE)
    with pytest.raises(InvalidArgument, match="certificate"):
        AuthorityKeyInfo(KeyKind.X509, "k", KeyState.ACTIVE, NOW, NOW + MINUTE)
    with pytest.raises(InvalidArgument, match="certificate"):
        AuthorityKeyInfo(KeyKind.JWT, "k", KeyState.ACTIVE, NOW, NOW + MINUTE, certificate=b"d")


@pytest.mark.parametrize("not_after", [NOW, NOW - MINUTE])
def test_key_life_must_be_positive(not_after: dt.datetime) -> None:
    with pytest.raises(InvalidArgument, match="not_after"):
        AuthorityKeyInfo(KeyKind.JWT, "k", KeyState.ACTIVE, NOW, not_after)


def test_key_enums_are_their_stored_strings() -> None:
    assert [k.value for k in KeyKind] == ["x509", "jwt", "task"]
    assert [s.value for s in KeyState] == ["prepared", "active", "old"]
    assert f"{KeyKind.X509}-abc" == "x509-abc"  # the vault name of a key
