"""An in-memory ``Store`` with the same semantics as the SQLite one, for tests of other modules.

Each method runs without awaiting, so it is atomic on its event loop. Datetimes must be
timezone-aware and come back in UTC, as from the SQLite store.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from typing import Final

from authority.audit import GENESIS, AuditEvent, AuditRecord, Checkpoint, chain
from authority.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from authority.ids import SpiffeId
from authority.models import (
    Approval,
    ApprovalState,
    AttestorInstance,
    AuthorityKeyInfo,
    Identity,
    IssuedX509,
    JoinToken,
    KeyKind,
    RegistrationEntry,
    Revocation,
    Selector,
    TaskRecord,
    TaskTokenRecord,
)
from authority.store import audit_page

PRUNE_GRACE: Final = dt.timedelta(days=1)


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidArgument("datetimes given to the store must be timezone-aware")
    return value.astimezone(dt.UTC)


def _short(token_id: str) -> str:
    return token_id[:8]


class MemoryStore:
    """``Store`` held in dictionaries; nothing survives the object."""

    def __init__(self) -> None:
        self._closed = False
        self._sequence = 0
        self._keys: dict[tuple[KeyKind, str], AuthorityKeyInfo] = {}
        self._entries: dict[str, RegistrationEntry] = {}
        self._entry_keys: dict[tuple[SpiffeId, frozenset[Selector], SpiffeId | None], str] = {}
        self._tokens: dict[str, JoinToken] = {}
        self._identities: dict[str, Identity] = {}
        self._issued: dict[str, IssuedX509] = {}
        now = dt.datetime.now(dt.UTC)
        self._attestors: dict[str, AttestorInstance] = {
            "join_token": AttestorInstance("join_token", "join_token", "{}", now, now)
        }
        self._claims: dict[tuple[str, str], dt.datetime] = {}
        self._audit: list[AuditRecord] = []
        self._anchor: tuple[int, str] = (1, GENESIS)
        self._checkpoints: dict[int, Checkpoint] = {}
        self._tasks: dict[str, TaskRecord] = {}
        self._task_tokens: dict[str, TaskTokenRecord] = {}
        self._approvals: dict[str, Approval] = {}
        self._revocations: dict[int, Revocation] = {}
        self._revocation_seq = 0

    def _append(self, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        seq, prev = (self._audit[-1].seq + 1, self._audit[-1].hash) if self._audit else self._anchor
        out = []
        for event in events:
            record = chain(event, seq, prev)
            self._audit.append(record)
            out.append(record)
            seq, prev = seq + 1, record.hash
        return out

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the store is closed", reason="STORE_CLOSED")

    async def close(self) -> None:
        self._closed = True

    # --- signing keys and the bundle sequence ---

    async def list_authority_keys(self) -> list[AuthorityKeyInfo]:
        self._check_open()
        return sorted(self._keys.values(), key=lambda k: (k.kind.value, k.not_before, k.key_id))

    async def _put_authority_keys(
        self, keys: list[AuthorityKeyInfo], *, bump_sequence: bool
    ) -> int:
        self._check_open()
        stored = [
            dataclasses.replace(key, not_before=_utc(key.not_before), not_after=_utc(key.not_after))
            for key in keys
        ]
        for key in stored:
            self._keys[key.kind, key.key_id] = key
        if bump_sequence:
            self._sequence += 1
        return self._sequence

    async def _delete_authority_key(self, kind: KeyKind, key_id: str) -> int:
        self._check_open()
        if self._keys.pop((kind, key_id), None) is None:
            raise NotFound(f"no {kind.value} key {key_id!r}", reason="KEY_NOT_FOUND")
        self._sequence += 1
        return self._sequence

    async def bundle_sequence(self) -> int:
        self._check_open()
        return self._sequence

    # --- registration entries ---

    async def _create_entry(self, entry: RegistrationEntry) -> None:
        self._check_open()
        entry = dataclasses.replace(entry, created_at=_utc(entry.created_at))
        if entry.id in self._entries:
            raise AlreadyExists(f"entry {entry.id!r} already exists", reason="ENTRY_EXISTS")
        canonical = (entry.spiffe_id, entry.selectors, entry.parent_id)
        same = self._entry_keys.get(canonical)
        if same is not None:
            raise AlreadyExists(
                f"entry {same!r} already maps these selectors to {entry.spiffe_id}",
                reason="ENTRY_EXISTS",
            )
        self._entries[entry.id] = entry
        self._entry_keys[canonical] = entry.id

    async def get_entry(self, entry_id: str) -> RegistrationEntry | None:
        self._check_open()
        return self._entries.get(entry_id)

    async def list_entries(self) -> list[RegistrationEntry]:
        self._check_open()
        return sorted(self._entries.values(), key=lambda e: (e.created_at, e.id))

    async def _update_entry(self, entry: RegistrationEntry) -> None:
        self._check_open()
        entry = dataclasses.replace(entry, created_at=_utc(entry.created_at))
        current = self._entries.get(entry.id)
        if current is None:
            raise NotFound(f"no entry {entry.id!r}", reason="ENTRY_NOT_FOUND")
        canonical = (entry.spiffe_id, entry.selectors, entry.parent_id)
        same = self._entry_keys.get(canonical)
        if same is not None and same != entry.id:
            raise AlreadyExists(
                f"entry {same!r} already maps these selectors to {entry.spiffe_id}",
                reason="ENTRY_EXISTS",
            )
        del self._entry_keys[current.spiffe_id, current.selectors, current.parent_id]
        self._entries[entry.id] = entry
        self._entry_keys[canonical] = entry.id

    async def _delete_entry(self, entry_id: str) -> bool:
        self._check_open()
        entry = self._entries.pop(entry_id, None)
        if entry is None:
            return False
        del self._entry_keys[entry.spiffe_id, entry.selectors, entry.parent_id]
        return True

    # --- join tokens ---

    async def _create_join_token(self, token: JoinToken) -> None:
        self._check_open()
        token = dataclasses.replace(
            token,
            expires_at=_utc(token.expires_at),
            created_at=_utc(token.created_at),
            used_at=None if token.used_at is None else _utc(token.used_at),
        )
        if token.token_id in self._tokens:
            raise AlreadyExists(
                f"join token {_short(token.token_id)}… already exists", reason="JOIN_TOKEN_EXISTS"
            )
        self._tokens[token.token_id] = token

    async def _consume_join_token(self, token_id: str, now: dt.datetime) -> JoinToken:
        self._check_open()
        now = _utc(now)
        token = self._tokens.get(token_id)
        if token is None:
            raise Unauthenticated(
                f"join token {_short(token_id)}… is unknown", reason="JOIN_TOKEN_UNKNOWN"
            )
        if token.used_at is not None:
            raise Unauthenticated(
                f"join token {_short(token_id)}… was already used", reason="JOIN_TOKEN_USED"
            )
        if token.expires_at <= now:
            raise Unauthenticated(
                f"join token {_short(token_id)}… has expired", reason="JOIN_TOKEN_EXPIRED"
            )
        self._tokens[token_id] = dataclasses.replace(token, used_at=now)
        return token

    # --- identities and issued X.509-SVIDs ---

    async def _record_issuance(self, identity: Identity | None, issued: list[IssuedX509]) -> None:
        self._check_open()
        # Check everything first: the write is all or nothing.
        if identity is not None:
            identity = dataclasses.replace(identity, attested_at=_utc(identity.attested_at))
            for svid in issued:
                if svid.identity_id != identity.id:
                    raise InvalidArgument(
                        f"SVID {svid.serial} names identity {svid.identity_id!r}, "
                        f"not {identity.id!r}"
                    )
            if identity.id in self._identities:
                raise AlreadyExists(
                    f"identity {identity.id!r} already exists", reason="IDENTITY_EXISTS"
                )
        svids = [dataclasses.replace(svid, not_after=_utc(svid.not_after)) for svid in issued]
        known = set(self._identities) | ({identity.id} if identity is not None else set())
        serials: set[str] = set()
        for svid in svids:
            if svid.identity_id not in known:
                raise FailedPrecondition(
                    f"identity {svid.identity_id!r} is unknown", reason="IDENTITY_UNKNOWN"
                )
            if svid.serial in self._issued or svid.serial in serials:
                raise AlreadyExists(
                    f"an X.509-SVID with serial {svid.serial} was already recorded",
                    reason="SERIAL_EXISTS",
                )
            serials.add(svid.serial)
        if identity is not None:
            self._identities[identity.id] = identity
        for svid in svids:
            self._issued[svid.serial] = svid

    async def find_issued_x509(self, serial: str) -> tuple[IssuedX509, Identity] | None:
        self._check_open()
        svid = self._issued.get(serial)
        if svid is None:
            return None
        return svid, self._identities[svid.identity_id]

    # --- attestor instances ---

    async def _create_attestor(self, instance: AttestorInstance) -> None:
        self._check_open()
        if instance.name in self._attestors:
            raise AlreadyExists(
                f"an attestor named {instance.name!r} exists", reason="ATTESTOR_EXISTS"
            )
        self._attestors[instance.name] = _attestor_utc(instance)

    async def _update_attestor(self, instance: AttestorInstance) -> None:
        self._check_open()
        current = self._attestors.get(instance.name)
        if current is None:
            raise NotFound(f"no attestor named {instance.name!r}", reason="ATTESTOR_NOT_FOUND")
        self._attestors[instance.name] = dataclasses.replace(
            _attestor_utc(instance), created_at=current.created_at
        )

    async def list_attestors(self) -> list[AttestorInstance]:
        self._check_open()
        return [self._attestors[name] for name in sorted(self._attestors)]

    async def _delete_attestor(self, name: str) -> bool:
        self._check_open()
        return self._attestors.pop(name, None) is not None

    # --- single-use claims ---

    async def claim_once(
        self, namespace: str, key: str, expires_at: dt.datetime, now: dt.datetime
    ) -> bool:
        self._check_open()
        expires_at, now = _utc(expires_at), _utc(now)
        current = self._claims.get((namespace, key))
        if current is not None and current > now:
            return False
        self._claims[(namespace, key)] = expires_at
        return True

    async def prune(self, now: dt.datetime) -> int:
        self._check_open()
        now = _utc(now)
        grace = now - PRUNE_GRACE
        gone = [serial for serial, svid in self._issued.items() if svid.not_after < now]
        for serial in gone:
            del self._issued[serial]
        count = len(gone)
        live = {svid.identity_id for svid in self._issued.values()}
        stale = [
            key
            for key, identity in self._identities.items()
            if identity.attested_at < grace and key not in live
        ]
        for key in stale:
            del self._identities[key]
        count += len(stale)
        expired = [key for key, token in self._tokens.items() if token.expires_at < grace]
        for key in expired:
            del self._tokens[key]
        count += len(expired)
        claims = [key for key, until in self._claims.items() if until <= now]
        for claim in claims:
            del self._claims[claim]
        count += len(claims)
        gone_revocations = [s for s, r in self._revocations.items() if r.expires_at < grace]
        for seq in gone_revocations:
            del self._revocations[seq]
        gone_tokens = [j for j, t in self._task_tokens.items() if t.expires_at < grace]
        for jti in gone_tokens:
            del self._task_tokens[jti]
        return count + len(gone_revocations) + len(gone_tokens)

    # --- tasks, task tokens and approvals ---

    async def record_task_token(
        self,
        record: TaskTokenRecord,
        *,
        consume_approval: str = "",
        audit: Sequence[AuditEvent] = (),
    ) -> None:
        self._check_open()
        approval = self._approvals.get(consume_approval) if consume_approval else None
        if consume_approval and (approval is None or approval.state is not ApprovalState.APPROVED):
            raise FailedPrecondition(
                f"approval {consume_approval} is not approved or was used", reason="APPROVAL_USED"
            )
        task = self._tasks.get(record.task_id)
        if task is None:
            self._tasks[record.task_id] = TaskRecord(
                record.task_id, record.subject, _utc(record.issued_at)
            )
        else:
            if task.ended_at is not None:
                raise FailedPrecondition(f"task {task.task_id!r} has ended", reason="TASK_ENDED")
            if task.principal != record.subject:
                raise PermissionDenied(
                    f"task {task.task_id!r} belongs to another principal", reason="TASK_NOT_YOURS"
                )
        self._task_tokens[record.jti] = record
        if approval is not None:
            self._approvals[approval.id] = dataclasses.replace(approval, state=ApprovalState.USED)
        self._append(audit)

    async def get_task(self, task_id: str) -> TaskRecord | None:
        self._check_open()
        return self._tasks.get(task_id)

    async def end_task(
        self, task_id: str, now: dt.datetime, reason: str, *, audit: Sequence[AuditEvent] = ()
    ) -> list[str]:
        self._check_open()
        task = self._tasks.get(task_id)
        if task is None:
            raise NotFound(f"no task {task_id!r}", reason="TASK_NOT_FOUND")
        if task.ended_at is not None:
            raise FailedPrecondition(f"task {task_id!r} has ended", reason="TASK_ENDED")
        self._tasks[task_id] = dataclasses.replace(task, ended_at=_utc(now), end_reason=reason)
        self._append(audit)
        return sorted(j for j, t in self._task_tokens.items() if t.task_id == task_id)

    async def get_task_token(self, jti: str) -> TaskTokenRecord | None:
        self._check_open()
        return self._task_tokens.get(jti)

    async def descendants(self, jti: str) -> list[str]:
        self._check_open()
        found: set[str] = set()
        frontier = {jti}
        while frontier:
            children = {j for j, t in self._task_tokens.items() if t.parent_jti in frontier}
            frontier = children - found
            found |= children
        return sorted(found)

    async def create_approval(
        self, approval: Approval, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        self._check_open()
        if approval.id in self._approvals:
            raise AlreadyExists(f"approval {approval.id} exists", reason="APPROVAL_EXISTS")
        self._approvals[approval.id] = approval
        self._append(audit)

    async def get_approval(self, approval_id: str) -> Approval | None:
        self._check_open()
        return self._approvals.get(approval_id)

    async def list_approvals(self) -> list[Approval]:
        self._check_open()
        return sorted(self._approvals.values(), key=lambda a: (a.requested_at, a.id))

    async def decide_approval(
        self, decided: Approval, now: dt.datetime, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        self._check_open()
        current = self._approvals.get(decided.id)
        if current is None:
            raise NotFound(f"no approval {decided.id!r}", reason="APPROVAL_NOT_FOUND")
        if current.state is not ApprovalState.PENDING:
            raise FailedPrecondition(
                f"approval {decided.id} was already {current.state}", reason="APPROVAL_DECIDED"
            )
        if current.expires_at <= now:
            raise FailedPrecondition(
                f"approval {decided.id} expired before it was answered", reason="APPROVAL_EXPIRED"
            )
        self._approvals[decided.id] = dataclasses.replace(
            current,
            state=decided.state,
            decided_at=decided.decided_at,
            decided_by=decided.decided_by,
            note=decided.note,
            grant_expires_at=decided.grant_expires_at,
        )
        self._append(audit)

    # --- revocations ---

    async def revoke(
        self, revocations: Sequence[Revocation], *, audit: Sequence[AuditEvent] = ()
    ) -> list[Revocation]:
        self._check_open()
        out = []
        for r in revocations:
            self._revocation_seq += 1
            stored = dataclasses.replace(r, seq=self._revocation_seq)
            self._revocations[stored.seq] = stored
            out.append(stored)
        self._append(audit)
        return out

    async def revocations_since(self, seq: int, limit: int = 10_000) -> list[Revocation]:
        self._check_open()
        return [self._revocations[s] for s in sorted(self._revocations) if s > seq][:limit]

    async def active_revocations(self, now: dt.datetime) -> list[Revocation]:
        self._check_open()
        return [r for _, r in sorted(self._revocations.items()) if r.expires_at > now]

    async def revocation_bounds(self) -> tuple[int, int]:
        self._check_open()
        low = min(self._revocations) if self._revocations else self._revocation_seq + 1
        return low, self._revocation_seq

    async def subjects_attested_by(self, attestor: str, now: dt.datetime) -> list[str]:
        return self._live_subjects(lambda i: i.attestor == attestor, now)

    async def subjects_issued_through(self, agent: str, now: dt.datetime) -> list[str]:
        return self._live_subjects(
            lambda i: i.parent_id is not None and i.parent_id.uri == agent, now
        )

    def _live_subjects(self, wanted: Callable[[Identity], bool], now: dt.datetime) -> list[str]:
        self._check_open()
        live = {s.identity_id for s in self._issued.values() if s.not_after > now}
        return sorted(
            {i.spiffe_id.uri for k, i in self._identities.items() if k in live and wanted(i)}
        )

    async def spiffe_id_on_record(self, spiffe_id: str) -> bool:
        self._check_open()
        return (
            any(
                e.spiffe_id.uri == spiffe_id or (e.parent_id and e.parent_id.uri == spiffe_id)
                for e in self._entries.values()
            )
            or any(t.spiffe_id.uri == spiffe_id for t in self._tokens.values())
            or any(i.spiffe_id.uri == spiffe_id for i in self._identities.values())
            or any(x.spiffe_id.uri == spiffe_id for x in self._issued.values())
            or any(spiffe_id in (t.subject, t.holder) for t in self._task_tokens.values())
        )

    async def task_tokens_of_subject(self, subject: str, now: dt.datetime) -> list[str]:
        self._check_open()
        return sorted(
            j
            for j, t in self._task_tokens.items()
            if (t.subject == subject or t.holder == subject) and t.expires_at > now
        )

    # --- audit ---

    async def append_audit(self, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        self._check_open()
        return self._append(events)

    async def audit_records(
        self,
        *,
        after_seq: int = 0,
        limit: int = 10_000,
        task_ids: Sequence[str] = (),
        max_bytes: int | None = None,
    ) -> list[AuditRecord]:
        self._check_open()
        wanted = set(task_ids)
        found = (
            r for r in self._audit if r.seq > after_seq and (not wanted or r.task_id in wanted)
        )
        return audit_page(found, limit, max_bytes)

    async def audit_head(self) -> tuple[int, str]:
        self._check_open()
        if self._audit:
            return self._audit[-1].seq, self._audit[-1].hash
        return self._anchor[0] - 1, self._anchor[1]

    async def audit_anchor(self) -> tuple[int, str]:
        self._check_open()
        return self._anchor

    async def put_checkpoint(self, checkpoint: Checkpoint) -> None:
        self._check_open()
        self._checkpoints[checkpoint.seq] = checkpoint

    async def list_checkpoints(self) -> list[Checkpoint]:
        self._check_open()
        return [self._checkpoints[seq] for seq in sorted(self._checkpoints)]

    async def prune_audit(self, through_seq: int, *, audit: Sequence[AuditEvent] = ()) -> int:
        self._check_open()
        kept = [r for r in self._audit if r.seq > through_seq]
        last = [r for r in self._audit if r.seq == through_seq]
        if not last:
            raise NotFound(f"no audit record {through_seq}", reason="AUDIT_RECORD_NOT_FOUND")
        removed = len(self._audit) - len(kept)
        self._audit = kept
        self._anchor = (through_seq + 1, last[0].hash)
        self._append(audit)
        return removed

    # --- audited changes: the change, then its records ---

    async def put_authority_keys(
        self,
        keys: list[AuthorityKeyInfo],
        *,
        bump_sequence: bool,
        audit: Sequence[AuditEvent] = (),
    ) -> int:
        result = await self._put_authority_keys(keys, bump_sequence=bump_sequence)
        self._append(audit)
        return result

    async def delete_authority_key(
        self, kind: KeyKind, key_id: str, *, audit: Sequence[AuditEvent] = ()
    ) -> int:
        result = await self._delete_authority_key(kind, key_id)
        self._append(audit)
        return result

    async def create_entry(
        self, entry: RegistrationEntry, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        await self._create_entry(entry)
        self._append(audit)

    async def update_entry(
        self, entry: RegistrationEntry, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        await self._update_entry(entry)
        self._append(audit)

    async def delete_entry(self, entry_id: str, *, audit: Sequence[AuditEvent] = ()) -> bool:
        result = await self._delete_entry(entry_id)
        if result:
            self._append(audit)
        return result

    async def create_join_token(
        self, token: JoinToken, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        await self._create_join_token(token)
        self._append(audit)

    async def consume_join_token(
        self, token_id: str, now: dt.datetime, *, audit: Sequence[AuditEvent] = ()
    ) -> JoinToken:
        result = await self._consume_join_token(token_id, now)
        self._append(audit)
        return result

    async def record_issuance(
        self,
        identity: Identity | None,
        issued: list[IssuedX509],
        *,
        audit: Sequence[AuditEvent] = (),
    ) -> None:
        await self._record_issuance(identity, issued)
        self._append(audit)

    async def create_attestor(
        self, instance: AttestorInstance, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        await self._create_attestor(instance)
        self._append(audit)

    async def update_attestor(
        self, instance: AttestorInstance, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        await self._update_attestor(instance)
        self._append(audit)

    async def delete_attestor(self, name: str, *, audit: Sequence[AuditEvent] = ()) -> bool:
        result = await self._delete_attestor(name)
        if result:
            self._append(audit)
        return result


def _attestor_utc(instance: AttestorInstance) -> AttestorInstance:
    return dataclasses.replace(
        instance, created_at=_utc(instance.created_at), updated_at=_utc(instance.updated_at)
    )
