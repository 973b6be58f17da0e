"""X.509-SVIDs issued over the wire, checked by OpenSSL, py-spiffe and cryptography's verifier."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import VerificationError
from spiffe import SpiffeId, TrustDomain, X509Bundle, X509Svid

from authority._pb import authority_v1_authority_pb2 as pb
from authority.client import new_key
from tests.conformance.verifiers import (
    TRUST_DOMAIN,
    assert_openssl_accepts,
    from_der,
    get_bundle,
    make_ca,
    now,
    openssl_extensions,
    openssl_verify,
    read_pem,
    requires_openssl,
    verify_client,
    verify_server,
    write_pem,
)
from tests.helpers import Running

WORKLOAD = f"spiffe://{TRUST_DOMAIN}/agent/one"
WEB = f"spiffe://{TRUST_DOMAIN}/web/api"
WEB_DNS = ("api.example.org", "api.internal")


async def _attested_with_dns(authority: Running, folder: Path) -> None:
    """An entry with DNS names for the join token's identity, then attestation with that token."""
    await authority.admin().stub.CreateEntry(
        pb.CreateEntryRequest(
            spiffe_id=WEB,
            selectors=[pb.Selector(type="join_token", value=f"spiffe_id:{WEB}")],
            dns_names=list(WEB_DNS),
        )
    )
    await authority.attested(WEB, folder)


# --- OpenSSL ---------------------------------------------------------------------------------


@requires_openssl
async def test_openssl_verifies_the_svid_against_the_bundle(
    authority: Running, tmp_path: Path
) -> None:
    folder = tmp_path / "svid"
    await authority.attested(WORKLOAD, folder)
    svid, bundle = folder / "svid.pem", folder / "bundle.pem"

    assert_openssl_accepts(bundle, svid)
    assert_openssl_accepts(bundle, svid, purpose="sslclient")
    assert_openssl_accepts(bundle, svid, purpose="sslserver")


@requires_openssl
async def test_openssl_rejects_the_svid_under_a_foreign_root(
    authority: Running, tmp_path: Path
) -> None:
    """The acceptance above means something: another trust domain's root does not verify it."""
    folder = tmp_path / "svid"
    await authority.attested(WORKLOAD, folder)
    foreign, _ = make_ca("spiffe://other.example")
    roots = write_pem(tmp_path / "foreign.pem", [foreign])

    result = openssl_verify(roots, folder / "svid.pem")
    assert result.returncode != 0, result.stdout
    assert "unable to get local issuer certificate" in result.stdout + result.stderr


@requires_openssl
async def test_openssl_text_shows_the_leaf_profile(authority: Running, tmp_path: Path) -> None:
    folder = tmp_path / "svid"
    await authority.attested(WORKLOAD, folder)
    ext = openssl_extensions(folder / "svid.pem")

    basic = ext["X509v3 Basic Constraints"]
    assert basic.critical
    assert basic.lines == ("CA:FALSE",)

    usage = ext["X509v3 Key Usage"]
    assert usage.critical
    assert usage.lines == ("Digital Signature",)

    eku = ext["X509v3 Extended Key Usage"]
    purposes = {p.strip() for p in eku.text.split(",")}
    assert purposes == {"TLS Web Server Authentication", "TLS Web Client Authentication"}

    san = ext["X509v3 Subject Alternative Name"]
    names = [n.strip() for n in san.text.split(",")]
    assert [n for n in names if n.startswith("URI:")] == [f"URI:{WORKLOAD}"]
    assert names == [f"URI:{WORKLOAD}"]  # no DNS or IP names without an entry asking for them


# --- py-spiffe -------------------------------------------------------------------------------


