"""The trust domain's certificate authority: signing keys, their rotation, and issuance.

Two kinds of signing key, each with a life of ``ca_ttl``: X.509 authorities (a self-signed root, or
an intermediate under an upstream CA) and JWT keys. Each rotates prepared -> active -> old: a key is
prepared (and published in the bundle) at half its predecessor's life, activated at five sixths,
and the old one stays in the bundle until it expires or an operator retires it.

Issuance follows params -> template -> sign -> check what was issued against the profile.
The public metadata of keys is in the Store, private keys in a KeyVault; time comes from a Clock.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import json
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from authority.audit import AuditEvent, Checkpoint, sign_checkpoint
from authority.bundle import TrustBundle, jwk_thumbprint, load_pem_certificates, public_jwk
from authority.clock import Clock
from authority.config import CaConfig, Limits, format_duration
from authority.errors import FailedPrecondition, InvalidArgument, NotFound, ProfileViolation
from authority.ids import SpiffeId, TrustDomain
from authority.keyvault import KeyVault
from authority.models import AuthorityKeyInfo, KeyKind, KeyState
from authority.store import Store
from authority.svid import (
    CLOCK_SKEW_BACKDATE,
    JwtSvid,
    WorkloadPublicKey,
    X509Svid,
    check_jwt_svid_claims,
    check_x509_svid,
)

log = logging.getLogger(__name__)

PREPARE_AT = 1 / 2
ACTIVATE_AT = 5 / 6
_CURVES: dict[str, tuple[type[ec.EllipticCurve], str, hashes.SHA256 | hashes.SHA384]] = {
    "ec-p256": (ec.SECP256R1, "ES256", hashes.SHA256()),
    "ec-p384": (ec.SECP384R1, "ES384", hashes.SHA384()),
}


@dataclass(frozen=True, slots=True)
class Upstream:
    """An operator-supplied CA above this one: its key signs our intermediates."""

    certificate: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes
    chain: tuple[x509.Certificate, ...]  # between the upstream certificate and a root
    roots: tuple[x509.Certificate, ...]

    @classmethod
    def load(cls, cert_path: Path, key_path: Path, bundle_path: Path | None) -> Upstream:
        certs = load_pem_certificates(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise InvalidArgument("the upstream key must be EC or RSA")
        cert, *chain = certs
        if cert.public_key() != key.public_key():
            raise InvalidArgument("the upstream key does not match the upstream certificate")
        roots = tuple(load_pem_certificates(bundle_path.read_bytes())) if bundle_path else ()
        if not roots:
            if cert.issuer != cert.subject:
                raise InvalidArgument(
                    "ca.upstream_bundle is required when the upstream is not a root"
                )
            roots = (cert,)
        return cls(cert, key, tuple(chain), roots)


@dataclass(frozen=True, slots=True)
class _Key:
    info: AuthorityKeyInfo
    private: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate | None
    chain: tuple[x509.Certificate, ...]  # upstream chain above the certificate (excluding roots)
    # Per-key parts of the leaf template, computed once: issuer, subject, the fixed extensions.
    aki: x509.AuthorityKeyIdentifier | None
    leaf_template: x509.CertificateBuilder | None = None

    @property
    def vault_name(self) -> str:
        return f"{self.info.kind}-{self.info.key_id}"


class CertificateAuthority:
    def __init__(
        self,
        *,
        trust_domain: TrustDomain,
        config: CaConfig,
        limits: Limits,
        clock: Clock,
        store: Store,
        vault: KeyVault,
        upstream: Upstream | None = None,
        replica: str = "",
    ) -> None:
        """``replica``: the replica this CA signs for; the keys of other replicas (on a shared
        store) are published in the bundle, never signed with."""
        self.trust_domain = trust_domain
        self.replica = replica
        self._peers: dict[tuple[KeyKind, str], AuthorityKeyInfo] = {}
        self._peer_public: dict[KeyKind, dict[str, ec.EllipticCurvePublicKey]] = {}
        self._config = config
        self._limits = limits
        self._clock = clock
        self._store = store
        self._vault = vault
        self._upstream = upstream
        curve, self._jwt_alg, self._hash = _CURVES[config.key_type]
        self._curve = curve
        self._keys: dict[tuple[KeyKind, str], _Key] = {}
        self._sequence = 0
        self._bundle: TrustBundle | None = None
        self._listeners: list[Callable[[], None]] = []
        self._signature_checked: set[str] = set()  # keys whose issued signatures verified once
        self._lock = asyncio.Lock()
        self._leaf_subject = x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, config.subject_organization)]
        )

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the keys, creating the first ones on first start, and bring them up to date."""
        async with self._lock:
            for info in await self._store.list_authority_keys():
                if info.replica == self.replica:
                    self._keys[(info.kind, info.key_id)] = self._load_key(info)
                else:
                    self._peers[(info.kind, info.key_id)] = info
            self._peer_public = self._index_peers()
            self._sequence = await self._store.bundle_sequence()
            await self._maintain_locked(mode="schedule")
            self._bundle = self._build_bundle()

    async def reload_peers(self) -> None:
        """Read the other replicas' keys and the bundle sequence again (another replica
        prepared, activated, retired or dropped a key); announce a changed bundle."""
        async with self._lock:
            peers = {
                (info.kind, info.key_id): info
                for info in await self._store.list_authority_keys()
                if info.replica != self.replica
            }
            sequence = await self._store.bundle_sequence()
            if peers == self._peers and sequence == self._sequence:
                return
            self._peers, self._sequence = peers, max(sequence, self._sequence)
            self._peer_public = self._index_peers()
            self._changed()

    async def maintain(self) -> bool:
        """Apply the rotation schedule now; True when the bundle changed."""
        async with self._lock:
            return await self._maintain_locked(mode="schedule")

    async def rotate(self, *, immediate: bool = False) -> list[AuthorityKeyInfo]:
        """Move each kind one step ahead of its schedule: prepare (and publish) a new key where
        none is prepared, else activate the prepared one. Two calls rotate, with a window
        between them for relying parties to fetch the new bundle.

        ``immediate`` prepares and activates at once, for a key that must stop signing now;
        holders of the previous bundle then cannot verify what is issued until they refresh.
        """
        async with self._lock:
            await self._maintain_locked(mode="immediate" if immediate else "step")
            return self.authorities()

    async def retire(self, kind: KeyKind, key_id: str) -> None:
        """Drop an old key from the bundle now (a key that leaked or is no longer trusted)."""
        async with self._lock:
            key = self._keys.get((kind, key_id))
            if key is None:
                raise NotFound(f"no {kind} authority {key_id}")
            if key.info.state is not KeyState.OLD:
                raise FailedPrecondition(
                    f"only an old key can be retired; {key_id} is {key.info.state} (rotate first)"
                )
            event = self._key_event("ca.key_retired", key.info)
            self._sequence = await self._store.delete_authority_key(kind, key_id, audit=[event])
            del self._keys[(kind, key_id)]
            self._vault.delete(key.vault_name)
            self._changed()

    async def revoke_key(self, key_id: str) -> None:
        """Stop trusting a key now: an active one is replaced at once, then it leaves the bundle
        (everything it signed stops verifying for anyone who refreshes the bundle)."""
        async with self._lock:
            key = next((k for k in self._keys.values() if k.info.key_id == key_id), None)
            if key is None:
                raise NotFound(f"no signing key {key_id}", reason="KEY_NOT_FOUND")
            kind = key.info.kind
            if key.info.state is KeyState.ACTIVE:
                now = self._clock.now()
                prepared = self._find(kind, KeyState.PREPARED) or self._create_key(kind, now)
                fresh = prepared not in self._keys.values()
                if fresh:
                    self._vault.save(prepared.vault_name, prepared.private)
                activated = replace(prepared.info, state=KeyState.ACTIVE)
                demoted = replace(key.info, state=KeyState.OLD)
                self._sequence = await self._store.put_authority_keys(
                    [activated, demoted],
                    bump_sequence=True,
                    audit=[self._key_event("ca.key_active", activated, "immediate")],
                )
                self._keys[(kind, activated.key_id)] = replace(prepared, info=activated)
                key = replace(key, info=demoted)
                self._keys[(kind, key_id)] = key
            self._sequence = await self._store.delete_authority_key(
                kind, key_id, audit=[self._key_event("ca.key_revoked", key.info)]
            )
            del self._keys[(kind, key_id)]
            self._vault.delete(key.vault_name)
            self._changed()

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Called (synchronously) after every change of the bundle or of the active keys."""
        self._listeners.append(callback)

    def _changed(self) -> None:
        self._bundle = self._build_bundle()
        log.info(
            "trust bundle changed: sequence=%d authorities=%s",
            self._sequence,
            ",".join(f"{k.info.kind}:{k.info.key_id[:12]}:{k.info.state}" for k in self._sorted()),
        )
        for callback in self._listeners:
            callback()

    async def _maintain_locked(self, *, mode: Literal["schedule", "step", "immediate"]) -> bool:
        now = self._clock.now()
        updates: list[AuthorityKeyInfo] = []
        new: list[_Key] = []
        drop: list[_Key] = []
        for kind in KeyKind:
            active = self._find(kind, KeyState.ACTIVE)
            prepared = self._find(kind, KeyState.PREPARED)
            drop += [
                key
                for key in self._keys.values()
                if key.info.kind is kind
                and key.info.state is KeyState.OLD
                and key.info.not_after <= now
            ]
            active_usable = (
                active is not None and active.info.not_after > now + self._limits.min_ttl
            )
            life = active.info.not_after - active.info.not_before if active else dt.timedelta(0)
            due_prepare = (
                active is None
                or not active_usable
                or now >= active.info.not_before + life * PREPARE_AT
            )
            just_prepared = False
            if prepared is None and (mode != "schedule" or due_prepare):
                prepared = self._create_key(kind, now)
                new.append(prepared)
                just_prepared = True
            due_activate = (
                active is None
                or not active_usable
                or now >= active.info.not_before + life * ACTIVATE_AT
            )
            forced = mode == "immediate" or (mode == "step" and not just_prepared)
            if prepared is not None and (forced or due_activate):
                if active is not None:
                    updates.append(replace(active.info, state=KeyState.OLD))
                    if active.info.not_after <= now:
                        drop.append(active)  # expired: never published again, not even as old
                activated = replace(prepared.info, state=KeyState.ACTIVE)
                if prepared in new:
                    new[new.index(prepared)] = replace(prepared, info=activated)
                else:
                    updates.append(activated)
        if not (updates or new or drop):
            return False
        for key in new:
            self._vault.save(key.vault_name, key.private)
        if new or updates:
            changed = [k.info for k in new] + updates
            self._sequence = await self._store.put_authority_keys(
                changed,
                bump_sequence=True,
                audit=[self._key_event(f"ca.key_{info.state}", info, mode) for info in changed],
            )
        for key in new:
            self._keys[(key.info.kind, key.info.key_id)] = key
        for info in updates:
            old = self._keys[(info.kind, info.key_id)]
            self._keys[(info.kind, info.key_id)] = replace(old, info=info)
        for key in drop:
            self._sequence = await self._store.delete_authority_key(
                key.info.kind, key.info.key_id, audit=[self._key_event("ca.key_dropped", key.info)]
            )
            self._vault.delete(key.vault_name)
            del self._keys[(key.info.kind, key.info.key_id)]
        self._changed()
        return True

    def _key_event(self, kind: str, info: AuthorityKeyInfo, mode: str = "") -> AuditEvent:
        """ca.key_prepared / key_active / key_old (a state reached), key_dropped, key_retired."""
        details: dict[str, object] = {
            "kind": str(info.kind),
            "key_id": info.key_id,
            "not_after": info.not_after.isoformat(),
        }
        if mode:
            details["trigger"] = {
                "schedule": "schedule",
                "step": "operator",
                "immediate": "operator-immediate",
            }[mode]
        return AuditEvent(
            kind, self._clock.now(), actor="authority", subject=info.key_id, details=details
        )

    def _find(self, kind: KeyKind, state: KeyState) -> _Key | None:
        for key in self._keys.values():
            if key.info.kind is kind and key.info.state is state:
                return key
        return None

    def _active(self, kind: KeyKind) -> _Key:
        key = self._find(kind, KeyState.ACTIVE)
        if key is None:
            raise FailedPrecondition(f"no active {kind} authority")
        return key

    def _sorted(self) -> list[_Key]:
        return sorted(self._keys.values(), key=lambda k: (k.info.kind, k.info.not_before))

    # --- key creation -----------------------------------------------------------------------

    def _create_key(self, kind: KeyKind, now: dt.datetime) -> _Key:
        private = ec.generate_private_key(self._curve())
        kid = jwk_thumbprint(private.public_key())
        not_before = now - CLOCK_SKEW_BACKDATE
        not_after = now + self._config.ca_ttl
        if kind is not KeyKind.X509:
            spki = private.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            info = AuthorityKeyInfo(
                kind,
                kid,
                KeyState.PREPARED,
                not_before,
                not_after,
                replica=self.replica,
                public_key=spki,
            )
            return _Key(info, private, None, (), None)
        cert, chain = self._make_ca_certificate(private, kid, not_before, not_after)
        info = AuthorityKeyInfo(
            kind,
            kid,
            KeyState.PREPARED,
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
            certificate=cert.public_bytes(serialization.Encoding.DER),
            upstream_chain=tuple(c.public_bytes(serialization.Encoding.DER) for c in chain),
            replica=self.replica,
        )
        return self._key_with_template(info, private, cert, chain)

    def _make_ca_certificate(
        self,
        private: ec.EllipticCurvePrivateKey,
        kid: str,
        not_before: dt.datetime,
        not_after: dt.datetime,
    ) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
        public = private.public_key()
        ski = x509.SubjectKeyIdentifier.from_public_key(public)
        # A subject of its own per key (serialNumber: the key identifier, hex) keeps path
        # building unambiguous while old and new authorities overlap in the bundle.
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self._config.subject_organization),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{self.trust_domain} authority"),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, ski.digest.hex()),
            ]
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
                    [x509.UniformResourceIdentifier(self.trust_domain.id.uri)]
                ),
                critical=False,
            )
            .add_extension(ski, critical=False)
        )
        if self._upstream is None:
            builder = (
                builder.issuer_name(subject)
                .not_valid_before(not_before)
                .not_valid_after(not_after)
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False
                )
            )
            return builder.sign(private, self._hash), ()
        up = self._upstream.certificate
        capped = min(not_after, up.not_valid_after_utc)
        if capped <= not_before + self._limits.min_ttl:
            raise FailedPrecondition("the upstream CA expires too soon to sign an intermediate")
        builder = (
            builder.issuer_name(up.subject)
            .not_valid_before(max(not_before, up.not_valid_before_utc))
            .not_valid_after(capped)
            .add_extension(_aki_for(up), critical=False)
        )
        chain = () if up in self._upstream.roots else (up, *self._upstream.chain)
        return builder.sign(self._upstream.key, self._hash), chain

    def _load_key(self, info: AuthorityKeyInfo) -> _Key:
        private = self._vault.load(f"{info.kind}-{info.key_id}")
        if info.kind is not KeyKind.X509:
            return _Key(info, private, None, (), None)
        cert = x509.load_der_x509_certificate(info.certificate)
        if cert.public_key() != private.public_key():
            raise FailedPrecondition(f"the vault key {info.key_id} does not match its certificate")
        chain = tuple(x509.load_der_x509_certificate(d) for d in info.upstream_chain)
        return self._key_with_template(info, private, cert, chain)

    @staticmethod
    def _key_with_template(
        info: AuthorityKeyInfo,
        private: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        chain: tuple[x509.Certificate, ...],
    ) -> _Key:
        aki = _aki_for(cert)
        template = (
            x509.CertificateBuilder()
            .issuer_name(cert.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(_LEAF_EKU, critical=False)
            .add_extension(aki, critical=False)
        )
        return _Key(info, private, cert, chain, aki, template)

    # --- views ------------------------------------------------------------------------------

    def authorities(self) -> list[AuthorityKeyInfo]:
        return [k.info for k in self._sorted()]

    def x509_intermediates(self) -> list[x509.Certificate]:
        """What stands between the bundle and an X.509-SVID of this trust domain, on any
        replica: with an upstream CA, each X.509 signing key's certificate and the upstream
        chain above it; self-signed, nothing (each key's certificate is in the bundle)."""
        if self._upstream is None:
            return []
        infos = [k.info for k in self._sorted()] + list(self._peer_infos(KeyKind.X509))
        ders = [
            d for i in infos if i.kind is KeyKind.X509 for d in (i.certificate, *i.upstream_chain)
        ]
        return [x509.load_der_x509_certificate(d) for d in dict.fromkeys(ders)]

    def bundle(self) -> TrustBundle:
        if self._bundle is None:
            raise FailedPrecondition("the CA has not started")
        return self._bundle

    def _build_bundle(self) -> TrustBundle:
        keys = self._sorted()
        if self._upstream is not None:
            x509_authorities: tuple[x509.Certificate, ...] = self._upstream.roots
        else:
            x509_authorities = tuple(
                k.certificate for k in keys if k.info.kind is KeyKind.X509 and k.certificate
            ) + tuple(
                x509.load_der_x509_certificate(info.certificate)
                for info in self._peer_infos(KeyKind.X509)
            )
        return TrustBundle(
            trust_domain=self.trust_domain,
            x509_authorities=x509_authorities,
            jwt_authorities={
                **{
                    k.info.key_id: k.private.public_key()
                    for k in keys
                    if k.info.kind is KeyKind.JWT
                },
                **self._peer_public_keys(KeyKind.JWT),
            },
            sequence=self._sequence,
            refresh_hint=self._config.refresh_hint,
        )

    def sign_checkpoint(self, seq: int, head_hash: str) -> Checkpoint:
        """Sign the audit chain's head with the active JWT key (verifiable with the bundle)."""
        key = self._active(KeyKind.JWT)
        return sign_checkpoint(
            seq,
            head_hash,
            key.private,
            key.info.key_id,
            self._jwt_alg,
            self._clock.now(),
            self.trust_domain.id.uri,
        )

    def task_keys(self) -> dict[str, ec.EllipticCurvePublicKey]:
        """The task-token keys (prepared, active, old), by kid: what relying services trust."""
        return {
            **{
                k.info.key_id: k.private.public_key()
                for k in self._sorted()
                if k.info.kind is KeyKind.TASK
            },
            **self._peer_public_keys(KeyKind.TASK),
        }

    def _peer_infos(self, kind: KeyKind) -> list[AuthorityKeyInfo]:
        """The other replicas' keys of ``kind``, oldest first."""
        return sorted(
            (info for info in self._peers.values() if info.kind is kind),
            key=lambda info: (info.not_before, info.key_id),
        )

    def _peer_public_keys(self, kind: KeyKind) -> dict[str, ec.EllipticCurvePublicKey]:
        return self._peer_public.get(kind, {})

    def _index_peers(self) -> dict[KeyKind, dict[str, ec.EllipticCurvePublicKey]]:
        """The other replicas' JWT and task-token public keys, parsed once per change."""
        out: dict[KeyKind, dict[str, ec.EllipticCurvePublicKey]] = {}
        for kind in (KeyKind.JWT, KeyKind.TASK):
            for info in self._peer_infos(kind):
                if not info.public_key:
                    continue
                public = serialization.load_der_public_key(info.public_key)
                if isinstance(public, ec.EllipticCurvePublicKey):
                    out.setdefault(kind, {})[info.key_id] = public
        return out

    def task_jwks_json(self) -> bytes:
        """The task-token keys as a JWK Set (``use`` "sig", ``alg`` set, ``kid`` set)."""
        keys = []
        for kid, pub in self.task_keys().items():
            jwk = public_jwk(pub)
            jwk.update(use="sig", kid=kid, alg=self._jwt_alg)
            keys.append(jwk)
        return json.dumps({"keys": keys}, sort_keys=True, separators=(",", ":")).encode()

    def task_signing_key(self) -> tuple[ec.EllipticCurvePrivateKey, str, str]:
        """(key, kid, algorithm) of the active task-token key."""
        key = self._active(KeyKind.TASK)
        return key.private, key.info.key_id, self._jwt_alg

    @property
    def issuer(self) -> str:
        """The ``iss`` of task tokens: the trust domain's SPIFFE ID."""
        return self.trust_domain.id.uri

    def active_x509_authority(self) -> x509.Certificate:
        cert = self._active(KeyKind.X509).certificate
        assert cert is not None
        return cert

    # --- issuance ---------------------------------------------------------------------------

    def _check_ttl(self, ttl: dt.timedelta) -> None:
        if ttl < self._limits.min_ttl:
            raise InvalidArgument(
                f"an SVID lives at least {format_duration(self._limits.min_ttl)}; "
                f"{format_duration(ttl)} was asked for",
                reason="TTL_TOO_SHORT",
            )

    def issue_x509_svid(
        self,
        spiffe_id: SpiffeId,
        public_key: WorkloadPublicKey,
        ttl: dt.timedelta,
        dns_names: Sequence[str] = (),
        ip_addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    ) -> X509Svid:
        if not spiffe_id.member_of(self.trust_domain):
            raise InvalidArgument(f"{spiffe_id} is not in trust domain {self.trust_domain}")
        self._check_ttl(ttl)
        key = self._active(KeyKind.X509)
        assert key.certificate is not None
        assert key.aki is not None
        now = self._clock.now()
        if key.info.not_after - now < self._limits.min_ttl:
            raise FailedPrecondition("the active X.509 authority expires too soon; rotate the CA")
        not_after = min(now + min(ttl, self._limits.max_x509_ttl), key.info.not_after)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id.uri)]
        names += [x509.DNSName(n) for n in dns_names]
        names += [x509.IPAddress(ip) for ip in ip_addresses]
        assert key.leaf_template is not None
        cert = (
            key.leaf_template.subject_name(self._leaf_subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW_BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(key.private, self._hash)
        )
        # Self-signed: the signing CA is a root in the bundle. Upstream: it is an intermediate.
        intermediates = (key.certificate, *key.chain) if self._upstream is not None else ()
        svid = X509Svid(spiffe_id, cert, intermediates)
        first = key.info.key_id not in self._signature_checked
        check_x509_svid(svid, key.certificate, public_key, now, verify_signature=first)
        self._signature_checked.add(key.info.key_id)
        return svid

    def issue_jwt_svid(
        self, spiffe_id: SpiffeId, audience: Sequence[str], ttl: dt.timedelta
    ) -> JwtSvid:
        if not spiffe_id.member_of(self.trust_domain):
            raise InvalidArgument(f"{spiffe_id} is not in trust domain {self.trust_domain}")
        if not audience:
            raise InvalidArgument("a JWT-SVID needs at least one audience")
        self._check_ttl(ttl)
        key = self._active(KeyKind.JWT)
        now = self._clock.now()
        if key.info.not_after - now < self._limits.min_ttl:
            raise FailedPrecondition("the active JWT authority expires too soon; rotate the CA")
        expires = min(now + min(ttl, self._limits.max_jwt_ttl), key.info.not_after)
        expires = expires.replace(microsecond=0)
        jti = secrets.token_urlsafe(16)
        claims = {
            "sub": spiffe_id.uri,
            "aud": list(audience),
            "exp": int(expires.timestamp()),
            "iat": int(now.timestamp()),
            "jti": jti,
        }
        header = {"kid": key.info.key_id, "typ": "JWT"}
        token = jwt.encode(claims, key.private, algorithm=self._jwt_alg, headers=header)
        svid = JwtSvid(spiffe_id, token, tuple(audience), expires, jti, key.info.key_id)
        issued_header, issued_claims = _parse_compact(token)
        if issued_header.get("alg") != self._jwt_alg:
            raise ProfileViolation("JWT-SVID signed with an unexpected algorithm")
        check_jwt_svid_claims(issued_header, issued_claims, svid)
        return svid


def _parse_compact(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a JWS we just produced (its signature is the signer's own)."""
    try:
        header_b64, claims_b64, _ = token.split(".")
        header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
        claims = json.loads(base64.urlsafe_b64decode(claims_b64 + "=" * (-len(claims_b64) % 4)))
    except ValueError:
        raise ProfileViolation("the signer produced a malformed JWS") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise ProfileViolation("the signer produced a malformed JWS")
    return header, claims


def _aki_for(cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(cert.public_key())  # type: ignore[arg-type]


_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)
