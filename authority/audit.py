"""One tamper-evident audit chain.

Each record holds the hash of the record before it; a record's hash covers its sequence number,
time, kind, actor, subject, task, decision and details (canonical JSON). Records are appended by
the store in the same transaction as the action they describe, so an action without its record,
or a record of an action that did not happen, cannot be committed. Signed checkpoints (the head
hash signed with a JWT authority key) let an export be checked offline against the bundle.

Records never carry a secret: tokens appear as their jti and SHA-256, keys as their key id,
prompts as digests. ``verify_chain`` finds an edit, a deletion, an insertion, a reordering, and a
truncation behind a checkpoint, naming the first record that breaks.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from authority.errors import InvalidArgument

GENESIS = "0" * 64
_KIND = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
CHECKPOINT_TYP = "authority-audit-checkpoint+jwt"
UNKNOWN_KEY = "signed by a key not in the bundle"


def digest(data: str | bytes) -> str:
    """SHA-256 hex: how a secret (a token, a prompt) appears in the audit."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def canonical(value: Mapping[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def bounded(value: str, limit: int) -> str:
    """``value`` as the audit keeps an untrusted field: whole when it has at most ``limit``
    characters, else its first ``limit``, a marker, its length and its SHA-256 (so the record
    still says what was sent, in bounded space)."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}...[truncated: {len(value)} chars, sha256 {digest(value)}]"


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """What happened, before it has a place in the chain."""

    kind: str  # e.g. "attest.succeeded", "x509.issued", "entry.deleted"
    time: dt.datetime
    actor: str = ""  # who acted: a SPIFFE ID, "operator", "authority"
    subject: str = ""  # whom it concerns: a SPIFFE ID, an entry id, an attestor name
    task_id: str = ""
    decision_id: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    # The canonical JSON of ``details``, encoded once here (it is what the chain hashes).
    details_json: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _KIND.fullmatch(self.kind):
            raise InvalidArgument(f"audit kind {self.kind!r} must look like 'noun.verb'")
        if self.time.tzinfo is None:
            raise InvalidArgument("audit times must be timezone-aware")
        try:
            object.__setattr__(self, "details_json", canonical(self.details))
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"audit details must be JSON: {exc}") from None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: int
    time_us: int
    kind: str
    actor: str
    subject: str
    task_id: str
    decision_id: str
    details_json: str
    prev_hash: str
    hash: str

    @property
    def time(self) -> dt.datetime:
        return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=self.time_us)

    @property
    def size(self) -> int:
        """Characters of its text fields: what a page of an export is bounded by."""
        return sum(
            len(f)
            for f in (
                self.kind,
                self.actor,
                self.subject,
                self.task_id,
                self.decision_id,
                self.details_json,
                self.prev_hash,
                self.hash,
            )
        )

    @property
    def details(self) -> dict[str, Any]:
        value = json.loads(self.details_json)
        assert isinstance(value, dict)
        return value

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time.isoformat(),
            "time_us": self.time_us,
            "kind": self.kind,
            "actor": self.actor,
            "subject": self.subject,
            "task_id": self.task_id,
            "decision_id": self.decision_id,
            "details": self.details,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> AuditRecord:
        """The inverse of ``as_json``. ``time`` is not hashed (``time_us`` is): a readable time
        that disagrees with the hashed one is refused, so that it cannot be edited unseen."""
        record = cls._from_json(doc)
        if "time" in doc and doc["time"] != record.time.isoformat():
            raise ValueError(f"record {record.seq}: its time does not match its time_us")
        return record

    @classmethod
    def _from_json(cls, doc: Mapping[str, Any]) -> AuditRecord:
        return cls(
            seq=int(doc["seq"]),
            time_us=int(doc["time_us"]),
            kind=str(doc["kind"]),
            actor=str(doc["actor"]),
            subject=str(doc["subject"]),
            task_id=str(doc["task_id"]),
            decision_id=str(doc["decision_id"]),
            details_json=canonical(doc["details"]),
            prev_hash=str(doc["prev_hash"]),
            hash=str(doc["hash"]),
        )


def _time_us(when: dt.datetime) -> int:
    return (when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


def record_hash(
    prev_hash: str,
    seq: int,
    time_us: int,
    kind: str,
    actor: str,
    subject: str,
    task_id: str,
    decision_id: str,
    details_json: str,
) -> str:
    # Each field length-prefixed, so no two different records share an encoding.
    fields = (
        prev_hash,
        str(seq),
        str(time_us),
        kind,
        actor,
        subject,
        task_id,
        decision_id,
        details_json,
    )
    return digest("".join(f"{len(f)}:{f};" for f in fields))


def chain(event: AuditEvent, seq: int, prev_hash: str) -> AuditRecord:
    """Give an event its place after ``prev_hash``."""
    details_json = event.details_json
    time_us = _time_us(event.time)
    return AuditRecord(
        seq=seq,
        time_us=time_us,
        kind=event.kind,
        actor=event.actor,
        subject=event.subject,
        task_id=event.task_id,
        decision_id=event.decision_id,
        details_json=details_json,
        prev_hash=prev_hash,
        hash=record_hash(
            prev_hash,
            seq,
            time_us,
            event.kind,
            event.actor,
            event.subject,
            event.task_id,
            event.decision_id,
            details_json,
        ),
    )


# --- refusals -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Suppressed:
    """Refusals left out of the audit in one window: how many, and from whom (the most
    frequent callers first, at most ``RefusalBudget.SUMMARY_CALLERS`` of them)."""

    window_start: dt.datetime
    window_end: dt.datetime
    count: int
    callers: tuple[tuple[str, int], ...]

    def details(self) -> dict[str, Any]:
        return {
            "suppressed": self.count,
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
            "callers": {caller: n for caller, n in self.callers},
        }


class RefusalBudget:
    """How many refusals reach the audit, so that hostile calls cannot grow it without bound.

    Time is cut into windows of ``window`` (aligned to the epoch, read from the injected
    clock's time passed in). In one window at most ``per_caller`` refusals of one caller and
    ``total`` in all are recorded; the rest are only counted. The first call after a window
    with suppressed refusals hands back its ``Suppressed`` summary, to be written as one
    record. Callers are counted in at most ``MAX_CALLERS`` slots a window; the rest share one.
    """

    MAX_CALLERS = 4096
    SUMMARY_CALLERS = 16
    OTHERS = "(others)"

    def __init__(self, *, per_caller: int, total: int, window: dt.timedelta) -> None:
        if per_caller <= 0 or total <= 0 or window <= dt.timedelta(0):
            raise InvalidArgument("a refusal budget needs positive bounds")
        self._per_caller = per_caller
        self._total = total
        self._window = window
        self._index: int | None = None
        self._recorded: dict[str, int] = {}
        self._recorded_total = 0
        self._suppressed: dict[str, int] = {}

    def _window_of(self, now: dt.datetime) -> int:
        return (now - _EPOCH) // self._window

    def _close(self, now: dt.datetime) -> Suppressed | None:
        """Start the window of ``now`` if it is a new one; the summary of the one closed."""
        index = self._window_of(now)
        if index == self._index:
            return None
        summary = None
        if self._index is not None and self._suppressed:
            ranked = sorted(self._suppressed.items(), key=lambda item: (-item[1], item[0]))
            start = _EPOCH + self._window * self._index
            summary = Suppressed(
                start,
                start + self._window,
                sum(self._suppressed.values()),
                tuple(ranked[: self.SUMMARY_CALLERS]),
            )
        self._index = index
        self._recorded.clear()
        self._recorded_total = 0
        self._suppressed.clear()
        return summary

    def admit(self, caller: str, now: dt.datetime) -> tuple[bool, Suppressed | None]:
        """Whether this refusal is recorded, and the summary of a window just closed (if any
        refusal was suppressed in it), to be written first."""
        summary = self._close(now)
        if (
            self._recorded.get(caller, 0) < self._per_caller
            and self._recorded_total < self._total
            and (caller in self._recorded or len(self._recorded) < self.MAX_CALLERS)
        ):
            self._recorded[caller] = self._recorded.get(caller, 0) + 1
            self._recorded_total += 1
            return True, summary
        slot = caller
        if caller not in self._suppressed and len(self._suppressed) >= self.MAX_CALLERS:
            slot = self.OTHERS
        self._suppressed[slot] = self._suppressed.get(slot, 0) + 1
        return False, summary

    def flush(self, now: dt.datetime) -> Suppressed | None:
        """The summary of a window that has closed by ``now`` with refusals suppressed."""
        return self._close(now)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


# --- checkpoints ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The chain's head at ``seq``, signed: a JWS whose claims are seq, hash and iat."""

    seq: int
    hash: str
    jws: str


def sign_checkpoint(
    seq: int,
    head_hash: str,
    key: ec.EllipticCurvePrivateKey,
    key_id: str,
    algorithm: str,
    now: dt.datetime,
    issuer: str,
) -> Checkpoint:
    claims = {"iss": issuer, "seq": seq, "hash": head_hash, "iat": int(now.timestamp())}
    token = jwt.encode(
        claims, key, algorithm=algorithm, headers={"kid": key_id, "typ": CHECKPOINT_TYP}
    )
    return Checkpoint(seq, head_hash, token)


def verify_checkpoint(
    checkpoint: Checkpoint, keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> str | None:
    """None when the checkpoint's signature and claims hold; else why not."""
    try:
        header = jwt.get_unverified_header(checkpoint.jws)
        key = keys.get(str(header.get("kid", "")))
        if key is None:
            return UNKNOWN_KEY
        if header.get("typ") != CHECKPOINT_TYP:
            return "not a checkpoint token"
        claims = jwt.decode(
            checkpoint.jws, key, algorithms=["ES256", "ES384"], options={"verify_iat": False}
        )
    except jwt.PyJWTError as exc:
        return f"signature does not verify: {exc}"
    if claims.get("seq") != checkpoint.seq or claims.get("hash") != checkpoint.hash:
        return "its claims differ from the checkpoint row"
    return None


# --- verification ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verification:
    ok: bool
    records: int
    checkpoints: int
    first_bad_seq: int | None = None
    problem: str = ""
    head_hash: str = GENESIS


def verify_chain(
    records: Iterable[AuditRecord],
    checkpoints: Sequence[Checkpoint] = (),
    keys: Mapping[str, ec.EllipticCurvePublicKey] | None = None,
    *,
    start_seq: int = 1,
    start_prev_hash: str = GENESIS,
) -> Verification:
    """Recompute the chain from ``start_seq`` (1, or the first record kept after an archive)."""
    by_seq: dict[int, str] = {}
    expected_seq, prev = start_seq, start_prev_hash
    count = 0
    for record in records:
        count += 1
        if record.seq != expected_seq:
            what = "missing" if record.seq > expected_seq else "out of order or duplicated"
            return Verification(
                False, count, 0, expected_seq, f"record {expected_seq} is {what}", prev
            )
        if record.prev_hash != prev:
            return Verification(
                False, count, 0, record.seq, "its prev_hash does not match the record before", prev
            )
        recomputed = record_hash(
            record.prev_hash,
            record.seq,
            record.time_us,
            record.kind,
            record.actor,
            record.subject,
            record.task_id,
            record.decision_id,
            record.details_json,
        )
        if recomputed != record.hash:
            return Verification(False, count, 0, record.seq, "its content was altered", prev)
        by_seq[record.seq] = record.hash
        prev = record.hash
        expected_seq += 1
    head = expected_seq - 1
    ordered = sorted(checkpoints, key=lambda c: c.seq)
    if start_seq > 1 and not any(
        c.seq == start_seq - 1 and c.hash == start_prev_hash for c in ordered
    ):
        return Verification(
            False, count, 0, start_seq, "the archive anchor is not covered by a checkpoint", prev
        )
    for index, checkpoint in enumerate(ordered):
        if keys is not None:
            problem = verify_checkpoint(checkpoint, keys)
            # A checkpoint signed by a key since retired from the bundle cannot be checked; the
            # latest one must be, and it covers every record before it through the hash chain.
            retired = problem == UNKNOWN_KEY and index < len(ordered) - 1
            if problem and not retired:
                return Verification(
                    False,
                    count,
                    0,
                    checkpoint.seq,
                    f"checkpoint at {checkpoint.seq}: {problem}",
                    prev,
                )
        if checkpoint.seq < start_seq:
            continue  # archived away
        if checkpoint.seq > head:
            return Verification(
                False,
                count,
                0,
                head + 1,
                f"the chain ends at {head} but a checkpoint covers {checkpoint.seq}: truncated",
                prev,
            )
        if by_seq.get(checkpoint.seq) != checkpoint.hash:
            return Verification(
                False, count, 0, checkpoint.seq, "it differs from the signed checkpoint", prev
            )
    return Verification(True, count, len(checkpoints), None, "", prev)


# --- a task's trace: what `authority audit trace` and the console's task page show ------------

TaskFetch = Callable[[list[str]], AsyncIterator[AuditRecord]]
"""The records of these tasks, in chain order (from the Admin API, or the store)."""


async def task_records(
    task_id: str, fetch: TaskFetch, *, follow: bool = True, max_tasks: int | None = None
) -> dict[int, AuditRecord]:
    """The task's records by seq and, ``follow``ing ``child_task`` links, those of the tasks
    delegated from it (at most ``max_tasks`` tasks in all, when given)."""
    seen: set[str] = set()
    pending = [task_id]
    found: dict[int, AuditRecord] = {}
    while pending and (max_tasks is None or len(seen) < max_tasks):
        batch = [t for t in pending if t not in seen]
        if max_tasks is not None:
            batch = batch[: max_tasks - len(seen)]
        seen.update(batch)
        pending = []
        if not batch:
            break
        async for record in fetch(batch):
            found[record.seq] = record
            child = record.details.get("child_task")
            if follow and isinstance(child, str) and child and child not in seen:
                pending.append(child)
    return found


def trace_surroundings(found: Mapping[int, AuditRecord]) -> Callable[[AuditRecord], bool] | None:
    """Which other records belong to the trace of the task records ``found``, though they carry
    no task id: the attestation behind each caller's SVID (linked by identity id from the
    decisions) and revocations of its tokens by jti made before revocations carried their
    task. None when there can be none (no decision, no token)."""
    jtis = {
        str(r.details.get("jti"))
        for r in found.values()
        if r.kind in ("task_token.issued", "task_token.delegated")
    }
    identities = {
        str(caller.get("identity_id"))
        for r in found.values()
        if r.kind == "policy.decided" and isinstance(caller := r.details.get("caller"), dict)
    }
    if not jtis and not identities:
        return None

    def belongs(record: AuditRecord) -> bool:
        if record.seq in found:
            return False
        if record.kind in ("attest.succeeded", "x509.issued"):
            return record.details.get("identity_id") in identities
        return (
            record.kind == "revocation.created"
            and record.details.get("kind") == "jti"
            and record.subject in jtis
        )

    return belongs
