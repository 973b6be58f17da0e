"""Cases a running server does not reach quickly, on a CertificateAuthority built directly:
P-384 keys (ES384 JWT-SVIDs) and leaf lifetimes capped by the issuing authority's end."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.verification import VerificationError
from spiffe import JwtBundle, JwtSvid, SpiffeId, TrustDomain

from authority.ca import CertificateAuthority
from authority.client import new_key
from authority.clock import FakeClock
from authority.config import CaConfig, Limits
from authority.ids import SpiffeId as AuthoritySpiffeId
from authority.ids import TrustDomain as AuthorityTrustDomain
from authority.keyvault import MemoryKeyVault
from authority.store.memory import MemoryStore
from tests.conformance.verifiers import (
    TRUST_DOMAIN,
    assert_openssl_accepts,
    keys_for_use,
    now,
    openssl_verify,
    requires_openssl,
    verify_client,
    write_pem,
)

WORKLOAD = f"spiffe://{TRUST_DOMAIN}/direct/one"


async def _started(config: CaConfig, clock: FakeClock) -> CertificateAuthority:
    ca = CertificateAuthority(
        trust_domain=AuthorityTrustDomain.parse(TRUST_DOMAIN),
        config=config,
        limits=Limits(),
        clock=clock,
        store=MemoryStore(),
        vault=MemoryKeyVault(),
    )
    await ca.start()
    return ca


def _jwt_svid_jwks(ca: CertificateAuthority) -> bytes:
    doc = json.loads(ca.bundle().jwks_json())
    return json.dumps({"keys": keys_for_use(doc, "jwt-svid")}).encode()


async def test_p384_authority_issues_es384_jwt_svids() -> None:
    ca = await _started(CaConfig(key_type="ec-p384"), FakeClock(now().replace(microsecond=0)))
    svid = ca.issue_jwt_svid(AuthoritySpiffeId.parse(WORKLOAD), ["svc-a"], dt.timedelta(minutes=5))
    jwks = _jwt_svid_jwks(ca)

    header = jwt.get_unverified_header(svid.token)
    assert header["alg"] == "ES384"
    assert header["typ"] == "JWT"
    entry = next(k for k in json.loads(jwks)["keys"] if k["kid"] == header["kid"])
    assert entry["crv"] == "P-384"
    claims = jwt.decode(
        svid.token,
        jwt.PyJWKSet.from_json(jwks.decode())[header["kid"]],
        algorithms=["ES384"],
        audience="svc-a",
        options={"require": ["exp", "aud", "sub", "iat"]},
    )
    assert claims["sub"] == WORKLOAD
    validated = JwtSvid.parse_and_validate(
        svid.token, JwtBundle.parse(TrustDomain(TRUST_DOMAIN), jwks), {"svc-a"}
    )
    assert validated.spiffe_id == SpiffeId(WORKLOAD)


@requires_openssl
async def test_p384_authority_issues_verifiable_x509_svids(tmp_path: Path) -> None:
    ca = await _started(CaConfig(key_type="ec-p384"), FakeClock(now().replace(microsecond=0)))
    svid = ca.issue_x509_svid(
        AuthoritySpiffeId.parse(WORKLOAD), new_key().public_key(), dt.timedelta(minutes=5)
    )
    roots = list(ca.bundle().x509_authorities)

    assert isinstance(svid.certificate.signature_hash_algorithm, hashes.SHA384)
    assert_openssl_accepts(
        write_pem(tmp_path / "bundle.pem", roots),
        write_pem(tmp_path / "svid.pem", [svid.certificate]),
    )
    sans, _ = verify_client(svid.certificate, roots)
    assert sans == [x509.UniformResourceIdentifier(WORKLOAD)]


@requires_openssl
async def test_leaf_life_is_capped_by_the_issuing_authority(tmp_path: Path) -> None:
    """Issued two minutes before the authority ends, a 5-minute SVID ends with the authority:
    valid for independent verifiers up to then, and not one second after."""
    clock = FakeClock(now().replace(microsecond=0))
    ca = await _started(CaConfig(), clock)
    (root,) = ca.bundle().x509_authorities
    end = root.not_valid_after_utc
    clock.set(end - dt.timedelta(minutes=2))

    svid = ca.issue_x509_svid(
        AuthoritySpiffeId.parse(WORKLOAD), new_key().public_key(), dt.timedelta(minutes=5)
    )

    assert svid.certificate.not_valid_after_utc <= end
    bundle = write_pem(tmp_path / "bundle.pem", [root])
    leaf = write_pem(tmp_path / "svid.pem", [svid.certificate])
    inside = end - dt.timedelta(minutes=1)
    assert_openssl_accepts(bundle, leaf, extra=("-attime", str(int(inside.timestamp()))))
    verify_client(svid.certificate, [root], at=inside)
    after = end + dt.timedelta(seconds=1)
    assert openssl_verify(bundle, leaf, extra=("-attime", str(int(after.timestamp())))).returncode
    with pytest.raises(VerificationError):
        verify_client(svid.certificate, [root], at=after)
