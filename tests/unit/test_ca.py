"""The certificate authority: first start, restart, the rotation schedule, and issuance.

Everything runs against the real in-memory Store and KeyVault with a FakeClock.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import VerificationError

from authority.bundle import TrustBundle, jwk_thumbprint, parse_jwks
from authority.ca import CertificateAuthority, Upstream
from authority.clock import FakeClock
from authority.config import CaConfig, Limits
from authority.errors import FailedPrecondition, InvalidArgument, NotFound
from authority.ids import SpiffeId, TrustDomain
from authority.keyvault import MemoryKeyVault
from authority.models import AuthorityKeyInfo, KeyKind, KeyState
from authority.store.memory import MemoryStore
from authority.svid import CLOCK_SKEW_BACKDATE, JwtSvid, X509Svid, check_x509_svid
from tests.unit._pki import der, ec_key, make_ca, verify_client

TD = TrustDomain("example.org")
APP = SpiffeId.parse("spiffe://example.org/app")
START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
CA_TTL = dt.timedelta(hours=24)
MINUTE = dt.timedelta(minutes=1)
HOUR = dt.timedelta(hours=1)


@dataclass
class World:
    """The CA's collaborators, shared by every CA built over them (a restart)."""

    clock: FakeClock = field(default_factory=lambda: FakeClock(START))
    store: MemoryStore = field(default_factory=MemoryStore)
    vault: MemoryKeyVault = field(default_factory=MemoryKeyVault)
    config: CaConfig = field(default_factory=lambda: CaConfig(ca_ttl=CA_TTL))
    limits: Limits = field(default_factory=Limits)

    async def ca(self, upstream: Upstream | None = None) -> CertificateAuthority:
        ca = CertificateAuthority(
            trust_domain=TD,
            config=self.config,
            limits=self.limits,
            clock=self.clock,
            store=self.store,
            vault=self.vault,
            upstream=upstream,
        )
        await ca.start()
        return ca


@pytest.fixture
def world() -> World:
    return World()


def keys(ca: CertificateAuthority, kind: KeyKind, state: KeyState) -> list[AuthorityKeyInfo]:
    return [k for k in ca.authorities() if k.kind is kind and k.state is state]


def only(ca: CertificateAuthority, kind: KeyKind, state: KeyState) -> AuthorityKeyInfo:
    (key,) = keys(ca, kind, state)
    return key


def workload_key() -> ec.EllipticCurvePublicKey:
    return ec_key().public_key()


def issue(ca: CertificateAuthority, ttl: dt.timedelta = 5 * MINUTE) -> X509Svid:
    return ca.issue_x509_svid(APP, workload_key(), ttl)


def jwt_verify(token: str, bundle: TrustBundle, audience: str = "db") -> dict[str, object]:
    """Verify a JWT-SVID the way a relying party would: by kid, from the published JWKS."""
    kid = jwt.get_unverified_header(token)["kid"]
    key = parse_jwks(bundle.jwks_json())[kid]
    claims: dict[str, object] = jwt.decode(
        token,
        key,
        algorithms=["ES256", "ES384"],
        audience=audience,
        options={"require": ["sub", "aud", "exp"], "verify_exp": False},
    )
    return claims


def ids(bundle: TrustBundle) -> tuple[list[bytes], list[str]]:
    return [der(c) for c in bundle.x509_authorities], sorted(bundle.jwt_authorities)


# --- first start and restart -----------------------------------------------------------------


async def test_bundle_before_start_is_refused(world: World) -> None:
    ca = CertificateAuthority(
        trust_domain=TD,
        config=world.config,
        limits=world.limits,
        clock=world.clock,
        store=world.store,
        vault=world.vault,
    )
    with pytest.raises(FailedPrecondition, match="not started"):
        ca.bundle()


