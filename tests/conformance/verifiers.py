"""Independent verifiers for what the authority issues: OpenSSL, py-spiffe, PyJWT, cryptography.

Nothing here imports the authority's own checking code (``authority.svid``, ``authority.bundle``):
the point of the conformance tests is that a third party's verifier accepts the credentials.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from authority._pb import authority_v1_authority_pb2 as pb
from tests.helpers import Running

TRUST_DOMAIN = "example.org"
AUTHORITY_ID = f"spiffe://{TRUST_DOMAIN}/authority"

OPENSSL = shutil.which("openssl")
requires_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl binary is not installed")


# --- PEM / DER plumbing ------------------------------------------------------------------------


def pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def write_pem(path: Path, certs: Sequence[x509.Certificate]) -> Path:
    path.write_bytes(pem(certs))
    return path


def read_pem(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def from_der(ders: Sequence[bytes]) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(d) for d in ders]


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- OpenSSL (the command) ---------------------------------------------------------------------


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run([OPENSSL, *args], capture_output=True, text=True, timeout=60, check=False)


def openssl_verify(
    ca_file: Path,
    cert: Path,
    *,
    untrusted: Path | None = None,
    purpose: str | None = None,
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """``openssl verify -x509_strict``: RFC 5280 path validation plus OpenSSL's strict checks."""
    args = ["verify", "-x509_strict", "-CAfile", str(ca_file)]
    if untrusted is not None:
        args += ["-untrusted", str(untrusted)]
    if purpose is not None:
        args += ["-purpose", purpose]
    return openssl(*args, *extra, str(cert))


def assert_openssl_accepts(
    ca_file: Path,
    cert: Path,
    *,
    untrusted: Path | None = None,
    purpose: str | None = None,
    extra: Sequence[str] = (),
) -> None:
    result = openssl_verify(ca_file, cert, untrusted=untrusted, purpose=purpose, extra=extra)
    assert result.returncode == 0, (
        f"openssl verify rejected {cert.name}:\n{result.stdout}{result.stderr}"
    )
    assert result.stdout.strip() == f"{cert}: OK", result.stdout + result.stderr


def assert_openssl_rejects(ca_file: Path, cert: Path, *, untrusted: Path | None = None) -> str:
    result = openssl_verify(ca_file, cert, untrusted=untrusted)
    assert result.returncode != 0, f"openssl verify accepted {cert.name}:\n{result.stdout}"
    return result.stdout + result.stderr


@dataclass(frozen=True)
class OpensslExtension:
    critical: bool
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


_EXT_HEADER = re.compile(r"^ {12}(?P<name>[^ ].*?):(?P<critical> critical)?\s*$")


def openssl_extensions(cert: Path) -> dict[str, OpensslExtension]:
    """The ``X509v3 extensions`` section of ``openssl x509 -text``, by extension name."""
    result = openssl("x509", "-in", str(cert), "-noout", "-text")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "X509v3 extensions:")
    found: dict[str, OpensslExtension] = {}
    name: str | None = None
    critical = False
    body: list[str] = []
    for line in lines[start + 1 :]:
        if not line.startswith(" " * 12):  # the end of the section (the signature algorithm)
            break
        header = _EXT_HEADER.match(line)
        if header:
            if name is not None:
                found[name] = OpensslExtension(critical, tuple(body))
            name, critical, body = header["name"], bool(header["critical"]), []
        else:
            body.append(line.strip())
    if name is not None:
        found[name] = OpensslExtension(critical, tuple(body))
    return found


# --- cryptography's RFC 5280 path validation ---------------------------------------------------


def verify_client(
    leaf: x509.Certificate,
    roots: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (),
    at: dt.datetime | None = None,
) -> tuple[list[x509.GeneralName], list[x509.Certificate]]:
    """Client-certificate path validation (EKU clientAuth); returns (SANs, chain)."""
    verifier = PolicyBuilder().store(Store(list(roots))).time(at or now()).build_client_verifier()
    verified = verifier.verify(leaf, list(intermediates))
    return list(verified.subjects or []), list(verified.chain)


def verify_server(
    leaf: x509.Certificate,
    roots: Sequence[x509.Certificate],
    subject: x509.DNSName | x509.IPAddress,
    intermediates: Sequence[x509.Certificate] = (),
    at: dt.datetime | None = None,
) -> list[x509.Certificate]:
    """Server-certificate path validation (EKU serverAuth, name match); returns the chain."""
    verifier = (
        PolicyBuilder().store(Store(list(roots))).time(at or now()).build_server_verifier(subject)
    )
    return list(verifier.verify(leaf, list(intermediates)))


# --- the bundle, as served ---------------------------------------------------------------------


async def get_bundle(authority: Running) -> pb.Bundle:
    return await authority.admin().stub.GetBundle(pb.GetBundleRequest())


def jwks_document(bundle: pb.Bundle) -> dict[str, Any]:
    doc = json.loads(bundle.jwks_json)
    assert isinstance(doc, dict)
    return doc


def keys_for_use(doc: Mapping[str, Any], use: str) -> list[dict[str, Any]]:
    keys = doc["keys"]
    assert isinstance(keys, list)
    return [k for k in keys if k.get("use") == use]


def jwt_svid_jwks(bundle: pb.Bundle) -> bytes:
    """The ``jwt-svid`` entries alone, as an RFC 7517 JWK Set.

    SPIFFE consumers select bundle entries by ``use`` (Trust Domain and Bundle standard, 4.2.2);
    py-spiffe's ``JwtBundle.parse`` does not, and refuses any key without ``kid`` -- which every
    ``x509-svid`` entry is (X509-SVID standard, 6.1: its ``kid`` MUST NOT be set).
    """
    doc = jwks_document(bundle)
    return json.dumps({"keys": keys_for_use(doc, "jwt-svid")}).encode()


# --- CAs of our own (foreign roots, upstream CAs) ----------------------------------------------


CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def make_ca(
    uri: str | None,
    *,
    key: CaKey | None = None,
    issuer: tuple[x509.Certificate, CaKey] | None = None,
    path_length: int | None = None,
    lifetime: dt.timedelta = dt.timedelta(days=30),
    common_name: str = "conformance test CA",
) -> tuple[x509.Certificate, CaKey]:
    """A CA certificate made with cryptography alone: self-signed, or signed by ``issuer``."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Conformance"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    signer_cert, signer_key = issuer if issuer is not None else (None, key)
    start = now() - dt.timedelta(hours=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_cert.subject if signer_cert is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
    )
    if uri is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
    return builder.sign(signer_key, hashes.SHA256()), key


def write_key(path: Path, key: CaKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path
