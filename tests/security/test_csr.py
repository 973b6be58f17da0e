"""Hostile CSRs, on both paths that take one (Attest and RenewX509SVID).

The authority takes only the public key from a CSR; anything else a CSR asks for is refused with
INVALID_ARGUMENT and a stable reason. On Attest the CSR is checked before the join token is spent,
so the token still works afterwards; on either path no SVID is recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from authority._pb import authority_v1_authority_pb2 as pb
from authority.client import make_csr, new_key
from tests.helpers import Running
from tests.security._attack import (
    AGENT,
    CALL_TIMEOUT,
    assert_status,
    attest_raw,
    attest_with_token,
    csr_der,
    issued_svids,
    params,
    rpc_error,
    tamper_signature,
)


def _tampered() -> bytes:
    return tamper_signature(make_csr(new_key()))


def _asks_ca() -> bytes:
    return csr_der(new_key(), [(x509.BasicConstraints(ca=True, path_length=None), True)])


def _asks_cert_sign() -> bytes:
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    return csr_der(new_key(), [(usage, True)])


def _uri_san() -> bytes:
    san = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier("spiffe://example.org/admin")]
    )
    return csr_der(new_key(), [(san, False)])


def _dns_san() -> bytes:
    san = x509.SubjectAlternativeName([x509.DNSName("localhost")])
    return csr_der(new_key(), [(san, False)])


def _p521() -> bytes:
    return csr_der(ec.generate_private_key(ec.SECP521R1()))


def _rsa1024() -> bytes:
    return csr_der(rsa.generate_private_key(public_exponent=65537, key_size=1024))  # noqa: S505


def _ed25519() -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    csr = builder.sign(ed25519.Ed25519PrivateKey.generate(), None)
    return csr.public_bytes(serialization.Encoding.DER)


def _pem_not_der() -> bytes:
    csr = x509.load_der_x509_csr(make_csr(new_key()))
    return csr.public_bytes(serialization.Encoding.PEM)


def _garbage() -> bytes:
    return b"\x30\x82\x01\x00" + b"\xff" * 64


def _truncated() -> bytes:
    return make_csr(new_key())[:-20]


def _oversized() -> bytes:
    # Larger than Limits.max_csr_bytes (16 KiB) but well inside the gRPC message limit.
    name = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "x" * 60) for _ in range(400)]
    )
    der = csr_der(new_key(), subject=name)
    assert 16 * 1024 < len(der) < 128 * 1024
    return der


CSR_ATTACKS: dict[str, tuple[Callable[[], bytes], str]] = {
    "tampered-signature": (_tampered, "CSR_SIGNATURE"),
    "asks-for-ca": (_asks_ca, "CSR_ASKS_CA"),
    "asks-for-key-cert-sign": (_asks_cert_sign, "CSR_ASKS_CA"),
    "own-uri-san": (_uri_san, "CSR_HAS_SANS"),
    "own-dns-san": (_dns_san, "CSR_HAS_SANS"),
    "p521-key": (_p521, "INVALID_CSR"),
    "rsa1024-key": (_rsa1024, "INVALID_CSR"),
    "ed25519-key": (_ed25519, "INVALID_CSR"),
    "pem-not-der": (_pem_not_der, "INVALID_CSR"),
    "garbage": (_garbage, "INVALID_CSR"),
    "truncated": (_truncated, "INVALID_CSR"),
    "empty": (lambda: b"", "INVALID_CSR"),
    "over-max-csr-bytes": (_oversized, "INVALID_CSR"),
}


@pytest.mark.parametrize("attack", sorted(CSR_ATTACKS))
async def test_hostile_csr_on_attest_is_refused_before_the_token_is_spent(
    authority: Running, attack: str
) -> None:
    make, reason = CSR_ATTACKS[attack]
    token = await authority.join_token(AGENT)
    client = await authority.workload()

    err = await rpc_error(attest_raw(client.tls_stub, [params(token.encode(), make())]))

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert issued_svids(authority.data_dir) == 0
    # The proof was not spent on a request that could never succeed.
    result = await attest_with_token(client.tls_stub, token)
    assert result.svids[0].spiffe_id == AGENT
    assert issued_svids(authority.data_dir) == 1


@pytest.mark.parametrize("attack", sorted(CSR_ATTACKS))
async def test_hostile_csr_on_renew_is_refused(
    authority: Running, tmp_path: Path, attack: str
) -> None:
    make, reason = CSR_ATTACKS[attack]
    holder = await authority.attested(AGENT, tmp_path / "svid")
    stub = await holder.mtls_stub()
    assert issued_svids(authority.data_dir) == 1

    err = await rpc_error(
        stub.RenewX509SVID(pb.RenewX509SVIDRequest(csr=make()), timeout=CALL_TIMEOUT)
    )

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert issued_svids(authority.data_dir) == 1


async def test_csr_subject_is_ignored(authority: Running) -> None:
    """A CSR may name a subject; the authority does not copy it into the SVID."""
    token = await authority.join_token(AGENT)
    client = await authority.workload()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "spiffe://example.org/admin"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "root"),
        ]
    )

    replies = await attest_raw(
        client.tls_stub, [params(token.encode(), csr_der(new_key(), subject=subject))]
    )

    leaf = x509.load_der_x509_certificate(replies[-1].result.svids[0].cert_chain[0])
    assert leaf.subject != subject
    assert not leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [AGENT]
