"""The authority's own TLS certificate is an X.509-SVID, as seen by TLS clients it did not write."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL
from spiffe import SpiffeId, TrustDomain, X509Bundle, X509Source, X509Svid
from spiffetls import create_ssl_context
from spiffetls.tlsconfig.authorize import authorize_id

from authority._pb import authority_v1_authority_pb2 as pb
from tests.conformance.verifiers import (
    AUTHORITY_ID,
    TRUST_DOMAIN,
    assert_openssl_accepts,
    from_der,
    get_bundle,
    pem,
    requires_openssl,
    uri_sans,
    verify_client,
    verify_server,
    write_pem,
)
from tests.helpers import Running

WORKLOAD = f"spiffe://{TRUST_DOMAIN}/agent/tls"
LOOPBACK = ipaddress.ip_address("127.0.0.1")
# The HTTP/2 client connection preface and an empty SETTINGS frame (RFC 9113 3.4, 6.5).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
H2_SETTINGS = 0x4


def _server_certificate(
    port: int,
    roots_pem: bytes,
    server_hostname: str,
    client: tuple[Path, Path] | None = None,
) -> tuple[bytes, int]:
    """Python's ``ssl`` (OpenSSL) as a TLS client: verify chain and host name, then read the
    server's first HTTP/2 frame (which proves the server accepted the handshake, client
    certificate included). Returns (peer certificate DER, first frame type)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.load_verify_locations(cadata=roots_pem.decode())
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(client[0], client[1])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        assert tls.selected_alpn_protocol() == "h2"
        tls.sendall(H2_PREFACE)
        header = _read_exactly(tls.recv, 9)
        return der, header[3]


