"""The trust bundle as PEM and as the SPIFFE JWK Set."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm

from authority.bundle import (
    TrustBundle,
    b64url,
    jwk_thumbprint,
    load_pem_certificates,
    parse_jwks,
    public_jwk,
)
from authority.errors import InvalidArgument
from authority.ids import TrustDomain
from tests.unit._pki import der, ec_key, make_ca

TD = TrustDomain("example.org")


def independent_thumbprint(key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 by hand: members crv, kty, x, y in that order, no whitespace, SHA-256."""
    numbers = key.public_numbers()
    size = (key.curve.key_size + 7) // 8
    x = b64url(numbers.x.to_bytes(size, "big"))
    y = b64url(numbers.y.to_bytes(size, "big"))
    crv = {"secp256r1": "P-256", "secp384r1": "P-384"}[key.curve.name]
    canonical = f'{{"crv":"{crv}","kty":"EC","x":"{x}","y":"{y}"}}'
    return b64url(hashlib.sha256(canonical.encode()).digest())


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()], ids=["p256", "p384"])
def test_thumbprint_is_rfc7638(curve: ec.EllipticCurve) -> None:
    key = ec_key(curve).public_key()
    assert jwk_thumbprint(key) == independent_thumbprint(key)
    assert len(jwk_thumbprint(key)) == 43  # 32 bytes, base64url without padding


def test_b64url_has_no_padding() -> None:
    assert b64url(b"\xfb\xff") == "-_8"
    assert b64url(b"") == ""


def make_bundle(
    certs: tuple[x509.Certificate, ...] = (),
    jwt_keys: dict[str, ec.EllipticCurvePublicKey] | None = None,
    sequence: int = 7,
) -> TrustBundle:
    return TrustBundle(
        trust_domain=TD,
        x509_authorities=certs,
        jwt_authorities=jwt_keys or {},
        sequence=sequence,
        refresh_hint=dt.timedelta(minutes=5),
    )


def test_jwks_follows_the_spiffe_bundle_format() -> None:
    ca1, _ = make_ca("one")
    ca2, _ = make_ca("two")
    jwt1, jwt2 = ec_key().public_key(), ec_key().public_key()
    bundle = make_bundle((ca1, ca2), {"kid-b": jwt2, "kid-a": jwt1})
    doc = bundle.jwks()
    assert doc["spiffe_sequence"] == 7
    assert doc["spiffe_refresh_hint"] == 300
    x509_keys = [k for k in doc["keys"] if k["use"] == "x509-svid"]
    jwt_keys = [k for k in doc["keys"] if k["use"] == "jwt-svid"]
    assert len(doc["keys"]) == 4
    # X.509 authorities: the certificate in x5c (standard base64 DER), no kid.
    assert [base64.b64decode(k["x5c"][0]) for k in x509_keys] == [der(ca1), der(ca2)]
    for jwk, cert in zip(x509_keys, (ca1, ca2), strict=True):
        assert "kid" not in jwk
        assert len(jwk["x5c"]) == 1
        assert jwk == {**public_jwk(_ec(cert.public_key())), "use": "x509-svid", "x5c": jwk["x5c"]}
    # JWT authorities: each with its kid, sorted by kid.
    assert [k["kid"] for k in jwt_keys] == ["kid-a", "kid-b"]
    assert jwt_keys[0] == {**public_jwk(jwt1), "use": "jwt-svid", "kid": "kid-a"}
    for jwk in doc["keys"]:
        assert "d" not in jwk  # never a private part


def _ec(key: object) -> ec.EllipticCurvePublicKey:
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def test_an_rsa_upstream_root_is_in_the_jwks() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2027, 1, 1, tzinfo=dt.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(rsa_key, hashes.SHA256())
    )
    doc = make_bundle((root,)).jwks()
    (jwk,) = doc["keys"]
    assert jwk["use"] == "x509-svid"
    assert jwk["kty"] == "RSA"
    assert base64.b64decode(jwk["x5c"][0]) == der(root)
    assert int.from_bytes(base64.urlsafe_b64decode(jwk["n"] + "=="), "big") == (
        rsa_key.public_key().public_numbers().n
    )


def test_jwks_json_is_canonical_and_parses_back() -> None:
    jwt1 = ec_key().public_key()
    bundle = make_bundle((make_ca()[0],), {"kid-1": jwt1})
    raw = bundle.jwks_json()
    assert raw == json.dumps(json.loads(raw), separators=(",", ":"), sort_keys=True).encode()
    assert parse_jwks(raw) == {"kid-1": jwt1}


def test_pem_and_der_hold_every_x509_authority_in_order() -> None:
    ca1, ca2 = make_ca("one")[0], make_ca("two")[0]
    bundle = make_bundle((ca1, ca2))
    assert load_pem_certificates(bundle.pem()) == [ca1, ca2]
    assert bundle.x509_der() == [der(ca1), der(ca2)]


def test_empty_bundle() -> None:
    bundle = make_bundle()
    assert bundle.pem() == b""
    assert bundle.jwks()["keys"] == []


# --- parse_jwks refusals ---------------------------------------------------------------------


def jwt_jwk(kid: str = "k") -> dict[str, Any]:
    return {**public_jwk(ec_key().public_key()), "use": "jwt-svid", "kid": kid}


def test_parse_jwks_skips_x509_entries() -> None:
    doc = make_bundle((make_ca()[0],)).jwks()
    assert parse_jwks(json.dumps(doc).encode()) == {}


@pytest.mark.parametrize(
    "doc",
    [
        b"not json",
        b"[]",
        b"{}",
        b'{"keys": 5}',
        b'{"keys": ["x"]}',
        json.dumps({"keys": [{**jwt_jwk(), "kid": None}]}).encode(),
        json.dumps({"keys": [{k: v for k, v in jwt_jwk().items() if k != "kid"}]}).encode(),
        json.dumps({"keys": [{**jwt_jwk(), "x": "AA"}]}).encode(),
        json.dumps({"keys": [{**jwt_jwk(), "kty": "RSA"}]}).encode(),
        json.dumps({"keys": [{**jwt_jwk(), "crv": "P-999"}]}).encode(),
        json.dumps({"keys": [jwt_jwk("same"), jwt_jwk("same")]}).encode(),
    ],
    ids=[
        "garbage",
        "list",
        "no-keys",
        "keys-not-list",
        "key-not-object",
        "kid-null",
        "kid-missing",
        "bad-coordinate",
        "wrong-kty",
        "unknown-curve",
        "duplicate-kid",
    ],
)
def test_parse_jwks_refuses(doc: bytes) -> None:
    with pytest.raises(InvalidArgument):
        parse_jwks(doc)


def test_parse_jwks_refuses_a_private_key() -> None:
    private = ec_key()
    jwk = json.loads(ECAlgorithm.to_jwk(private))  # includes "d"
    assert "d" in jwk
    doc = json.dumps({"keys": [{**jwk, "use": "jwt-svid", "kid": "k"}]}).encode()
    with pytest.raises(InvalidArgument, match="public"):
        parse_jwks(doc)


def test_load_pem_certificates_refuses_garbage() -> None:
    with pytest.raises(InvalidArgument, match="PEM"):
        load_pem_certificates(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(InvalidArgument, match="PEM"):
        load_pem_certificates(b"")
