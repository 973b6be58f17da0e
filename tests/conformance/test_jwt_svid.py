"""JWT-SVIDs fetched over mutual TLS, checked by py-spiffe and PyJWT against the served JWK Set."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from spiffe import JwtBundle, JwtSvid, SpiffeId, TrustDomain
from spiffe.svid.errors import InvalidTokenError

from tests.conformance.verifiers import TRUST_DOMAIN, get_bundle, jwt_svid_jwks, now
from tests.helpers import Running

WORKLOAD = f"spiffe://{TRUST_DOMAIN}/agent/jwt"
DEFAULT_JWT_TTL = 300


def _segment(token: str, index: int) -> dict[str, Any]:
    part = token.split(".")[index]
    decoded = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    assert isinstance(decoded, dict)
    return decoded


async def _jwks(authority: Running) -> bytes:
    return jwt_svid_jwks(await get_bundle(authority))


async def test_py_spiffe_validates_the_jwt_svid(authority: Running, tmp_path: Path) -> None:
    holder = await authority.attested(WORKLOAD, tmp_path / "svid")
    response = await holder.fetch_jwt(["svc-a"])
    bundle = JwtBundle.parse(TrustDomain(TRUST_DOMAIN), await _jwks(authority))

    svid = JwtSvid.parse_and_validate(response.token, bundle, {"svc-a"})

    assert svid.spiffe_id == SpiffeId(WORKLOAD)
    assert set(svid.audience) == {"svc-a"}
    assert svid.expiry == response.expires_at
    assert svid.token == response.token


async def test_py_spiffe_rejects_another_audience(authority: Running, tmp_path: Path) -> None:
    holder = await authority.attested(WORKLOAD, tmp_path / "svid")
    response = await holder.fetch_jwt(["svc-a"])
    bundle = JwtBundle.parse(TrustDomain(TRUST_DOMAIN), await _jwks(authority))

    with pytest.raises(InvalidTokenError):
        JwtSvid.parse_and_validate(response.token, bundle, {"svc-b"})


async def test_pyjwt_verifies_signature_and_required_claims(
    authority: Running, tmp_path: Path
) -> None:
    holder = await authority.attested(WORKLOAD, tmp_path / "svid")
    before = int(now().timestamp())
    response = await holder.fetch_jwt(["svc-a"])
    after = int(now().timestamp())

    header = jwt.get_unverified_header(response.token)
    assert header["alg"] == "ES256"
    assert header["typ"] == "JWT"
    kid = header["kid"]
    assert isinstance(kid, str)
    assert kid
    key = jwt.PyJWKSet.from_json((await _jwks(authority)).decode())[kid]

    claims = jwt.decode(
        response.token,
        key,
        algorithms=["ES256"],
        audience="svc-a",
        options={"require": ["exp", "aud", "sub", "iat"]},
    )

    assert claims["sub"] == WORKLOAD
    assert claims["aud"] in (["svc-a"], "svc-a")
    assert isinstance(claims["jti"], str)
    assert len(claims["jti"]) >= 16
    assert isinstance(claims["iat"], int)
    assert before - 1 <= claims["iat"] <= after
    assert isinstance(claims["exp"], int)
    assert claims["exp"] == response.expires_at
    assert claims["exp"] - claims["iat"] in range(DEFAULT_JWT_TTL - 1, DEFAULT_JWT_TTL + 1)
    assert response.spiffe_id == WORKLOAD


async def test_jws_compact_serialization_with_only_the_spiffe_header(
    authority: Running, tmp_path: Path
) -> None:
    """Read the JOSE header and claims by hand, without any JWT library."""
    holder = await authority.attested(WORKLOAD, tmp_path / "svid")
    token = (await holder.fetch_jwt(["svc-a"])).token

    assert token.count(".") == 2
    assert all(token.split("."))
    header = _segment(token, 0)
    assert header == {"alg": "ES256", "kid": header["kid"], "typ": "JWT"}
    claims = _segment(token, 1)
    assert set(claims) == {"sub", "aud", "exp", "iat", "jti"}
    # ES256 signature: the raw 64-byte R || S of RFC 7518 section 3.4, not DER.
    signature = token.split(".")[2]
    assert len(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))) == 64


async def test_multiple_audiences_each_validate(authority: Running, tmp_path: Path) -> None:
    holder = await authority.attested(WORKLOAD, tmp_path / "svid")
    response = await holder.fetch_jwt(["svc-a", "svc-b"])
    jwks = await _jwks(authority)
    bundle = JwtBundle.parse(TrustDomain(TRUST_DOMAIN), jwks)
    key = jwt.PyJWKSet.from_json(jwks.decode())[jwt.get_unverified_header(response.token)["kid"]]

    for audience in ("svc-a", "svc-b"):
        svid = JwtSvid.parse_and_validate(response.token, bundle, {audience})
        assert set(svid.audience) == {"svc-a", "svc-b"}
        claims = jwt.decode(response.token, key, algorithms=["ES256"], audience=audience)
        assert claims["aud"] == ["svc-a", "svc-b"]
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(response.token, key, algorithms=["ES256"], audience="svc-c")


async def test_the_signing_key_is_a_jwt_svid_key_of_the_bundle(
    authority: Running, tmp_path: Path
) -> None:
    """``kid`` names a ``use: jwt-svid`` entry; no ``x509-svid`` entry verifies the token."""
    holder = await authority.attested(WORKLOAD, tmp_path / "svid")
    token = (await holder.fetch_jwt(["svc-a"])).token
    doc = json.loads((await get_bundle(authority)).jwks_json)
    kid = jwt.get_unverified_header(token)["kid"]

    entries = [k for k in doc["keys"] if k.get("kid") == kid]
    assert len(entries) == 1
    assert entries[0]["use"] == "jwt-svid"
    assert entries[0]["kty"] == "EC"
    assert entries[0]["crv"] == "P-256"
    for x509_entry in (k for k in doc["keys"] if k["use"] == "x509-svid"):
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(
                token,
                jwt.PyJWK({k: v for k, v in x509_entry.items() if k != "x5c"}, "ES256"),
                algorithms=["ES256"],
                audience="svc-a",
            )
