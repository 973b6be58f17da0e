"""The rules hold across replicas: several PostgresStores (one per replica) on one database,
racing each other the way replicas' writer connections do."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator

import pytest

from authority.audit import AuditEvent, verify_chain
from authority.errors import AuthorityError, FailedPrecondition, Unauthenticated
from authority.models import (
    Approval,
    ApprovalState,
    Revocation,
    RevocationKind,
    TaskTokenRecord,
)
from authority.store import sql
from authority.store.postgres import SCHEMA_VERSION, PostgresStore, migrate, redact
from tests.unit.store.test_store import NOW, make_entry, make_token

HOUR = dt.timedelta(hours=1)


@pytest.fixture
async def replicas(pg_url: str) -> AsyncIterator[list[PostgresStore]]:
    stores = await asyncio.gather(*(PostgresStore.open(pg_url, f"r{i}") for i in range(3)))
    try:
        yield list(stores)
    finally:
        for store in stores:
            await store.close()


async def test_replicas_migrating_together_apply_each_migration_once(pg_url: str) -> None:
    versions = await asyncio.gather(
        *(asyncio.to_thread(migrate, pg_url, f"r{i}") for i in range(6))
    )
    assert sorted(versions) == [0] + [SCHEMA_VERSION] * 5


async def test_a_join_token_is_used_once_across_replicas(replicas: list[PostgresStore]) -> None:
    token = make_token("race")
    await replicas[0].create_join_token(token)

    async def consume(i: int) -> str:
        try:
            await replicas[i % 3].consume_join_token(token.token_id, NOW)
        except Unauthenticated as exc:
            return exc.reason
        return "ok"

    outcomes = await asyncio.gather(*(consume(i) for i in range(50)))
    assert outcomes.count("ok") == 1
    assert set(outcomes) == {"ok", "JOIN_TOKEN_USED"}


def _approval(approval_id: str) -> Approval:
    return Approval(
        id=approval_id,
        principal="spiffe://example.org/agent",
        task_id="task-1",
        audience="spiffe://example.org/db",
        intent_json="{}",
        intent_fingerprint="f" * 64,
        decision_id="d-1",
        requested_at=NOW,
        expires_at=NOW + HOUR,
    )


def _token(jti: str, task_id: str = "task-1") -> TaskTokenRecord:
    return TaskTokenRecord(
        jti=jti,
        task_id=task_id,
        subject="spiffe://example.org/agent",
        holder="spiffe://example.org/agent",
        audience="spiffe://example.org/db",
        scope="read",
        resource="db/orders",
        parent_jti="",
        depth=0,
        issued_at=NOW,
        expires_at=NOW + HOUR,
        decision_id="d-1",
        cnf_x5t="x",
    )


async def test_an_approval_asked_on_one_is_granted_on_another_and_used_once(
    replicas: list[PostgresStore],
) -> None:
    a, b, c = replicas
    await a.create_approval(_approval("ap-1"))
    granted = dataclasses.replace(
        _approval("ap-1"),
        state=ApprovalState.APPROVED,
        decided_at=NOW,
        decided_by="operator",
        grant_expires_at=NOW + HOUR,
    )
    await b.decide_approval(granted, NOW)
    with pytest.raises(FailedPrecondition) as info:
        await c.decide_approval(granted, NOW)
    assert info.value.reason == "APPROVAL_DECIDED"

    async def collect(i: int) -> str:
        try:
            await replicas[i % 3].record_task_token(_token(f"jti-{i}"), consume_approval="ap-1")
        except AuthorityError as exc:
            return exc.reason
        return "ok"

    outcomes = await asyncio.gather(*(collect(i) for i in range(30)))
    assert outcomes.count("ok") == 1
    assert set(outcomes) == {"ok", "APPROVAL_USED"}
    stored = await c.get_approval("ap-1")
    assert stored is not None
    assert stored.state is ApprovalState.USED


async def test_a_task_ended_on_one_replica_takes_no_token_on_another(
    replicas: list[PostgresStore],
) -> None:
    a, b, _ = replicas
    await a.record_task_token(_token("t-1"))
    results = await asyncio.gather(
        b.end_task("task-1", NOW, "done"),
        *(a.record_task_token(_token(f"t-{i}")) for i in range(2, 30)),
        return_exceptions=True,
    )
    ended = results[0]
    assert isinstance(ended, list)
    # Every token the task took before it ended is in the end's list; none after it.
    accepted = {f"t-{i}" for i, r in zip(range(2, 30), results[1:], strict=True) if r is None}
    assert accepted | {"t-1"} == set(ended)
    for r in results[1:]:
        assert r is None or (isinstance(r, FailedPrecondition) and r.reason == "TASK_ENDED")


async def test_revocation_numbers_are_in_commit_order_across_replicas(
    replicas: list[PostgresStore],
) -> None:
    seen: list[int] = []
    done = asyncio.Event()

    async def follow() -> None:
        # A follower reading by sequence while three replicas commit: it must never see a
        # number before a smaller one that commits later (that one would be missed).
        head = 0
        while not done.is_set() or head < 150:
            for r in await replicas[2].revocations_since(head):
                assert r.seq == head + 1, f"after {head} came {r.seq}"
                head = r.seq
                seen.append(r.seq)
            await asyncio.sleep(0)

    async def revoke(store: PostgresStore, tag: str) -> None:
        for i in range(50):
            await store.revoke(
                [Revocation(RevocationKind.JTI, f"{tag}-{i}", "test", NOW, NOW + HOUR, actor="op")]
            )

    follower = asyncio.create_task(follow())
    await asyncio.gather(*(revoke(s, f"r{i}") for i, s in enumerate(replicas)))
    done.set()
    await asyncio.wait_for(follower, 30)
    assert seen == list(range(1, 151))
    assert await replicas[1].revocation_bounds() == (1, 150)


async def test_the_audit_chain_of_all_replicas_verifies(replicas: list[PostgresStore]) -> None:
    async def write(store: PostgresStore, tag: str) -> None:
        for i in range(40):
            event = AuditEvent("test.written", NOW, actor=tag, details={"i": i})
            await store.append_audit([event])

    await asyncio.gather(*(write(s, s.replica) for s in replicas))
    records = await replicas[0].audit_records(limit=1000)
    assert len(records) == 120
    assert verify_chain(records).ok
    assert {r.actor for r in records} == {"r0", "r1", "r2"}


async def test_a_change_on_one_replica_is_announced_on_the_others(
    replicas: list[PostgresStore],
) -> None:
    heard: asyncio.Queue[set[str]] = asyncio.Queue()
    replicas[2].add_listener(heard.put_nowait)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await replicas[0].create_entry(make_entry())
    topics = await asyncio.wait_for(heard.get(), 2)
    while sql.ENTRIES not in topics:  # the periodic revocations sweep may come first
        topics = await asyncio.wait_for(heard.get(), 2)
    assert loop.time() - started < 1.0


def test_passwords_are_redacted() -> None:
    assert redact("postgresql://app:s3cret@db:5432/authority") == (
        "postgresql://app:***@db:5432/authority"
    )
    assert "s3cret" not in redact("postgresql://app:s3cret@db/authority?sslmode=require")
    assert redact("postgresql://db/authority") == "postgresql://db/authority"