async def test_first_start_creates_one_active_key_of_each_kind(world: World) -> None:
    ca = await world.ca()
    infos = ca.authorities()
    assert sorted((k.kind.value, k.state.value) for k in infos) == [
        ("jwt", "active"),
        ("task", "active"),
        ("x509", "active"),
    ]
    assert await world.store.list_authority_keys() == sorted(
        infos, key=lambda k: (k.kind.value, k.not_before, k.key_id)
    )
    bundle = ca.bundle()
    assert len(bundle.x509_authorities) == 1
    assert len(bundle.jwt_authorities) == 1
    assert bundle.sequence == 1 == await world.store.bundle_sequence()
    assert bundle.refresh_hint == world.config.refresh_hint
    # The private halves are in the vault, under the kind and key id.
    for info in infos:
        private = world.vault.load(f"{info.kind}-{info.key_id}")
        assert jwk_thumbprint(private.public_key()) == info.key_id


async def test_the_root_is_a_spiffe_signing_certificate(world: World) -> None:
    ca = await world.ca()
    root = ca.active_x509_authority()
    info = only(ca, KeyKind.X509, KeyState.ACTIVE)
    assert info.certificate == der(root)
    assert root.issuer == root.subject
    root.verify_directly_issued_by(root)
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    usage = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert not usage.value.digital_signature
    san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    assert root.not_valid_before_utc == START - CLOCK_SKEW_BACKDATE
    assert root.not_valid_after_utc == START + CA_TTL
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert jwk_thumbprint(root.public_key()) == info.key_id  # type: ignore[arg-type]


async def test_restart_yields_the_same_bundle(world: World) -> None:
    first = await world.ca()
    world.clock.advance(HOUR)
    second = await world.ca()
    assert ids(second.bundle()) == ids(first.bundle())
    assert second.bundle().jwks_json() == first.bundle().jwks_json()
    assert second.bundle().sequence == first.bundle().sequence
    assert second.authorities() == first.authorities()
    assert len(await world.store.list_authority_keys()) == len(KeyKind)  # nothing new was made


async def test_restart_keeps_a_rotation_in_progress(world: World) -> None:
    first = await world.ca()
    world.clock.advance(CA_TTL * 0.6)
    assert await first.maintain()
    second = await world.ca()
    assert ids(second.bundle()) == ids(first.bundle())
    assert second.authorities() == first.authorities()
    assert len(keys(second, KeyKind.X509, KeyState.PREPARED)) == 1


async def test_restart_issues_with_the_stored_key(world: World) -> None:
    first = await world.ca()
    second = await world.ca()
    svid = issue(second)
    svid.certificate.verify_directly_issued_by(first.active_x509_authority())
    token = second.issue_jwt_svid(APP, ["db"], 5 * MINUTE).token
    assert jwt_verify(token, first.bundle())["sub"] == APP.uri


async def test_restart_refuses_a_vault_key_that_does_not_match(world: World) -> None:
    ca = await world.ca()
    info = only(ca, KeyKind.X509, KeyState.ACTIVE)
    world.vault.save(f"x509-{info.key_id}", ec_key())
    with pytest.raises(FailedPrecondition, match="does not match"):
        await world.ca()


async def test_restart_with_a_lost_vault_key_fails(world: World) -> None:
    ca = await world.ca()
    world.vault.delete(f"jwt-{only(ca, KeyKind.JWT, KeyState.ACTIVE).key_id}")
    with pytest.raises(NotFound, match="missing from the vault"):
        await world.ca()


# --- the rotation schedule -------------------------------------------------------------------


async def test_nothing_changes_before_half_life(world: World) -> None:
    ca = await world.ca()
    before = ids(ca.bundle())
    world.clock.advance(CA_TTL / 2 - MINUTE)
    assert not await ca.maintain()
    assert ids(ca.bundle()) == before
    assert ca.bundle().sequence == 1


async def test_at_half_life_a_prepared_key_is_published(world: World) -> None:
    ca = await world.ca()
    active_x509 = only(ca, KeyKind.X509, KeyState.ACTIVE)
    active_jwt = only(ca, KeyKind.JWT, KeyState.ACTIVE)
    world.clock.advance(CA_TTL / 2)
    assert await ca.maintain()
    prepared_x509 = only(ca, KeyKind.X509, KeyState.PREPARED)
    prepared_jwt = only(ca, KeyKind.JWT, KeyState.PREPARED)
    # Both in the bundle, the sequence bumped once for the change.
    bundle = ca.bundle()
    assert [der(c) for c in bundle.x509_authorities] == [
        active_x509.certificate,
        prepared_x509.certificate,
    ]
    assert set(bundle.jwt_authorities) == {active_jwt.key_id, prepared_jwt.key_id}
    assert bundle.sequence == 2
    # The active keys still sign.
    assert only(ca, KeyKind.X509, KeyState.ACTIVE) == active_x509
    svid = issue(ca)
    assert der(ca.active_x509_authority()) == active_x509.certificate
    svid.certificate.verify_directly_issued_by(ca.active_x509_authority())
    assert jwt.get_unverified_header(ca.issue_jwt_svid(APP, ["db"], MINUTE).token)["kid"] == (
        active_jwt.key_id
    )
    # Maintaining again changes nothing.
    assert not await ca.maintain()
    assert ca.bundle().sequence == 2


