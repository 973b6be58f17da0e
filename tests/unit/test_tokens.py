"""Task tokens: what ``mint`` writes, and everything ``verify`` refuses.

Tokens with odd claims are made here with PyJWT directly (signed with the right key, so only the
claim under test is wrong), or by hand where PyJWT refuses to (``alg: none``, HMAC keyed with
the public key)."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from authority.errors import InvalidArgument, PermissionDenied, Unauthenticated
from authority.tokens import (
    HARD_MAX_TTL,
    TASK_TOKEN_TYP,
    Intent,
    TaskToken,
    check_binding,
    check_scope,
    mint,
    resource_within,
    verify,
    x5t_s256,
)

ISSUER = "spiffe://example.org"
AGENT = "spiffe://example.org/agent/reporter"
HELPER = "spiffe://example.org/agent/helper"
RUNNER = "spiffe://example.org/agent/runner"
NOW = dt.datetime(2026, 1, 5, 10, 0, tzinfo=dt.UTC)
KID = "task-key-1"
CERT = b"the holder's certificate, DER"
INTENT = Intent(
    action="read",
    resource="metrics/prod",
    purpose="weekly report",
    environment="prod",
    parameters={"window": "7d", "format": "csv"},
)


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def keys(key: ec.EllipticCurvePrivateKey) -> dict[str, ec.EllipticCurvePublicKey]:
    return {KID: key.public_key()}


def make(key: ec.EllipticCurvePrivateKey, **overrides: Any) -> TaskToken:
    args: dict[str, Any] = {
        "key": key,
        "key_id": KID,
        "algorithm": "ES256",
        "issuer": ISSUER,
        "subject": AGENT,
        "audience": "metrics-api",
        "now": NOW,
        "expires_at": NOW + dt.timedelta(minutes=5),
        "jti": "jti-1",
        "task_id": "task-1",
        "intent": INTENT,
        "cnf_x5t": x5t_s256(CERT),
        "actors": (),
        "decision_id": "dec-1",
        "may_delegate": 1,
    }
    args.update(overrides)
    return mint(**args)


def check(token: str, keys: Mapping[str, ec.EllipticCurvePublicKey], **overrides: Any) -> TaskToken:
    args: dict[str, Any] = {
        "keys": keys,
        "issuer": ISSUER,
        "audience": "metrics-api",
        "now": NOW + dt.timedelta(seconds=30),
    }
    args.update(overrides)
    return verify(token, **args)


def good_claims() -> dict[str, Any]:
    """The claims ``mint`` writes for the default token."""
    return {
        "iss": ISSUER,
        "sub": AGENT,
        "aud": "metrics-api",
        "iat": int(NOW.timestamp()),
        "nbf": int(NOW.timestamp()),
        "exp": int(NOW.timestamp()) + 300,
        "jti": "jti-1",
        "txn": "task-1",
        "scope": "read",
        "tctx": INTENT.as_claim(),
        "purp": "weekly report",
        "cnf": {"x5t#S256": x5t_s256(CERT)},
        "decision_id": "dec-1",
        "del": 1,
    }


def forge(
    key: ec.EllipticCurvePrivateKey,
    claims: Mapping[str, Any],
    *,
    typ: str | None = TASK_TOKEN_TYP,
    kid: str = KID,
    alg: str = "ES256",
) -> str:
    headers: dict[str, Any] = {"kid": kid}
    if typ is not None:
        headers["typ"] = typ
    return jwt.encode(dict(claims), key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes) -> str:
    return ".".join(
        (b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature))
    )


def refused(reason: str, fn: Any, *args: Any, **kwargs: Any) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as caught:
        fn(*args, **kwargs)
    assert caught.value.reason == reason, caught.value
    return caught.value


# --- mint and verify -----------------------------------------------------------------------------


def test_round_trip_gives_back_what_was_minted(
    key: ec.EllipticCurvePrivateKey, keys: dict[str, ec.EllipticCurvePublicKey]
) -> None:
    minted = make(key)
    verified = check(minted.token, keys)
    assert verified == minted
    assert verified.holder == AGENT
    assert verified.depth == 0
    assert verified.scopes == ("read",)
    assert verified.issued_at == NOW
    assert verified.expires_at == NOW + dt.timedelta(minutes=5)
    assert verified.intent == INTENT


def test_every_claim_is_written(key: ec.EllipticCurvePrivateKey) -> None:
    minted = make(key, parent_jti="jti-0", actors=(HELPER,))
    header = jwt.get_unverified_header(minted.token)
    assert header == {"alg": "ES256", "kid": KID, "typ": "task+jwt"}
    claims = jwt.decode(minted.token, options={"verify_signature": False})
    assert claims == {
        **good_claims(),
        "act": {"sub": HELPER},
        "parent": "jti-0",
        "tctx": {
            "action": "read",
            "resource": "metrics/prod",
            "purpose": "weekly report",
            "environment": "prod",
            "parameters": {"format": "csv", "window": "7d"},
        },
    }
    assert isinstance(claims["aud"], str)  # exactly one audience, not a list


def test_a_direct_token_has_neither_act_nor_parent(key: ec.EllipticCurvePrivateKey) -> None:
    claims = jwt.decode(make(key).token, options={"verify_signature": False})
    assert "act" not in claims
    assert "parent" not in claims


def test_a_token_collected_with_an_approval_names_it_and_others_do_not(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    approved = make(key, approval_id="apr-42")
    assert jwt.decode(approved.token, options={"verify_signature": False})["apr"] == "apr-42"
    assert check(approved.token, {KID: key.public_key()}).approval_id == "apr-42"
    plain = make(key)
    assert "apr" not in jwt.decode(plain.token, options={"verify_signature": False})
    assert check(plain.token, {KID: key.public_key()}).approval_id == ""


def test_a_token_printed_or_logged_shows_its_jti_not_the_token(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    minted = make(key)
    assert minted.token
    assert minted.token not in repr(minted)
    assert minted.token.split(".")[2] not in f"{minted!r} {minted!s}"
    assert minted.jti in repr(minted)


def test_two_level_delegation_nests_act_current_holder_outermost(
    key: ec.EllipticCurvePrivateKey, keys: dict[str, ec.EllipticCurvePublicKey]
) -> None:
    minted = make(key, actors=(RUNNER, HELPER), parent_jti="jti-helper", may_delegate=0)
    claims = jwt.decode(minted.token, options={"verify_signature": False})
    assert claims["act"] == {"sub": RUNNER, "act": {"sub": HELPER}}  # RFC 8693 section 4.1
    assert claims["sub"] == AGENT  # whose intent it stays
    verified = check(minted.token, keys)
    assert verified.actors == (RUNNER, HELPER)
    assert verified.holder == RUNNER
    assert verified.depth == 2
    assert verified.parent_jti == "jti-helper"
    assert verified.may_delegate == 0


def test_es384_tokens_verify_with_a_p384_key() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    minted = make(key, algorithm="ES384")
    assert jwt.get_unverified_header(minted.token)["alg"] == "ES384"
    assert check(minted.token, {KID: key.public_key()}).jti == "jti-1"


def test_mint_caps_a_token_at_fifteen_minutes(key: ec.EllipticCurvePrivateKey) -> None:
    at_cap = make(key, expires_at=NOW + HARD_MAX_TTL)
    assert at_cap.expires_at - at_cap.issued_at == HARD_MAX_TTL
    with pytest.raises(InvalidArgument):
        make(key, expires_at=NOW + HARD_MAX_TTL + dt.timedelta(seconds=2))


def test_verify_refuses_a_token_living_longer_than_the_cap(
    key: ec.EllipticCurvePrivateKey, keys: dict[str, ec.EllipticCurvePublicKey]
) -> None:
    claims = {**good_claims(), "exp": int(NOW.timestamp()) + 16 * 60}
    refused("TOKEN_LIFETIME", check, forge(key, claims), keys)


# --- time ----------------------------------------------------------------------------------------


def test_expiry_allows_the_leeway_and_no_more(
    key: ec.EllipticCurvePrivateKey, keys: dict[str, ec.EllipticCurvePublicKey]
) -> None:
    token = make(key).token
    exp = NOW + dt.timedelta(minutes=5)
    assert check(token, keys, now=exp + dt.timedelta(seconds=4)).jti == "jti-1"
    refused("TOKEN_EXPIRED", check, token, keys, now=exp + dt.timedelta(seconds=5))
    refused("TOKEN_EXPIRED", check, token, keys, now=exp, leeway=dt.timedelta(0))


def test_not_before_allows_the_leeway_and_no_more(
    key: ec.EllipticCurvePrivateKey, keys: dict[str, ec.EllipticCurvePublicKey]
) -> None:
    token = make(key).token
    assert check(token, keys, now=NOW - dt.timedelta(seconds=5)).jti == "jti-1"
    refused("TOKEN_NOT_YET_VALID", check, token, keys, now=NOW - dt.timedelta(seconds=6))


# --- who and for whom ----------------------------------------------------------------------------


def test_another_issuer_is_refused(
    key: ec.EllipticCurvePrivateKey, keys: dict[str, ec.EllipticCurvePublicKey]
) -> None:
    token = make(key, issuer="spiffe://evil.example").token
    refused("TOKEN_ISSUER", check, token, keys)


def test_another_audience_is_refused(
    key: ec.EllipticCurvePrivateKey, keys: dict[str, ec.EllipticCurvePublicKey]
) -> None:
    token = make(key, audience="tickets-api").token
    refused("TOKEN_AUDIENCE", check, token, keys)
    assert check(token, keys, audience=None).audience == "tickets-api"  # the authority's own use


def test_an_audience_list_is_refused_even_when_it_names_us(
    key: ec.EllipticCurvePrivateKey, keys: dict[str, ec.EllipticCurvePublicKey]
) -> None:
    token = forge(key, {**good_claims(), "aud": ["metrics-api", "tickets-api"]})
    refused("TOKEN_AUDIENCE", check, token, keys)
    refused("TOKEN_AUDIENCE", check, token, keys, audience=None)


# --- the JWS itself ------------------------------------------------------------------------------


def test_a_signature_by_another_key_is_refused(
    keys: dict[str, ec.EllipticCurvePublicKey],
) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    refused("TOKEN_SIGNATURE", check, make(other).token, keys)


def test_a_changed_payload_breaks_the_signature(
    key: ec.EllipticCurvePrivateKey, keys: dict[str, ec.EllipticCurvePublicKey]
) -> None:
    header, _, signature = make(key).token.split(".")
    payload = b64(json.dumps({**good_claims(), "scope": "write"}).encode())
    refused("TOKEN_SIGNATURE", check, f"{header}.{payload}.{signature}", keys)


@pytest.mark.parametrize("typ", [None, "JWT", "at+jwt", "TASK+JWT", "task+jwt "])
def test_only_the_task_token_type_is_accepted(
    key: ec.EllipticCurvePrivateKey, keys: dict[str, ec.EllipticCurvePublicKey], typ: str | None
) -> None:
    refused("TOKEN_TYPE", check, forge(key, good_claims(), typ=typ), keys)


def test_alg_none_is_refused(keys: dict[str, ec.EllipticCurvePublicKey]) -> None:
    token = hand_made({"alg": "none", "typ": TASK_TOKEN_TYP, "kid": KID}, good_claims(), b"")
    refused("TOKEN_ALGORITHM", check, token, keys)


def test_hs256_keyed_with_the_public_key_is_refused(
    key: ec.EllipticCurvePrivateKey, keys: dict[str, ec.EllipticCurvePublicKey]
) -> None:
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": TASK_TOKEN_TYP, "kid": KID}
    signing_input = ".".join(
        (b64(json.dumps(header).encode()), b64(json.dumps(good_claims()).encode()))
    )
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    refused("TOKEN_ALGORITHM", check, f"{signing_input}.{b64(mac)}", keys)


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES512", "EdDSA"])
def test_algorithms_off_the_allow_list_are_refused(
    key: ec.EllipticCurvePrivateKey, keys: dict[str, ec.EllipticCurvePublicKey], alg: str
) -> None:
    header = {"alg": alg, "typ": TASK_TOKEN_TYP, "kid": KID}
    refused("TOKEN_ALGORITHM", check, hand_made(header, good_claims(), b"sig"), keys)


def test_a_curve_that_does_not_match_the_algorithm_is_refused(
    key: ec.EllipticCurvePrivateKey, keys: dict[str, ec.EllipticCurvePublicKey]
) -> None:
    """ES384 in the header with the P-256 task key: PyJWT refuses the key for that algorithm."""
    _, payload, signature = make(key).token.split(".")
    es384 = b64(json.dumps({"alg": "ES384", "typ": TASK_TOKEN_TYP, "kid": KID}).encode())
    refused("TOKEN_MALFORMED", check, f"{es384}.{payload}.{signature}", keys)


@pytest.mark.parametrize("kid", ["another-key", "", None])
def test_an_unknown_or_missing_kid_is_refused(
    key: ec.EllipticCurvePrivateKey, keys: dict[str, ec.EllipticCurvePublicKey], kid: object
) -> None:
    header: dict[str, Any] = {"alg": "ES256", "typ": TASK_TOKEN_TYP}
    if kid is not None:
        header["kid"] = kid
    _, payload, signature = make(key).token.split(".")
    token = f"{b64(json.dumps(header).encode())}.{payload}.{signature}"
    refused("TOKEN_UNKNOWN_KEY", check, token, keys)


@pytest.mark.parametrize("text", ["", "not a token", "a.b", "a.b.c", "....", "e30.e30.e30"])
def test_what_is_not_a_jws_is_refused(
    keys: dict[str, ec.EllipticCurvePublicKey], text: str
) -> None:
    with pytest.raises(Unauthenticated) as caught:
        check(text, keys)
    assert caught.value.reason in ("TOKEN_MALFORMED", "TOKEN_TYPE")


# --- malformed claims ----------------------------------------------------------------------------

MALFORMED: list[tuple[str, dict[str, Any]]] = [
    *((f"no {name}", {name: None}) for name in ("sub", "jti", "txn", "scope", "tctx", "cnf")),
    *((f"no {name}", {name: None}) for name in ("iat", "nbf", "exp")),
    ("exp as a string", {"exp": str(int(NOW.timestamp()) + 300)}),
    ("exp as a boolean", {"exp": True}),
    ("exp out of range", {"exp": 10**20}),
    ("nbf out of range", {"nbf": -(10**20)}),
    ("iat out of range", {"iat": 2**63}),
    ("sub not a string", {"sub": 42}),
    ("jti not a string", {"jti": 42}),
    ("scope as a list", {"scope": ["read", "write"]}),
    ("tctx as a list", {"tctx": ["read"]}),
    ("tctx without an action", {"tctx": {"resource": "metrics/prod", "purpose": "p"}}),
    ("tctx with a bad action", {"tctx": {**INTENT.as_claim(), "action": "Read Everything"}}),
    ("tctx resource climbing out", {"tctx": {**INTENT.as_claim(), "resource": "metrics/../x"}}),
    ("tctx without a purpose", {"tctx": {**INTENT.as_claim(), "purpose": " "}}),
    ("tctx parameters as a list", {"tctx": {**INTENT.as_claim(), "parameters": [1, 2, 3]}}),
    ("cnf as a string", {"cnf": "thumbprint"}),
    ("cnf without x5t#S256", {"cnf": {"jkt": "abc"}}),
    ("cnf with an empty thumbprint", {"cnf": {"x5t#S256": ""}}),
    ("act without sub", {"act": {"act": {"sub": HELPER}}}),
    ("act as a string", {"act": HELPER}),
    ("act with a list inside", {"act": {"sub": HELPER, "act": [RUNNER]}}),
    ("del not a number", {"del": "many"}),
]


@pytest.mark.parametrize(("case", "change"), MALFORMED, ids=[c for c, _ in MALFORMED])
def test_malformed_claims_are_refused(
    key: ec.EllipticCurvePrivateKey,
    keys: dict[str, ec.EllipticCurvePublicKey],
    case: str,
    change: dict[str, Any],
) -> None:
    claims = {**good_claims(), **change}
    claims = {k: v for k, v in claims.items() if v is not None}
    refused("TOKEN_MALFORMED", check, forge(key, claims), keys)


def test_an_act_chain_deeper_than_sixteen_is_refused(
    key: ec.EllipticCurvePrivateKey, keys: dict[str, ec.EllipticCurvePublicKey]
) -> None:
    fine = make(key, actors=tuple(f"{AGENT}-{i}" for i in range(16)))
    assert check(fine.token, keys).depth == 16
    deep = make(key, actors=tuple(f"{AGENT}-{i}" for i in range(17)))
    refused("TOKEN_MALFORMED", check, deep.token, keys)


def test_the_claims_forge_helper_makes_a_valid_token(
    key: ec.EllipticCurvePrivateKey, keys: dict[str, ec.EllipticCurvePublicKey]
) -> None:
    """The refusals above come from the one claim changed, not from the helper."""
    forged, minted = check(forge(key, good_claims()), keys), check(make(key).token, keys)
    assert dataclasses.replace(forged, token="") == dataclasses.replace(minted, token="")


# --- binding and scope ---------------------------------------------------------------------------


def test_binding_needs_the_very_certificate(key: ec.EllipticCurvePrivateKey) -> None:
    token = make(key)
    check_binding(token, CERT)
    with pytest.raises(PermissionDenied) as caught:
        check_binding(token, CERT + b"!")
    assert caught.value.reason == "TOKEN_CNF_MISMATCH"
    refused("TOKEN_UNBOUND", check_binding, token, None)


def test_scope_is_exactly_the_action(key: ec.EllipticCurvePrivateKey) -> None:
    token = make(key)
    check_scope(token, "read")
    for action in ("write", "deploy", "read_all", "rea"):
        with pytest.raises(PermissionDenied) as caught:
            check_scope(token, action)
        assert caught.value.reason == "TOKEN_SCOPE"


def test_resource_is_the_same_or_below(key: ec.EllipticCurvePrivateKey) -> None:
    token = make(key)
    check_scope(token, "read", "metrics/prod")
    check_scope(token, "read", "metrics/prod/cpu")
    for resource in ("metrics", "metrics/prod2", "metrics/staging", "deploy/prod"):
        with pytest.raises(PermissionDenied) as caught:
            check_scope(token, "read", resource)
        assert caught.value.reason == "TOKEN_RESOURCE"
    assert resource_within("a/b/c", "a/b/")
    assert not resource_within("a/bc", "a/b")


# --- intents -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"action": "Read"},
        {"action": "read everything"},
        {"action": ""},
        {"resource": "metrics/../secrets"},
        {"resource": "/etc/passwd"},
        {"resource": ""},
        {"purpose": "   "},
        {"purpose": "x" * 513},
        {"parameters": {f"k{i}": "v" for i in range(17)}},
        {"parameters": {"k": "v" * 513}},
    ],
)
def test_an_intent_checks_itself(fields: dict[str, Any]) -> None:
    args: dict[str, Any] = {"action": "read", "resource": "metrics/prod", "purpose": "report"}
    args.update(fields)
    with pytest.raises(InvalidArgument) as caught:
        Intent(**args)
    assert caught.value.reason == "BAD_INTENT"


def test_an_intent_fingerprint_binds_intent_and_audience() -> None:
    same = Intent(
        action="read",
        resource="metrics/prod",
        purpose="weekly report",
        environment="prod",
        parameters={"format": "csv", "window": "7d"},  # another order
    )
    assert same.fingerprint("metrics-api") == INTENT.fingerprint("metrics-api")
    assert INTENT.fingerprint("metrics-api") != INTENT.fingerprint("tickets-api")
    other = Intent(action="write", resource="metrics/prod", purpose="weekly report")
    assert other.fingerprint("metrics-api") != INTENT.fingerprint("metrics-api")


def test_x5t_is_the_unpadded_base64url_sha256() -> None:
    assert x5t_s256(b"") == "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"
