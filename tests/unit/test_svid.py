"""The credential profiles: what a workload may ask for (CSR), and what an SVID must be."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from authority.errors import InvalidCsr, ProfileViolation
from authority.ids import SpiffeId
from authority.svid import JwtSvid, X509Svid, check_jwt_svid_claims, check_x509_svid, parse_csr
from tests.unit._pki import (
    NOW,
    PrivateKey,
    ec_key,
    key_usage,
    make_ca,
    make_csr,
    make_leaf,
    name,
)

MAX = 16 * 1024
APP = SpiffeId.parse("spiffe://example.org/app")


# --- parse_csr: accepted ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        ec_key(ec.SECP256R1()),
        ec_key(ec.SECP384R1()),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ],
    ids=["ec-p256", "ec-p384", "rsa-2048"],
)
def test_csr_with_an_allowed_key_gives_that_key(key: PrivateKey) -> None:
    public = parse_csr(make_csr(key), MAX)
    assert public == key.public_key()


def test_csr_may_carry_a_leaf_basic_constraints_and_digital_signature() -> None:
    # Harmless requests (cA=false, digitalSignature) are not a reason to refuse.
    key = ec_key()
    csr = make_csr(
        key, x509.BasicConstraints(ca=False, path_length=None), key_usage(digital_signature=True)
    )
    assert parse_csr(csr, MAX) == key.public_key()


# --- parse_csr: refused ----------------------------------------------------------------------


def refused(der: bytes, max_bytes: int = MAX) -> InvalidCsr:
    with pytest.raises(InvalidCsr) as info:
        parse_csr(der, max_bytes)
    return info.value


def test_csr_with_a_bad_signature() -> None:
    der = bytearray(make_csr(ec_key()))
    der[-1] ^= 0x01  # the last byte of the ECDSA signature's s
    error = refused(bytes(der))
    assert error.reason == "CSR_SIGNATURE"


def test_csr_asking_for_a_ca() -> None:
    csr = make_csr(ec_key(), x509.BasicConstraints(ca=True, path_length=0), critical=True)
    assert refused(csr).reason == "CSR_ASKS_CA"


def test_csr_carrying_its_own_san() -> None:
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org/x")])
    assert refused(make_csr(ec_key(), san)).reason == "CSR_HAS_SANS"


def test_csr_carrying_a_dns_san() -> None:
    san = x509.SubjectAlternativeName([x509.DNSName("example.org")])
    assert refused(make_csr(ec_key(), san)).reason == "CSR_HAS_SANS"


@pytest.mark.parametrize(
    "usage",
    [key_usage(key_cert_sign=True), key_usage(digital_signature=True, crl_sign=True)],
    ids=["keyCertSign", "cRLSign"],
)
def test_csr_asking_for_certificate_signing(usage: x509.KeyUsage) -> None:
    error = refused(make_csr(ec_key(), usage, critical=True))
    assert error.reason == "CSR_ASKS_CA"
    assert "key usage" in error.message


def test_csr_asking_for_name_constraints() -> None:
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName("example.org")], excluded_subtrees=None
    )
    error = refused(make_csr(ec_key(), constraints, critical=True))
    assert error.reason == "CSR_ASKS_CA"
    assert "name constraints" in error.message


def test_csr_with_a_p521_key() -> None:
    error = refused(make_csr(ec_key(ec.SECP521R1())))
    assert error.reason == "INVALID_CSR"
    assert "secp521r1" in error.message


def test_csr_with_an_rsa_1024_key() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    error = refused(make_csr(key))
    assert error.reason == "INVALID_CSR"
    assert "2048" in error.message


def test_csr_with_an_ed25519_key() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    der = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name("workload"))
        .sign(key, None)
        .public_bytes(serialization.Encoding.DER)
    )
    error = refused(der)
    assert "EC (P-256, P-384) or RSA" in error.message


def test_csr_with_an_unknown_key_algorithm() -> None:
    # id-ecPublicKey (1.2.840.10045.2.1) rewritten to an OID no library knows: a client's
    # mistake, never an internal error.
    der = make_csr(ec_key())
    known, unknown = bytes.fromhex("2a8648ce3d0201"), bytes.fromhex("2a8648ce3d0209")
    assert der.count(known) == 1
    error = refused(der.replace(known, unknown))
    assert error.reason == "INVALID_CSR"
    assert "not supported" in error.message


def test_csr_with_an_unknown_signature_algorithm() -> None:
    # ecdsa-with-SHA256 (1.2.840.10045.4.3.2) rewritten to an unassigned sibling.
    der = make_csr(ec_key())
    known, unknown = bytes.fromhex("2a8648ce3d040302"), bytes.fromhex("2a8648ce3d040309")
    assert der.count(known) == 1
    assert refused(der.replace(known, unknown)).reason in {"CSR_SIGNATURE", "INVALID_CSR"}


def test_oversized_csr_is_refused_before_parsing() -> None:
    der = make_csr(ec_key())
    assert parse_csr(der, len(der)) is not None
    error = refused(der, len(der) - 1)
    assert "larger than" in error.message
    # The size check comes first: even garbage of that size gets the size answer.
    assert "larger than" in refused(b"\x00" * (MAX + 1)).message


@pytest.mark.parametrize(
    "der",
    [b"\x30\x03\x02\x01\x00", b"not a csr", b"\x00", b"-----BEGIN CERTIFICATE REQUEST-----"],
)
def test_garbage_is_refused(der: bytes) -> None:
    error = refused(der)
    assert error.reason == "INVALID_CSR"
    assert "PKCS#10" in error.message


def test_a_pem_csr_is_not_der() -> None:
    csr = x509.load_der_x509_csr(make_csr(ec_key()))
    assert "PKCS#10" in refused(csr.public_bytes(serialization.Encoding.PEM)).message


def test_empty_csr() -> None:
    assert "required" in refused(b"").message


# --- check_x509_svid: one test per rule ------------------------------------------------------

CA = make_ca()
WORKLOAD = ec_key()


def svid_of(cert: x509.Certificate, spiffe_id: SpiffeId = APP) -> X509Svid:
    return X509Svid(spiffe_id, cert, ())


def violation(cert: x509.Certificate, issuer: x509.Certificate = CA[0]) -> str:
    with pytest.raises(ProfileViolation) as info:
        check_x509_svid(svid_of(cert), issuer, WORKLOAD.public_key(), NOW)
    assert info.value.reason == "PROFILE_VIOLATION"
    return info.value.message


def test_a_leaf_that_meets_the_profile_passes() -> None:
    cert = make_leaf(CA, WORKLOAD.public_key())
    check_x509_svid(svid_of(cert), CA[0], WORKLOAD.public_key(), NOW)


def test_rule_two_uri_sans() -> None:
    cert = make_leaf(
        CA, WORKLOAD.public_key(), uris=("spiffe://example.org/app", "spiffe://example.org/b")
    )
    assert "exactly one URI SAN" in violation(cert)


def test_rule_no_uri_san() -> None:
    assert "exactly one URI SAN" in violation(make_leaf(CA, WORKLOAD.public_key(), uris=()))


def test_rule_uri_san_of_another_id() -> None:
    cert = make_leaf(CA, WORKLOAD.public_key(), uris=("spiffe://example.org/other",))
    assert "exactly one URI SAN" in violation(cert)


def test_rule_ca_true() -> None:
    assert "cA=true" in violation(make_leaf(CA, WORKLOAD.public_key(), ca_flag=True))


def test_rule_no_basic_constraints() -> None:
    assert "basicConstraints" in violation(make_leaf(CA, WORKLOAD.public_key(), ca_flag=None))


def test_rule_basic_constraints_not_critical() -> None:
    cert = make_leaf(CA, WORKLOAD.public_key(), basic_constraints_critical=False)
    assert "critical" in violation(cert)


def test_rule_key_cert_sign() -> None:
    usage = key_usage(digital_signature=True, key_cert_sign=True)
    assert "keyCertSign" in violation(make_leaf(CA, WORKLOAD.public_key(), usage=usage))


def test_rule_crl_sign() -> None:
    usage = key_usage(digital_signature=True, crl_sign=True)
    assert "cRLSign" in violation(make_leaf(CA, WORKLOAD.public_key(), usage=usage))


def test_rule_digital_signature_missing() -> None:
    usage = key_usage()
    assert "digitalSignature" in violation(make_leaf(CA, WORKLOAD.public_key(), usage=usage))


def test_rule_key_usage_not_critical() -> None:
    cert = make_leaf(CA, WORKLOAD.public_key(), usage_critical=False)
    assert "keyUsage must be critical" in violation(cert)


def test_rule_missing_eku() -> None:
    assert "lacks extKeyUsage" in violation(make_leaf(CA, WORKLOAD.public_key(), eku=None))


def test_rule_eku_without_client_auth() -> None:
    cert = make_leaf(CA, WORKLOAD.public_key(), eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    assert "serverAuth and clientAuth" in violation(cert)


def test_rule_wrong_issuer_key() -> None:
    # Same issuer name, another key: the signature does not verify.
    impostor = make_ca(CA[0].subject.rfc4514_string().removeprefix("CN="))
    assert impostor[0].subject == CA[0].subject
    cert = make_leaf(impostor, WORKLOAD.public_key())
    assert "does not verify" in violation(cert)


def test_rule_wrong_issuer_name() -> None:
    cert = make_leaf(CA, WORKLOAD.public_key(), issuer_name=name("someone else"))
    assert "does not verify" in violation(cert)


def test_rule_outliving_issuer() -> None:
    cert = make_leaf(
        CA, WORKLOAD.public_key(), not_after=CA[0].not_valid_after_utc + dt.timedelta(seconds=1)
    )
    assert "outlives" in violation(cert)


def test_rule_not_yet_valid() -> None:
    cert = make_leaf(CA, WORKLOAD.public_key(), not_before=NOW + dt.timedelta(seconds=1))
    assert "not valid now" in violation(cert)


def test_rule_expired() -> None:
    cert = make_leaf(CA, WORKLOAD.public_key(), not_after=NOW)
    assert "not valid now" in violation(cert)


def test_rule_another_public_key() -> None:
    cert = make_leaf(CA, ec_key().public_key())
    assert "public key" in violation(cert)


# --- check_jwt_svid_claims -------------------------------------------------------------------

EXPIRES = NOW + dt.timedelta(minutes=5)
JWT = JwtSvid(APP, "token", ("aud1", "aud2"), EXPIRES, "jti", "kid-1")


def good_header() -> dict[str, Any]:
    return {"alg": "ES256", "kid": "kid-1", "typ": "JWT"}


def good_claims() -> dict[str, Any]:
    return {
        "sub": APP.uri,
        "aud": ["aud1", "aud2"],
        "exp": int(EXPIRES.timestamp()),
        "iat": int(NOW.timestamp()),
        "jti": "jti",
    }


def test_jwt_claims_that_meet_the_profile_pass() -> None:
    check_jwt_svid_claims(good_header(), good_claims(), JWT)
    check_jwt_svid_claims({**good_header(), "typ": "JOSE"}, good_claims(), JWT)
    single = JwtSvid(APP, "token", ("aud1",), EXPIRES, "jti", "kid-1")
    check_jwt_svid_claims(good_header(), {**good_claims(), "aud": "aud1"}, single)


@pytest.mark.parametrize(
    ("header", "claims", "why"),
    [
        ({"kid": None}, {}, "key id"),
        ({"kid": "other"}, {}, "key id"),
        ({"typ": "at+jwt"}, {}, "typ"),
        ({"typ": None}, {}, "typ"),
        ({}, {"sub": "spiffe://example.org/other"}, "sub"),
        ({}, {"sub": None}, "sub"),
        ({}, {"aud": None}, "aud"),
        ({}, {"aud": []}, "aud"),
        ({}, {"aud": ["aud1"]}, "aud"),
        ({}, {"exp": None}, "exp"),
        ({}, {"exp": int(EXPIRES.timestamp()) + 1}, "exp"),
    ],
)
def test_jwt_claims_rules(header: dict[str, Any], claims: dict[str, Any], why: str) -> None:
    h = {k: v for k, v in {**good_header(), **header}.items() if v is not None}
    c = {k: v for k, v in {**good_claims(), **claims}.items() if v is not None}
    with pytest.raises(ProfileViolation, match=why):
        check_jwt_svid_claims(h, c, JWT)
