"""The authority's use cases, free of any transport: entries, join tokens, attestation,
renewal and JWT-SVIDs. The gRPC adapters translate to and from these calls."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import secrets
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from attestors.api import AttestContext
from attestors.unix import UnixAttestor
from authority.attestation import AttestorHost
from authority.audit import (
    AuditEvent,
    AuditRecord,
    Checkpoint,
    RefusalBudget,
    Suppressed,
    bounded,
    digest,
)
from authority.ca import CertificateAuthority
from authority.clock import Clock
from authority.config import Limits, format_duration
from authority.errors import (
    AlreadyExists,
    AttestationFailed,
    AuthorityError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from authority.ids import SpiffeId
from authority.jwt_svid import check_jwt_svid
from authority.models import (
    Identity,
    IssuedX509,
    JoinToken,
    RegistrationEntry,
    RevocationKind,
    Selector,
    check_dns_name,
    check_length,
    token_digest,
)
from authority.revocation import RevocationService
from authority.store import Store
from authority.svid import JwtSvid, WorkloadPublicKey, X509Svid, parse_csr
from authority.tokens import check_task_id

log = logging.getLogger(__name__)

_PEER_CACHE_SIZE = 10_000
# Namespace of the identity ids of node SVIDs: uuid5(agent identity id / entry id).
_NODE_IDENTITIES = uuid.UUID("5a1c7e0e-7f0b-4c59-9b1e-6d0d2b3c4a01")
# JWT-SVID validation: the algorithms allowed for each curve of a JWT authority key.
OPERATOR = "operator"  # the actor of admin-socket calls (the socket's file mode is the gate)
AUTHORITY = "authority"


@dataclass(frozen=True, slots=True)
class AttestResult:
    svids: tuple[X509Svid, ...]
    selectors: frozenset[Selector]
    entry_ids: tuple[str | None, ...]


@dataclass(frozen=True, slots=True)
class Caller:
    """A workload authenticated by its X.509-SVID over mutual TLS."""

    spiffe_id: SpiffeId
    identity: Identity
    certificate: x509.Certificate


class Authority:
    def __init__(
        self,
        *,
        ca: CertificateAuthority,
        store: Store,
        attestors: AttestorHost,
        clock: Clock,
        limits: Limits,
        revocations: RevocationService,
        reserved_dns_names: Sequence[str] = (),
        reserved_ids: Sequence[SpiffeId] = (),
        workload_api_attestor: str = "unix",
    ) -> None:
        self.revocations = revocations
        # The type of the selectors the authority's own Workload API finds (the built-in unix
        # plugin, unless an instance of that name is registered): entries may name it.
        self._workload_api_attestor = workload_api_attestor
        self.ca = ca
        self._store = store
        self.attestors = attestors
        self._clock = clock
        self._limits = limits
        self._reserved_dns = frozenset(reserved_dns_names)
        self._reserved_ids = frozenset(reserved_ids)
        self._entries: dict[str, RegistrationEntry] = {}
        self._entry_listeners: list[Callable[[], None]] = []
        self._node_identities: set[str] = set()  # node identity ids known to be stored
        # peer certificate DER -> (issued record, identity): spares a store read per call
        self._peers: OrderedDict[bytes, tuple[x509.Certificate, IssuedX509, Identity]] = (
            OrderedDict()
        )
        self._refusals = RefusalBudget(
            per_caller=limits.refusals_per_caller,
            total=limits.refusals_per_window,
            window=limits.refusal_window,
        )

    async def start(self) -> None:
        self._entries = {e.id: e for e in await self._store.list_entries()}

    async def reload_entries(self) -> None:
        """Read the entries again (another replica changed them) and wake whoever serves
        them."""
        entries = {e.id: e for e in await self._store.list_entries()}
        if entries != self._entries:
            self._entries = entries
            self._entries_changed()

    def now(self) -> dt.datetime:
        return self._clock.now()

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def trust_domain(self) -> str:
        return self.ca.trust_domain.name

    # --- registration entries ---------------------------------------------------------------

    async def create_entry(
        self,
        *,
        spiffe_id: str,
        selectors: Sequence[str | Selector],
        x509_ttl: dt.timedelta | None = None,
        jwt_ttl: dt.timedelta | None = None,
        dns_names: Sequence[str] = (),
        admin: bool = False,
        record_prompts: bool = False,
        parent_id: str = "",
        force: bool = False,
    ) -> RegistrationEntry:
        """Create an entry. Its selectors must be ones a workload could present (see
        ``_unproducible``), unless ``force``: for an attestor registered later."""
        sid = SpiffeId.parse(spiffe_id)
        if not sid.member_of(self.ca.trust_domain):
            raise InvalidArgument(f"{sid} is not in trust domain {self.ca.trust_domain}")
        if sid in self._reserved_ids:
            raise InvalidArgument(f"{sid} is the authority's own identity")
        parent = SpiffeId.parse(parent_id) if parent_id else None
        if parent is not None and not parent.member_of(self.ca.trust_domain):
            raise InvalidArgument(f"parent {parent} is not in trust domain {self.ca.trust_domain}")
        if parent is not None and admin:
            raise InvalidArgument(
                "admin entries are served by the authority alone, not through a node agent"
            )
        parsed = self._entry_selectors(selectors, parent)
        x509_ttl, jwt_ttl = self._entry_ttls(x509_ttl, jwt_ttl)
        unchecked = self._unproducible(parsed, parent, force=force)
        entry = RegistrationEntry(
            id=str(uuid.uuid4()),
            spiffe_id=sid,
            selectors=parsed,
            x509_ttl=x509_ttl,
            jwt_ttl=jwt_ttl,
            dns_names=self._entry_dns_names(dns_names),
            admin=admin,
            created_at=self._clock.now().replace(microsecond=0),
            record_prompts=record_prompts,
            parent_id=parent,
        )
        details = _entry_details(entry)
        if unchecked:
            details["forced_selectors"] = unchecked
        await self._store.create_entry(
            entry,
            audit=[self._event("entry.created", actor=OPERATOR, subject=entry.id, details=details)],
        )
        self._entries[entry.id] = entry
        self._entries_changed()
        log.info("entry created: id=%s spiffe_id=%s", entry.id, entry.spiffe_id)
        return entry

    async def update_entry(
        self,
        entry_id: str,
        *,
        selectors: Sequence[str | Selector] | None = None,
        x509_ttl: dt.timedelta | None = None,
        jwt_ttl: dt.timedelta | None = None,
        dns_names: Sequence[str] | None = None,
        record_prompts: bool | None = None,
        force: bool = False,
    ) -> RegistrationEntry:
        """Change what is given (None: unchanged; a zero TTL: the configured default). The
        SPIFFE ID, parent and admin flag are fixed. Audited with the fields before and after,
        and pushed to node agents and open Workload API streams as a creation is; SVIDs already
        issued renew under the new TTLs and DNS names, and a workload whose selectors no longer
        match is refused (ENTRY_CHANGED)."""
        current = self.get_entry(entry_id)
        changes: dict[str, object] = {}
        unchecked: list[str] = []
        if selectors is not None:
            parsed = self._entry_selectors(selectors, current.parent_id)
            unchecked = self._unproducible(parsed, current.parent_id, force=force)
            changes["selectors"] = parsed
        new_x509_ttl, new_jwt_ttl = self._entry_ttls(x509_ttl, jwt_ttl)
        if x509_ttl is not None:
            changes["x509_ttl"] = new_x509_ttl
        if jwt_ttl is not None:
            changes["jwt_ttl"] = new_jwt_ttl
        if dns_names is not None:
            changes["dns_names"] = self._entry_dns_names(dns_names)
        if record_prompts is not None:
            changes["record_prompts"] = record_prompts
        updated = dataclasses.replace(current, **changes)  # type: ignore[arg-type]
        before, after = _entry_details(current), _entry_details(updated)
        changed = sorted(k for k in after if after[k] != before[k])
        if not changed:
            return current
        details: dict[str, object] = {
            "spiffe_id": updated.spiffe_id.uri,
            "changed": changed,
            "before": {k: before[k] for k in changed},
            "after": {k: after[k] for k in changed},
        }
        if unchecked:
            details["forced_selectors"] = unchecked
        await self._store.update_entry(
            updated,
            audit=[self._event("entry.updated", actor=OPERATOR, subject=entry_id, details=details)],
        )
        self._entries[entry_id] = updated
        self._peers.clear()
        self._entries_changed()
        log.info("entry updated: id=%s changed=%s", entry_id, ",".join(changed))
        return updated

    def _entry_selectors(
        self, selectors: Sequence[str | Selector], parent: SpiffeId | None
    ) -> frozenset[Selector]:
        if not selectors:
            raise InvalidArgument("an entry needs at least one selector")
        if len(selectors) > self._limits.max_selectors:
            raise InvalidArgument(f"an entry takes at most {self._limits.max_selectors} selectors")
        return frozenset(s if isinstance(s, Selector) else Selector.parse(s) for s in selectors)

    def _entry_dns_names(self, dns_names: Sequence[str]) -> tuple[str, ...]:
        if len(dns_names) > self._limits.max_dns_names:
            raise InvalidArgument(f"an entry takes at most {self._limits.max_dns_names} DNS names")
        names = tuple(dict.fromkeys(check_dns_name(n) for n in dns_names))
        taken = self._reserved_dns.intersection(names)
        if taken:
            raise InvalidArgument(f"DNS names reserved for the authority itself: {sorted(taken)}")
        return names

    def _unproducible(
        self, selectors: frozenset[Selector], parent: SpiffeId | None, *, force: bool
    ) -> list[str]:
        """The selectors no workload could present: refused (INVALID_ARGUMENT), or with
        ``force`` returned (to be recorded) for an attestor to be registered later.

        An entry of the authority's: the selector's type must name a registered attestor
        instance, and its value be ``KEY:VALUE`` with a key the instance's plugin declares it
        can produce; or name the authority's own Workload API attestor (``unix`` by default,
        the built-in unix plugin when no instance of that name is registered). A node entry:
        its selectors are produced on the node by the agent's own unix attestor (under the type
        the agent was given, ``unix`` by default), which is not registered here: only the key
        is checked, against the unix plugin's."""
        unchecked: list[str] = []
        for selector in sorted(selectors, key=str):
            try:
                _check_producible(selector, parent, self.attestors, self._workload_api_attestor)
            except InvalidArgument:
                if not force:
                    raise
                unchecked.append(str(selector))
        if unchecked:
            log.warning("entry selectors accepted with force: %s", ", ".join(unchecked))
        return unchecked

    def add_entry_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every entry created, updated or deleted (node agents' sync
        streams, the Workload API's open streams)."""
        self._entry_listeners.append(listener)

    def remove_entry_listener(self, listener: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._entry_listeners.remove(listener)

    def _entries_changed(self) -> None:
        for listener in list(self._entry_listeners):
            listener()

    def node_entries(self, parent: SpiffeId) -> list[RegistrationEntry]:
        """The entries the node agent ``parent`` serves, in a stable order."""
        return sorted(
            (e for e in self._entries.values() if e.parent_id == parent),
            key=lambda e: (e.spiffe_id, e.id),
        )

    def _ttl(
        self,
        value: dt.timedelta | None,
        default: dt.timedelta,
        cap: dt.timedelta,
        what: str = "TTL",
    ) -> dt.timedelta:
        if value is None or value == dt.timedelta(0):
            return default
        if value < self._limits.min_ttl or value > cap:
            raise InvalidArgument(
                f"{what} must be between {format_duration(self._limits.min_ttl)} and "
                f"{format_duration(cap)}"
            )
        return value

    def _entry_ttls(
        self, x509_ttl: dt.timedelta | None, jwt_ttl: dt.timedelta | None
    ) -> tuple[dt.timedelta, dt.timedelta]:
        limits = self._limits
        return (
            self._ttl(x509_ttl, limits.default_x509_ttl, limits.max_x509_ttl, "X.509-SVID TTL"),
            self._ttl(jwt_ttl, limits.default_jwt_ttl, limits.max_jwt_ttl, "JWT-SVID TTL"),
        )

    def list_entries(self) -> list[RegistrationEntry]:
        return sorted(self._entries.values(), key=lambda e: (e.spiffe_id, e.id))

    def records_prompts(self, identity: Identity) -> bool:
        """Whether the entry behind an identity keeps full prompt text in the audit."""
        entry = self._entries.get(identity.entry_id or "")
        return entry is not None and entry.record_prompts

    def get_entry(self, entry_id: str) -> RegistrationEntry:
        entry = self._entries.get(entry_id)
        if entry is None:
            raise NotFound(f"no entry {entry_id!r}")
        return entry

    async def delete_entry(self, entry_id: str) -> None:
        """Delete an entry and revoke what was issued through it (the entry, and its SPIFFE ID:
        relying services know tokens by subject, not by entry)."""
        if entry_id not in self._entries:
            raise NotFound(f"no entry {entry_id!r}")
        # Revoke first, while the entry still names the SPIFFE ID the cascade must reach.
        await self.revocations.revoke(
            RevocationKind.ENTRY, entry_id, "registration entry deleted", actor=OPERATOR
        )
        event = self._event("entry.deleted", actor=OPERATOR, subject=entry_id)
        if not await self._store.delete_entry(entry_id, audit=[event]):
            raise NotFound(f"no entry {entry_id!r}")
        self._entries.pop(entry_id, None)
        self._peers.clear()
        self._entries_changed()
        log.info("entry deleted: id=%s", entry_id)

    async def unregister_attestor(self, name: str) -> None:
        """Unregister an attestor instance and revoke what was issued through it (revoked
        first, while the instance is still on record: nothing it attested outlives it)."""
        self.attestors.get(name)
        await self.revocations.revoke(
            RevocationKind.ATTESTOR, name, "attestor unregistered", actor=OPERATOR
        )
        await self.attestors.unregister(name)

    # --- join tokens ------------------------------------------------------------------------

    async def create_join_token(
        self, spiffe_id: str, ttl: dt.timedelta | None = None
    ) -> tuple[str, JoinToken]:
        sid = SpiffeId.parse(spiffe_id)
        if not sid.member_of(self.ca.trust_domain) or not sid.path or sid in self._reserved_ids:
            raise InvalidArgument(f"{sid} must be a workload ID in {self.ca.trust_domain}")
        ttl = ttl or self._limits.default_join_token_ttl
        if not self._limits.min_ttl <= ttl <= self._limits.max_join_token_ttl:
            raise InvalidArgument(
                f"join token TTL must be between {format_duration(self._limits.min_ttl)} and "
                f"{format_duration(self._limits.max_join_token_ttl)}"
            )
        secret = secrets.token_urlsafe(32)
        now = self._clock.now().replace(microsecond=0)
        token = JoinToken(token_digest(secret), sid, now + ttl, now)
        await self._store.create_join_token(
            token,
            audit=[
                self._event(
                    "join_token.created",
                    actor=OPERATOR,
                    subject=sid.uri,
                    details={
                        "token_id": token.token_id,
                        "expires_at": token.expires_at.isoformat(),
                    },
                )
            ],
        )
        log.info("join token created: id=%s spiffe_id=%s", token.token_id[:16], sid)
        return secret, token

    # --- attestation and issuance ------------------------------------------------------------

    async def attest(
        self,
        *,
        attestor: str,
        evidence: bytes,
        csr: bytes,
        challenger: AttestContext,
        spiffe_id_hint: str = "",
        origin: str = "",
    ) -> AttestResult:
        """Attest a workload. ``origin`` names a network caller (its address) for the refusal
        budget; a local caller is known by the kernel's credentials instead."""
        try:
            check_length(attestor, self._limits.max_name_chars, "the attestor name")
            # The CSR is checked before any proof (a join token) is spent.
            public_key = parse_csr(csr, self._limits.max_csr_bytes)
            hint = SpiffeId.parse(spiffe_id_hint) if spiffe_id_hint else None
            outcome = await self.attestors.attest(attestor, evidence, challenger)
            identities = self._identities_for(outcome.selectors, outcome.bound_spiffe_id, hint)
            now = self._clock.now()
            standing = []
            for template in identities:
                try:
                    self._check_not_revoked(dataclasses.replace(template, attestor=attestor), now)
                except PermissionDenied:
                    continue
                standing.append(template)
            if identities and not standing:
                raise AttestationFailed(
                    "every identity this workload matches is revoked", reason="REVOKED"
                )
            identities = standing
            if not identities:
                log.info("attestation matched no entry: attestor=%s", attestor)
                raise AttestationFailed(
                    "the attested workload matches no registration entry",
                    reason="NO_MATCHING_ENTRY",
                )
        except AuthorityError as exc:
            await self._record_refusal(attestor, challenger, origin, exc)
            raise
        now = self._clock.now()
        svids: list[X509Svid] = []
        for template in identities:
            identity = Identity(
                id=str(uuid.uuid4()),
                spiffe_id=template.spiffe_id,
                entry_id=template.entry_id,
                attestor=attestor,
                selectors=outcome.selectors,
                attested_at=now,
                x509_ttl=template.x509_ttl,
                jwt_ttl=template.jwt_ttl,
                dns_names=template.dns_names,
                admin=template.admin,
            )
            svid = self.ca.issue_x509_svid(
                identity.spiffe_id, public_key, identity.x509_ttl, identity.dns_names
            )
            await self._store.record_issuance(
                identity,
                [_issued(svid, identity)],
                audit=self._attested_events(identity, svid, actor=attestor),
            )
            svids.append(svid)
            log.info(
                "attested: attestor=%s spiffe_id=%s serial=%s entry=%s",
                attestor,
                identity.spiffe_id,
                svid.serial_hex,
                identity.entry_id,
            )
        return AttestResult(tuple(svids), outcome.selectors, tuple(t.entry_id for t in identities))

    async def _record_refusal(
        self, attestor: str, challenger: AttestContext, origin: str, exc: AuthorityError
    ) -> None:
        """``attest.refused``, its untrusted fields cut to a bounded size, within the refusal
        budget of the caller (its uid on the local socket, its address on the network); past
        it, only counted, and summed up in one record when the window closes."""
        peer = challenger.peer
        caller = f"uid:{peer.uid}" if peer is not None else bounded(origin or "network", 64)
        now = self._clock.now()
        admitted, summary = self._refusals.admit(caller, now)
        events = [] if summary is None else [self._suppressed_event(summary)]
        if admitted:
            cap = self._limits.max_refusal_field_chars
            details: dict[str, object] = {
                "reason": exc.reason,
                "message": bounded(exc.message, cap),
            }
            if peer is not None:
                details.update(pid=peer.pid, uid=peer.uid, gid=peer.gid)
            else:
                details["origin"] = caller
            events.append(
                self._event("attest.refused", actor=bounded(attestor, cap), details=details)
            )
        if events:
            await self._store.append_audit(events)

    def _suppressed_event(self, summary: Suppressed) -> AuditEvent:
        log.warning(
            "attestation refusals left out of the audit: %d in the window from %s",
            summary.count,
            summary.window_start.isoformat(),
        )
        return self._event("attest.refusals_suppressed", actor=AUTHORITY, details=summary.details())

    async def flush_refusals(self) -> None:
        """Write the summary of a closed window of suppressed refusals, if one is due."""
        summary = self._refusals.flush(self._clock.now())
        if summary is not None:
            await self._store.append_audit([self._suppressed_event(summary)])

    def _identities_for(
        self,
        selectors: frozenset[Selector],
        bound: SpiffeId | None,
        hint: SpiffeId | None,
    ) -> list[Identity]:
        # Node entries are served by their agent alone, never here.
        matches = [
            e for e in self._entries.values() if e.parent_id is None and e.matches(selectors)
        ]
        if bound is not None:
            # A credential bound to an identity grants that identity and no other; an entry for
            # it (matching the same selectors) only adds TTLs, DNS names and flags.
            matches = [e for e in matches if e.spiffe_id == bound]
        if hint is not None:
            matches = [e for e in matches if e.spiffe_id == hint]
        matches.sort(key=lambda e: (e.spiffe_id, e.id))
        now = self._clock.now()
        templates = [
            Identity(
                "",
                e.spiffe_id,
                e.id,
                "",
                selectors,
                now,
                e.x509_ttl,
                e.jwt_ttl,
                e.dns_names,
                e.admin,
            )
            for e in matches
        ]
        if not templates and bound is not None and (hint is None or hint == bound):
            templates.append(
                Identity(
                    "",
                    bound,
                    None,
                    "",
                    selectors,
                    now,
                    self._limits.default_x509_ttl,
                    self._limits.default_jwt_ttl,
                )
            )
        return templates

    # --- callers authenticated by mutual TLS ------------------------------------------------

    async def authenticate(self, peer_pem: bytes | None) -> Caller:
        """Who is calling, from the client certificate gRPC verified against the bundle.

        gRPC has checked the chain; here the SPIFFE rules: one URI SAN in this trust domain, an
        SVID this authority issued and still stands behind (entry not deleted)."""
        if not peer_pem:
            raise Unauthenticated(
                "this call needs the caller's X.509-SVID over mutual TLS", reason="NO_CLIENT_SVID"
            )
        cached = self._peers.get(peer_pem)
        if cached is None:
            cached = await self._lookup_peer(peer_pem)
            self._peers[peer_pem] = cached
            if len(self._peers) > _PEER_CACHE_SIZE:
                self._peers.popitem(last=False)
        cert, issued, identity = cached
        now = self._clock.now()
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise Unauthenticated(
                "the client SVID is expired or not yet valid", reason="SVID_EXPIRED"
            )
        if identity.entry_id is not None and identity.entry_id not in self._entries:
            raise PermissionDenied(
                "the registration entry behind this SVID was deleted", reason="ENTRY_DELETED"
            )
        if not self.attestors.is_registered(identity.attestor):
            raise PermissionDenied(
                "the attestor behind this SVID was unregistered", reason="ATTESTOR_UNREGISTERED"
            )
        identity = self._as_entry_now(identity)
        self._check_not_revoked(identity, now)
        return Caller(issued.spiffe_id, identity, cert)

    def _as_entry_now(self, identity: Identity) -> Identity:
        """The identity under its entry as it stands now (``entry update``): its TTLs and DNS
        names; PermissionDenied (ENTRY_CHANGED) when the entry's selectors no longer match
        what the workload was attested with. Node identities are re-derived from the entry
        on every signing, and their workloads re-identified by the agent."""
        entry = self._entries.get(identity.entry_id or "")
        if entry is None:
            return identity
        if identity.parent_id is None and not entry.matches(identity.selectors):
            raise PermissionDenied(
                "the registration entry behind this SVID was changed and no longer matches "
                "this workload",
                reason="ENTRY_CHANGED",
            )
        return dataclasses.replace(
            identity,
            x509_ttl=entry.x509_ttl,
            jwt_ttl=entry.jwt_ttl,
            dns_names=entry.dns_names,
        )

    def _check_not_revoked(self, identity: Identity, now: dt.datetime) -> None:
        revoked = self.revocations.revoked
        # The agent first: its revocation is the cause when it cascades to its workloads.
        if identity.parent_id and revoked.has(RevocationKind.SUBJECT, identity.parent_id.uri, now):
            raise PermissionDenied(
                f"the node agent {identity.parent_id} behind this SVID is revoked",
                reason="AGENT_REVOKED",
            )
        if revoked.has(RevocationKind.SUBJECT, identity.spiffe_id.uri, now):
            raise PermissionDenied(f"{identity.spiffe_id} is revoked", reason="SUBJECT_REVOKED")
        if identity.entry_id and revoked.has(RevocationKind.ENTRY, identity.entry_id, now):
            raise PermissionDenied("the entry behind this SVID is revoked", reason="ENTRY_REVOKED")
        if revoked.has(RevocationKind.ATTESTOR, identity.attestor, now):
            raise PermissionDenied(
                "the attestor behind this SVID is revoked", reason="ATTESTOR_REVOKED"
            )

    async def _lookup_peer(self, peer_pem: bytes) -> tuple[x509.Certificate, IssuedX509, Identity]:
        try:
            cert = x509.load_pem_x509_certificate(peer_pem)
        except ValueError:
            raise Unauthenticated("the client certificate does not parse") from None
        found = await self._store.find_issued_x509(format(cert.serial_number, "x"))
        if found is None:
            raise Unauthenticated("the client certificate is not an SVID issued here")
        issued, identity = found
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if uris != [issued.spiffe_id.uri]:
            raise Unauthenticated("the client certificate's SPIFFE ID does not match its record")
        return cert, issued, identity

    async def renew_x509(self, caller: Caller, csr: bytes) -> X509Svid:
        public_key = parse_csr(csr, self._limits.max_csr_bytes)
        identity = caller.identity
        svid = self.ca.issue_x509_svid(
            identity.spiffe_id, public_key, identity.x509_ttl, identity.dns_names
        )
        await self._store.record_issuance(
            None,
            [_issued(svid, identity)],
            audit=[self._x509_event("x509.renewed", svid, identity, caller=caller)],
        )
        return svid

    async def fetch_jwt(
        self, caller: Caller, audience: Sequence[str], ttl: dt.timedelta | None
    ) -> JwtSvid:
        _check_audience(audience, self._limits)
        return await self._issue_jwt(
            caller.spiffe_id, caller.identity, audience, ttl, {"identity_id": caller.identity.id}
        )

    async def _issue_jwt(
        self,
        spiffe_id: SpiffeId,
        identity: Identity,
        audience: Sequence[str],
        ttl: dt.timedelta | None,
        details: Mapping[str, object],
    ) -> JwtSvid:
        cap = identity.jwt_ttl
        wanted = cap if ttl is None or ttl <= dt.timedelta(0) else min(ttl, cap)
        if wanted < self._limits.min_ttl:
            raise InvalidArgument(
                f"JWT-SVID TTL must be at least {format_duration(self._limits.min_ttl)}"
            )
        svid = self.ca.issue_jwt_svid(spiffe_id, list(dict.fromkeys(audience)), wanted)
        await self._store.append_audit(
            [
                self._event(
                    "jwt.issued",
                    actor=spiffe_id.uri,
                    subject=svid.spiffe_id.uri,
                    details={
                        "jti": svid.jti,
                        "token_sha256": digest(svid.token),
                        "audience": list(svid.audience),
                        "expires_at": svid.expires_at.isoformat(),
                        "kid": svid.key_id,
                        **details,
                    },
                )
            ]
        )
        return svid

    # --- node agents: SVIDs for the workloads of the entries an agent serves ----------------

    def _node_identity(self, agent: Caller, entry_id: str, now: dt.datetime) -> Identity:
        """The identity a node entry grants through ``agent``: one per (agent attestation,
        entry), so renewals through the same agent are renewals of it; it names the agent
        (``parent_id``) and inherits the agent's attestor, so revoking either reaches it."""
        entry = self._entries.get(entry_id)
        if entry is None or entry.parent_id != agent.spiffe_id:
            raise PermissionDenied(
                f"entry {entry_id!r} is not a node entry of {agent.spiffe_id}",
                reason="NOT_NODE_ENTRY",
            )
        identity = Identity(
            id=str(uuid.uuid5(_NODE_IDENTITIES, f"{agent.identity.id}/{entry.id}")),
            spiffe_id=entry.spiffe_id,
            entry_id=entry.id,
            attestor=agent.identity.attestor,
            selectors=entry.selectors,
            attested_at=now,
            x509_ttl=entry.x509_ttl,
            jwt_ttl=entry.jwt_ttl,
            dns_names=entry.dns_names,
            parent_id=agent.spiffe_id,
        )
        self._check_not_revoked(identity, now)
        return identity

    async def sign_node_svids(
        self, agent: Caller, requests: Sequence[tuple[str, bytes]]
    ) -> list[tuple[X509Svid, str]]:
        """X.509-SVIDs for node entries of ``agent`` from CSRs made on the node (entry id,
        CSR), in the same order. All or nothing: one refused request refuses the batch."""
        if not requests:
            raise InvalidArgument("no CSR to sign", reason="NO_CSR")
        if len(requests) > self._limits.max_node_csrs:
            raise InvalidArgument(
                f"at most {self._limits.max_node_csrs} CSRs per call", reason="TOO_MANY_CSRS"
            )
        now = self._clock.now()
        planned = [
            (self._node_identity(agent, entry_id, now), parse_csr(csr, self._limits.max_csr_bytes))
            for entry_id, csr in requests
        ]
        if len({identity.id for identity, _ in planned}) != len(planned):
            raise InvalidArgument("one CSR per entry and call", reason="DUPLICATE_ENTRY")
        issued = [
            (
                identity,
                self.ca.issue_x509_svid(
                    identity.spiffe_id, public_key, identity.x509_ttl, identity.dns_names
                ),
            )
            for identity, public_key in planned
        ]
        # Concurrent records share the store's group commit (one fsync for the batch).
        await asyncio.gather(*(self._record_node_svid(agent, i, svid) for i, svid in issued))
        return [(svid, identity.entry_id or "") for identity, svid in issued]

    async def _record_node_svid(self, agent: Caller, identity: Identity, svid: X509Svid) -> None:
        renewal = [self._x509_event("x509.renewed", svid, identity, caller=agent)]
        if identity.id in self._node_identities:
            await self._store.record_issuance(None, [_issued(svid, identity)], audit=renewal)
            return
        first = self._attested_events(
            identity,
            svid,
            actor=agent.spiffe_id.uri,
            caller=agent,
            details={"endpoint": "node_agent", "agent_identity_id": agent.identity.id},
        )
        try:
            await self._store.record_issuance(identity, [_issued(svid, identity)], audit=first)
        except AlreadyExists as exc:  # recorded before a restart of the authority
            if exc.reason != "IDENTITY_EXISTS":
                raise
            await self._store.record_issuance(None, [_issued(svid, identity)], audit=renewal)
        self._node_identities.add(identity.id)
        if len(self._node_identities) > _PEER_CACHE_SIZE:
            self._node_identities.clear()  # a miss costs one refused insert, nothing more

    async def fetch_node_jwt(
        self, agent: Caller, entry_id: str, audience: Sequence[str]
    ) -> JwtSvid:
        """A JWT-SVID for a node entry of ``agent``, for a workload the agent identified."""
        _check_audience(audience, self._limits)
        identity = self._node_identity(agent, entry_id, self._clock.now())
        return await self._issue_jwt(
            identity.spiffe_id,
            identity,
            audience,
            None,
            {"entry_id": entry_id, "agent": agent.spiffe_id.uri},
        )

    # --- the SPIFFE Workload API: local workloads identified by the kernel -------------------

    def workload_identities(self, attestor: str, selectors: frozenset[Selector]) -> list[Identity]:
        """The identities the registration entries grant a local workload with ``selectors``
        (found by the ``attestor`` instance), less what is revoked. Templates: no id yet."""
        now = self._clock.now()
        standing: list[Identity] = []
        for template in self._identities_for(selectors, None, None):
            candidate = dataclasses.replace(template, attestor=attestor)
            try:
                self._check_not_revoked(candidate, now)
            except PermissionDenied:
                continue
            standing.append(candidate)
        return standing

    async def issue_workload_x509(
        self,
        template: Identity,
        public_key: WorkloadPublicKey,
        *,
        previous: Identity | None = None,
        details: Mapping[str, object] | None = None,
    ) -> tuple[Identity, X509Svid]:
        """An X.509-SVID for a workload the Workload API identified (its key made here).

        The first one is recorded as an attestation is (identity, issuance, audit), so renewal
        checks, revocation cascades and ``trace`` see it; a rotation on the same stream
        (``previous``) is recorded as a renewal of that identity."""
        if previous is None:
            identity = dataclasses.replace(
                template, id=str(uuid.uuid4()), attested_at=self._clock.now()
            )
        else:
            identity = previous
        svid = self.ca.issue_x509_svid(
            identity.spiffe_id, public_key, identity.x509_ttl, identity.dns_names
        )
        if previous is None:
            audit = self._attested_events(
                identity,
                svid,
                actor=identity.attestor,
                details={"endpoint": "workload_api", **(details or {})},
            )
            await self._store.record_issuance(identity, [_issued(svid, identity)], audit=audit)
        else:
            await self._store.record_issuance(
                None,
                [_issued(svid, identity)],
                audit=[self._x509_event("x509.renewed", svid, identity)],
            )
        return identity, svid

    async def fetch_workload_jwt(self, identity: Identity, audience: Sequence[str]) -> JwtSvid:
        """A JWT-SVID for a workload the Workload API identified, for one of its identities."""
        _check_audience(audience, self._limits)
        return await self._issue_jwt(
            identity.spiffe_id,
            identity,
            audience,
            None,
            {"entry_id": identity.entry_id, "attestor": identity.attestor},
        )

    def validate_jwt_svid(self, token: str, audience: str) -> tuple[SpiffeId, dict[str, Any]]:
        """Check a JWT-SVID against this trust domain's bundle (see ``check_jwt_svid``); a
        revoked subject is refused. Returns the SPIFFE ID and the claims."""
        now = self._clock.now()
        return check_jwt_svid(
            token,
            audience,
            self.ca.bundle(),
            now,
            lambda sub: self.revocations.revoked.has(RevocationKind.SUBJECT, sub, now),
        )

    # --- audit ---------------------------------------------------------------------------

    async def checkpoint(self, seq: int | None = None) -> Checkpoint | None:
        """Sign the chain at ``seq`` (default: the head); None when the chain is empty."""
        await self.flush_refusals()
        head_seq, head_hash = await self._store.audit_head()
        if seq is None or seq == head_seq:
            seq, record_hash = head_seq, head_hash
        else:
            records = await self._store.audit_records(after_seq=seq - 1, limit=1)
            if not records or records[0].seq != seq:
                raise NotFound(f"no audit record {seq}", reason="AUDIT_RECORD_NOT_FOUND")
            record_hash = records[0].hash
        anchor_seq, _ = await self._store.audit_anchor()
        if seq < anchor_seq:
            return None
        checkpoint = self.ca.sign_checkpoint(seq, record_hash)
        await self._store.put_checkpoint(checkpoint)
        return checkpoint

    async def audit_records(
        self, *, after_seq: int = 0, task_ids: Sequence[str] = (), limit: int | None = None
    ) -> list[AuditRecord]:
        """One page of the chain after ``after_seq``, bounded in records (``limit``, by default
        limits.audit_page_records) and in bytes (limits.audit_page_bytes)."""
        if len(task_ids) > self._limits.max_export_task_ids:
            raise InvalidArgument(
                f"at most {self._limits.max_export_task_ids} task ids", reason="TOO_MANY_TASKS"
            )
        for task_id in task_ids:
            check_task_id(task_id)
        return await self._store.audit_records(
            after_seq=after_seq,
            task_ids=task_ids,
            limit=limit or self._limits.audit_page_records,
            max_bytes=self._limits.audit_page_bytes,
        )

    async def audit_info(self) -> tuple[tuple[int, str], tuple[int, str], list[Checkpoint]]:
        """(anchor, head, checkpoints)."""
        return (
            await self._store.audit_anchor(),
            await self._store.audit_head(),
            await self._store.list_checkpoints(),
        )

    async def prune_audit(self, through_seq: int) -> int:
        """Drop records an operator archived; a signed checkpoint must sit at ``through_seq``,
        so what remains still verifies from an authenticated anchor."""
        checkpoints = {c.seq for c in await self._store.list_checkpoints()}
        if through_seq not in checkpoints:
            raise FailedPrecondition(
                f"checkpoint the chain at {through_seq} (and archive it) before pruning",
                reason="NO_CHECKPOINT",
            )
        anchor_seq, _ = await self._store.audit_anchor()
        removing = through_seq - anchor_seq + 1  # records are contiguous from the anchor
        return await self._store.prune_audit(
            through_seq,
            audit=[
                self._event(
                    "audit.pruned",
                    actor=OPERATOR,
                    details={"through_seq": through_seq, "removed": removing},
                )
            ],
        )

    def _event(
        self,
        kind: str,
        *,
        actor: str,
        subject: str = "",
        task_id: str = "",
        decision_id: str = "",
        details: Mapping[str, object] | None = None,
    ) -> AuditEvent:
        return AuditEvent(
            kind=kind,
            time=self._clock.now(),
            actor=actor,
            subject=subject,
            task_id=task_id,
            decision_id=decision_id,
            details=dict(details or {}),
        )

    def _attested_events(
        self,
        identity: Identity,
        svid: X509Svid,
        *,
        actor: str,
        caller: Caller | None = None,
        details: Mapping[str, object] | None = None,
    ) -> list[AuditEvent]:
        """An identity's first SVID: its attestation, then the issuance."""
        return [
            self._event(
                "attest.succeeded",
                actor=actor,
                subject=identity.spiffe_id.uri,
                details={
                    "identity_id": identity.id,
                    "entry_id": identity.entry_id,
                    "selectors": sorted(str(s) for s in identity.selectors),
                    **(details or {}),
                },
            ),
            self._x509_event("x509.issued", svid, identity, caller=caller),
        ]

    def _x509_event(
        self, kind: str, svid: X509Svid, identity: Identity, caller: Caller | None = None
    ) -> AuditEvent:
        return self._event(
            kind,
            actor=caller.spiffe_id.uri if caller else AUTHORITY,
            subject=svid.spiffe_id.uri,
            details={
                "serial": svid.serial_hex,
                "identity_id": identity.id,
                "entry_id": identity.entry_id,
                "not_after": svid.expires_at.isoformat(),
                "dns_names": list(identity.dns_names),
            },
        )


def _entry_details(entry: RegistrationEntry) -> dict[str, object]:
    """An entry as its audit records show it."""
    return {
        "spiffe_id": entry.spiffe_id.uri,
        "selectors": sorted(str(s) for s in entry.selectors),
        "x509_ttl_s": int(entry.x509_ttl.total_seconds()),
        "jwt_ttl_s": int(entry.jwt_ttl.total_seconds()),
        "dns_names": list(entry.dns_names),
        "admin": entry.admin,
        "record_prompts": entry.record_prompts,
        "parent_id": entry.parent_id.uri if entry.parent_id else None,
    }


def _check_producible(
    selector: Selector, parent: SpiffeId | None, attestors: AttestorHost, workload_api: str
) -> None:
    """InvalidArgument when no workload could present ``selector`` (see ``_unproducible``)."""
    key, sep, rest = selector.value.partition(":")
    if parent is not None:
        where = "the node agent's unix attestor (node entries)"
        kinds: frozenset[str] | None = UnixAttestor.selector_kinds
    elif selector.type == workload_api and not attestors.is_registered(selector.type):
        where = f"the Workload API's built-in unix attestor {selector.type!r}"
        kinds = UnixAttestor.selector_kinds
    else:
        if not attestors.is_registered(selector.type):
            registered = ", ".join(r.name for r in attestors.instances()) or "none"
            raise InvalidArgument(
                f"selector {str(selector)[:128]!r}: no attestor named {selector.type[:64]!r} "
                f"is registered (registered: {registered}; the Workload API's: "
                f"{workload_api}); register it first, or --force for an attestor registered "
                "later",
                reason="SELECTOR_UNKNOWN_ATTESTOR",
            )
        plugin = attestors.get(selector.type).plugin
        where = f"attestor {selector.type!r} (plugin {plugin})"
        kinds = attestors.selector_kinds(selector.type)
    if not sep or not key or not rest:
        raise InvalidArgument(
            f"selector {str(selector)[:128]!r}: {where} produces {selector.type}:KEY:VALUE "
            "(--force to create it anyway)",
            reason="SELECTOR_KIND",
        )
    if kinds is not None and key not in kinds:
        raise InvalidArgument(
            f"selector {str(selector)[:128]!r}: {where} produces the keys "
            f"{', '.join(sorted(kinds))}, not {key[:64]!r} (--force to create it anyway)",
            reason="SELECTOR_KIND",
        )


def _check_audience(audience: Sequence[str], limits: Limits) -> None:
    if not audience or not all(audience):
        raise InvalidArgument(
            "a JWT-SVID needs at least one non-empty audience", reason="NO_AUDIENCE"
        )
    if len(audience) > limits.max_audiences:
        raise InvalidArgument(f"at most {limits.max_audiences} audiences")
    if any(len(a) > limits.max_audience_chars for a in audience):
        raise InvalidArgument(f"audiences are at most {limits.max_audience_chars} characters")


def _issued(svid: X509Svid, identity: Identity) -> IssuedX509:
    return IssuedX509(svid.serial_hex, identity.id, identity.spiffe_id, svid.expires_at)
