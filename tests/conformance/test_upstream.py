"""Upstream mode: the authority's signing CA is an intermediate under an operator's CA.

The upstream hierarchies are made here with cryptography alone; what the authority issues under
them is checked with OpenSSL, cryptography's verifier and py-spiffe.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from spiffe import SpiffeId as PySpiffeId
from spiffe import X509Svid as PyX509Svid

from authority.ca import CertificateAuthority, Upstream
from authority.client import new_key
from authority.clock import FakeClock
from authority.config import CaConfig, Limits
from authority.ids import SpiffeId, TrustDomain
from authority.keyvault import MemoryKeyVault
from authority.store.memory import MemoryStore
from tests.conformance.verifiers import (
    TRUST_DOMAIN,
    CaKey,
    assert_openssl_accepts,
    assert_openssl_rejects,
    from_der,
    get_bundle,
    keys_for_use,
    make_ca,
    now,
    read_pem,
    requires_openssl,
    uri_sans,
    verify_client,
    write_key,
    write_pem,
)
from tests.helpers import running_authority
from tests.helpers import test_config as make_config

WORKLOAD = f"spiffe://{TRUST_DOMAIN}/up/one"


@dataclass(frozen=True)
class UpstreamFiles:
    """An operator's CA on disk, as ``ca.upstream_*`` would name it."""

    roots: tuple[x509.Certificate, ...]
    certificate: Path  # the upstream CA that signs the authority's intermediates
    key: Path
    bundle: Path | None  # the roots, when the upstream CA is not itself a root
    roots_pem: Path

    def ca_config(self) -> CaConfig:
        return CaConfig(
            upstream_cert=self.certificate, upstream_key=self.key, upstream_bundle=self.bundle
        )


def _make_upstream(folder: Path, kind: str) -> UpstreamFiles:
    folder.mkdir(parents=True, exist_ok=True)
    root_key: CaKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa-root"
        else ec.generate_private_key(ec.SECP256R1())
    )
    root, root_key = make_ca(None, key=root_key, common_name="upstream root")
    roots_pem = write_pem(folder / "upstream_root.pem", [root])
    if kind in ("ec-root", "rsa-root"):
        return UpstreamFiles(
            (root,), roots_pem, write_key(folder / "upstream_root.key", root_key), None, roots_pem
        )
    assert kind == "ec-intermediate"
    middle, middle_key = make_ca(None, issuer=(root, root_key), common_name="upstream issuing CA")
    return UpstreamFiles(
        (root,),
        write_pem(folder / "upstream_ca.pem", [middle]),
        write_key(folder / "upstream_ca.key", middle_key),
        roots_pem,
        roots_pem,
    )


UPSTREAM_KINDS = ["ec-root", "rsa-root", "ec-intermediate"]


@pytest.fixture(params=UPSTREAM_KINDS)
def upstream(request: pytest.FixtureRequest, tmp_path: Path) -> UpstreamFiles:
    kind = request.param
    assert isinstance(kind, str)
    return _make_upstream(tmp_path / "upstream", kind)


@pytest.fixture
async def upstream_ca(upstream: UpstreamFiles) -> AsyncIterator[CertificateAuthority]:
    """A CertificateAuthority built as the composition root builds it, on in-memory parts."""
    config = upstream.ca_config()
    assert config.upstream_cert is not None
    assert config.upstream_key is not None
    store = MemoryStore()
    ca = CertificateAuthority(
        trust_domain=TrustDomain.parse(TRUST_DOMAIN),
        config=config,
        limits=Limits(),
        clock=FakeClock(now().replace(microsecond=0)),
        store=store,
        vault=MemoryKeyVault(),
        upstream=Upstream.load(config.upstream_cert, config.upstream_key, config.upstream_bundle),
    )
    await ca.start()
    yield ca
    await store.close()


@dataclass(frozen=True)
class IssuedFiles:
    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    svid: Path
    untrusted: Path
    chain: Path
    key: Path


def _issue(ca: CertificateAuthority, folder: Path) -> IssuedFiles:
    folder.mkdir(parents=True, exist_ok=True)
    key = new_key()
    svid = ca.issue_x509_svid(SpiffeId.parse(WORKLOAD), key.public_key(), dt.timedelta(minutes=5))
    leaf, *intermediates = svid.chain
    return IssuedFiles(
        leaf,
        tuple(intermediates),
        write_pem(folder / "svid.pem", [leaf]),
        write_pem(folder / "intermediate.pem", intermediates),
        write_pem(folder / "chain.pem", [leaf, *intermediates]),
        write_key(folder / "svid.key", key),
    )


@requires_openssl
async def test_openssl_verifies_through_the_intermediate(
    upstream_ca: CertificateAuthority, upstream: UpstreamFiles, tmp_path: Path
) -> None:
    issued = _issue(upstream_ca, tmp_path / "svid")

    assert_openssl_accepts(upstream.roots_pem, issued.svid, untrusted=issued.untrusted)
    for purpose in ("sslclient", "sslserver"):
        assert_openssl_accepts(
            upstream.roots_pem, issued.svid, untrusted=issued.untrusted, purpose=purpose
        )
    # The intermediates carry the path: without them the leaf does not reach the upstream root.
    assert_openssl_rejects(upstream.roots_pem, issued.svid)