async def test_at_five_sixths_the_prepared_key_becomes_active(world: World) -> None:
    ca = await world.ca()
    first = only(ca, KeyKind.X509, KeyState.ACTIVE)
    first_jwt = only(ca, KeyKind.JWT, KeyState.ACTIVE)
    world.clock.advance(CA_TTL / 2)
    await ca.maintain()
    prepared = only(ca, KeyKind.X509, KeyState.PREPARED)
    prepared_jwt = only(ca, KeyKind.JWT, KeyState.PREPARED)
    world.clock.set(START + CA_TTL * 5 / 6 - MINUTE)
    assert not await ca.maintain()
    world.clock.set(START + CA_TTL * 5 / 6)
    assert await ca.maintain()
    assert only(ca, KeyKind.X509, KeyState.ACTIVE).key_id == prepared.key_id
    assert only(ca, KeyKind.X509, KeyState.OLD).key_id == first.key_id
    assert only(ca, KeyKind.JWT, KeyState.ACTIVE).key_id == prepared_jwt.key_id
    assert only(ca, KeyKind.JWT, KeyState.OLD).key_id == first_jwt.key_id
    assert keys(ca, KeyKind.X509, KeyState.PREPARED) == []
    bundle = ca.bundle()
    assert bundle.sequence == 3
    assert len(bundle.x509_authorities) == 2  # the old key stays published
    assert set(bundle.jwt_authorities) == {first_jwt.key_id, prepared_jwt.key_id}
    # The store agrees.
    stored = {(k.kind, k.key_id): k.state for k in await world.store.list_authority_keys()}
    assert stored[(KeyKind.X509, first.key_id)] is KeyState.OLD
    assert stored[(KeyKind.X509, prepared.key_id)] is KeyState.ACTIVE


async def test_old_keys_are_dropped_after_they_expire(world: World) -> None:
    ca = await world.ca()
    first = only(ca, KeyKind.X509, KeyState.ACTIVE)
    first_jwt = only(ca, KeyKind.JWT, KeyState.ACTIVE)
    world.clock.advance(CA_TTL / 2)
    await ca.maintain()
    world.clock.set(START + CA_TTL * 5 / 6)
    await ca.maintain()
    sequence = ca.bundle().sequence
    world.clock.set(first.not_after - MINUTE)
    assert not await ca.maintain()
    assert len(ca.bundle().x509_authorities) == 2
    world.clock.set(first.not_after)
    assert await ca.maintain()
    assert keys(ca, KeyKind.X509, KeyState.OLD) == []
    assert keys(ca, KeyKind.JWT, KeyState.OLD) == []
    bundle = ca.bundle()
    assert first.certificate not in [der(c) for c in bundle.x509_authorities]
    assert first_jwt.key_id not in bundle.jwt_authorities
    assert bundle.sequence > sequence
    stored = {k.key_id for k in await world.store.list_authority_keys()}
    assert first.key_id not in stored
    with pytest.raises(NotFound):
        world.vault.load(f"x509-{first.key_id}")


