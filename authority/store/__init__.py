"""Persistence, behind one Protocol so that a second backend (PostgreSQL) can be added.

Every method is a coroutine; a backend may batch concurrent writes into one durable commit.
A method that returns has made its write durable. Times must be timezone-aware.

Every method that changes state takes ``audit``: events appended to the audit chain in the same
transaction as the change, so that the change and its record commit together or not at all (a
delete that found nothing records nothing).

Errors every method may raise: ``Unavailable`` (STORE_CLOSED, STORE_ERROR); opening a database
whose schema is newer than the code: ``FailedPrecondition`` (STORE_SCHEMA_TOO_NEW).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Protocol

from authority.audit import AuditEvent, AuditRecord, Checkpoint
from authority.models import (
    Approval,
    AttestorInstance,
    AuthorityKeyInfo,
    HeldSvid,
    Identity,
    IssuedX509,
    JoinToken,
    KeyKind,
    RegistrationEntry,
    Revocation,
    TaskRecord,
    TaskTokenRecord,
)


def audit_page(
    records: Iterable[AuditRecord], limit: int, max_bytes: int | None
) -> list[AuditRecord]:
    """The first records of ``records``: at most ``limit``, ending with the one whose text
    (``AuditRecord.size``) brings the page to ``max_bytes`` (None: no byte bound). Reads no
    further than it keeps, so a backend can pass a cursor."""
    page: list[AuditRecord] = []
    total = 0
    for record in records:
        if len(page) >= limit:
            break
        page.append(record)
        total += record.size
        if max_bytes is not None and total >= max_bytes:
            break
    return page


class Store(Protocol):
    async def close(self) -> None: ...

    # --- signing keys (public metadata) and the bundle's sequence number ---
    async def list_authority_keys(self) -> list[AuthorityKeyInfo]: ...

    async def put_authority_keys(
        self,
        keys: list[AuthorityKeyInfo],
        *,
        bump_sequence: bool,
        audit: Sequence[AuditEvent] = (),
    ) -> int:
        """Insert or replace these keys in one transaction; return the bundle sequence after it
        (incremented by one when ``bump_sequence``)."""
        ...

    async def delete_authority_key(
        self, kind: KeyKind, key_id: str, *, audit: Sequence[AuditEvent] = ()
    ) -> int:
        """Remove a key; increments and returns the bundle sequence. NotFound (KEY_NOT_FOUND)
        for an unknown key, without touching the sequence."""
        ...

    async def bundle_sequence(self) -> int: ...

    # --- registration entries ---
    async def create_entry(
        self, entry: RegistrationEntry, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        """Raises AlreadyExists if an entry with the same id, or the same SPIFFE ID and the same
        selectors, exists."""
        ...

    async def get_entry(self, entry_id: str) -> RegistrationEntry | None: ...

    async def list_entries(self) -> list[RegistrationEntry]: ...

    async def update_entry(
        self, entry: RegistrationEntry, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        """Replace the entry with ``entry.id``: NotFound (ENTRY_NOT_FOUND) when there is none;
        AlreadyExists (ENTRY_EXISTS) when another entry has the same SPIFFE ID, selectors and
        parent."""
        ...

    async def delete_entry(self, entry_id: str, *, audit: Sequence[AuditEvent] = ()) -> bool: ...

    # --- join tokens (stored by digest only) ---
    async def create_join_token(
        self, token: JoinToken, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        """AlreadyExists (JOIN_TOKEN_EXISTS) for a digest already stored."""
        ...

    async def consume_join_token(
        self, token_id: str, now: dt.datetime, *, audit: Sequence[AuditEvent] = ()
    ) -> JoinToken:
        """Atomically mark the token used and return it as it was before. Raises
        Unauthenticated (reason JOIN_TOKEN_UNKNOWN, JOIN_TOKEN_USED or JOIN_TOKEN_EXPIRED)."""
        ...

    # --- attested identities and the X.509-SVIDs issued to them ---
    async def record_issuance(
        self,
        identity: Identity | None,
        issued: list[IssuedX509],
        *,
        audit: Sequence[AuditEvent] = (),
    ) -> None:
        """Store a new identity (when given) and the SVIDs issued for it, in one transaction.
        AlreadyExists (IDENTITY_EXISTS, SERIAL_EXISTS); FailedPrecondition (IDENTITY_UNKNOWN)
        when no identity is given and an SVID names one not stored; InvalidArgument when an
        SVID names another identity than the one given."""
        ...

    async def find_issued_x509(self, serial: str) -> tuple[IssuedX509, Identity] | None: ...

    async def node_svids(self, now: dt.datetime) -> list[HeldSvid]:
        """The live X.509-SVIDs signed for node agents' workloads, by agent."""
        ...

    # --- attestor instances ---
    async def create_attestor(
        self, instance: AttestorInstance, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        """AlreadyExists (ATTESTOR_EXISTS) when the name is taken."""
        ...

    async def update_attestor(
        self, instance: AttestorInstance, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        """NotFound (ATTESTOR_NOT_FOUND) when no instance has the name."""
        ...

    async def list_attestors(self) -> list[AttestorInstance]: ...

    async def delete_attestor(self, name: str, *, audit: Sequence[AuditEvent] = ()) -> bool: ...

    # --- tasks, task tokens and approvals ---
    async def record_task_token(
        self,
        record: TaskTokenRecord,
        *,
        consume_approval: str = "",
        audit: Sequence[AuditEvent] = (),
    ) -> None:
        """Store a token's lineage, opening its task on first use. FailedPrecondition
        (TASK_ENDED) for an ended task; PermissionDenied (TASK_NOT_YOURS) when the task belongs
        to another principal. With ``consume_approval``, that approval must be approved and is
        marked used (FailedPrecondition APPROVAL_USED otherwise). Atomic with those checks."""
        ...

    async def get_task(self, task_id: str) -> TaskRecord | None: ...

    async def end_task(
        self, task_id: str, now: dt.datetime, reason: str, *, audit: Sequence[AuditEvent] = ()
    ) -> list[str]:
        """Mark the task ended; return the jtis of all its tokens. NotFound (TASK_NOT_FOUND),
        FailedPrecondition (TASK_ENDED)."""
        ...

    async def get_task_token(self, jti: str) -> TaskTokenRecord | None: ...

    async def descendants(self, jti: str) -> list[str]:
        """Every token delegated from ``jti``, at any depth."""
        ...

    async def create_approval(
        self, approval: Approval, *, audit: Sequence[AuditEvent] = ()
    ) -> None: ...

    async def pending_approvals(self, now: dt.datetime) -> tuple[int, dt.datetime | None]:
        """(approvals pending at ``now``, when the oldest of them was asked)."""
        ...

    async def get_approval(self, approval_id: str) -> Approval | None: ...

    async def list_approvals(self) -> list[Approval]: ...

    async def decide_approval(
        self, decided: Approval, now: dt.datetime, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        """Record an operator's answer; only a pending, unexpired approval can be answered
        (FailedPrecondition APPROVAL_DECIDED / APPROVAL_EXPIRED; NotFound)."""
        ...

    # --- revocations ---
    async def revoke(
        self, revocations: Sequence[Revocation], *, audit: Sequence[AuditEvent] = ()
    ) -> list[Revocation]:
        """Store revocations durably; return them with their sequence numbers, which only grow
        and are never reused."""
        ...

    async def revocations_since(self, seq: int, limit: int = 10_000) -> list[Revocation]: ...

    async def active_revocations(self, now: dt.datetime) -> list[Revocation]: ...

    async def revocation_bounds(self) -> tuple[int, int]:
        """(lowest seq still kept, highest seq ever assigned): a subscriber behind the first
        must take a snapshot."""
        ...

    async def subjects_attested_by(self, attestor: str, now: dt.datetime) -> list[str]: ...

    async def subjects_issued_through(self, agent: str, now: dt.datetime) -> list[str]:
        """SPIFFE IDs holding a live X.509-SVID issued through the node agent ``agent``."""
        ...

    async def spiffe_id_on_record(self, spiffe_id: str) -> bool:
        """Whether anything on record names this SPIFFE ID: an entry (or node entries naming it
        as their agent), a join token, an identity, an issued X.509-SVID, a task token's
        subject or holder."""
        ...

    async def task_tokens_of_subject(self, subject: str, now: dt.datetime) -> list[str]: ...

    # --- the audit chain ---
    async def append_audit(self, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        """Append records for events that change nothing else (a refusal, a JWT issued)."""
        ...

    async def audit_records(
        self,
        *,
        after_seq: int = 0,
        limit: int = 10_000,
        task_ids: Sequence[str] = (),
        max_bytes: int | None = None,
    ) -> list[AuditRecord]:
        """Records after ``after_seq`` in order: at most ``limit``, and no more once their text
        reaches ``max_bytes`` (the record that reaches it included: a page is never empty
        while records remain, however large one is). See ``audit_page``."""
        ...

    async def audit_head(self) -> tuple[int, str]:
        """(seq, hash) of the last record; (anchor seq - 1, anchor hash) when there is none."""
        ...

    async def audit_anchor(self) -> tuple[int, str]:
        """(first kept seq, the hash it chains to): (1, GENESIS) until records are archived."""
        ...

    async def put_checkpoint(self, checkpoint: Checkpoint) -> None: ...

    async def list_checkpoints(self) -> list[Checkpoint]: ...

    async def prune_audit(self, through_seq: int, *, audit: Sequence[AuditEvent] = ()) -> int:
        """Delete records up to ``through_seq`` (archived elsewhere) and move the anchor; the
        ``audit`` records (of the pruning itself) follow in the same transaction."""
        ...

    # --- single-use keys (nonces, token ids) ---
    async def claim_once(
        self, namespace: str, key: str, expires_at: dt.datetime, now: dt.datetime
    ) -> bool:
        """Record ``key``; True if it was not already claimed (or its claim expired)."""
        ...

    async def prune(self, now: dt.datetime) -> int:
        """Drop what has expired: issued SVIDs past their notAfter, identities with no live SVID
        older than a day, join tokens expired over a day ago (a used token stays used until
        then, so a replay is told JOIN_TOKEN_USED), expired claims. Returns how many rows
        went."""
        ...
