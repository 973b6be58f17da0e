"""``jwt``: platform tokens (Kubernetes projected service-account tokens, GitHub Actions OIDC
tokens) checked against configured keys, issuer, audience, lifetime and replay; one test per
known JWT attack.

Keys are made with cryptography, tokens signed with PyJWT or assembled by hand for the attacks;
the plugin runs on the SDK's ``FakeHost`` (its clock, its replay cache).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attestors.api import AttestationRefused, Attestor, ConfigError
from attestors.jwt_attestor import PRESETS, JwtAttestor
from attestors.testing import FakeHost, ScriptedContext
from authority.attestation import AttestorHost
from authority.clock import FakeClock
from authority.config import Limits
from authority.errors import AttestationFailed
from authority.models import Selector
from authority.store.memory import MemoryStore

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
K8S_ISSUER = "https://kubernetes.default.svc.cluster.local"
K8S_AUDIENCE = "agent-authority"
GH_ISSUER = "https://token.actions.githubusercontent.com"
GH_AUDIENCE = "https://github.com/octo-org"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KIDS = {"RS256": "rsa-1", "ES256": "ec-1"}
SIGNERS: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] = {
    "RS256": RSA_KEY,
    "ES256": EC_KEY,
}


def jwk(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, kid: str | None) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPublicKey):
        text = jwt.algorithms.RSAAlgorithm.to_jwk(key)
    else:
        text = jwt.algorithms.ECAlgorithm.to_jwk(key)
    doc: dict[str, Any] = json.loads(text)
    if kid is not None:
        doc["kid"] = kid
    return doc


JWKS = {"keys": [jwk(RSA_KEY.public_key(), KIDS["RS256"]), jwk(EC_KEY.public_key(), KIDS["ES256"])]}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def k8s_claims(**overrides: Any) -> dict[str, Any]:
    iat = int(NOW.timestamp())
    claims: dict[str, Any] = {
        "iss": K8S_ISSUER,
        "aud": [K8S_AUDIENCE],
        "sub": "system:serviceaccount:prod:web",
        "iat": iat,
        "nbf": iat,
        "exp": iat + 600,
        "jti": "6b5c9e52-0f1d-4d1c-9a4e-7f3b2a1c0d9e",
        "kubernetes.io": {
            "namespace": "prod",
            "node": {"name": "node-a", "uid": "n-uid"},
            "pod": {"name": "web-0", "uid": "p-uid"},
            "serviceaccount": {"name": "web", "uid": "sa-uid"},
        },
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def github_claims(**overrides: Any) -> dict[str, Any]:
    iat = int(NOW.timestamp())
    claims: dict[str, Any] = {
        "iss": GH_ISSUER,
        "aud": GH_AUDIENCE,
        "sub": "repo:octo-org/app:ref:refs/heads/main",
        "iat": iat,
        "nbf": iat,
        "exp": iat + 300,
        "jti": "gh-run-42-1",
        "repository": "octo-org/app",
        "repository_owner": "octo-org",
        "ref": "refs/heads/main",
        "workflow": "release",
        "event_name": "push",
        "actor": "octocat",
    }
    claims.update(overrides)
    return claims


def sign(claims: Mapping[str, Any], alg: str = "RS256", *, kid: str | None = None) -> bytes:
    headers = {"kid": kid if kid is not None else KIDS[alg]}
    return jwt.encode(dict(claims), SIGNERS[alg], algorithm=alg, headers=headers).encode()


def forge(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes = b"") -> bytes:
    """A compact JWS assembled by hand, as an attacker would."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    return (signing_input + "." + b64(signature)).encode()


def k8s_config(**extra: Any) -> dict[str, Any]:
    return {
        "jwks": JWKS,
        "issuer": K8S_ISSUER,
        "audience": K8S_AUDIENCE,
        "kind": "kubernetes",
    } | extra


def k8s(host: FakeHost | None = None, **extra: Any) -> JwtAttestor:
    return JwtAttestor.configure(k8s_config(**extra), host or FakeHost(NOW))


async def refused(attestor: JwtAttestor, token: bytes) -> AttestationRefused:
    with pytest.raises(AttestationRefused) as info:
        await attestor.attest(token, ScriptedContext())
    return info.value