async def test_schedule_over_many_lives_keeps_its_invariants(world: World) -> None:
    ca = await world.ca()
    changes: list[int] = []
    ca.add_listener(lambda: changes.append(ca.bundle().sequence))
    sequence = ca.bundle().sequence
    seen_active: set[str] = set()
    step = dt.timedelta(minutes=20)
    for _ in range(int(5 * CA_TTL / step)):
        world.clock.advance(step)
        changed = await ca.maintain()
        now = world.clock.now()
        bundle = ca.bundle()
        assert (bundle.sequence > sequence) == changed
        sequence = bundle.sequence
        for kind in KeyKind:
            active = only(ca, kind, KeyState.ACTIVE)
            seen_active.add(active.key_id)
            assert active.not_after - now > CA_TTL / 6 - step  # always enough life left
            assert len(keys(ca, kind, KeyState.PREPARED)) <= 1
            assert len(keys(ca, kind, KeyState.OLD)) <= 1
        for info in ca.authorities():
            assert info.not_after > now  # nothing expired is ever published
        published = {der(c) for c in bundle.x509_authorities}
        assert published == {k.certificate for k in ca.authorities() if k.kind is KeyKind.X509}
        assert set(bundle.jwt_authorities) == {
            k.key_id for k in ca.authorities() if k.kind is KeyKind.JWT
        }
        issue(ca)  # and issuance works at every step
    # A key becomes active at 5/6 of its predecessor's life; as each key's life starts when it is
    # prepared (at 1/2), that is every 12h after the first rotation at 20h: 10 keys of each kind.
    assert len(seen_active) == len(KeyKind) * 10
    assert changes == sorted(changes)
    assert len(changes) == len(set(changes))


async def test_a_key_is_published_before_it_signs(world: World) -> None:
    ca = await world.ca()
    published: set[bytes] = {der(c) for c in ca.bundle().x509_authorities}
    step = HOUR
    for _ in range(72):
        previous = published
        world.clock.advance(step)
        await ca.maintain()
        # The authority signing now was already in the bundle an hour ago.
        assert der(ca.active_x509_authority()) in previous
        published = {der(c) for c in ca.bundle().x509_authorities}


async def test_an_expired_ca_is_replaced_at_start(world: World) -> None:
    first = await world.ca()
    old = only(first, KeyKind.X509, KeyState.ACTIVE)
    world.clock.advance(CA_TTL * 3)  # the authority was down for days
    ca = await world.ca()
    active = only(ca, KeyKind.X509, KeyState.ACTIVE)
    assert active.key_id != old.key_id
    assert active.not_after > world.clock.now()
    # The expired authority is not published, not even as old.
    assert [der(c) for c in ca.bundle().x509_authorities] == [active.certificate]
    assert len(ca.bundle().jwt_authorities) == 1
    issue(ca)
    # The store holds exactly the new active keys (no stale ACTIVE left behind).
    stored = await world.store.list_authority_keys()
    assert sorted((k.kind.value, k.state.value) for k in stored) == [
        ("jwt", "active"),
        ("task", "active"),
        ("x509", "active"),
    ]
    assert ids((await world.ca()).bundle()) == ids(ca.bundle())


# --- forced rotation and retirement ----------------------------------------------------------


async def test_step_rotation_publishes_before_it_activates(world: World) -> None:
    ca = await world.ca()
    first = only(ca, KeyKind.X509, KeyState.ACTIVE)
    await ca.rotate()
    prepared = only(ca, KeyKind.X509, KeyState.PREPARED)
    assert only(ca, KeyKind.X509, KeyState.ACTIVE).key_id == first.key_id
    assert prepared.certificate in [der(c) for c in ca.bundle().x509_authorities]
    assert only(ca, KeyKind.JWT, KeyState.PREPARED).key_id in ca.bundle().jwt_authorities
    # What is issued between the two steps still comes from the old key.
    issue(ca).certificate.verify_directly_issued_by(ca.active_x509_authority())
    assert ca.active_x509_authority().public_bytes(Encoding.DER) == first.certificate
    await ca.rotate()
    assert only(ca, KeyKind.X509, KeyState.ACTIVE).key_id == prepared.key_id
    assert only(ca, KeyKind.X509, KeyState.OLD).key_id == first.key_id
    assert ca.bundle().sequence == 3


