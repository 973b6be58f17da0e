"""Growing the audit with refused requests, and breaking its export with a huge record.

Issue 11, finding 2: one Attest on the local socket with a 5,000,000-character attestor name
wrote that name into ``attest.refused`` as its actor, and the record, larger than a gRPC message,
broke ``audit verify``/``export``/``archive`` for good; from the network, 1,200 refused calls of
255 KB grew the database by 310 MB. Now a refusal's untrusted fields are cut (first N characters,
a marker, the SHA-256), refusals are budgeted per caller and window (then counted into one summary
record), and a record larger than a message (left by an older version) is exported in fragments.
Each test measures the audit table through a read-only SQLite connection."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority.audit import AuditEvent, AuditRecord, digest
from authority.audit_cli import export_to, read_export, verify_file, verify_live
from authority.client import make_csr, new_key
from authority.clock import FakeClock
from authority.config import Config, Limits
from authority.store import Store
from authority.store.memory import MemoryStore
from authority.store.sqlite import SqliteStore
from tests.helpers import running_authority
from tests.helpers import test_config as config_for
from tests.security._attack import (
    assert_status,
    attest_raw,
    db_path,
    params,
    rpc_error,
    running_with_clock,
)

LIMITS = Limits()
# What one attest.refused record may take at most, all its text fields counted in bytes: the
# attestor name and the message cut to max_refusal_field_chars plus a marker with a SHA-256,
# the reason, the caller's pid/uid/gid or address, the kind, and the two hashes.
MAX_REFUSAL_RECORD_BYTES = 2048
MIB = 1024 * 1024


def audit_usage(data_dir: Path) -> tuple[int, int]:
    """(rows, bytes of their text) of the audit table, read through a read-only connection."""
    uri = f"file:{db_path(data_dir)}?mode=ro"
    text = (
        "length(CAST(kind AS BLOB)) + length(CAST(actor AS BLOB))"
        " + length(CAST(subject AS BLOB)) + length(CAST(task_id AS BLOB))"
        " + length(CAST(decision_id AS BLOB)) + length(CAST(details AS BLOB))"
        " + length(prev_hash) + length(hash)"
    )
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        rows, size = db.execute(f"SELECT COUNT(*), COALESCE(SUM({text}), 0) FROM audit").fetchone()  # noqa: S608
    return int(rows), int(size)


def audit_rows_after(data_dir: Path, seq: int) -> list[tuple[str, str, dict[str, object]]]:
    """(kind, actor, details) of the records after ``seq``, in order."""
    uri = f"file:{db_path(data_dir)}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        rows = db.execute(
            "SELECT kind, actor, details FROM audit WHERE seq > ? ORDER BY seq", [seq]
        ).fetchall()
    return [(kind, actor, json.loads(details)) for kind, actor, details in rows]


def head_seq(data_dir: Path) -> int:
    uri = f"file:{db_path(data_dir)}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM audit").fetchone()
    return int(seq)


def local_config(tmp_path: Path, socket_dir: Path, **limits: object) -> Config:
    """A test config whose attest socket has a short path (sun_path holds 107 bytes)."""
    config = config_for(tmp_path / "data", socket_dir, **limits)
    return dataclasses.replace(config, local_socket=socket_dir / "attest.sock")


@contextlib.asynccontextmanager
async def local_stub(socket: Path, max_bytes: int) -> AsyncIterator[pb_grpc.WorkloadAsyncStub]:
    """A raw Workload stub on the local attest socket that sends messages up to ``max_bytes``."""
    channel = grpc.aio.insecure_channel(
        f"unix:{socket}", options=[("grpc.max_send_message_length", max_bytes)]
    )
    try:
        yield pb_grpc.WorkloadStub(channel)
    finally:
        await channel.close(None)


# --- one huge attestor name --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name_chars", "message_limit"),
    [
        (200_000, LIMITS.max_message_bytes),  # just under what the socket accepts by default
        (5_000_000, 8 * MIB),  # the finding's 5 MB name, the message cap lifted to let it in
    ],
    ids=["200KB-default-cap", "5MB-cap-lifted"],
)
async def test_huge_attestor_name_on_the_local_socket_leaves_one_bounded_record(
    tmp_path: Path, socket_dir: Path, name_chars: int, message_limit: int
) -> None:
    config = local_config(tmp_path, socket_dir, max_message_bytes=message_limit)
    name = "a" * name_chars
    async with (
        running_authority(config) as running,
        local_stub(config.local_socket_path, message_limit) as stub,
    ):
        seq = head_seq(running.data_dir)
        rows, size = audit_usage(running.data_dir)

        err = await rpc_error(attest_raw(stub, [params(b"x", make_csr(new_key()), attestor=name)]))

        assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "TOO_LONG")
        assert len(err.details() or "") < 200  # the answer names the length, not the name
        rows_after, size_after = audit_usage(running.data_dir)
        assert rows_after == rows + 1
        assert size_after - size <= MAX_REFUSAL_RECORD_BYTES
        [(kind, actor, details)] = audit_rows_after(running.data_dir, seq)
        assert kind == "attest.refused"
        # Still says what was refused: the name's start, its length and its SHA-256.
        assert actor.startswith("a" * LIMITS.max_refusal_field_chars + "...[truncated")
        assert f"{name_chars} chars" in actor
        assert digest(name) in actor
        assert details["reason"] == "TOO_LONG"
        assert isinstance(details["uid"], int)  # the kernel's word on who called


# --- a flood of refusals from the network ------------------------------------------------------

FLOOD = 1000
FLOOD_NAME_CHARS = 64 * 1024  # each call also carries a long attestor name
CONCURRENCY = 50


async def test_a_thousand_refused_attests_grow_the_audit_by_a_stated_bound(
    tmp_path: Path, socket_dir: Path
) -> None:
    """1,000 refused Attests from one network address, with 64 KiB attestor names, in one
    budget window: exactly ``refusals_per_caller`` (10) attest.refused records, each at most
    2 KiB. When the window has passed, the next refusal first writes one summary counting the
    990 left out: 12 records and at most 12 x 2 KiB in all."""
    config = config_for(tmp_path / "data", socket_dir)
    clock = FakeClock(dt.datetime.now(dt.UTC))
    async with running_with_clock(config, clock) as running:
        stub = (await running.workload()).tls_stub
        seq = head_seq(running.data_dir)
        rows, size = audit_usage(running.data_dir)
        csr = make_csr(new_key())

        async def refused(index: int) -> None:
            name = f"{index:06d}" + "n" * FLOOD_NAME_CHARS
            err = await rpc_error(attest_raw(stub, [params(b"x", csr, attestor=name)]))
            assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "TOO_LONG")

        for start in range(0, FLOOD, CONCURRENCY):
            await asyncio.gather(*(refused(i) for i in range(start, start + CONCURRENCY)))

        budget = LIMITS.refusals_per_caller
        rows_after, size_after = audit_usage(running.data_dir)
        assert rows_after - rows == budget
        assert size_after - size <= budget * MAX_REFUSAL_RECORD_BYTES

        clock.advance(LIMITS.refusal_window)
        await refused(FLOOD)

        rows_after, size_after = audit_usage(running.data_dir)
        assert rows_after - rows == budget + 2
        assert size_after - size <= (budget + 2) * MAX_REFUSAL_RECORD_BYTES
        records = audit_rows_after(running.data_dir, seq)
        kinds = [kind for kind, _, _ in records]
        assert kinds == ["attest.refused"] * budget + [
            "attest.refusals_suppressed",
            "attest.refused",
        ]
        summary = records[budget][2]
        assert summary["suppressed"] == FLOOD - budget
        assert summary["callers"] == {"ipv4:127.0.0.1": FLOOD - budget}


# --- a record larger than a gRPC message, left by an older version -----------------------------

HUGE_ACTOR_CHARS = 5_000_000
HUGE_DETAILS_CHARS = 1_000_000


async def _append_huge_record(data_dir: Path) -> AuditRecord:
    """What an older version wrote for a refused 5 MB attestor name: the name as the actor."""
    store = await SqliteStore.open(db_path(data_dir))
    try:
        event = AuditEvent(
            "attest.refused",
            dt.datetime.now(dt.UTC),
            actor="b" * HUGE_ACTOR_CHARS,
            details={"reason": "UNKNOWN_ATTESTOR", "message": "m" * HUGE_DETAILS_CHARS},
        )
        [record] = await store.append_audit([event])
    finally:
        await store.close()
    return record


async def test_audit_verify_export_and_archive_survive_a_record_over_4_mib(
    tmp_path: Path, socket_dir: Path
) -> None:
    config = config_for(tmp_path / "data", socket_dir)
    async with running_authority(config):
        pass  # the server creates and migrates its database, then stops
    huge = await _append_huge_record(config.data_dir)
    assert huge.size > 4 * MIB
    async with running_authority(config) as running:
        admin = running.admin()
        await admin.stub.CreateJoinToken(
            pb.CreateJoinTokenRequest(spiffe_id="spiffe://example.org/after")
        )

        verified = await verify_live(admin)
        assert verified.ok, verified.problem

        exported = tmp_path / "audit.jsonl"
        with exported.open("w") as out:
            count = await export_to(admin, out)
        assert count == verified.records
        _, records, _ = read_export(exported)
        [copy] = [r for r in records if r.seq == huge.seq]
        assert copy == huge
        assert verify_file(exported, None).ok

        # Archive: checkpoint at the huge record and prune through it; the rest still verifies.
        checkpoint = await admin.stub.CheckpointAudit(pb.CheckpointAuditRequest(seq=huge.seq))
        assert checkpoint.seq == huge.seq
        pruned = await admin.stub.PruneAudit(pb.PruneAuditRequest(through_seq=huge.seq))
        assert pruned.removed == huge.seq
        after = await verify_live(admin)
        assert after.ok, after.problem


# --- the store pages by bytes ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
async def test_an_export_page_stops_at_its_byte_budget(tmp_path: Path, backend: str) -> None:
    """Pages of 10,000 records of 255 KB took the server to 644 MB: a page now ends at
    ``max_bytes`` (with the record that reaches it) whatever its record limit."""
    store: Store = (
        await SqliteStore.open(tmp_path / "audit.db") if backend == "sqlite" else MemoryStore()
    )
    try:
        now = dt.datetime.now(dt.UTC)
        events = [
            AuditEvent("attest.refused", now, details={"pad": "p" * 255_000}) for _ in range(20)
        ]
        await store.append_audit(events)

        page = await store.audit_records(limit=10_000, max_bytes=MIB)

        assert len(page) == 5  # 4 x 255 KB < 1 MiB; the fifth reaches it
        assert sum(r.size for r in page[:-1]) < MIB <= sum(r.size for r in page)
        rest = await store.audit_records(after_seq=page[-1].seq, limit=10_000, max_bytes=MIB)
        assert rest[0].seq == page[-1].seq + 1
        huge = await store.audit_records(limit=1, max_bytes=1)
        assert len(huge) == 1  # a page is never empty while records remain
    finally:
        await store.close()


async def test_a_closed_window_of_suppressed_refusals_is_summarised_by_the_checkpoint_job(
    tmp_path: Path, socket_dir: Path
) -> None:
    """A flood that stops: nothing refused after it, yet its summary is written by the audit
    checkpoint job once the window has closed, not left waiting for the next refusal."""
    config = config_for(tmp_path / "data", socket_dir)
    clock = FakeClock(dt.datetime.now(dt.UTC))
    async with running_with_clock(config, clock) as running:
        stub = (await running.workload()).tls_stub
        seq = head_seq(running.data_dir)
        csr = make_csr(new_key())
        extra = 5
        for index in range(LIMITS.refusals_per_caller + extra):
            name = f"{index:06d}" + "n" * 100
            err = await rpc_error(attest_raw(stub, [params(b"x", csr, attestor=name)]))
            assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "TOO_LONG")
        await running.server._checkpoint_once()  # the window is still open: no summary yet
        kinds = [kind for kind, _, _ in audit_rows_after(running.data_dir, seq)]
        assert "attest.refusals_suppressed" not in kinds

        clock.advance(LIMITS.refusal_window)
        await running.server._checkpoint_once()  # what the audit-checkpoints job runs

        records = audit_rows_after(running.data_dir, seq)
        summaries = [
            details for kind, _, details in records if kind == "attest.refusals_suppressed"
        ]
        assert len(summaries) == 1
        assert summaries[0]["suppressed"] == extra