# --- success ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_a_kubernetes_service_account_token_attests(alg: str) -> None:
    ctx = ScriptedContext()
    attested = await k8s().attest(sign(k8s_claims(), alg), ctx)
    assert sorted(attested.selectors) == sorted(
        [
            ("sub", "system:serviceaccount:prod:web"),
            ("namespace", "prod"),
            ("service_account", "web"),
            ("service_account_uid", "sa-uid"),
            ("pod", "web-0"),
            ("pod_uid", "p-uid"),
            ("node", "node-a"),
        ]
    )
    assert attested.bound_spiffe_id is None
    assert ctx.payloads == []  # a bearer token needs no challenge


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_a_github_actions_token_attests_with_keys_from_a_file(
    alg: str, tmp_path: Path
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(JWKS))
    config = {
        "jwks_path": str(path),
        "issuer": GH_ISSUER,
        "audience": [GH_AUDIENCE, "other"],
        "kind": "github",
    }
    attestor = JwtAttestor.configure(config, FakeHost(NOW))
    attested = await attestor.attest(sign(github_claims(), alg), ScriptedContext())
    selectors = dict(attested.selectors)
    assert selectors["repository"] == "octo-org/app"
    assert selectors["ref"] == "refs/heads/main"
    assert selectors["workflow"] == "release"
    assert selectors["sub"] == "repo:octo-org/app:ref:refs/heads/main"
    assert "environment" not in selectors  # absent claims make no selector
    # Declared keys: sub and the kind's claims (entry create refuses others).
    assert set(selectors) <= attestor.selector_kinds
    assert "environment" in attestor.selector_kinds


async def test_the_declared_selector_kinds_follow_the_configuration() -> None:
    attestor = k8s(selector_claims={"team": "extra/team"})
    assert attestor.selector_kinds == {"sub", "team", *PRESETS["kubernetes"]}
    attested = await attestor.attest(sign(k8s_claims(extra={"team": "blue"})), ScriptedContext())
    assert ("team", "blue") in attested.selectors
    assert {k for k, _ in attested.selectors} <= attestor.selector_kinds


async def test_an_inline_jwks_may_be_json_text() -> None:
    attestor = k8s(jwks=json.dumps(JWKS))
    attested = await attestor.attest(sign(k8s_claims()), ScriptedContext())
    assert ("namespace", "prod") in attested.selectors


async def test_extra_selector_claims_and_list_values() -> None:
    attestor = k8s(selector_claims={"group": "groups"})
    token = sign(k8s_claims(groups=["dev", "ops"]))
    attested = await attestor.attest(token, ScriptedContext())
    assert ("group", "dev") in attested.selectors
    assert ("group", "ops") in attested.selectors


async def test_a_token_within_the_leeway_is_accepted() -> None:
    host = FakeHost(NOW)
    attestor = k8s(host, leeway_seconds=30)
    host.set_now(NOW + dt.timedelta(seconds=600 + 29))
    await attestor.attest(sign(k8s_claims()), ScriptedContext())


# --- attacks: one test each ------------------------------------------------------------------


async def test_alg_none_is_refused() -> None:
    token = forge({"alg": "none", "typ": "JWT", "kid": KIDS["RS256"]}, k8s_claims())
    assert (await refused(k8s(), token)).reason == "JWT_ALGORITHM"


async def test_hs256_signed_with_the_public_key_is_refused() -> None:
    public_pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": KIDS["RS256"]}
    signing_input = forge(header, k8s_claims()).rstrip(b".")  # "header.payload"
    mac = hmac.new(public_pem, signing_input, hashlib.sha256).digest()
    token = signing_input + b"." + b64(mac).encode()
    assert (await refused(k8s(), token)).reason == "JWT_ALGORITHM"


async def test_an_unknown_kid_is_refused() -> None:
    token = sign(k8s_claims(), kid="rotated-away")
    assert (await refused(k8s(), token)).reason == "JWT_UNKNOWN_KID"


async def test_a_token_without_kid_is_refused() -> None:
    token = jwt.encode(k8s_claims(), RSA_KEY, algorithm="RS256").encode()
    assert (await refused(k8s(), token)).reason == "JWT_UNKNOWN_KID"


async def test_a_wrong_issuer_is_refused() -> None:
    token = sign(k8s_claims(iss="https://evil.example"))
    assert (await refused(k8s(), token)).reason == "JWT_ISSUER"


async def test_a_wrong_audience_is_refused() -> None:
    token = sign(k8s_claims(aud=["https://kubernetes.default.svc"]))
    assert (await refused(k8s(), token)).reason == "JWT_AUDIENCE"


async def test_an_expired_token_is_refused() -> None:
    host = FakeHost(NOW)
    attestor = k8s(host)
    host.set_now(NOW + dt.timedelta(seconds=600 + 30))  # exp + the default 30 s leeway
    assert (await refused(attestor, sign(k8s_claims()))).reason == "JWT_EXPIRED"


