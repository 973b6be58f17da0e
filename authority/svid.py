"""The SPIFFE credential profiles, as small named checks.

``parse_csr`` checks what a workload sends; ``check_x509_svid`` and ``check_jwt_svid_claims`` check
what the authority issued before it is returned (issue, then validate: a signer bug never reaches a
workload).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from authority.errors import InvalidCsr, ProfileViolation
from authority.ids import SpiffeId

ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
CLOCK_SKEW_BACKDATE = dt.timedelta(seconds=10)

WorkloadPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True, slots=True)
class X509Svid:
    spiffe_id: SpiffeId
    certificate: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return (self.certificate, *self.intermediates)

    @property
    def expires_at(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def serial_hex(self) -> str:
        return format(self.certificate.serial_number, "x")


@dataclass(frozen=True, slots=True)
class JwtSvid:
    spiffe_id: SpiffeId
    token: str
    audience: tuple[str, ...]
    expires_at: dt.datetime
    jti: str
    key_id: str


def check_public_key(key: object) -> WorkloadPublicKey:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise InvalidCsr(f"EC curve {key.curve.name} is not allowed (P-256, P-384)")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise InvalidCsr(f"RSA keys must be {MIN_RSA_BITS}..{MAX_RSA_BITS} bits")
        return key
    raise InvalidCsr("the CSR's key must be EC (P-256, P-384) or RSA")


def parse_csr(der: bytes, max_bytes: int) -> WorkloadPublicKey:
    """Check a workload's PKCS#10 request and return the public key it proves possession of.

    The authority takes only the key from a CSR: names, SANs and CA flags are the authority's to
    decide, so a CSR that asks for any of them is refused rather than silently trimmed.
    """
    if not der:
        raise InvalidCsr("a CSR is required")
    if len(der) > max_bytes:
        raise InvalidCsr(f"the CSR is larger than {max_bytes} bytes")
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError:
        raise InvalidCsr("the CSR is not a DER-encoded PKCS#10 request") from None
    try:
        signature_valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidCsr("the CSR's key or signature algorithm is not supported") from None
    if not signature_valid:
        raise InvalidCsr(
            "the CSR's signature does not verify with its own key", reason="CSR_SIGNATURE"
        )
    try:
        extensions = csr.extensions
    except (ValueError, x509.DuplicateExtension) as exc:
        raise InvalidCsr(f"the CSR's extensions are malformed: {exc}") from None
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise InvalidCsr("the CSR asks for a CA certificate", reason="CSR_ASKS_CA")
        if isinstance(value, x509.SubjectAlternativeName):
            raise InvalidCsr(
                "the CSR carries its own subject alternative names; the authority sets them",
                reason="CSR_HAS_SANS",
            )
        if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            raise InvalidCsr("the CSR asks for certificate-signing key usage", reason="CSR_ASKS_CA")
        if isinstance(value, x509.NameConstraints):
            raise InvalidCsr("the CSR asks for name constraints", reason="CSR_ASKS_CA")
    return check_public_key(public_key)


# --- X.509-SVID profile (SPIFFE X509-SVID standard, leaf certificates) -----------------------


_Extensions = dict[x509.ObjectIdentifier, x509.Extension[Any]]


def _extensions(cert: x509.Certificate) -> _Extensions:
    """The certificate's extensions by OID, read once for all the checks below."""
    return {ext.oid: ext for ext in cert.extensions}


def _required(exts: _Extensions, oid: x509.ObjectIdentifier, name: str) -> x509.Extension[Any]:
    ext = exts.get(oid)
    if ext is None:
        raise ProfileViolation(f"leaf lacks {name}")
    return ext


def _check_one_uri_san(exts: _Extensions, expected: SpiffeId) -> None:
    ext = exts.get(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    uris = ext.value.get_values_for_type(x509.UniformResourceIdentifier) if ext else []
    if uris != [expected.uri]:
        raise ProfileViolation(f"leaf must carry exactly one URI SAN {expected}, has {uris}")


def _check_leaf_basic_constraints(exts: _Extensions) -> None:
    ext = _required(exts, ExtensionOID.BASIC_CONSTRAINTS, "basicConstraints")
    if ext.value.ca:
        raise ProfileViolation("leaf has cA=true")
    if not ext.critical:
        raise ProfileViolation("leaf basicConstraints must be critical")


def _check_leaf_key_usage(exts: _Extensions) -> None:
    ext = _required(exts, ExtensionOID.KEY_USAGE, "keyUsage")
    if not ext.critical:
        raise ProfileViolation("leaf keyUsage must be critical")
    if not ext.value.digital_signature:
        raise ProfileViolation("leaf keyUsage lacks digitalSignature")
    if ext.value.key_cert_sign or ext.value.crl_sign:
        raise ProfileViolation("leaf keyUsage must not allow keyCertSign or cRLSign")


def _check_leaf_eku(exts: _Extensions) -> None:
    eku = _required(exts, ExtensionOID.EXTENDED_KEY_USAGE, "extKeyUsage").value
    if not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku):
        raise ProfileViolation("leaf extKeyUsage must hold serverAuth and clientAuth")


def _check_validity(cert: x509.Certificate, issuer: x509.Certificate, now: dt.datetime) -> None:
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise ProfileViolation("leaf is not valid now")
    if cert.not_valid_after_utc > issuer.not_valid_after_utc:
        raise ProfileViolation("leaf outlives its issuer")


def _check_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise ProfileViolation(f"leaf does not verify against its issuer: {exc}") from None


def check_x509_svid(
    svid: X509Svid,
    issuer: x509.Certificate,
    public_key: WorkloadPublicKey,
    now: dt.datetime,
    *,
    verify_signature: bool = True,
) -> None:
    """The leaf profile, on every certificate issued. ``verify_signature`` re-checks the
    signature too (the CA does so for the first certificate of each signing key: a key that
    does not match its certificate shows there; the signer itself is pyca/cryptography's)."""
    cert = svid.certificate
    exts = _extensions(cert)
    _check_one_uri_san(exts, svid.spiffe_id)
    _check_leaf_basic_constraints(exts)
    _check_leaf_key_usage(exts)
    _check_leaf_eku(exts)
    _check_validity(cert, issuer, now)
    if verify_signature:
        _check_issued_by(cert, issuer)
    if cert.public_key() != public_key:
        raise ProfileViolation("leaf does not carry the requested public key")


# --- JWT-SVID profile ------------------------------------------------------------------------


def check_jwt_svid_claims(
    header: Mapping[str, Any], claims: Mapping[str, Any], expected: JwtSvid
) -> None:
    if header.get("kid") != expected.key_id:
        raise ProfileViolation("JWT-SVID header lacks the key id")
    if header.get("typ") not in ("JWT", "JOSE"):
        raise ProfileViolation("JWT-SVID typ must be JWT or JOSE")
    if claims.get("sub") != expected.spiffe_id.uri:
        raise ProfileViolation("JWT-SVID sub is not the SPIFFE ID")
    aud = claims.get("aud")
    auds = [aud] if isinstance(aud, str) else aud
    if not auds or list(auds) != list(expected.audience):
        raise ProfileViolation("JWT-SVID aud is missing or differs")
    if claims.get("exp") != int(expected.expires_at.timestamp()):
        raise ProfileViolation("JWT-SVID exp is missing or differs")
