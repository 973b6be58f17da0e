"""Tools for the attack tests: raw calls the SDK would never make, hostile CSRs and certificates,
status assertions, and read-only looks into the store's SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path
from typing import cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority.api.status import REASON_KEY
from authority.client import make_csr, new_key
from authority.clock import Clock
from authority.config import Config
from tests.helpers import Running, running_authority

TD = "example.org"
AGENT = f"spiffe://{TD}/agent/one"
CALL_TIMEOUT = 20.0
HALF_CLOSE_GRACE = 5.0

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


# --- a real server, optionally on an injected clock --------------------------------------------


@contextlib.asynccontextmanager
async def running_with_clock(config: Config, clock: Clock | None) -> AsyncIterator[Running]:
    """``tests.helpers.running_authority`` with a clock of the test's choosing."""
    async with running_authority(config, clock) as running:
        yield running


# --- statuses ----------------------------------------------------------------------------------


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    """Await ``call``, which must fail with a gRPC status; return that status."""
    try:
        result = await call
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError(f"the call succeeded where it must fail: {result!r}")


def reason_of(err: grpc.aio.AioRpcError) -> str | None:
    # grpc-stubs type this as the sync call's tuple; on grpc.aio it is an aio.Metadata.
    metadata = cast("grpc.aio.Metadata | None", err.trailing_metadata())
    value = metadata.get(REASON_KEY) if metadata is not None else None
    return value.decode() if isinstance(value, bytes) else value


def assert_status(err: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: str | None) -> None:
    """The exact code, and the exact ``authority-reason`` (None: the server set none)."""
    assert err.code() is code, f"expected {code.name}, got {err.code().name}: {err.details()}"
    assert reason_of(err) == reason, (
        f"expected reason {reason!r}, got {reason_of(err)!r} ({err.code().name}: {err.details()})"
    )


# --- raw Attest streams ------------------------------------------------------------------------


def params(
    evidence: bytes, csr: bytes, *, attestor: str = "join_token", hint: str = ""
) -> pb.AttestRequest:
    return pb.AttestRequest(
        params=pb.AttestParams(attestor=attestor, evidence=evidence, csr=csr, spiffe_id_hint=hint)
    )


async def attest_raw(
    stub: pb_grpc.WorkloadAsyncStub, messages: Sequence[pb.AttestRequest]
) -> list[pb.AttestResponse]:
    """Send ``messages`` on one Attest stream and read everything back.

    Raises the call's AioRpcError when the server ends it with a status other than OK.

    The request stream is half-closed only once the server has answered (or after a grace
    period, for a server that waits for the end of the stream): grpc.aio reports a client-side
    INTERNAL instead of the server's status when a write races the server's early status
    (grpc/grpc#36066), and this harness must see the server's own status."""
    answered = asyncio.Event()

    async def requests() -> AsyncIterator[pb.AttestRequest]:
        for message in messages:
            yield message
        if messages:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(answered.wait(), HALF_CLOSE_GRACE)

    call = stub.Attest(requests(), timeout=CALL_TIMEOUT)
    call.add_done_callback(lambda _: answered.set())
    return [reply async for reply in call]


async def attest_with_token(stub: pb_grpc.WorkloadAsyncStub, token: str) -> pb.AttestResult:
    """An honest attestation with ``token``: must succeed and return exactly one SVID."""
    replies = await attest_raw(stub, [params(token.encode(), make_csr(new_key()))])
    assert len(replies) == 1, replies
    assert replies[0].WhichOneof("step") == "result", replies
    assert len(replies[0].result.svids) == 1
    return replies[0].result


# --- hostile CSRs ------------------------------------------------------------------------------


def csr_der(
    key: PrivateKey,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    subject: x509.Name | None = None,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def tamper_signature(der: bytes) -> bytes:
    """Flip bits in the last byte of the CSR: the end of the signature BIT STRING.

    The request still parses; only its self-signature no longer verifies."""
    tampered = der[:-1] + bytes([der[-1] ^ 0x5A])
    original = x509.load_der_x509_csr(der)
    parsed = x509.load_der_x509_csr(tampered)
    assert original.is_signature_valid
    assert parsed.public_key() == original.public_key()
    assert not parsed.is_signature_valid
    return tampered


# --- a CA of the attacker's own ----------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def self_made_ca(trust_domain: str = TD) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A root CA that claims the same trust domain but the authority never saw."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=1))
        .not_valid_after(_now() + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def forged_svid(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    spiffe_id: str,
    dns_names: Sequence[str] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf with the SVID profile, signed by ``ca_key``."""
    key = new_key()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
    names += [x509.DNSName(n) for n in dns_names]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=1))
        .not_valid_after(_now() + dt.timedelta(minutes=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# --- the store, read-only ----------------------------------------------------------------------


def db_path(data_dir: Path) -> Path:
    return data_dir / "authority.db"


def count_rows(data_dir: Path, table: str, where: str = "", args: Sequence[object] = ()) -> int:
    """Rows in ``table`` of the authority's SQLite file, read through a read-only connection.

    WAL mode lets this reader see every committed write while the server keeps running."""
    assert table.isidentifier()
    uri = f"file:{db_path(data_dir)}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        sql = f"SELECT COUNT(*) FROM {table}" + (f" WHERE {where}" if where else "")  # noqa: S608
        (count,) = db.execute(sql, list(args)).fetchone()
    return int(count)


def issued_svids(data_dir: Path) -> int:
    """X.509-SVIDs the authority recorded as issued to workloads."""
    return count_rows(data_dir, "issued_x509")


def identities(data_dir: Path) -> int:
    return count_rows(data_dir, "identities")


# --- channels the SDK would not open -----------------------------------------------------------


@contextlib.asynccontextmanager
async def tls_channel(
    address: str,
    roots: bytes,
    *,
    key: bytes | None = None,
    chain: bytes | None = None,
    target_name: str | None = None,
) -> AsyncIterator[grpc.aio.Channel]:
    """A channel that verifies the server against ``roots`` and presents ``chain`` if given."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=key, certificate_chain=chain
    )
    options: list[tuple[str, str | int]] = []
    if target_name is not None:
        options.append(("grpc.ssl_target_name_override", target_name))
    channel = grpc.aio.secure_channel(address, creds, options)
    try:
        yield channel
    finally:
        await channel.close(None)