async def test_immediate_rotation_makes_and_activates_a_new_key(world: World) -> None:
    ca = await world.ca()
    first = only(ca, KeyKind.X509, KeyState.ACTIVE)
    first_jwt = only(ca, KeyKind.JWT, KeyState.ACTIVE)
    svid = issue(ca)
    infos = await ca.rotate(immediate=True)
    assert infos == ca.authorities()
    active = only(ca, KeyKind.X509, KeyState.ACTIVE)
    assert active.key_id != first.key_id
    assert only(ca, KeyKind.X509, KeyState.OLD).key_id == first.key_id
    assert only(ca, KeyKind.JWT, KeyState.OLD).key_id == first_jwt.key_id
    assert ca.bundle().sequence == 2
    # SVIDs of the old authority still verify during the overlap.
    verify_client(svid, ca.bundle().x509_authorities, world.clock.now())
    issue(ca).certificate.verify_directly_issued_by(ca.active_x509_authority())


async def test_forced_rotation_activates_the_prepared_key(world: World) -> None:
    ca = await world.ca()
    world.clock.advance(CA_TTL * 0.6)
    await ca.maintain()
    prepared = only(ca, KeyKind.X509, KeyState.PREPARED)
    await ca.rotate()
    assert only(ca, KeyKind.X509, KeyState.ACTIVE).key_id == prepared.key_id
    assert keys(ca, KeyKind.X509, KeyState.PREPARED) == []


async def test_retire_drops_an_old_key(world: World) -> None:
    ca = await world.ca()
    svid = issue(ca)
    token = ca.issue_jwt_svid(APP, ["db"], 5 * MINUTE).token
    await ca.rotate(immediate=True)
    old = only(ca, KeyKind.X509, KeyState.OLD)
    old_jwt = only(ca, KeyKind.JWT, KeyState.OLD)
    sequence = ca.bundle().sequence
    await ca.retire(KeyKind.X509, old.key_id)
    assert ca.bundle().sequence == sequence + 1
    await ca.retire(KeyKind.JWT, old_jwt.key_id)
    assert ca.bundle().sequence == sequence + 2
    assert keys(ca, KeyKind.X509, KeyState.OLD) == []
    assert old.certificate not in [der(c) for c in ca.bundle().x509_authorities]
    assert old_jwt.key_id not in ca.bundle().jwt_authorities
    assert old.key_id not in {k.key_id for k in await world.store.list_authority_keys()}
    with pytest.raises(NotFound):
        world.vault.load(f"x509-{old.key_id}")
    # What the retired keys signed no longer verifies against the bundle.
    with pytest.raises(VerificationError):
        verify_client(svid, ca.bundle().x509_authorities, world.clock.now())
    with pytest.raises(KeyError):
        jwt_verify(token, ca.bundle())
    # A restart does not bring it back.
    assert ids((await world.ca()).bundle()) == ids(ca.bundle())


async def test_retire_refuses_the_active_and_prepared_keys(world: World) -> None:
    ca = await world.ca()
    active = only(ca, KeyKind.X509, KeyState.ACTIVE)
    with pytest.raises(FailedPrecondition, match="only an old key"):
        await ca.retire(KeyKind.X509, active.key_id)
    world.clock.advance(CA_TTL * 0.6)
    await ca.maintain()
    prepared = only(ca, KeyKind.JWT, KeyState.PREPARED)
    with pytest.raises(FailedPrecondition, match="only an old key"):
        await ca.retire(KeyKind.JWT, prepared.key_id)
    assert len(ca.authorities()) == 2 * len(KeyKind)


async def test_retire_an_unknown_key(world: World) -> None:
    ca = await world.ca()
    with pytest.raises(NotFound):
        await ca.retire(KeyKind.X509, "no-such-key")
    # The kind is part of the identity: a JWT key id is not an X.509 key.
    jwt_id = only(ca, KeyKind.JWT, KeyState.ACTIVE).key_id
    with pytest.raises(NotFound):
        await ca.retire(KeyKind.X509, jwt_id)


async def test_listeners_hear_every_change(world: World) -> None:
    ca = await world.ca()
    heard: list[int] = []
    ca.add_listener(lambda: heard.append(ca.bundle().sequence))
    assert not await ca.maintain()
    await ca.rotate(immediate=True)
    old = only(ca, KeyKind.X509, KeyState.OLD)
    await ca.retire(KeyKind.X509, old.key_id)
    assert heard == [2, 3]


# --- X.509-SVID issuance ---------------------------------------------------------------------


