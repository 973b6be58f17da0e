"""Certificates and requests made with cryptography directly, apart from the code under test."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from authority.svid import X509Svid

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
BOTH_EKU = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(
    common_name: str = "test root",
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    not_before: dt.datetime = NOW - HOUR,
    not_after: dt.datetime = NOW + 24 * HOUR,
    issuer: tuple[x509.Certificate, PrivateKey] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA certificate: self-signed, or signed by ``issuer`` (certificate, key)."""
    key = key or ec_key()
    subject = name(common_name)
    issuer_name, signer = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    aki_key = key.public_key() if issuer is None else issuer[1].public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(aki_key), critical=False)
        .sign(signer, hashes.SHA256())
    )
    return cert, key


def make_leaf(
    ca: tuple[x509.Certificate, PrivateKey],
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    *,
    uris: Sequence[str] = ("spiffe://example.org/app",),
    ca_flag: bool | None = False,  # None: no basicConstraints at all
    basic_constraints_critical: bool = True,
    usage: x509.KeyUsage | None = None,
    usage_critical: bool = True,
    eku: Sequence[x509.ObjectIdentifier] | None = BOTH_EKU,
    not_before: dt.datetime = NOW - dt.timedelta(seconds=10),
    not_after: dt.datetime = NOW + dt.timedelta(minutes=5),
    issuer_name: x509.Name | None = None,
) -> x509.Certificate:
    """An X.509-SVID leaf that meets the profile unless told otherwise."""
    ca_cert, ca_key = ca
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]))
        .issuer_name(issuer_name or ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    if ca_flag is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca_flag, path_length=None),
            critical=basic_constraints_critical,
        )
    usage = usage if usage is not None else key_usage(digital_signature=True)
    builder = builder.add_extension(usage, critical=usage_critical)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def make_csr(
    key: PrivateKey,
    *extensions: x509.ExtensionType,
    critical: bool = False,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(name("workload"))
    for ext in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def verify_client(
    svid: X509Svid, roots: Sequence[x509.Certificate], when: dt.datetime
) -> list[x509.Certificate]:
    """Path validation by cryptography's own verifier (client-auth profile); the built chain."""
    verifier = PolicyBuilder().store(Store(list(roots))).time(when).build_client_verifier()
    return verifier.verify(svid.certificate, list(svid.intermediates)).chain


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)