async def test_cryptography_verifier_builds_the_path_to_the_upstream_root(
    upstream_ca: CertificateAuthority, upstream: UpstreamFiles, tmp_path: Path
) -> None:
    issued = _issue(upstream_ca, tmp_path / "svid")

    sans, chain = verify_client(issued.leaf, upstream.roots, issued.intermediates)

    assert sans == [x509.UniformResourceIdentifier(WORKLOAD)]
    assert chain[0] == issued.leaf
    assert chain[-1] == upstream.roots[0]
    assert chain[1:-1] == list(issued.intermediates)
    # The authority's own signing CA: a CA certificate, an SVID of the trust domain (no path).
    signing = issued.intermediates[0]
    assert signing.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert signing.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert uri_sans(signing) == [f"spiffe://{TRUST_DOMAIN}"]
    assert issued.leaf.not_valid_after_utc <= signing.not_valid_after_utc


async def test_py_spiffe_accepts_the_chain(
    upstream_ca: CertificateAuthority, tmp_path: Path
) -> None:
    """py-spiffe checks the leaf profile and that every intermediate is a signing CA."""
    issued = _issue(upstream_ca, tmp_path / "svid")

    svid = PyX509Svid.load(issued.chain, issued.key, serialization.Encoding.PEM)

    assert svid.spiffe_id == PySpiffeId(WORKLOAD)
    assert svid.cert_chain == [issued.leaf, *issued.intermediates]


async def test_bundle_authorities_are_the_upstream_roots(
    upstream_ca: CertificateAuthority, upstream: UpstreamFiles
) -> None:
    bundle = upstream_ca.bundle()
    roots_der = [r.public_bytes(serialization.Encoding.DER) for r in upstream.roots]

    assert [
        c.public_bytes(serialization.Encoding.DER) for c in bundle.x509_authorities
    ] == roots_der
    assert bundle.pem() == upstream.roots_pem.read_bytes()
    # The SPIFFE JWK Set: one x509-svid entry per root, whatever its key type (RFC 7518 6.2, 6.3).
    doc = json.loads(bundle.jwks_json())
    x5c = [base64.b64decode(k["x5c"][0]) for k in keys_for_use(doc, "x509-svid")]
    assert x5c == roots_der
    for entry in keys_for_use(doc, "x509-svid"):
        assert "kid" not in entry
        assert entry["kty"] == (
            "RSA" if isinstance(upstream.roots[0].public_key(), rsa.RSAPublicKey) else "EC"
        )


@requires_openssl
async def test_served_upstream_chain_over_the_wire(
    upstream: UpstreamFiles, tmp_path: Path, socket_dir: Path
) -> None:
    """A real server under the upstream CA: attestation returns leaf + intermediates, GetBundle
    returns the upstream roots, and OpenSSL verifies what a workload wrote to disk."""
    base = make_config(tmp_path / "data", socket_dir)
    config = dataclasses.replace(base, ca=upstream.ca_config())
    async with running_authority(config) as authority:
        folder = tmp_path / "svid"
        await authority.attested(WORKLOAD, folder)
        served = await get_bundle(authority)

    assert from_der(list(served.x509_authorities)) == list(upstream.roots)
    leaf, *intermediates = read_pem(folder / "svid.pem")
    assert intermediates, "the SVID chain must carry the authority's intermediate"
    assert read_pem(folder / "bundle.pem") == list(upstream.roots)
    untrusted = write_pem(tmp_path / "intermediates.pem", intermediates)
    only_leaf = write_pem(tmp_path / "leaf.pem", [leaf])
    assert_openssl_accepts(upstream.roots_pem, only_leaf, untrusted=untrusted)
    sans, chain = verify_client(leaf, upstream.roots, intermediates)
    assert sans == [x509.UniformResourceIdentifier(WORKLOAD)]
    assert chain[-1] == upstream.roots[0]


@requires_openssl
async def test_intermediate_and_leaf_end_with_a_short_lived_upstream(tmp_path: Path) -> None:
    """An upstream root with two hours left: the authority's intermediate (ca_ttl 24 h) and its
    leaves are cut to the root's end, and the chain verifies right up to it."""
    root, root_key = make_ca(None, lifetime=dt.timedelta(hours=3), common_name="short root")
    root_pem = write_pem(tmp_path / "root.pem", [root])
    key_path = write_key(tmp_path / "root.key", root_key)
    end = root.not_valid_after_utc
    clock = FakeClock(now().replace(microsecond=0))
    ca = CertificateAuthority(
        trust_domain=TrustDomain.parse(TRUST_DOMAIN),
        config=CaConfig(upstream_cert=root_pem, upstream_key=key_path),
        limits=Limits(),
        clock=clock,
        store=MemoryStore(),
        vault=MemoryKeyVault(),
        upstream=Upstream.load(root_pem, key_path, None),
    )
    await ca.start()
    clock.set(end - dt.timedelta(minutes=2))

    issued = _issue(ca, tmp_path / "svid")

    assert issued.intermediates[0].not_valid_after_utc <= end
    assert issued.leaf.not_valid_after_utc <= end
    inside = end - dt.timedelta(minutes=1)
    assert_openssl_accepts(
        root_pem,
        issued.svid,
        untrusted=issued.untrusted,
        extra=("-attime", str(int(inside.timestamp()))),
    )
    sans, chain = verify_client(issued.leaf, [root], issued.intermediates, at=inside)
    assert sans == [x509.UniformResourceIdentifier(WORKLOAD)]
    assert chain[-1] == root
