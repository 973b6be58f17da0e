"""Revocation in the domain: the revoked set, planning and cascades, SETs, the hub and the feed.

Everything runs against the in-memory Store and KeyVault with a FakeClock; the feed is driven
directly (no gRPC), as a subscriber's stream would drive it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

import jwt
import pytest

from authority._pb import authority_v1_authority_pb2 as pb
from authority.api.revocations import SNAPSHOT_PAGE_BYTES, RevocationFeed
from authority.ca import CertificateAuthority
from authority.clock import FakeClock
from authority.config import CaConfig, Limits
from authority.errors import InvalidArgument, NotFound
from authority.ids import SpiffeId, TrustDomain
from authority.keyvault import MemoryKeyVault
from authority.models import (
    Identity,
    JoinToken,
    KeyKind,
    KeyState,
    RegistrationEntry,
    Revocation,
    RevocationKind,
    Selector,
    TaskTokenRecord,
)
from authority.relying import parse_task_jwks
from authority.revocation import (
    CREDENTIAL_CHANGE,
    SESSION_REVOKED,
    SET_TYP,
    EventQueue,
    RevocationHub,
    RevocationService,
    RevokedSet,
)
from authority.store.memory import MemoryStore
from authority.tokens import HARD_MAX_TTL, Intent, TaskToken
from authority.watch import RevocationSet

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)
HEARTBEAT = dt.timedelta(milliseconds=50)


@dataclass
class World:
    clock: FakeClock
    store: MemoryStore
    ca: CertificateAuthority
    service: RevocationService
    feed: RevocationFeed

    @property
    def hub(self) -> RevocationHub:
        return self.service.hub

    async def revoke_subjects(self, *names: str) -> list[Revocation]:
        stored: list[Revocation] = []
        for name in names:
            stored += await self.service.revoke(
                RevocationKind.SUBJECT,
                f"spiffe://example.org/{name}",
                "test",
                actor="operator",
                preemptive=True,  # these tests are about the feed, not the names
            )
        return stored


async def make_world(queue_size: int = 4096) -> World:
    clock = FakeClock(START)
    store = MemoryStore()
    limits = Limits()
    ca = CertificateAuthority(
        trust_domain=TrustDomain("example.org"),
        config=CaConfig(),
        limits=limits,
        clock=clock,
        store=store,
        vault=MemoryKeyVault(),
    )
    await ca.start()
    service = RevocationService(
        store=store, ca=ca, hub=RevocationHub(store, queue_size), clock=clock, limits=limits
    )
    await service.start()
    return World(clock, store, ca, service, RevocationFeed(service, store, clock, HEARTBEAT))


@pytest.fixture
async def world() -> World:
    return await make_world()


def token(**changes: object) -> TaskToken:
    fields: dict[str, object] = {
        "token": "x.y.z",
        "jti": "jti-1",
        "issuer": "spiffe://example.org",
        "subject": "spiffe://example.org/agent/a",
        "audience": "svc",
        "issued_at": START,
        "expires_at": START + 5 * MINUTE,
        "task_id": "task-1",
        "scopes": ("read",),
        "intent": Intent(action="read", resource="metrics/prod", purpose="p"),
        "cnf_x5t": "thumb",
        "actors": (),
        "decision_id": "d",
        "may_delegate": 0,
        "parent_jti": "",
        "key_id": "kid-1",
    }
    fields.update(changes)
    return TaskToken(**fields)  # type: ignore[arg-type]


def revocation(kind: RevocationKind, target: str, until: dt.datetime, seq: int = 0) -> Revocation:
    return Revocation(kind, target, "r", START, until, "operator", seq)


# --- RevokedSet -------------------------------------------------------------------------------


def test_revoked_set_forgets_at_expiry_and_keeps_the_longest() -> None:
    revoked = RevokedSet()
    revoked.add(revocation(RevocationKind.SUBJECT, "spiffe://example.org/a", START + MINUTE))
    assert revoked.has(RevocationKind.SUBJECT, "spiffe://example.org/a", START)
    assert not revoked.has(RevocationKind.SUBJECT, "spiffe://example.org/a", START + MINUTE)
    assert not revoked.has(RevocationKind.TASK, "spiffe://example.org/a", START)  # by kind

    revoked.add(revocation(RevocationKind.SUBJECT, "spiffe://example.org/a", START + 3 * MINUTE))
    revoked.add(revocation(RevocationKind.SUBJECT, "spiffe://example.org/a", START + MINUTE))
    assert revoked.has(RevocationKind.SUBJECT, "spiffe://example.org/a", START + 2 * MINUTE)


@pytest.mark.parametrize(
    ("kind", "target"),
    [
        (RevocationKind.JTI, "jti-1"),
        (RevocationKind.TASK, "task-1"),
        (RevocationKind.KEY, "kid-1"),
        (RevocationKind.SUBJECT, "spiffe://example.org/agent/a"),  # the principal
        (RevocationKind.SUBJECT, "spiffe://example.org/agent/b"),  # the current holder
        (RevocationKind.SUBJECT, "spiffe://example.org/agent/c"),  # an earlier actor
    ],
)
def test_a_token_is_revoked_by_any_of_what_it_carries(kind: RevocationKind, target: str) -> None:
    delegated = token(actors=("spiffe://example.org/agent/b", "spiffe://example.org/agent/c"))
    revoked = RevokedSet()
    assert not revoked.token_revoked(delegated, START)
    revoked.add(revocation(kind, target, START + MINUTE))
    assert revoked.token_revoked(delegated, START)
    assert not revoked.token_revoked(delegated, START + MINUTE)
    assert not revoked.token_revoked(
        token(jti="other", task_id="other", key_id="other", subject="spiffe://example.org/z"),
        START,
    )


async def test_revoke_is_stored_applied_and_published(world: World) -> None:
    sub = world.hub.subscribe()
    [stored] = await world.revoke_subjects("agent/a")
    assert stored.seq == 1
    # Kept until everything issued to the identity has expired (the longest SVID TTL).
    assert stored.expires_at == START + Limits().max_x509_ttl + MINUTE
    assert await world.store.revocations_since(0) == [stored]
    assert world.service.revoked.has(RevocationKind.SUBJECT, stored.target, START)
    assert sub.queue.get_nowait() == stored
    assert world.hub.head == 1
    # The audit chain records it, in the same transaction.
    records = [r for r in await world.store.audit_records() if r.kind == "revocation.created"]
    assert [r.subject for r in records] == [stored.target]


async def test_revoke_refuses_what_it_cannot_name(world: World) -> None:
    with pytest.raises(NotFound):
        await world.service.revoke(RevocationKind.JTI, "no-such-jti", "r", actor="operator")
    with pytest.raises(NotFound):
        await world.service.revoke(RevocationKind.TASK, "no-such-task", "r", actor="operator")
    with pytest.raises(NotFound):
        await world.service.revoke(RevocationKind.KEY, "no-such-key", "r", actor="operator")
    with pytest.raises(InvalidArgument):
        await world.service.revoke(RevocationKind.SUBJECT, "not a spiffe id", "r", actor="op")
    assert await world.store.revocations_since(0) == []


async def _revoked_records(world: World) -> list[dict[str, object]]:
    return [
        json.loads(r.details_json)
        for r in await world.store.audit_records()
        if r.kind == "revocation.created"
    ]


@pytest.mark.parametrize(
    ("kind", "target", "reason"),
    [
        (RevocationKind.SUBJECT, "spiffe://example.org/nobody", "SUBJECT_NOT_FOUND"),
        (RevocationKind.ENTRY, "no-such-entry", "ENTRY_NOT_FOUND"),
        (RevocationKind.ATTESTOR, "no-such-attestor", "ATTESTOR_NOT_FOUND"),
    ],
)
async def test_revoking_a_name_with_no_record_is_not_found(
    world: World, kind: RevocationKind, target: str, reason: str
) -> None:
    with pytest.raises(NotFound) as caught:
        await world.service.revoke(kind, target, "typo", actor="operator")
    assert caught.value.reason == reason
    assert "preemptive" in caught.value.message
    assert await world.store.revocations_since(0) == []
    assert await _revoked_records(world) == []
    assert not world.service.revoked.has(kind, target, START)


@pytest.mark.parametrize(
    ("kind", "target"),
    [
        (RevocationKind.SUBJECT, "spiffe://example.org/not-yet"),
        (RevocationKind.ENTRY, "entry-to-come"),
        (RevocationKind.ATTESTOR, "attestor-to-come"),
    ],
)
async def test_a_preemptive_revocation_is_applied_and_recorded_as_such(
    world: World, kind: RevocationKind, target: str
) -> None:
    [stored] = await world.service.revoke(kind, target, "ahead", actor="operator", preemptive=True)
    assert (stored.kind, stored.target) == (kind, target)
    assert world.service.revoked.has(kind, target, START)
    [details] = await _revoked_records(world)
    assert details["preemptive"] is True


async def test_names_on_record_are_revoked_without_preemptive(world: World) -> None:
    """A SPIFFE ID is on record through an entry, an agent named as an entry's parent, a join
    token, an identity; an attestor instance through its registration (join_token is built
    in); an entry through itself. None of these revocations is marked preemptive."""
    entry = RegistrationEntry(
        id="e1",
        spiffe_id=SpiffeId.parse("spiffe://example.org/w/entry"),
        selectors=frozenset({Selector("unix", "uid:1000")}),
        x509_ttl=MINUTE,
        jwt_ttl=MINUTE,
        parent_id=SpiffeId.parse("spiffe://example.org/agent/parent"),
    )
    await world.store.create_entry(entry)
    await world.store.create_join_token(
        JoinToken("d" * 64, SpiffeId.parse("spiffe://example.org/w/token"), START + MINUTE, START)
    )
    identity = Identity(
        id="i1",
        spiffe_id=SpiffeId.parse("spiffe://example.org/w/identity"),
        entry_id=None,
        attestor="join_token",
        selectors=frozenset(),
        attested_at=START,
        x509_ttl=MINUTE,
        jwt_ttl=MINUTE,
    )
    await world.store.record_issuance(identity, [])
    targets = [
        (RevocationKind.SUBJECT, "spiffe://example.org/w/entry"),
        (RevocationKind.SUBJECT, "spiffe://example.org/agent/parent"),
        (RevocationKind.SUBJECT, "spiffe://example.org/w/token"),
        (RevocationKind.SUBJECT, "spiffe://example.org/w/identity"),
        (RevocationKind.ATTESTOR, "join_token"),
        (RevocationKind.ENTRY, "e1"),
    ]
    for kind, target in targets:
        await world.service.revoke(kind, target, "on record", actor="operator")
        assert world.service.revoked.has(kind, target, START)
    assert not any("preemptive" in d for d in await _revoked_records(world))


async def test_preemptive_does_not_apply_to_tokens_tasks_or_keys(world: World) -> None:
    for kind in (RevocationKind.JTI, RevocationKind.TASK, RevocationKind.KEY):
        with pytest.raises(InvalidArgument) as caught:
            await world.service.revoke(kind, "x", "r", actor="operator", preemptive=True)
        assert caught.value.reason == "NOT_PREEMPTIBLE"
    assert await world.store.revocations_since(0) == []


async def _record(world: World, jti: str, parent: str, expires: dt.datetime) -> None:
    await world.store.record_task_token(
        TaskTokenRecord(
            jti=jti,
            task_id="task-1",
            subject="spiffe://example.org/agent/a",
            holder="spiffe://example.org/agent/a",
            audience="svc",
            scope="read",
            resource="metrics/prod",
            parent_jti=parent,
            depth=0 if not parent else 1,
            issued_at=START,
            expires_at=expires,
            decision_id="d",
            cnf_x5t="t",
        )
    )


async def test_revoking_a_token_revokes_every_descendant(world: World) -> None:
    await _record(world, "root", "", START + 5 * MINUTE)
    await _record(world, "child", "root", START + 4 * MINUTE)
    await _record(world, "grandchild", "child", START + 3 * MINUTE)
    await _record(world, "unrelated", "", START + 5 * MINUTE)
    stored = await world.service.revoke(RevocationKind.JTI, "child", "leak", actor="operator")
    assert [(r.kind, r.target) for r in stored] == [
        (RevocationKind.JTI, "child"),
        (RevocationKind.JTI, "grandchild"),
    ]
    assert [r.seq for r in stored] == [1, 2]
    # Each kept until its own token expired (plus a minute).
    assert [r.expires_at for r in stored] == [START + 5 * MINUTE, START + 4 * MINUTE]
    assert world.service.revoked.has(RevocationKind.JTI, "grandchild", START)
    assert not world.service.revoked.has(RevocationKind.JTI, "root", START)


async def test_revoking_a_task_ends_it_and_lasts_past_any_token(world: World) -> None:
    await _record(world, "t1", "", START + 5 * MINUTE)
    [stored] = await world.service.revoke(RevocationKind.TASK, "task-1", "drift", actor="operator")
    assert stored.expires_at == START + HARD_MAX_TTL + MINUTE
    task = await world.store.get_task("task-1")
    assert task is not None
    assert task.ended_at == START
    assert task.end_reason == "revoked: drift"


async def test_revoking_a_key_covers_what_it_signed(world: World) -> None:
    jwt_key = next(k for k in world.ca.authorities() if k.kind is KeyKind.JWT)
    [stored] = await world.service.revoke(
        RevocationKind.KEY, jwt_key.key_id, "leaked", actor="operator"
    )
    assert stored.expires_at == jwt_key.not_after + MINUTE
    # The CA stops trusting it at once: gone from its keys, another active in its place.
    remaining = [k for k in world.ca.authorities() if k.kind is KeyKind.JWT]
    assert jwt_key.key_id not in {k.key_id for k in remaining}
    assert any(k.state is KeyState.ACTIVE for k in remaining)


# --- Security Event Tokens --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "target", "event_type"),
    [
        (RevocationKind.JTI, "jti-1", SESSION_REVOKED),
        (RevocationKind.TASK, "task-1", SESSION_REVOKED),
        (RevocationKind.SUBJECT, "spiffe://example.org/agent/a", SESSION_REVOKED),
        (RevocationKind.ENTRY, "entry-1", CREDENTIAL_CHANGE),
        (RevocationKind.ATTESTOR, "join_token", CREDENTIAL_CHANGE),
        (RevocationKind.KEY, "kid-1", CREDENTIAL_CHANGE),
    ],
)
async def test_security_event_token_per_kind(
    world: World, kind: RevocationKind, target: str, event_type: str
) -> None:
    stored = Revocation(kind, target, "why", START, START + MINUTE, "operator", seq=7)
    text = world.service.security_event_token(stored)
    header = jwt.get_unverified_header(text)
    assert header["typ"] == SET_TYP
    assert header["alg"] == "ES256"
    # Verifies with the task-token JWK Set, exactly what GetTaskKeys publishes.
    keys = parse_task_jwks(world.ca.task_jwks_json())
    claims = jwt.decode(
        text,
        keys[header["kid"]],
        algorithms=["ES256"],
        issuer="spiffe://example.org",
        options={"require": ["iss", "iat", "jti", "events"]},
    )
    assert claims["txn"] == "7"
    assert list(claims["events"]) == [event_type]
    event = claims["events"][event_type]
    assert event["event_timestamp"] == int(START.timestamp())
    assert event["reason_admin"] == {"en": "why"}
    assert event["initiating_entity"] == "admin"
    if kind is RevocationKind.SUBJECT:
        assert event["subject"] == {"format": "uri", "uri": target}
    else:
        assert event["subject"] == {"format": "opaque", "id": f"{kind}:{target}"}
    if event_type == CREDENTIAL_CHANGE:
        assert event["change_type"] == "revoke"
        assert event["credential_type"] == ("x509" if kind is RevocationKind.KEY else "bearer")
    # Another key does not verify it.
    other = await make_world()
    other_keys = parse_task_jwks(other.ca.task_jwks_json())
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(text, next(iter(other_keys.values())), algorithms=["ES256"])


async def test_security_event_token_is_the_same_event_when_signed_again(world: World) -> None:
    """A replay (or the Revoke reply and the feed) carries the same SET id: receivers dedupe."""
    stored = Revocation(RevocationKind.TASK, "t", "why", START, START + MINUTE, "policy", seq=3)
    first = jwt.decode(
        world.service.security_event_token(stored), options={"verify_signature": False}
    )
    world.clock.advance(MINUTE)
    again = jwt.decode(
        world.service.security_event_token(stored), options={"verify_signature": False}
    )
    assert first["jti"] == again["jti"]
    assert first["events"][SESSION_REVOKED]["initiating_entity"] == "policy"
    other = Revocation(RevocationKind.TASK, "t", "why", START, START + MINUTE, "policy", seq=4)
    third = jwt.decode(
        world.service.security_event_token(other), options={"verify_signature": False}
    )
    assert third["jti"] != first["jti"]


# --- the hub and the feed ----------------------------------------------------------------------


async def _collect(
    stream: AsyncIterator[pb.RevocationMessage], until_heartbeats: int = 1
) -> list[pb.RevocationMessage]:
    """Messages up to (and including) the n-th heartbeat, or the end of the stream."""
    out: list[pb.RevocationMessage] = []
    beats = 0
    async for message in stream:
        out.append(message)
        if message.WhichOneof("body") == "heartbeat":
            beats += 1
            if beats == until_heartbeats:
                break
    return out


async def settle(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.001)


async def close(stream: AsyncIterator[pb.RevocationMessage]) -> None:
    assert isinstance(stream, AsyncGenerator)
    await stream.aclose()


def _seqs(messages: list[pb.RevocationMessage]) -> list[int]:
    return [m.event.seq for m in messages if m.WhichOneof("body") == "event"]


async def test_feed_replays_from_since_then_heartbeats(world: World) -> None:
    await world.revoke_subjects("a", "b", "c")
    stream = world.feed.stream(1)
    try:
        messages = await _collect(stream)
    finally:
        await close(stream)
    assert [m.WhichOneof("body") for m in messages] == ["event", "event", "heartbeat"]
    assert _seqs(messages) == [2, 3]
    assert messages[-1].heartbeat.seq == 3
    assert messages[-1].heartbeat.interval_ms == 50
    assert world.hub.subscribers == 0  # unsubscribed in finally


async def test_feed_delivers_what_commits_during_the_replay_exactly_once(world: World) -> None:
    await world.revoke_subjects("a", "b")
    stream = world.feed.stream(0)
    try:
        first = await anext(stream)  # subscribed to the hub, replay started
        await world.revoke_subjects("c", "d")  # committed while the replay is under way
        messages = [first, *await _collect(stream, until_heartbeats=2)]
    finally:
        await close(stream)
    assert _seqs(messages) == [1, 2, 3, 4]


async def test_a_slow_subscriber_is_told_to_resync_and_others_get_everything() -> None:
    world = await make_world(queue_size=2)
    slow = world.feed.stream(0)
    normal = world.feed.stream(0)
    received: list[pb.RevocationMessage] = []

    async def read_normal() -> None:
        async for message in normal:
            received.append(message)

    try:
        assert (await anext(slow)).WhichOneof("body") == "heartbeat"  # subscribed, then silent
        reader = asyncio.create_task(read_normal())
        await settle(lambda: world.hub.subscribers == 2)
        # The normal subscriber reads as events come; the slow one reads nothing.
        for i in range(1, 11):
            await world.revoke_subjects(f"v{i}")
            await settle(lambda: len(_seqs(received)) == i)  # noqa: B023 - awaited here
        assert _seqs(received) == list(range(1, 11))
        assert "resync" not in [m.WhichOneof("body") for m in received]

        # The silent one overflowed its queue of 2: it is told to resync, and its stream ends.
        rest = [m async for m in slow]
        assert [m.WhichOneof("body") for m in rest] == ["resync"]
        assert "behind" in rest[0].resync.reason
        assert world.hub.subscribers == 1

        # Reconnecting from its last sequence number (0) replays everything.
        again = world.feed.stream(0)
        try:
            assert _seqs(await _collect(again)) == list(range(1, 11))
        finally:
            await close(again)

        # The normal subscriber kept going: live events still flow to it.
        await world.revoke_subjects("after")
        await settle(lambda: len(_seqs(received)) == 11)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
    finally:
        await close(slow)
        await close(normal)


async def test_a_subscriber_queue_is_bounded_and_woken_by_an_event() -> None:
    queue = EventQueue(2)
    first, second, third = (
        Revocation(
            RevocationKind.SUBJECT, f"spiffe://example.org/{n}", "r", START, START, "op", seq=n
        )
        for n in (1, 2, 3)
    )
    reader = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.wake()  # a heartbeat being due is not an item: get() keeps waiting
    await asyncio.sleep(0)
    assert not reader.done()
    queue.put_nowait(first)
    assert await reader == first
    queue.put_nowait(second)
    queue.put_nowait(third)
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait(first)
    assert [queue.get_nowait(), queue.get_nowait()] == [second, third]
    assert queue.empty()
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
    with pytest.raises(ValueError, match="at least one"):
        EventQueue(0)


async def test_a_quiet_stream_hears_a_heartbeat_about_once_an_interval(world: World) -> None:
    stream = world.feed.stream(0)
    try:
        assert (await anext(stream)).WhichOneof("body") == "heartbeat"  # after the replay
        started = time.monotonic()
        beats = await _collect(stream, until_heartbeats=3)
        elapsed = time.monotonic() - started
    finally:
        await close(stream)
    assert [m.WhichOneof("body") for m in beats] == ["heartbeat"] * 3
    # One clock ticks eight times an interval: a beat after 7/8 to 8/8 of an interval of silence.
    assert elapsed >= 3 * 7 / 8 * HEARTBEAT.total_seconds() - 0.005
    assert world.hub.subscribers == 0


async def test_a_busy_stream_gets_events_and_no_heartbeat_in_between() -> None:
    world = await make_world()
    interval = dt.timedelta(milliseconds=400)
    feed = RevocationFeed(world.service, world.store, world.clock, interval)
    stream = feed.stream(0)
    received: list[pb.RevocationMessage] = []

    async def read() -> None:
        async for message in stream:
            received.append(message)

    assert (await anext(stream)).WhichOneof("body") == "heartbeat"
    reader = asyncio.create_task(read())
    try:
        for i in range(1, 16):  # one every 20 ms for 0.3 s: never quiet for 7/8 of 400 ms
            await world.revoke_subjects(f"busy-{i}")
            await asyncio.sleep(0.02)
        await settle(lambda: len(_seqs(received)) == 15)
        assert [m.WhichOneof("body") for m in received] == ["event"] * 15
        # Quiet again: the heartbeat comes back, carrying the last sequence number.
        await settle(lambda: received[-1].WhichOneof("body") == "heartbeat", within=2.0)
        assert received[-1].heartbeat.seq == 15
    finally:
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await close(stream)
    assert world.hub.subscribers == 0


async def test_a_subscriber_behind_the_pruned_window_gets_a_snapshot(world: World) -> None:
    await world.revoke_subjects("early-1", "early-2")
    world.clock.advance(dt.timedelta(days=2))
    await world.revoke_subjects("late-1", "late-2")
    assert await world.store.prune(world.clock.now()) == 2
    assert await world.store.revocation_bounds() == (3, 4)

    stream = world.feed.stream(1)  # had seen seq 1; 2 is gone
    try:
        messages = await _collect(stream)
    finally:
        await close(stream)
    assert [m.WhichOneof("body") for m in messages] == ["snapshot", "heartbeat"]
    snapshot = messages[0].snapshot
    assert snapshot.seq == 4
    assert [e.target for e in snapshot.revocations] == [
        "spiffe://example.org/late-1",
        "spiffe://example.org/late-2",
    ]

    # A subscriber that is up to date (or only just behind) gets a replay, not a snapshot.
    stream = world.feed.stream(2)
    try:
        assert [m.WhichOneof("body") for m in await _collect(stream)] == [
            "event",
            "event",
            "heartbeat",
        ]
    finally:
        await close(stream)


async def test_a_large_snapshot_is_paged_under_the_message_limit(world: World) -> None:
    """Thousands of active revocations do not make one message over gRPC's 4 MiB limit, and a
    subscriber cut off midway resumes without losing an active revocation."""
    await world.revoke_subjects("gone")
    world.clock.advance(dt.timedelta(days=2))
    long_path = "x" * 1500
    count = 1200
    for i in range(count):
        await world.service.revoke(
            RevocationKind.SUBJECT,
            f"spiffe://example.org/{long_path}/{i}",
            "r" * 400,
            actor="op",
            preemptive=True,
        )
    await world.store.prune(world.clock.now())
    active = {r.target for r in await world.store.active_revocations(world.clock.now())}
    assert len(active) == count

    stream = world.feed.stream(0)
    try:
        messages = await _collect(stream)
    finally:
        await close(stream)
    assert messages[0].WhichOneof("body") == "snapshot"
    assert all(m.ByteSize() < 4 * 1024 * 1024 for m in messages)
    assert messages[0].ByteSize() <= SNAPSHOT_PAGE_BYTES + 16 * 1024
    assert len(messages[0].snapshot.revocations) < count  # it was paged
    view = RevocationSet()
    for message in messages:
        if message.WhichOneof("body") == "snapshot":
            view.replace(message.snapshot)
        elif message.WhichOneof("body") == "event":
            view.apply(message.event)
    assert set(view.targets["subject"]) == active
    assert view.seq == count + 1

    # Cut off right after the first page: resuming from what it applied loses nothing.
    cut = RevocationSet()
    cut.replace(messages[0].snapshot)
    stream = world.feed.stream(cut.seq)
    try:
        for message in await _collect(stream):
            assert message.WhichOneof("body") in ("event", "heartbeat")
            if message.WhichOneof("body") == "event":
                cut.apply(message.event)
    finally:
        await close(stream)
    assert set(cut.targets["subject"]) == active


async def test_a_subscriber_ahead_of_the_store_gets_a_snapshot(world: World) -> None:
    """A store restored from a backup numbers new revocations again from its own head: a
    subscriber that saw higher numbers must not have them filtered out as already seen."""
    await world.revoke_subjects("before-restore-1", "before-restore-2")
    view = RevocationSet()
    view.seq = 50  # what the subscriber saw of the store before it was restored
    stream = world.feed.stream(view.seq)
    try:
        first = await anext(stream)
        assert first.WhichOneof("body") == "snapshot"
        view.replace(first.snapshot)
        assert view.seq == 2
        assert (await anext(stream)).WhichOneof("body") == "heartbeat"
        await world.revoke_subjects("after-restore")  # seq 3, below what it saw before
        async with asyncio.timeout(5):
            while True:
                message = await anext(stream)
                if message.WhichOneof("body") == "event":
                    view.apply(message.event)
                    break
    finally:
        await close(stream)
    assert view.has("subject", "spiffe://example.org/after-restore", 0)
    assert view.seq == 3