async def test_py_spiffe_loads_the_svid_and_bundle(authority: Running, tmp_path: Path) -> None:
    folder = tmp_path / "svid"
    await authority.attested(WORKLOAD, folder)

    svid = X509Svid.load(folder / "svid.pem", folder / "svid.key", serialization.Encoding.PEM)
    assert svid.spiffe_id == SpiffeId(WORKLOAD)
    assert svid.spiffe_id.trust_domain == TrustDomain(TRUST_DOMAIN)
    assert svid.spiffe_id.path == "/agent/one"
    assert svid.leaf == read_pem(folder / "svid.pem")[0]
    assert len(svid.cert_chain) == 1  # self-signed authority: the signing CA is in the bundle
    key = svid.private_key
    assert key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == svid.leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    bundle = X509Bundle.load(
        TrustDomain(TRUST_DOMAIN), folder / "bundle.pem", serialization.Encoding.PEM
    )
    served = from_der(list((await get_bundle(authority)).x509_authorities))
    assert bundle.trust_domain == TrustDomain(TRUST_DOMAIN)
    assert bundle.x509_authorities == set(served)
    # py-spiffe has no offline path validation: check the signature link with the bundle it loaded.
    issuers = [ca for ca in bundle.x509_authorities if ca.subject == svid.leaf.issuer]
    assert len(issuers) == 1
    svid.leaf.verify_directly_issued_by(issuers[0])


async def test_py_spiffe_parses_the_der_chain_from_the_wire(
    authority: Running, tmp_path: Path
) -> None:
    """The DER chain of a renewal, as returned on the wire, through ``X509Svid.parse_raw``."""
    holder = await authority.attested(WORKLOAD, tmp_path / "svid")
    key = new_key()
    renewed = await holder.renew(key)
    key_der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    svid = X509Svid.parse_raw(b"".join(renewed.cert_chain), key_der)
    assert svid.spiffe_id == SpiffeId(WORKLOAD)
    assert str(svid.spiffe_id) == renewed.spiffe_id


# --- cryptography's RFC 5280 verifier ---------------------------------------------------------


async def test_cryptography_client_verifier_accepts_the_svid(
    authority: Running, tmp_path: Path
) -> None:
    folder = tmp_path / "svid"
    await authority.attested(WORKLOAD, folder)
    leaf, *intermediates = read_pem(folder / "svid.pem")
    roots = read_pem(folder / "bundle.pem")

    sans, chain = verify_client(leaf, roots, intermediates)

    assert sans == [x509.UniformResourceIdentifier(WORKLOAD)]
    assert chain[0] == leaf
    assert chain[-1] in roots
    assert len(chain) == 2


async def test_leaf_profile_read_with_cryptography(authority: Running, tmp_path: Path) -> None:
    before = now()
    folder = tmp_path / "svid"
    await authority.attested(WORKLOAD, folder)
    leaf = read_pem(folder / "svid.pem")[0]

    basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert not basic.value.ca
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert not usage.value.crl_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WORKLOAD]
    # Backdated ~10 s for clock skew; 5 minutes of life by default after that.
    assert leaf.not_valid_before_utc <= before - dt.timedelta(seconds=5)
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(minutes=5) <= life <= dt.timedelta(minutes=5, seconds=15)


async def test_cryptography_server_verifier_accepts_entry_dns_names(
    authority: Running, tmp_path: Path
) -> None:
    folder = tmp_path / "web"
    await _attested_with_dns(authority, folder)
    leaf, *intermediates = read_pem(folder / "svid.pem")
    roots = read_pem(folder / "bundle.pem")

    for name in WEB_DNS:
        chain = verify_server(leaf, roots, x509.DNSName(name), intermediates)
        assert chain[0] == leaf
        assert chain[-1] in roots

    sans, _ = verify_client(leaf, roots, intermediates)
    assert [s for s in sans if isinstance(s, x509.UniformResourceIdentifier)] == [
        x509.UniformResourceIdentifier(WEB)
    ]
    assert {s.value for s in sans if isinstance(s, x509.DNSName)} == set(WEB_DNS)

    with pytest.raises(VerificationError):
        verify_server(leaf, roots, x509.DNSName("other.example.org"), intermediates)


@requires_openssl
async def test_openssl_verifies_entry_dns_names(authority: Running, tmp_path: Path) -> None:
    folder = tmp_path / "web"
    await _attested_with_dns(authority, folder)
    svid, bundle = folder / "svid.pem", folder / "bundle.pem"

    assert_openssl_accepts(
        bundle, svid, purpose="sslserver", extra=("-verify_hostname", WEB_DNS[0])
    )
    wrong = openssl_verify(bundle, svid, extra=("-verify_hostname", "other.example.org"))
    assert wrong.returncode != 0
    names = [
        n.strip()
        for n in openssl_extensions(svid)["X509v3 Subject Alternative Name"].text.split(",")
    ]
    assert [n for n in names if n.startswith("URI:")] == [f"URI:{WEB}"]
