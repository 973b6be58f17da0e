"""Revocation: durable, ordered, pushed.

A revocation names a token (jti), a task, a subject (SPIFFE ID), an entry, an attestor instance
or a signing key. ``RevocationService.revoke`` computes the cascade (a token's descendants; the
subjects an entry or attestor granted), commits every revocation with its audit record before it
returns (fsync'd), and hands them to the ``RevocationHub``, which publishes them to subscribers in
sequence order. A revocation is kept until everything it covers has expired, then forgotten.

The authority applies the same set to itself: it refuses renewals, JWT-SVIDs, exchanges and
attestation for what is revoked.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import jwt

from authority.audit import AuditEvent
from authority.ca import CertificateAuthority
from authority.clock import Clock
from authority.config import Limits
from authority.errors import InvalidArgument, NotFound
from authority.ids import SpiffeId
from authority.models import Revocation, RevocationKind, check_length
from authority.store import Store
from authority.tokens import HARD_MAX_TTL, TaskToken

log = logging.getLogger(__name__)

SET_TYP = "secevent+jwt"
CAEP = "https://schemas.openid.net/secevent/caep/event-type/"
SESSION_REVOKED = CAEP + "session-revoked"
CREDENTIAL_CHANGE = CAEP + "credential-change"
DEFAULT_QUEUE = 4096
# What may be revoked before it exists: a name an operator chooses, not a random id.
PREEMPTIBLE = frozenset({RevocationKind.SUBJECT, RevocationKind.ENTRY, RevocationKind.ATTESTOR})


class EventQueue:
    """A bounded FIFO read by one task: ``asyncio.Queue``'s ``put_nowait``/``get`` without its
    bookkeeping (``task_done``, blocked putters), which the fan-out pays once per subscriber
    per event. ``wake`` rouses the reader without an item (a heartbeat is due)."""

    __slots__ = ("_items", "_maxsize", "_waiter")

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("a subscriber's queue holds at least one event")
        self._items: deque[Revocation] = deque()
        self._maxsize = maxsize
        self._waiter: asyncio.Future[None] | None = None

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Revocation) -> None:
        if len(self._items) >= self._maxsize:
            raise asyncio.QueueFull
        self._items.append(item)
        self.wake()

    def get_nowait(self) -> Revocation:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        """Until an item is queued or ``wake`` is called (at once if an item is waiting)."""
        if self._items:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            if self._waiter is waiter:  # cancelled while waiting
                self._waiter = None

    async def get(self) -> Revocation:
        while not self._items:
            await self.wait()
        return self._items.popleft()


@dataclass(slots=True, eq=False)  # compared and hashed by identity
class Subscription:
    """One subscriber's bounded queue; on overflow it is told to resync, never blocks others."""

    queue: EventQueue = field(default_factory=lambda: EventQueue(DEFAULT_QUEUE))
    overflowed: bool = False


class RevocationHub:
    """In-process fan-out, strictly in sequence order."""

    def __init__(self, store: Store, queue_size: int = DEFAULT_QUEUE) -> None:
        self._store = store
        self._queue_size = queue_size
        self._subscribers: set[Subscription] = set()
        self._lock = asyncio.Lock()
        self.head = 0  # the last sequence number published

    async def start(self) -> None:
        _, self.head = await self._store.revocation_bounds()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> Subscription:
        sub = Subscription(EventQueue(self._queue_size))
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    async def publish_committed(self) -> list[Revocation]:
        """Publish everything committed since the last publication, in order. Reading back
        from the store (rather than trusting the caller's list) keeps the order strict when
        revocations commit concurrently, and heals a publication a cancelled caller missed."""
        async with self._lock:
            events = await self._store.revocations_since(self.head)
            if not events:
                return []
            subscribers = list(self._subscribers)
            for event in events:
                for sub in subscribers:
                    if sub.overflowed:
                        continue
                    try:
                        sub.queue.put_nowait(event)
                    except asyncio.QueueFull:
                        sub.overflowed = True
                self.head = event.seq
            return events


