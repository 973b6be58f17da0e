"""How values are kept in the SQL stores (SQLite and PostgreSQL alike), and rows read back.

Instants are integer microseconds since the Unix epoch (UTC), durations integer microseconds,
SPIFFE IDs their URI, selectors a sorted JSON list of ``type:value`` strings, DER chains a JSON
list of base64 strings, booleans 0 or 1.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

from authority.audit import AuditRecord
from authority.errors import FailedPrecondition, InvalidArgument, PermissionDenied
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
    KeyState,
    RegistrationEntry,
    Revocation,
    RevocationKind,
    Selector,
    TaskRecord,
    TaskTokenRecord,
)

_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND: Final = dt.timedelta(microseconds=1)


def instant(value: dt.datetime) -> int:
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidArgument("datetimes given to the store must be timezone-aware")
    return (value - _EPOCH) // _MICROSECOND


def from_instant(value: int) -> dt.datetime:
    return _EPOCH + value * _MICROSECOND


def duration(value: dt.timedelta) -> int:
    return value // _MICROSECOND


def from_duration(value: int) -> dt.timedelta:
    return value * _MICROSECOND


def selectors_text(selectors: Iterable[Selector]) -> str:
    return json.dumps(sorted(str(s) for s in selectors), separators=(",", ":"))


def from_selectors(text: str) -> frozenset[Selector]:
    return frozenset(Selector.parse(s) for s in json.loads(text))


def names_text(names: Iterable[str]) -> str:
    return json.dumps(list(names), separators=(",", ":"))


def from_names(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


def chain_text(chain: Iterable[bytes]) -> str:
    return json.dumps([base64.b64encode(der).decode("ascii") for der in chain])


def from_chain(text: str) -> tuple[bytes, ...]:
    return tuple(base64.b64decode(item) for item in json.loads(text))


def short(token_id: str) -> str:
    """A prefix of a token digest, enough to tell tokens apart in a message."""
    return token_id[:8]


def entry_row(entry: RegistrationEntry) -> list[object]:
    """The columns of ``entries``, in the order create_entry inserts them."""
    return [
        entry.id,
        entry.spiffe_id.uri,
        selectors_text(entry.selectors),
        duration(entry.x509_ttl),
        duration(entry.jwt_ttl),
        names_text(entry.dns_names),
        int(entry.admin),
        instant(entry.created_at),
        int(entry.record_prompts),
        entry.parent_id.uri if entry.parent_id else "",
    ]


def entry_from_row(row: Mapping[str, Any]) -> RegistrationEntry:
    return RegistrationEntry(
        id=row["id"],
        spiffe_id=SpiffeId.parse(row["spiffe_id"]),
        selectors=from_selectors(row["selectors"]),
        x509_ttl=from_duration(row["x509_ttl_us"]),
        jwt_ttl=from_duration(row["jwt_ttl_us"]),
        dns_names=from_names(row["dns_names"]),
        admin=bool(row["admin"]),
        created_at=from_instant(row["created_at_us"]),
        record_prompts=bool(row["record_prompts"]),
        parent_id=SpiffeId.parse(row["parent_id"]) if row["parent_id"] else None,
    )


def key_from_row(row: Mapping[str, Any]) -> AuthorityKeyInfo:
    return AuthorityKeyInfo(
        kind=KeyKind(row["kind"]),
        key_id=row["key_id"],
        state=KeyState(row["state"]),
        not_before=from_instant(row["not_before_us"]),
        not_after=from_instant(row["not_after_us"]),
        certificate=bytes(row["certificate"]),
        upstream_chain=from_chain(row["upstream_chain"]),
        tainted=bool(row["tainted"]),
        replica=row["replica"],
        public_key=bytes(row["public_key"]),
    )


def token_from_row(row: Mapping[str, Any]) -> JoinToken:
    used = row["used_at_us"]
    return JoinToken(
        token_id=row["token_id"],
        spiffe_id=SpiffeId.parse(row["spiffe_id"]),
        expires_at=from_instant(row["expires_at_us"]),
        created_at=from_instant(row["created_at_us"]),
        used_at=None if used is None else from_instant(used),
    )


def identity_from_row(row: Mapping[str, Any], prefix: str = "") -> Identity:
    return Identity(
        id=row[prefix + "id"],
        spiffe_id=SpiffeId.parse(row[prefix + "spiffe_id"]),
        entry_id=row[prefix + "entry_id"],
        attestor=row[prefix + "attestor"],
        selectors=from_selectors(row[prefix + "selectors"]),
        attested_at=from_instant(row[prefix + "attested_at_us"]),
        x509_ttl=from_duration(row[prefix + "x509_ttl_us"]),
        jwt_ttl=from_duration(row[prefix + "jwt_ttl_us"]),
        dns_names=from_names(row[prefix + "dns_names"]),
        admin=bool(row[prefix + "admin"]),
        parent_id=SpiffeId.parse(row[prefix + "parent_id"]) if row[prefix + "parent_id"] else None,
    )


def audit_from_row(row: Mapping[str, Any]) -> AuditRecord:
    return AuditRecord(
        seq=row["seq"],
        time_us=row["time_us"],
        kind=row["kind"],
        actor=row["actor"],
        subject=row["subject"],
        task_id=row["task_id"],
        decision_id=row["decision_id"],
        details_json=row["details"],
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


def revocation_from_row(row: Mapping[str, Any]) -> Revocation:
    return Revocation(
        kind=RevocationKind(row["kind"]),
        target=row["target"],
        reason=row["reason"],
        revoked_at=from_instant(row["revoked_at_us"]),
        expires_at=from_instant(row["expires_at_us"]),
        actor=row["actor"],
        seq=row["seq"],
    )


def task_from_row(row: Mapping[str, Any]) -> TaskRecord:
    ended = row["ended_at_us"]
    return TaskRecord(
        row["task_id"],
        row["principal"],
        from_instant(row["created_at_us"]),
        None if ended is None else from_instant(ended),
        row["end_reason"],
    )


def check_task_open(task: TaskRecord, subject: str) -> None:
    if task.ended_at is not None:
        raise FailedPrecondition(f"task {task.task_id!r} has ended", reason="TASK_ENDED")
    if task.principal != subject:
        raise PermissionDenied(
            f"task {task.task_id!r} belongs to another principal", reason="TASK_NOT_YOURS"
        )


def task_token_from_row(row: Mapping[str, Any]) -> TaskTokenRecord:
    return TaskTokenRecord(
        jti=row["jti"],
        task_id=row["task_id"],
        subject=row["subject"],
        holder=row["holder"],
        audience=row["audience"],
        scope=row["scope"],
        resource=row["resource"],
        parent_jti=row["parent_jti"],
        depth=row["depth"],
        issued_at=from_instant(row["issued_at_us"]),
        expires_at=from_instant(row["expires_at_us"]),
        decision_id=row["decision_id"],
        cnf_x5t=row["cnf_x5t"],
    )


def approval_row(a: Approval) -> list[object]:
    return [
        a.id,
        a.principal,
        a.task_id,
        a.audience,
        a.intent_json,
        a.intent_fingerprint,
        a.decision_id,
        instant(a.requested_at),
        instant(a.expires_at),
        a.state.value,
        None if a.decided_at is None else instant(a.decided_at),
        a.decided_by,
        a.note,
        None if a.grant_expires_at is None else instant(a.grant_expires_at),
    ]


def approval_from_row(row: Mapping[str, Any]) -> Approval:
    def maybe(value: int | None) -> dt.datetime | None:
        return None if value is None else from_instant(value)

    return Approval(
        id=row["id"],
        principal=row["principal"],
        task_id=row["task_id"],
        audience=row["audience"],
        intent_json=row["intent_json"],
        intent_fingerprint=row["intent_fingerprint"],
        decision_id=row["decision_id"],
        requested_at=from_instant(row["requested_at_us"]),
        expires_at=from_instant(row["expires_at_us"]),
        state=ApprovalState(row["state"]),
        decided_at=maybe(row["decided_at_us"]),
        decided_by=row["decided_by"],
        note=row["note"],
        grant_expires_at=maybe(row["grant_expires_at_us"]),
    )


def attestor_row(instance: AttestorInstance) -> list[object]:
    return [
        instance.name,
        instance.plugin,
        instance.config_json,
        instant(instance.created_at),
        instant(instance.updated_at),
    ]


def check_issuance(identity: Identity | None, issued: list[IssuedX509]) -> None:
    if identity is None:
        return
    for svid in issued:
        if svid.identity_id != identity.id:
            raise InvalidArgument(
                f"SVID {svid.serial} names identity {svid.identity_id!r}, not {identity.id!r}"
            )
