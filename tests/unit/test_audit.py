"""The audit chain as a pure state machine: hashing, linking, checkpoints, and what verify_chain
finds when a record is edited, deleted, inserted, reordered or truncated."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
from collections.abc import Mapping

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from authority.audit import (
    CHECKPOINT_TYP,
    GENESIS,
    UNKNOWN_KEY,
    AuditEvent,
    AuditRecord,
    Checkpoint,
    Verification,
    canonical,
    chain,
    digest,
    record_hash,
    sign_checkpoint,
    verify_chain,
    verify_checkpoint,
)
from authority.errors import InvalidArgument

T0 = dt.datetime(2026, 1, 5, 10, 0, tzinfo=dt.UTC)
ISSUER = "spiffe://example.org"
KINDS = (
    "attest.succeeded",
    "x509.issued",
    "policy.decided",
    "task_token.issued",
    "approval.requested",
    "approval.approved",
    "task_token.delegated",
    "revocation.created",
    "task.ended",
    "jwt.issued",
)


def event(i: int) -> AuditEvent:
    return AuditEvent(
        kind=KINDS[i % len(KINDS)],
        time=T0 + dt.timedelta(seconds=i, microseconds=i),
        actor=f"spiffe://example.org/agent/a{i % 3}",
        subject=f"subject-{i}",
        task_id=f"task-{i // 4}",
        decision_id=f"decision-{i}",
        details={"i": i, "jti": f"jti-{i}", "nested": {"b": [1, 2], "a": "é"}},
    )


def build(n: int, *, start_seq: int = 1, prev: str = GENESIS) -> list[AuditRecord]:
    records = []
    for i in range(n):
        record = chain(event(start_seq + i), start_seq + i, prev)
        records.append(record)
        prev = record.hash
    return records


def rehash(record: AuditRecord, prev_hash: str | None = None) -> AuditRecord:
    """What an attacker who knows the hash rule does after editing a record."""
    prev = record.prev_hash if prev_hash is None else prev_hash
    return dataclasses.replace(
        record,
        prev_hash=prev,
        hash=record_hash(
            prev,
            record.seq,
            record.time_us,
            record.kind,
            record.actor,
            record.subject,
            record.task_id,
            record.decision_id,
            record.details_json,
        ),
    )


def rechain(records: list[AuditRecord], prev: str = GENESIS) -> list[AuditRecord]:
    out = []
    for record in records:
        fixed = rehash(record, prev)
        out.append(fixed)
        prev = fixed.hash
    return out


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return new_key()


@pytest.fixture(scope="module")
def keys(key: ec.EllipticCurvePrivateKey) -> Mapping[str, ec.EllipticCurvePublicKey]:
    return {"kid-current": key.public_key()}


def checkpoint_at(
    record: AuditRecord, key: ec.EllipticCurvePrivateKey, kid: str = "kid-current"
) -> Checkpoint:
    return sign_checkpoint(record.seq, record.hash, key, kid, "ES256", T0, ISSUER)


def broken(result: Verification, seq: int, needle: str) -> None:
    assert not result.ok, result
    assert result.first_bad_seq == seq, result
    assert needle in result.problem, result


# --- hashing and linking -----------------------------------------------------------------------


def test_chain_is_deterministic() -> None:
    first, second = build(6), build(6)
    assert first == second
    assert [r.seq for r in first] == [1, 2, 3, 4, 5, 6]
    assert first[0].prev_hash == GENESIS
    for before, after in itertools.pairwise(first):
        assert after.prev_hash == before.hash
    assert len({r.hash for r in first}) == 6


def test_record_hash_is_sha256_of_length_prefixed_fields() -> None:
    """Pinned: exports must verify with any later version, so the hashed form may not drift."""
    record = chain(event(7), 42, "ab" * 32)
    fields = (
        "ab" * 32,
        "42",
        str(record.time_us),
        record.kind,
        record.actor,
        record.subject,
        record.task_id,
        record.decision_id,
        record.details_json,
    )
    body = "".join(f"{len(f)}:{f};" for f in fields)
    assert record.hash == hashlib.sha256(body.encode()).hexdigest()
    assert record.hash == digest(body)
    assert record.time_us == int((T0 + dt.timedelta(seconds=7, microseconds=7)).timestamp() * 1e6)


def test_details_are_canonical_whatever_their_key_order() -> None:
    a = AuditEvent("task.ended", T0, details={"b": 2, "a": {"y": 1, "x": 2}})
    b = AuditEvent("task.ended", T0, details={"a": {"x": 2, "y": 1}, "b": 2})
    assert chain(a, 1, GENESIS) == chain(b, 1, GENESIS)
    assert chain(a, 1, GENESIS).details_json == '{"a":{"x":2,"y":1},"b":2}'


@pytest.mark.parametrize(
    "change",
    [
        {"seq": 2},
        {"prev": "1" * 64},
        {"time_us": 1},
        {"kind": "x509.issued"},
        {"actor": "someone else"},
        {"subject": "other"},
        {"task_id": "task-x"},
        {"decision_id": "d-x"},
        {"details": '{"i":2}'},
    ],
)
def test_every_field_is_hashed(change: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "prev": GENESIS,
        "seq": 1,
        "time_us": 0,
        "kind": "task.ended",
        "actor": "a",
        "subject": "s",
        "task_id": "t",
        "decision_id": "d",
        "details": '{"i":1}',
    }

    def h(values: dict[str, object]) -> str:
        return record_hash(
            str(values["prev"]),
            int(str(values["seq"])),
            int(str(values["time_us"])),
            str(values["kind"]),
            str(values["actor"]),
            str(values["subject"]),
            str(values["task_id"]),
            str(values["decision_id"]),
            str(values["details"]),
        )

    assert h(fields) != h({**fields, **change})


def test_fields_cannot_be_shifted_between_each_other() -> None:
    """Length-prefixed, not plain concatenation: 'ab'+'c' and 'a'+'bc' hash apart."""
    one = record_hash(GENESIS, 1, 0, "task.ended", "ab", "c", "", "", "{}")
    two = record_hash(GENESIS, 1, 0, "task.ended", "a", "bc", "", "", "{}")
    assert one != two


def test_events_check_their_invariants() -> None:
    with pytest.raises(InvalidArgument):
        AuditEvent("Ended", T0)
    with pytest.raises(InvalidArgument):
        AuditEvent("task.ended", dt.datetime(2026, 1, 5, 10, 0))  # naive
    with pytest.raises(InvalidArgument):
        AuditEvent("task.ended", T0, details={"x": object()})


def test_json_round_trip_keeps_the_hash() -> None:
    records = build(5)
    again = [AuditRecord.from_json(json.loads(json.dumps(r.as_json()))) for r in records]
    assert again == records
    assert verify_chain(again).ok


def test_json_with_an_edited_readable_time_is_refused() -> None:
    """``time`` is for readers; ``time_us`` is hashed: the two must agree."""
    doc = build(1)[0].as_json()
    doc["time"] = (T0 - dt.timedelta(days=1)).isoformat()
    with pytest.raises(ValueError, match="time"):
        AuditRecord.from_json(doc)


# --- verify_chain: the untouched chain ---------------------------------------------------------


def test_untouched_chain_verifies(
    key: ec.EllipticCurvePrivateKey, keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> None:
    records = build(8)
    checkpoints = [checkpoint_at(records[3], key), checkpoint_at(records[7], key)]
    result = verify_chain(records, checkpoints, keys)
    assert result == Verification(True, 8, 2, None, "", records[-1].hash)


def test_empty_chain_verifies() -> None:
    assert verify_chain([]) == Verification(True, 0, 0, None, "", GENESIS)


# --- verify_chain: tampering -------------------------------------------------------------------

EDITS: dict[str, dict[str, object]] = {
    "kind": {"kind": "x509.issued"},
    "actor": {"actor": "spiffe://example.org/agent/innocent"},
    "subject": {"subject": "someone-else"},
    "task_id": {"task_id": "task-other"},
    "decision_id": {"decision_id": "decision-forged"},
    "details": {"details_json": canonical({"i": 3, "jti": "jti-forged"})},
    "time": {"time_us": 0},
}


@pytest.mark.parametrize("field", sorted(EDITS))
def test_an_edited_field_names_the_record(field: str) -> None:
    records = build(8)
    records[3] = dataclasses.replace(records[3], **EDITS[field])  # type: ignore[arg-type]
    broken(verify_chain(records), 4, "altered")


@pytest.mark.parametrize("field", sorted(EDITS))
def test_an_edited_and_rehashed_record_breaks_the_next_link(field: str) -> None:
    records = build(8)
    records[3] = rehash(dataclasses.replace(records[3], **EDITS[field]))  # type: ignore[arg-type]
    broken(verify_chain(records), 5, "prev_hash")


def test_an_edited_hash_names_the_record() -> None:
    records = build(8)
    records[5] = dataclasses.replace(records[5], hash="f" * 64)
    broken(verify_chain(records), 6, "altered")


def test_a_rewritten_chain_is_caught_by_the_checkpoint(
    key: ec.EllipticCurvePrivateKey, keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> None:
    """An attacker who rehashes everything after an edit keeps the links: only the signed head
    betrays it."""
    records = build(8)
    checkpoints = [checkpoint_at(records[7], key)]
    records[2] = dataclasses.replace(records[2], actor="spiffe://example.org/agent/innocent")
    forged = rechain(records)
    assert verify_chain(forged).ok  # no checkpoint: nothing to compare with
    broken(verify_chain(forged, checkpoints, keys), 8, "differs from the signed checkpoint")


def test_a_deleted_record_names_it() -> None:
    records = build(8)
    del records[4]
    broken(verify_chain(records), 5, "record 5 is missing")


def test_a_deleted_first_record_names_it() -> None:
    records = build(4)
    del records[0]
    broken(verify_chain(records), 1, "record 1 is missing")


def test_a_deleted_and_renumbered_record_breaks_the_link() -> None:
    records = build(8)
    del records[4]
    renumbered = records[:4] + [dataclasses.replace(r, seq=r.seq - 1) for r in records[4:]]
    broken(verify_chain(renumbered), 5, "prev_hash")


def test_an_inserted_record_is_found() -> None:
    """A well-formed forgery slotted in after record 3: the original record 4 no longer fits."""
    records = build(8)
    forged = chain(AuditEvent("task.ended", T0, actor="forger"), 4, records[2].hash)
    inserted = [*records[:3], forged, *records[3:]]
    broken(verify_chain(inserted), 5, "out of order or duplicated")


def test_an_inserted_record_with_renumbering_is_found() -> None:
    """As in the database, where seq is the key: the forgery takes 4, the rest move up by one."""
    records = build(8)
    forged = chain(AuditEvent("task.ended", T0, actor="forger"), 4, records[2].hash)
    shifted = [dataclasses.replace(r, seq=r.seq + 1) for r in records[3:]]
    broken(verify_chain([*records[:3], forged, *shifted]), 5, "prev_hash")


def test_an_inserted_record_with_a_made_up_hash_names_it() -> None:
    records = build(8)
    forged = dataclasses.replace(
        chain(AuditEvent("task.ended", T0), 4, records[2].hash), hash="e" * 64
    )
    shifted = [dataclasses.replace(r, seq=r.seq + 1) for r in records[3:]]
    broken(verify_chain([*records[:3], forged, *shifted]), 4, "altered")


@pytest.mark.parametrize(("i", "j"), [(2, 3), (1, 6), (0, 7)])
def test_two_swapped_records_are_found(i: int, j: int) -> None:
    records = build(8)
    records[i], records[j] = records[j], records[i]
    broken(verify_chain(records), i + 1, f"record {i + 1} is")


@pytest.mark.parametrize(("i", "j"), [(2, 3), (1, 6), (0, 7)])
def test_two_records_with_swapped_seqs_are_found(i: int, j: int) -> None:
    """The database way to swap: each takes the other's seq."""
    records = build(8)
    a, b = records[i], records[j]
    records[i] = dataclasses.replace(b, seq=a.seq)
    records[j] = dataclasses.replace(a, seq=b.seq)
    broken(verify_chain(records), i + 1, "prev_hash")