@dataclass(slots=True)
class RevokedSet:
    """What is revoked now, by kind: the authority's own view (relying services keep theirs)."""

    by_kind: dict[RevocationKind, dict[str, dt.datetime]] = field(
        default_factory=lambda: {k: {} for k in RevocationKind}
    )

    def add(self, revocation: Revocation) -> None:
        current = self.by_kind[revocation.kind].get(revocation.target)
        if current is None or current < revocation.expires_at:
            self.by_kind[revocation.kind][revocation.target] = revocation.expires_at

    def has(self, kind: RevocationKind, target: str, now: dt.datetime) -> bool:
        until = self.by_kind[kind].get(target)
        return until is not None and until > now

    def token_revoked(self, token: TaskToken, now: dt.datetime) -> bool:
        return (
            self.has(RevocationKind.JTI, token.jti, now)
            or self.has(RevocationKind.TASK, token.task_id, now)
            or self.has(RevocationKind.KEY, token.key_id, now)
            or any(
                self.has(RevocationKind.SUBJECT, who, now) for who in (token.subject, *token.actors)
            )
        )


class RevocationService:
    def __init__(
        self,
        *,
        store: Store,
        ca: CertificateAuthority,
        hub: RevocationHub,
        clock: Clock,
        limits: Limits,
    ) -> None:
        self._store = store
        self._ca = ca
        self.hub = hub
        self._clock = clock
        self._limits = limits
        self.revoked = RevokedSet()

    async def start(self) -> None:
        for revocation in await self._store.active_revocations(self._clock.now()):
            self.revoked.add(revocation)
        await self.hub.start()

    async def catch_up(self) -> None:
        """Publish what was committed since the last publication, this replica's and the
        others' (on a shared store), and take the others' into the revoked set."""
        for revocation in await self.hub.publish_committed():
            self.revoked.add(revocation)

    def _identity_horizon(self, now: dt.datetime) -> dt.datetime:
        """When everything issued to an identity now has expired."""
        longest = max(self._limits.max_x509_ttl, self._limits.max_jwt_ttl, HARD_MAX_TTL)
        return now + longest + dt.timedelta(minutes=1)

    async def revoke(
        self,
        kind: RevocationKind,
        target: str,
        reason: str,
        *,
        actor: str,
        preemptive: bool = False,
    ) -> list[Revocation]:
        """Revoke ``target`` and what cascades from it; durable before this returns.

        An entry, attestor or SPIFFE ID the authority has no record of is NotFound unless
        ``preemptive``: revoking a name before it exists is a deliberate act, recorded as such.
        A token, task or key must exist (``preemptive`` does not apply to them)."""
        now = self._clock.now()
        reason = check_length(reason.strip(), self._limits.max_reason_chars, "the reason")
        reason = reason or "revoked"
        ahead = await self._preemptive(kind, target, preemptive)
        planned = await self._plan(kind, target, reason, actor, now)
        tasks = await self._tasks_of(planned)
        events = [
            AuditEvent(
                "revocation.created",
                now,
                actor=actor,
                subject=r.target,
                task_id=tasks.get((r.kind, r.target), ""),
                details={
                    "kind": str(r.kind),
                    "reason": r.reason,
                    "expires_at": r.expires_at.isoformat(),
                    "cascade_of": f"{kind}:{target}"
                    if (r.kind, r.target) != (kind, target)
                    else "",
                    **(
                        {"preemptive": True}
                        if ahead and (r.kind, r.target) == (kind, target)
                        else {}
                    ),
                },
            )
            for r in planned
        ]
        stored = await self._store.revoke(planned, audit=events)
        for revocation in stored:
            self.revoked.add(revocation)
        await self.catch_up()
        await self._side_effects(kind, target, reason, now)
        log.info(
            "revoked: kind=%s target=%s cascade=%d seq=%s%s",
            kind,
            target,
            len(stored) - 1,
            ",".join(str(r.seq) for r in stored),
            " preemptive" if ahead else "",
        )
        return stored

    async def _preemptive(self, kind: RevocationKind, target: str, preemptive: bool) -> bool:
        """Whether this revocation names what does not exist yet (allowed with ``preemptive``);
        NotFound when it does not exist and ``preemptive`` was not given."""
        if kind not in PREEMPTIBLE:
            if preemptive:
                raise InvalidArgument(
                    "preemptive applies to entries, attestors and SPIFFE IDs: a "
                    f"{kind} must exist to be revoked",
                    reason="NOT_PREEMPTIBLE",
                )
            return False
        if kind is RevocationKind.SUBJECT:
            SpiffeId.parse(target)
            exists = await self._store.spiffe_id_on_record(target)
            what, reason = f"SPIFFE ID {target[:256]!r}", "SUBJECT_NOT_FOUND"
        elif kind is RevocationKind.ENTRY:
            exists = await self._store.get_entry(target) is not None
            what, reason = f"entry {target[:256]!r}", "ENTRY_NOT_FOUND"
        else:
            exists = any(a.name == target for a in await self._store.list_attestors())
            what, reason = f"attestor {target[:256]!r}", "ATTESTOR_NOT_FOUND"
        if exists:
            return False
        if not preemptive:
            raise NotFound(
                f"no {what} on record; to revoke it before it exists, say preemptive "
                "(authority revoke --preemptive)",
                reason=reason,
            )
        return True

    async def _tasks_of(
        self, planned: Sequence[Revocation]
    ) -> dict[tuple[RevocationKind, str], str]:
        """The task each revocation belongs to, so that a task's audit trace shows it."""
        tasks: dict[tuple[RevocationKind, str], str] = {}
        for r in planned:
            if r.kind is RevocationKind.TASK:
                tasks[(r.kind, r.target)] = r.target
            elif r.kind is RevocationKind.JTI:
                record = await self._store.get_task_token(r.target)
                if record is not None:
                    tasks[(r.kind, r.target)] = record.task_id
        return tasks

    async def _plan(
        self, kind: RevocationKind, target: str, reason: str, actor: str, now: dt.datetime
    ) -> list[Revocation]:
        def make(k: RevocationKind, t: str, until: dt.datetime) -> Revocation:
            return Revocation(k, t, reason, now, max(until, now + dt.timedelta(seconds=1)), actor)

        horizon = self._identity_horizon(now)
        if kind is RevocationKind.JTI:
            record = await self._store.get_task_token(target)
            if record is None:
                raise NotFound(f"no task token {target!r}", reason="TOKEN_NOT_FOUND")
            plan = [make(kind, target, record.expires_at + dt.timedelta(minutes=1))]
            for child in await self._store.descendants(target):
                child_record = await self._store.get_task_token(child)
                until = child_record.expires_at if child_record else now + HARD_MAX_TTL
                plan.append(make(kind, child, until + dt.timedelta(minutes=1)))
            return plan
        if kind is RevocationKind.TASK:
            if await self._store.get_task(target) is None:
                raise NotFound(f"no task {target!r}", reason="TASK_NOT_FOUND")
            return [make(kind, target, now + HARD_MAX_TTL + dt.timedelta(minutes=1))]
        if kind is RevocationKind.SUBJECT:
            SpiffeId.parse(target)
            plan = [make(kind, target, horizon)]
            # A node agent's workloads: their SVIDs' keys were in its keeping.
            for subject in await self._store.subjects_issued_through(target, now):
                if subject != target:
                    plan.append(make(RevocationKind.SUBJECT, subject, horizon))
            return plan
        if kind is RevocationKind.ENTRY:
            entry = await self._store.get_entry(target)
            plan = [make(kind, target, horizon)]
            if entry is not None:
                plan.append(make(RevocationKind.SUBJECT, entry.spiffe_id.uri, horizon))
            return plan
        if kind is RevocationKind.ATTESTOR:
            plan = [make(kind, target, horizon)]
            for subject in await self._store.subjects_attested_by(target, now):
                plan.append(make(RevocationKind.SUBJECT, subject, horizon))
            return plan
        if kind is RevocationKind.KEY:
            info = next((k for k in self._ca.authorities() if k.key_id == target), None)
            if info is None:
                raise NotFound(f"no signing key {target!r}", reason="KEY_NOT_FOUND")
            return [make(kind, target, info.not_after + dt.timedelta(minutes=1))]
        raise InvalidArgument(f"unknown revocation kind {kind!r}")

    async def _side_effects(
        self, kind: RevocationKind, target: str, reason: str, now: dt.datetime
    ) -> None:
        if kind is RevocationKind.TASK:
            task = await self._store.get_task(target)
            if task is not None and task.ended_at is None:
                await self._store.end_task(
                    target,
                    now,
                    f"revoked: {reason}",
                    audit=[
                        AuditEvent(
                            "task.ended",
                            now,
                            actor="authority",
                            subject=target,
                            task_id=target,
                            details={"reason": f"revoked: {reason}"},
                        )
                    ],
                )
        elif kind is RevocationKind.KEY:
            await self._ca.revoke_key(target)

    async def revoke_task_tokens(self, task_id: str, reason: str, *, actor: str) -> None:
        """EndTask's revocation of a task already marked ended in the store."""
        now = self._clock.now()
        revocation = Revocation(
            RevocationKind.TASK,
            task_id,
            reason.strip()[:500] or "task ended",
            now,
            now + HARD_MAX_TTL + dt.timedelta(minutes=1),
            actor,
        )
        stored = await self._store.revoke(
            [revocation],
            audit=[
                AuditEvent(
                    "revocation.created",
                    now,
                    actor=actor,
                    subject=task_id,
                    task_id=task_id,
                    details={"kind": "task", "reason": revocation.reason, "cause": "end_task"},
                )
            ],
        )
        for r in stored:
            self.revoked.add(r)
        await self.catch_up()

    # --- Security Event Tokens (RFC 8417), CAEP event types ------------------------------

    def security_event_token(self, revocation: Revocation) -> str:
        """The revocation as a signed SET, for bridging to Shared Signals receivers."""
        if revocation.kind in (RevocationKind.JTI, RevocationKind.TASK, RevocationKind.SUBJECT):
            event_type = SESSION_REVOKED
        else:
            event_type = CREDENTIAL_CHANGE
        if revocation.kind is RevocationKind.SUBJECT:
            subject = {"format": "uri", "uri": revocation.target}
        else:
            subject = {"format": "opaque", "id": f"{revocation.kind}:{revocation.target}"}
        event: dict[str, object] = {
            "subject": subject,
            "event_timestamp": int(revocation.revoked_at.timestamp()),
            "initiating_entity": "admin" if revocation.actor == "operator" else "policy",
            "reason_admin": {"en": revocation.reason},
        }
        if event_type == CREDENTIAL_CHANGE:
            event.update(
                credential_type="x509" if revocation.kind is RevocationKind.KEY else "bearer",
                change_type="revoke",
            )
        claims = {
            "iss": self._ca.issuer,
            "iat": int(self._clock.now().timestamp()),
            # Stable per revocation: the same event signed again (a replay, the Revoke reply)
            # is recognisable as a duplicate by a receiver (RFC 8417 section 2.2).
            "jti": _set_id(self._ca.issuer, revocation),
            "txn": str(revocation.seq),
            "events": {event_type: event},
        }
        key, kid, alg = self._ca.task_signing_key()
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ": SET_TYP})


def _set_id(issuer: str, revocation: Revocation) -> str:
    fields = (issuer, revocation.seq, revocation.kind, revocation.target, revocation.revoked_at)
    material = "|".join(str(f) for f in fields)
    digest = hashlib.sha256(material.encode()).digest()[:16]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


__all__ = [
    "PREEMPTIBLE",
    "EventQueue",
    "RevocationHub",
    "RevocationService",
    "RevokedSet",
    "Subscription",
]