async def test_a_token_not_yet_valid_is_refused() -> None:
    start = int(NOW.timestamp()) + 3600
    token = sign(k8s_claims(nbf=start, exp=start + 600))
    assert (await refused(k8s(), token)).reason == "JWT_NOT_YET_VALID"


async def test_a_token_issued_in_the_future_is_refused() -> None:
    iat = int(NOW.timestamp()) + 3600
    token = sign(k8s_claims(iat=iat, nbf=None, exp=iat + 600))
    assert (await refused(k8s(), token)).reason == "JWT_NOT_YET_VALID"


async def test_a_replayed_jti_is_refused() -> None:
    attestor = k8s()
    token = sign(k8s_claims())
    await attestor.attest(token, ScriptedContext())
    assert (await refused(attestor, token)).reason == "JWT_REPLAYED"
    # A fresh token with the same jti is the same token as far as replay goes.
    again = sign(k8s_claims(sub="system:serviceaccount:prod:other"))
    assert (await refused(attestor, again)).reason == "JWT_REPLAYED"


async def test_a_replayed_jti_is_accepted_by_another_instance() -> None:
    # Through the real host: claims are namespaced per instance.
    plugins: dict[str, type[Attestor]] = {"jwt": JwtAttestor}
    host = AttestorHost(store=MemoryStore(), clock=FakeClock(NOW), limits=Limits(), plugins=plugins)
    await host.register("k8s-a", "jwt", k8s_config())
    await host.register("k8s-b", "jwt", k8s_config())
    token = sign(k8s_claims())
    await host.attest("k8s-a", token, ScriptedContext())
    with pytest.raises(AttestationFailed) as info:
        await host.attest("k8s-a", token, ScriptedContext())
    assert info.value.reason == "JWT_REPLAYED"
    outcome = await host.attest("k8s-b", token, ScriptedContext())
    assert Selector("k8s-b", "namespace:prod") in outcome.selectors


async def test_a_jti_can_be_used_again_after_the_token_expired() -> None:
    # The claim lasts exactly as long as the token could be accepted.
    host = FakeHost(NOW)
    attestor = k8s(host)
    await attestor.attest(sign(k8s_claims()), ScriptedContext())
    assert host.claimed("jti:6b5c9e52-0f1d-4d1c-9a4e-7f3b2a1c0d9e")
    host.set_now(NOW + dt.timedelta(seconds=630))
    assert not host.claimed("jti:6b5c9e52-0f1d-4d1c-9a4e-7f3b2a1c0d9e")


async def test_a_token_without_jti_is_refused() -> None:
    token = sign(k8s_claims(jti=None))
    assert (await refused(k8s(), token)).reason == "JWT_MISSING_CLAIM"


async def test_an_empty_jti_is_refused() -> None:
    token = sign(k8s_claims(jti=""))
    assert (await refused(k8s(), token)).reason == "JWT_MISSING_CLAIM"


async def test_a_lifetime_over_the_maximum_is_refused() -> None:
    iat = int(NOW.timestamp())
    token = sign(k8s_claims(exp=iat + 3601))
    assert (await refused(k8s(max_lifetime_seconds=3600), token)).reason == "JWT_LIFETIME"


async def test_a_signature_by_another_key_with_a_known_kid_is_refused() -> None:
    token = jwt.encode(
        k8s_claims(), OTHER_RSA_KEY, algorithm="RS256", headers={"kid": KIDS["RS256"]}
    ).encode()
    assert (await refused(k8s(), token)).reason == "JWT_SIGNATURE"


async def test_an_algorithm_not_configured_is_refused() -> None:
    token = sign(k8s_claims(), "ES256")
    assert (await refused(k8s(algorithms=["RS256"]), token)).reason == "JWT_ALGORITHM"


async def test_a_known_kid_used_with_another_keys_algorithm_is_refused() -> None:
    # The RSA key's kid on an ES256 token: the key decides the algorithm, not the header.
    token = sign(k8s_claims(), "ES256", kid=KIDS["RS256"])
    assert (await refused(k8s(), token)).reason == "JWT_ALGORITHM"


@pytest.mark.parametrize("claim", ["exp", "iat", "iss", "aud", "sub"])
async def test_a_token_missing_a_required_claim_is_refused(claim: str) -> None:
    token = sign(k8s_claims(**{claim: None}))
    assert (await refused(k8s(), token)).reason == "JWT_MISSING_CLAIM"