def test_a_truncated_tail_after_a_checkpoint_is_found(
    key: ec.EllipticCurvePrivateKey, keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> None:
    records = build(8)
    checkpoints = [checkpoint_at(records[7], key)]
    assert verify_chain(records, checkpoints, keys).ok
    broken(verify_chain(records[:5], checkpoints, keys), 6, "truncated")
    broken(verify_chain([], checkpoints, keys), 1, "truncated")


def test_a_truncated_and_regrown_tail_is_found(
    key: ec.EllipticCurvePrivateKey, keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> None:
    """Records dropped, then new ones appended in their place: the checkpoint's seq exists again
    but holds another hash."""
    records = build(8)
    checkpoints = [checkpoint_at(records[7], key)]
    regrown = records[:5]
    prev = records[4].hash
    for seq in (6, 7, 8):
        record = chain(AuditEvent("task.ended", T0, actor="regrown"), seq, prev)
        regrown.append(record)
        prev = record.hash
    broken(verify_chain(regrown, checkpoints, keys), 8, "differs from the signed checkpoint")


# --- checkpoints -------------------------------------------------------------------------------


def test_checkpoint_token_carries_seq_hash_and_kid(
    key: ec.EllipticCurvePrivateKey, keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> None:
    record = build(3)[2]
    checkpoint = checkpoint_at(record, key)
    header = jwt.get_unverified_header(checkpoint.jws)
    assert header["kid"] == "kid-current"
    assert header["typ"] == CHECKPOINT_TYP
    claims = jwt.decode(checkpoint.jws, key.public_key(), algorithms=["ES256"])
    assert claims == {"iss": ISSUER, "seq": 3, "hash": record.hash, "iat": int(T0.timestamp())}
    assert verify_checkpoint(checkpoint, keys) is None


def test_a_checkpoint_with_a_bad_signature_is_refused(
    keys: Mapping[str, ec.EllipticCurvePublicKey],
) -> None:
    """Signed with another key under the bundle's kid."""
    records = build(8)
    forged = checkpoint_at(records[7], new_key(), "kid-current")
    broken(verify_chain(records, [forged], keys), 8, "signature does not verify")


def test_a_checkpoint_with_a_tampered_signature_is_refused(
    key: ec.EllipticCurvePrivateKey, keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> None:
    records = build(8)
    good = checkpoint_at(records[7], key)
    head, payload, signature = good.jws.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    forged = Checkpoint(good.seq, good.hash, f"{head}.{payload}.{flipped}")
    broken(verify_chain(records, [forged], keys), 8, "signature does not verify")


def test_a_checkpoint_row_edited_apart_from_its_token_is_refused(
    key: ec.EllipticCurvePrivateKey, keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> None:
    """The attacker rewrote the chain and moved the row's hash along; the signed claims did not."""
    records = build(8)
    good = checkpoint_at(records[7], key)
    records[2] = dataclasses.replace(records[2], subject="other")
    forged_chain = rechain(records)
    moved = Checkpoint(good.seq, forged_chain[7].hash, good.jws)
    broken(verify_chain(forged_chain, [moved], keys), 8, "claims differ")


def test_a_checkpoint_that_is_not_a_checkpoint_token_is_refused(
    key: ec.EllipticCurvePrivateKey, keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> None:
    """A JWT signed by the right key for another purpose (a JWT-SVID, say) is no checkpoint."""
    records = build(8)
    token = jwt.encode(
        {"iss": ISSUER, "seq": 8, "hash": records[7].hash},
        key,
        algorithm="ES256",
        headers={"kid": "kid-current", "typ": "JWT"},
    )
    broken(verify_chain(records, [Checkpoint(8, records[7].hash, token)], keys), 8, "checkpoint")


def test_the_latest_checkpoint_must_be_signed_by_a_bundle_key(
    key: ec.EllipticCurvePrivateKey, keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> None:
    records = build(8)
    stranger = checkpoint_at(records[7], new_key(), "kid-unknown")
    broken(verify_chain(records, [stranger], keys), 8, UNKNOWN_KEY)
    older_good = checkpoint_at(records[3], key)
    broken(verify_chain(records, [older_good, stranger], keys), 8, UNKNOWN_KEY)


def test_older_checkpoints_by_a_retired_key_are_tolerated_under_a_later_good_one(
    key: ec.EllipticCurvePrivateKey, keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> None:
    records = build(8)
    retired = checkpoint_at(records[2], new_key(), "kid-retired")
    latest = checkpoint_at(records[7], key)
    assert verify_chain(records, [retired, latest], keys).ok
    assert verify_chain(records, [latest, retired], keys).ok  # order of the list is irrelevant
    # ...but only as long as the later checkpoint verifies,
    unverifiable = checkpoint_at(records[7], new_key(), "kid-also-retired")
    broken(verify_chain(records, [retired, unverifiable], keys), 8, UNKNOWN_KEY)
    # ...and a retired checkpoint still has to match the chain it claims to cover.
    lying = Checkpoint(3, records[4].hash, retired.jws)
    broken(verify_chain(records, [lying, latest], keys), 3, "differs from the signed checkpoint")


def test_a_bad_signature_is_not_excused_as_retired(
    key: ec.EllipticCurvePrivateKey, keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> None:
    records = build(8)
    forged_old = checkpoint_at(records[2], new_key(), "kid-current")
    latest = checkpoint_at(records[7], key)
    broken(verify_chain(records, [forged_old, latest], keys), 3, "signature does not verify")


# --- archives ----------------------------------------------------------------------------------


def test_what_remains_after_an_archive_verifies_from_its_anchor(
    key: ec.EllipticCurvePrivateKey, keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> None:
    records = build(10)
    anchor = checkpoint_at(records[3], key)
    latest = checkpoint_at(records[9], key)
    kept = records[4:]
    result = verify_chain(
        kept, [anchor, latest], keys, start_seq=5, start_prev_hash=records[3].hash
    )
    assert result == Verification(True, 6, 2, None, "", records[9].hash)
    archived = verify_chain(records[:4], [anchor], keys)
    assert archived.ok
    assert archived.head_hash == records[3].hash


def test_an_archive_anchor_without_a_checkpoint_is_refused(
    key: ec.EllipticCurvePrivateKey, keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> None:
    records = build(10)
    latest = checkpoint_at(records[9], key)
    kept = records[4:]
    broken(
        verify_chain(kept, [latest], keys, start_seq=5, start_prev_hash=records[3].hash),
        5,
        "anchor is not covered by a checkpoint",
    )
    # A checkpoint at the anchor's seq over another hash does not cover it either.
    elsewhere = Checkpoint(4, records[2].hash, checkpoint_at(records[2], key).jws)
    broken(
        verify_chain(kept, [elsewhere, latest], keys, start_seq=5, start_prev_hash=records[3].hash),
        5,
        "anchor",
    )


def test_records_dropped_from_the_front_without_an_anchor_move_are_found(
    key: ec.EllipticCurvePrivateKey, keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> None:
    records = build(10)
    anchor = checkpoint_at(records[3], key)
    kept = records[6:]  # 5 and 6 went too
    broken(
        verify_chain(kept, [anchor], keys, start_seq=5, start_prev_hash=records[3].hash),
        5,
        "record 5 is missing",
    )
