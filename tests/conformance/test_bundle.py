"""The SPIFFE bundle (JWK Set) as served, and what rotation does to it, read by independent code."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import JwtBundle, JwtSvid, SpiffeId, TrustDomain

from authority._pb import authority_v1_authority_pb2 as pb
from tests.conformance.verifiers import (
    TRUST_DOMAIN,
    assert_openssl_accepts,
    assert_openssl_rejects,
    from_der,
    get_bundle,
    jwks_document,
    jwt_svid_jwks,
    keys_for_use,
    read_pem,
    requires_openssl,
    uri_sans,
    verify_client,
    write_pem,
)
from tests.helpers import Running

FIRST = f"spiffe://{TRUST_DOMAIN}/agent/before"
SECOND = f"spiffe://{TRUST_DOMAIN}/agent/after"


def _spki(key: object) -> bytes:
    assert hasattr(key, "public_bytes")
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _x5c_certificates(doc: dict[str, Any]) -> list[x509.Certificate]:
    return [
        x509.load_der_x509_certificate(base64.b64decode(k["x5c"][0]))
        for k in keys_for_use(doc, "x509-svid")
    ]


def _jwt_kids(doc: dict[str, Any]) -> set[str]:
    return {k["kid"] for k in keys_for_use(doc, "jwt-svid")}


def _x509_der(bundle: pb.Bundle) -> set[bytes]:
    return set(bundle.x509_authorities)


async def test_jwks_members_follow_the_spiffe_bundle_format(authority: Running) -> None:
    bundle = await get_bundle(authority)
    doc = jwks_document(bundle)

    assert set(doc) == {"keys", "spiffe_sequence", "spiffe_refresh_hint"}
    seq, hint = doc["spiffe_sequence"], doc["spiffe_refresh_hint"]
    assert type(seq) is int
    assert seq >= 1
    assert type(hint) is int
    assert hint > 0
    assert seq == bundle.sequence
    assert hint == bundle.refresh_hint_seconds

    assert {k["use"] for k in doc["keys"]} == {"x509-svid", "jwt-svid"}
    for key in doc["keys"]:
        assert key["kty"] in ("EC", "RSA")


async def test_x509_svid_entries_have_one_x5c_and_no_kid(authority: Running) -> None:
    bundle = await get_bundle(authority)
    doc = jwks_document(bundle)
    entries = keys_for_use(doc, "x509-svid")

    assert entries
    for entry in entries:
        assert "kid" not in entry  # X509-SVID standard 6.1: kid MUST NOT be set
        assert isinstance(entry["x5c"], list)
        assert len(entry["x5c"]) == 1
        cert = x509.load_der_x509_certificate(base64.b64decode(entry["x5c"][0]))
        # The JWK's key members are the certificate's key (RFC 7517 4.7).
        jwk_key = jwt.PyJWK({k: v for k, v in entry.items() if k != "x5c"}, "ES256").key
        assert _spki(jwk_key) == _spki(cert.public_key())
        # A signing certificate: cA, keyCertSign, an ID without a path (X509-SVID 3.2 and 4).
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert usage.critical
        assert usage.value.key_cert_sign
        assert not usage.value.digital_signature
        assert uri_sans(cert) == [f"spiffe://{TRUST_DOMAIN}"]
        assert cert.issuer == cert.subject  # self-signed (SHOULD, X509-SVID 6.1)
        cert.verify_directly_issued_by(cert)
    certs = _x5c_certificates(doc)
    assert {c.public_bytes(serialization.Encoding.DER) for c in certs} == _x509_der(bundle)


async def test_jwt_svid_entries_have_a_kid(authority: Running) -> None:
    bundle = await get_bundle(authority)
    entries = keys_for_use(jwks_document(bundle), "jwt-svid")

    assert entries
    for entry in entries:
        assert isinstance(entry["kid"], str)
        assert entry["kid"]
        assert "x5c" not in entry
        assert entry["kty"] == "EC"
    # Read by py-spiffe and PyJWT: every kid resolves to a usable public key.
    parsed = JwtBundle.parse(TrustDomain(TRUST_DOMAIN), jwt_svid_jwks(bundle))
    assert set(parsed.jwt_authorities) == {e["kid"] for e in entries}
    pyjwk = jwt.PyJWKSet.from_json(jwt_svid_jwks(bundle).decode())
    for entry in entries:
        assert _spki(pyjwk[entry["kid"]].key) == _spki(parsed.jwt_authorities[entry["kid"]])


async def _rotate_fully(authority: Running) -> None:
    """Prepare, then activate: the two operator steps of a rotation."""
    await authority.admin().stub.RotateCA(pb.RotateCARequest())
    await authority.admin().stub.RotateCA(pb.RotateCARequest())


async def test_rotation_grows_the_bundle_and_bumps_the_sequence(authority: Running) -> None:
    before = await get_bundle(authority)
    prepared = await authority.admin().stub.RotateCA(pb.RotateCARequest())
    assert {("x509", "prepared"), ("jwt", "prepared")} <= {
        (a.kind, a.state) for a in prepared.authorities
    }
    rotated = await authority.admin().stub.RotateCA(pb.RotateCARequest())
    after = await get_bundle(authority)
    doc_before, doc_after = jwks_document(before), jwks_document(after)

    assert doc_after["spiffe_sequence"] > doc_before["spiffe_sequence"]
    assert type(doc_after["spiffe_sequence"]) is int
    assert "spiffe_refresh_hint" in doc_after
    # Old and new keys side by side, of both kinds.
    assert _x509_der(before) < _x509_der(after)
    assert len(after.x509_authorities) == len(before.x509_authorities) + 1
    assert _jwt_kids(doc_before) < _jwt_kids(doc_after)
    assert len(_jwt_kids(doc_after)) == len(_jwt_kids(doc_before)) + 1
    states = {(a.kind, a.state) for a in rotated.authorities}
    assert {("x509", "active"), ("x509", "old"), ("jwt", "active"), ("jwt", "old")} <= states

    # A second rotation changes the bundle again: the sequence moves again.
    await authority.admin().stub.RotateCA(pb.RotateCARequest())
    again = jwks_document(await get_bundle(authority))
    assert again["spiffe_sequence"] > doc_after["spiffe_sequence"]


@requires_openssl
async def test_svids_before_and_after_rotation_verify_with_the_new_bundle(
    authority: Running, tmp_path: Path
) -> None:
    old_folder, new_folder = tmp_path / "before", tmp_path / "after"
    await authority.attested(FIRST, old_folder)
    old_bundle = old_folder / "bundle.pem"
    await _rotate_fully(authority)
    rotated = await get_bundle(authority)
    new_bundle = write_pem(tmp_path / "rotated.pem", from_der(list(rotated.x509_authorities)))
    await authority.attested(SECOND, new_folder)

    # Both SVIDs verify with OpenSSL against the bundle after rotation...
    assert_openssl_accepts(new_bundle, old_folder / "svid.pem")
    assert_openssl_accepts(new_bundle, new_folder / "svid.pem")
    # ...and the new one is signed by the new key: the bundle before rotation does not verify it.
    assert_openssl_rejects(old_bundle, new_folder / "svid.pem")

    roots = from_der(list(rotated.x509_authorities))
    old_leaf, new_leaf = read_pem(old_folder / "svid.pem")[0], read_pem(new_folder / "svid.pem")[0]
    assert old_leaf.issuer != new_leaf.issuer
    for leaf, spiffe_id in ((old_leaf, FIRST), (new_leaf, SECOND)):
        sans, chain = verify_client(leaf, roots)
        assert sans == [x509.UniformResourceIdentifier(spiffe_id)]
        assert chain[-1] in roots
    # The bundle the new workload received is the rotated one.
    assert set(read_pem(new_folder / "bundle.pem")) == set(roots)


async def test_jwt_svid_from_before_rotation_validates_with_the_new_bundle(
    authority: Running, tmp_path: Path
) -> None:
    holder = await authority.attested(FIRST, tmp_path / "before")
    token = (await holder.fetch_jwt(["svc-a"])).token
    old_kid = jwt.get_unverified_header(token)["kid"]
    await _rotate_fully(authority)
    rotated = await get_bundle(authority)
    fresh = await authority.attested(SECOND, tmp_path / "after")
    new_token = (await fresh.fetch_jwt(["svc-a"])).token
    new_kid = jwt.get_unverified_header(new_token)["kid"]

    assert new_kid != old_kid
    assert {old_kid, new_kid} <= _jwt_kids(jwks_document(rotated))
    jwt_bundle = JwtBundle.parse(TrustDomain(TRUST_DOMAIN), jwt_svid_jwks(rotated))
    assert JwtSvid.parse_and_validate(token, jwt_bundle, {"svc-a"}).spiffe_id == SpiffeId(FIRST)
    assert JwtSvid.parse_and_validate(new_token, jwt_bundle, {"svc-a"}).spiffe_id == SpiffeId(
        SECOND
    )
    keys = jwt.PyJWKSet.from_json(jwt_svid_jwks(rotated).decode())
    for tok, kid in ((token, old_kid), (new_token, new_kid)):
        claims = jwt.decode(tok, keys[kid], algorithms=["ES256"], audience="svc-a")
        assert claims["aud"] == ["svc-a"]