@pytest.mark.parametrize(
    "evidence",
    [b"", b"not-a-jwt", b"a.b.c", "caf\u00e9".encode(), b"x" * (16 * 1024 + 1)],
    ids=["empty", "text", "dots", "non-ascii", "too-large"],
)
async def test_malformed_tokens_are_refused(evidence: bytes) -> None:
    assert (await refused(k8s(), evidence)).reason == "JWT_MALFORMED"


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": 253402300799},  # 9999-12-31: one leeway more is out of range
        {"iat": -62135596800, "nbf": None},  # 0001-01-01
        {"exp": 10**20},
        {"exp": "tomorrow"},
    ],
    ids=["exp-year-9999", "iat-year-1", "exp-huge", "exp-text"],
)
async def test_out_of_range_times_are_refused(claims: dict[str, Any]) -> None:
    error = await refused(k8s(max_lifetime_seconds=10**12), sign(k8s_claims(**claims)))
    assert error.reason == "JWT_INVALID"


@pytest.mark.parametrize(
    "sub", ["", "x" * 5000, "bad\nsub"], ids=["empty", "too-long", "control-char"]
)
async def test_a_subject_that_cannot_be_a_selector_is_refused(sub: str) -> None:
    assert (await refused(k8s(), sign(k8s_claims(sub=sub)))).reason == "JWT_INVALID"


async def test_claim_values_that_cannot_be_selectors_are_left_out() -> None:
    claims = k8s_claims()
    claims["kubernetes.io"]["namespace"] = "n" * 3000
    claims["kubernetes.io"]["pod"]["name"] = "web-*"
    attested = await k8s().attest(sign(claims), ScriptedContext())
    keys = {k for k, _ in attested.selectors}
    assert "namespace" not in keys
    assert "pod" not in keys
    assert ("service_account", "web") in attested.selectors


# --- configuration ---------------------------------------------------------------------------


def oct_jwk() -> dict[str, Any]:
    return {"kty": "oct", "kid": "hmac", "k": b64(b"k" * 32)}


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"algorithms": ["RS256", "HS256"]}, "algorithms"),
        ({"algorithms": ["none"]}, "algorithms"),
        ({"algorithms": []}, "algorithms"),
        ({"algorithms": 5}, "algorithms"),
        ({"algorithms": [["RS256"]]}, "algorithms"),
        ({"jwks": {"keys": [oct_jwk()]}}, "symmetric"),
        ({"jwks": {"keys": [*JWKS["keys"], oct_jwk()]}}, "symmetric"),
        ({"jwks": {"keys": [jwk(RSA_KEY.public_key(), None)]}}, "kid"),
        ({"jwks": {"keys": []}}, "jwks"),
        ({"jwks": [1, 2]}, "jwks"),
        ({"jwks": "not json"}, "jwks"),
        ({"jwks": 7}, "jwks"),
        ({"jwks_path": "/nonexistent/jwks.json"}, "exactly one of jwks"),
        ({"issuer": ""}, "issuer"),
        ({"issuer": 3}, "issuer"),
        ({"audience": []}, "audience"),
        ({"audience": [""]}, "audience"),
        ({"kind": "gitlab"}, "kind"),
        ({"kind": ["kubernetes"]}, "kind"),
        ({"selector_claims": {"Bad Key": "x"}}, "selector_claims"),
        ({"selector_claims": ["x"]}, "selector_claims"),
        ({"leeway_seconds": 301}, "leeway_seconds"),
        ({"leeway_seconds": "soon"}, "leeway_seconds"),
        ({"max_lifetime_seconds": 0}, "max_lifetime_seconds"),
        ({"extra": 1}, "unknown configuration keys: extra"),
    ],
)
def test_bad_configuration_is_refused(change: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        JwtAttestor.configure(k8s_config(**change), FakeHost())


def test_a_jwks_file_alongside_inline_keys_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(JWKS))
    with pytest.raises(ConfigError, match="exactly one of jwks"):
        JwtAttestor.configure(k8s_config(jwks_path=str(path)), FakeHost())


@pytest.mark.parametrize("missing", ["issuer", "audience"])
def test_issuer_and_audience_are_required(missing: str) -> None:
    config = k8s_config()
    del config[missing]
    with pytest.raises(ConfigError, match=f"missing configuration keys: {missing}"):
        JwtAttestor.configure(config, FakeHost())


@pytest.mark.parametrize("kind", ["missing", "directory", "not-json"])
def test_an_unreadable_jwks_file_is_refused(tmp_path: Path, kind: str) -> None:
    path = {"missing": tmp_path / "none.json", "directory": tmp_path}.get(kind)
    if path is None:
        path = tmp_path / "bad.json"
        path.write_text("{")
    config = k8s_config()
    del config["jwks"]
    with pytest.raises(ConfigError, match="jwks"):
        JwtAttestor.configure({**config, "jwks_path": str(path)}, FakeHost())