async def test_issued_svid_meets_the_profile(world: World) -> None:
    ca = await world.ca()
    public = workload_key()
    svid = ca.issue_x509_svid(
        APP,
        public,
        5 * MINUTE,
        dns_names=["app.example.org"],
        ip_addresses=[ipaddress.ip_address("10.0.0.1")],
    )
    now = world.clock.now()
    check_x509_svid(svid, ca.active_x509_authority(), public, now)
    cert = svid.certificate
    assert svid.spiffe_id == APP
    assert svid.intermediates == ()  # self-signed mode: the signer is a root in the bundle
    assert cert.not_valid_before_utc == now - CLOCK_SKEW_BACKDATE
    assert cert.not_valid_after_utc == now + 5 * MINUTE
    assert svid.expires_at == cert.not_valid_after_utc
    assert svid.serial_hex == format(cert.serial_number, "x")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [APP.uri]
    assert san.get_values_for_type(x509.DNSName) == ["app.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "SPIFFE"
    # cryptography's own path validation accepts it as a client certificate.
    chain = verify_client(svid, ca.bundle().x509_authorities, now)
    assert chain[-1] == ca.active_x509_authority()


async def test_svid_serials_are_unique(world: World) -> None:
    ca = await world.ca()
    serials = {issue(ca).serial_hex for _ in range(20)}
    assert len(serials) == 20


async def test_svid_ttl_is_capped_by_max_x509_ttl(world: World) -> None:
    ca = await world.ca()
    svid = issue(ca, 10 * HOUR)
    assert svid.expires_at == world.clock.now() + world.limits.max_x509_ttl


async def test_svid_ttl_is_capped_by_the_ca_remaining_life(world: World) -> None:
    ca = await world.ca()
    authority = ca.active_x509_authority()
    world.clock.set(authority.not_valid_after_utc - 2 * MINUTE)  # no maintain: the CA is old
    public = workload_key()
    svid = ca.issue_x509_svid(APP, public, 5 * MINUTE)
    assert svid.expires_at == authority.not_valid_after_utc
    check_x509_svid(svid, authority, public, world.clock.now())


async def test_issuance_refused_when_the_ca_has_less_than_min_ttl_left(world: World) -> None:
    ca = await world.ca()
    authority = ca.active_x509_authority()
    world.clock.set(authority.not_valid_after_utc - world.limits.min_ttl + dt.timedelta(seconds=1))
    with pytest.raises(FailedPrecondition, match="expires too soon"):
        issue(ca)
    with pytest.raises(FailedPrecondition, match="expires too soon"):
        ca.issue_jwt_svid(APP, ["db"], 5 * MINUTE)
    # Maintenance rotates, and issuance works again.
    assert await ca.maintain()
    issue(ca)
    ca.issue_jwt_svid(APP, ["db"], 5 * MINUTE)


async def test_issuance_at_exactly_min_ttl_left_works(world: World) -> None:
    ca = await world.ca()
    authority = ca.active_x509_authority()
    world.clock.set(authority.not_valid_after_utc - world.limits.min_ttl)
    assert issue(ca).expires_at == authority.not_valid_after_utc


@pytest.mark.parametrize("ttl", [dt.timedelta(0), -MINUTE, dt.timedelta(seconds=29)])
async def test_a_ttl_below_min_ttl_is_an_invalid_argument(world: World, ttl: dt.timedelta) -> None:
    ca = await world.ca()
    with pytest.raises(InvalidArgument, match="at least") as info:
        issue(ca, ttl)
    assert info.value.reason == "TTL_TOO_SHORT"
    with pytest.raises(InvalidArgument, match="at least"):
        ca.issue_jwt_svid(APP, ["db"], ttl)


async def test_an_id_of_another_trust_domain_is_refused(world: World) -> None:
    ca = await world.ca()
    other = SpiffeId.parse("spiffe://example.com/app")
    with pytest.raises(InvalidArgument, match="not in trust domain"):
        ca.issue_x509_svid(other, workload_key(), 5 * MINUTE)
    with pytest.raises(InvalidArgument, match="not in trust domain"):
        ca.issue_jwt_svid(other, ["db"], 5 * MINUTE)


async def test_svids_across_a_rotation_verify_against_the_overlapping_bundle(
    world: World,
) -> None:
    ca = await world.ca()
    world.clock.set(START + CA_TTL / 2)
    await ca.maintain()  # prepared, published
    world.clock.set(START + CA_TTL * 5 / 6 - MINUTE)
    before = issue(ca)
    token_before = ca.issue_jwt_svid(APP, ["db"], 5 * MINUTE).token
    world.clock.set(START + CA_TTL * 5 / 6)
    await ca.maintain()  # rotated
    after = issue(ca)
    token_after = ca.issue_jwt_svid(APP, ["db"], 5 * MINUTE).token
    assert before.certificate.issuer != after.certificate.issuer
    bundle = ca.bundle()
    now = world.clock.now()
    # Both X.509-SVIDs chain to the one bundle, each to its own authority.
    assert (
        verify_client(before, bundle.x509_authorities, now)[-1]
        != (verify_client(after, bundle.x509_authorities, now)[-1])
    )
    # Both JWT-SVIDs verify with the keys the bundle publishes.
    assert jwt_verify(token_before, bundle)["sub"] == APP.uri
    assert jwt_verify(token_after, bundle)["sub"] == APP.uri
    assert (
        jwt.get_unverified_header(token_before)["kid"]
        != (jwt.get_unverified_header(token_after)["kid"])
    )


async def test_a_relying_party_with_the_previous_bundle_trusts_the_new_authority(
    world: World,
) -> None:
    ca = await world.ca()
    world.clock.set(START + CA_TTL / 2)
    await ca.maintain()
    earlier_bundle = ca.bundle()
    world.clock.set(START + CA_TTL * 5 / 6)
    await ca.maintain()
    svid = issue(ca)
    token = ca.issue_jwt_svid(APP, ["db"], 5 * MINUTE).token
    verify_client(svid, earlier_bundle.x509_authorities, world.clock.now())
    assert jwt_verify(token, earlier_bundle)["sub"] == APP.uri


# --- JWT-SVID issuance -----------------------------------------------------------------------


async def test_issued_jwt_svid_meets_the_profile(world: World) -> None:
    ca = await world.ca()
    svid = ca.issue_jwt_svid(APP, ["db", "cache"], 5 * MINUTE)
    now = world.clock.now()
    header = jwt.get_unverified_header(svid.token)
    assert header == {"alg": "ES256", "kid": svid.key_id, "typ": "JWT"}
    assert svid.key_id == only(ca, KeyKind.JWT, KeyState.ACTIVE).key_id
    claims = jwt_verify(svid.token, ca.bundle(), audience="cache")
    assert claims == {
        "sub": APP.uri,
        "aud": ["db", "cache"],
        "exp": int((now + 5 * MINUTE).timestamp()),
        "iat": int(now.timestamp()),
        "jti": svid.jti,
    }
    assert svid.audience == ("db", "cache")
    assert svid.expires_at == now + 5 * MINUTE


async def test_jwt_ids_are_unique(world: World) -> None:
    ca = await world.ca()
    jtis = {ca.issue_jwt_svid(APP, ["db"], MINUTE).jti for _ in range(20)}
    assert len(jtis) == 20


async def test_jwt_exp_is_capped_by_max_jwt_ttl(world: World) -> None:
    ca = await world.ca()
    svid = ca.issue_jwt_svid(APP, ["db"], 10 * HOUR)
    assert svid.expires_at == world.clock.now() + world.limits.max_jwt_ttl


async def test_jwt_exp_is_capped_by_the_key_life(world: World) -> None:
    ca = await world.ca()
    key = only(ca, KeyKind.JWT, KeyState.ACTIVE)
    world.clock.set(key.not_after - 2 * MINUTE)
    svid: JwtSvid = ca.issue_jwt_svid(APP, ["db"], 5 * MINUTE)
    assert svid.expires_at <= key.not_after
    assert key.not_after - svid.expires_at < dt.timedelta(seconds=1)  # whole seconds
    claims = jwt_verify(svid.token, ca.bundle())
    assert claims["exp"] == int(svid.expires_at.timestamp())


async def test_jwt_needs_an_audience(world: World) -> None:
    ca = await world.ca()
    with pytest.raises(InvalidArgument, match="audience"):
        ca.issue_jwt_svid(APP, [], 5 * MINUTE)


async def test_p384_keys_sign_es384(world: World) -> None:
    world.config = CaConfig(ca_ttl=CA_TTL, key_type="ec-p384")
    ca = await world.ca()
    root_key = ca.active_x509_authority().public_key()
    assert isinstance(root_key, ec.EllipticCurvePublicKey)
    assert isinstance(root_key.curve, ec.SECP384R1)
    svid = ca.issue_jwt_svid(APP, ["db"], 5 * MINUTE)
    assert jwt.get_unverified_header(svid.token)["alg"] == "ES384"
    assert jwt_verify(svid.token, ca.bundle())["sub"] == APP.uri
    verify_client(issue(ca), ca.bundle().x509_authorities, world.clock.now())


# --- an upstream CA --------------------------------------------------------------------------


async def test_upstream_mode_issues_under_an_intermediate(world: World) -> None:
    root, root_key = make_ca("upstream root", not_after=START + 365 * CA_TTL)
    upstream = Upstream(root, root_key, (), (root,))
    ca = await world.ca(upstream)
    intermediate = ca.active_x509_authority()
    assert intermediate.issuer == root.subject
    intermediate.verify_directly_issued_by(root)
    assert intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The bundle holds the upstream roots; SVIDs carry the intermediate.
    assert ca.bundle().x509_authorities == (root,)
    svid = issue(ca)
    assert svid.intermediates == (intermediate,)
    assert verify_client(svid, ca.bundle().x509_authorities, world.clock.now()) == [
        svid.certificate,
        intermediate,
        root,
    ]
    # A restart reloads the intermediate from the store.
    again = await world.ca(upstream)
    assert again.active_x509_authority() == intermediate


async def test_upstream_life_caps_the_intermediate(world: World) -> None:
    root, root_key = make_ca("upstream root", not_after=START + 2 * HOUR)
    ca = await world.ca(Upstream(root, root_key, (), (root,)))
    assert ca.active_x509_authority().not_valid_after_utc == root.not_valid_after_utc
    assert issue(ca, HOUR).expires_at <= root.not_valid_after_utc


async def test_an_upstream_about_to_expire_is_refused(world: World) -> None:
    root, root_key = make_ca("upstream root", not_after=START + dt.timedelta(seconds=5))
    with pytest.raises(FailedPrecondition, match="upstream CA expires too soon"):
        await world.ca(Upstream(root, root_key, (), (root,)))


def write_pem(path: Path, *items: x509.Certificate | ec.EllipticCurvePrivateKey) -> Path:
    data = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            data += item.public_bytes(serialization.Encoding.PEM)
        else:
            data += item.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
    path.write_bytes(data)
    return path


def test_upstream_load_from_files(tmp_path: Path) -> None:
    root, root_key = make_ca("root")
    middle, middle_key = make_ca("middle", issuer=(root, root_key))
    loaded = Upstream.load(
        write_pem(tmp_path / "up.pem", middle, root),
        write_pem(tmp_path / "up.key", middle_key),
        write_pem(tmp_path / "roots.pem", root),
    )
    assert loaded.certificate == middle
    assert loaded.chain == (root,)
    assert loaded.roots == (root,)
    self_signed = Upstream.load(
        write_pem(tmp_path / "root.pem", root), write_pem(tmp_path / "root.key", root_key), None
    )
    assert self_signed.roots == (root,)


def test_upstream_load_refuses_a_key_of_another_certificate(tmp_path: Path) -> None:
    root, _ = make_ca("root")
    with pytest.raises(InvalidArgument, match="does not match"):
        Upstream.load(
            write_pem(tmp_path / "up.pem", root), write_pem(tmp_path / "up.key", ec_key()), None
        )


def test_upstream_load_needs_roots_for_an_intermediate(tmp_path: Path) -> None:
    root, root_key = make_ca("root")
    middle, middle_key = make_ca("middle", issuer=(root, root_key))
    with pytest.raises(InvalidArgument, match="upstream_bundle is required"):
        Upstream.load(
            write_pem(tmp_path / "up.pem", middle), write_pem(tmp_path / "up.key", middle_key), None
        )