def _read_exactly(recv: Callable[[int], bytes], size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = recv(size - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data


def _check_server_svid(cert: x509.Certificate, roots: list[x509.Certificate]) -> None:
    assert uri_sans(cert) == [AUTHORITY_ID]
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert not basic.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert not usage.value.crl_sign
    eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= eku

    for subject in (x509.IPAddress(LOOPBACK), x509.DNSName("localhost")):
        chain = verify_server(cert, roots, subject)
        assert chain[0] == cert
        assert chain[-1] in roots
    sans, _ = verify_client(cert, roots)
    assert [s for s in sans if isinstance(s, x509.UniformResourceIdentifier)] == [
        x509.UniformResourceIdentifier(AUTHORITY_ID)
    ]


@pytest.mark.parametrize("server_hostname", ["127.0.0.1", "localhost"])
async def test_server_tls_certificate_is_an_x509_svid(
    authority: Running, server_hostname: str
) -> None:
    roots = from_der(list((await get_bundle(authority)).x509_authorities))

    der, frame = await asyncio.to_thread(
        _server_certificate, authority.port, pem(roots), server_hostname
    )

    assert frame == H2_SETTINGS
    _check_server_svid(x509.load_der_x509_certificate(der), roots)


async def test_mtls_listener_presents_the_svid_and_accepts_a_workload_svid(
    authority: Running, tmp_path: Path
) -> None:
    folder = tmp_path / "svid"
    await authority.attested(WORKLOAD, folder)
    roots = from_der(list((await get_bundle(authority)).x509_authorities))

    der, frame = await asyncio.to_thread(
        _server_certificate,
        authority.mtls_port,
        pem(roots),
        "127.0.0.1",
        (folder / "svid.pem", folder / "svid.key"),
    )

    assert frame == H2_SETTINGS
    _check_server_svid(x509.load_der_x509_certificate(der), roots)


@requires_openssl
async def test_openssl_verifies_the_server_svid(authority: Running, tmp_path: Path) -> None:
    roots = from_der(list((await get_bundle(authority)).x509_authorities))
    der, _ = await asyncio.to_thread(_server_certificate, authority.port, pem(roots), "127.0.0.1")
    cert = write_pem(tmp_path / "server.pem", [x509.load_der_x509_certificate(der)])
    bundle = write_pem(tmp_path / "bundle.pem", roots)

    assert_openssl_accepts(bundle, cert, purpose="sslserver", extra=("-verify_ip", "127.0.0.1"))
    assert_openssl_accepts(bundle, cert, extra=("-verify_hostname", "localhost"))


# --- spiffetls (pyOpenSSL) -------------------------------------------------------------------


class _StaticSource:
    """The part of ``X509Source`` that spiffetls reads, from files instead of a Workload API."""

    def __init__(self, svid: X509Svid, bundle: X509Bundle) -> None:
        self.svid = svid
        self.bundles = frozenset({bundle})

    def subscribe_for_updates(self, callback: Callable[[], None]) -> None:
        del callback  # static: never updated


def _spiffetls_handshake(port: int, source: _StaticSource, expected: SpiffeId) -> int:
    context = create_ssl_context(
        SSL.TLS_CLIENT_METHOD,
        cast(X509Source, source),
        authorize_id(expected),
        SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
    )
    context.set_alpn_protos([b"h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.settimeout(None)
        connection = SSL.Connection(context, raw)
        connection.set_connect_state()
        connection.do_handshake()
        peer = connection.get_peer_certificate(as_cryptography=True)
        assert peer is not None
        assert uri_sans(peer) == [str(expected)]
        connection.sendall(H2_PREFACE)
        return _read_exactly(connection.recv, 9)[3]


# spiffetls 0.4 hands pyOpenSSL X509 objects to pyOpenSSL >= 25, which deprecates that: a
# warning raised inside the third-party library, not by the authority.
_SPIFFETLS_DEPRECATION = pytest.mark.filterwarnings(
    "ignore:Passing pyOpenSSL .* objects is deprecated:DeprecationWarning"
)


def _source(folder: Path) -> _StaticSource:
    return _StaticSource(
        X509Svid.load(folder / "svid.pem", folder / "svid.key", serialization.Encoding.PEM),
        X509Bundle.load(
            TrustDomain(TRUST_DOMAIN), folder / "bundle.pem", serialization.Encoding.PEM
        ),
    )


@_SPIFFETLS_DEPRECATION
async def test_spiffetls_mutual_tls_with_the_authority(authority: Running, tmp_path: Path) -> None:
    """py-spiffe's TLS layer checks the server's chain against the bundle and its SPIFFE ID; the
    authority accepts the workload SVID presented by that independent TLS stack."""
    folder = tmp_path / "svid"
    await authority.attested(WORKLOAD, folder)

    frame = await asyncio.to_thread(
        _spiffetls_handshake, authority.mtls_port, _source(folder), SpiffeId(AUTHORITY_ID)
    )

    assert frame == H2_SETTINGS


@_SPIFFETLS_DEPRECATION
async def test_spiffetls_refuses_the_server_for_another_id(
    authority: Running, tmp_path: Path
) -> None:
    folder = tmp_path / "svid"
    await authority.attested(WORKLOAD, folder)

    with pytest.raises(SSL.Error, match="certificate verify failed"):
        await asyncio.to_thread(
            _spiffetls_handshake,
            authority.port,
            _source(folder),
            SpiffeId(f"spiffe://{TRUST_DOMAIN}/not-the-authority"),
        )


async def test_server_svid_verifies_with_the_bundle_a_workload_held_before_rotation(
    authority: Running, tmp_path: Path
) -> None:
    folder = tmp_path / "svid"
    await authority.attested(WORKLOAD, folder)
    held = (folder / "bundle.pem").read_bytes()
    # Step one publishes the new key; the server keeps its certificate from the old one.
    await authority.admin().stub.RotateCA(pb.RotateCARequest())
    _, frame = await asyncio.to_thread(_server_certificate, authority.port, held, "127.0.0.1")
    assert frame == H2_SETTINGS

    # A workload that refreshed its bundle between the steps still verifies the server after
    # step two, whose certificate comes from the new key.
    refreshed = await authority.bundle_pem()
    await authority.admin().stub.RotateCA(pb.RotateCARequest())
    _, frame = await asyncio.to_thread(_server_certificate, authority.port, refreshed, "127.0.0.1")
    assert frame == H2_SETTINGS
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.to_thread(_server_certificate, authority.port, held, "127.0.0.1")


async def test_immediate_rotation_cuts_off_holders_of_the_old_bundle(
    authority: Running, tmp_path: Path
) -> None:
    """The documented price of --immediate: the old bundle no longer verifies the server."""
    folder = tmp_path / "svid"
    await authority.attested(WORKLOAD, folder)
    held = (folder / "bundle.pem").read_bytes()
    await authority.admin().stub.RotateCA(pb.RotateCARequest(immediate=True))
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.to_thread(_server_certificate, authority.port, held, "127.0.0.1")
