"""``authority audit``: verify, trace, export, tail, checkpoint and archive the audit chain."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, TextIO

import click

from authority._pb import authority_v1_authority_pb2 as pb
from authority.api.convert import AuditRecordAssembler, checkpoint_from_pb
from authority.audit import (
    AuditRecord,
    Checkpoint,
    Verification,
    task_records,
    trace_surroundings,
    verify_chain,
)
from authority.bundle import parse_jwks
from authority.client import AdminClient
from authority.config import parse_duration


def record_line(record: AuditRecord) -> str:
    parts = [
        f"{record.seq:>7}",
        record.time.isoformat(timespec="milliseconds"),
        f"{record.kind:24}",
    ]
    for label, value in (
        ("actor", record.actor),
        ("subject", record.subject),
        ("task", record.task_id),
        ("decision", record.decision_id),
    ):
        if value:
            parts.append(f"{label}={value}")
    if record.details_json != "{}":
        parts.append(record.details_json)
    return " ".join(parts)


async def stream_records(
    client: AdminClient,
    *,
    after_seq: int = 0,
    task_ids: Iterable[str] = (),
    follow: bool = False,
    since_time_us: int = 0,
) -> AsyncIterator[AuditRecord]:
    request = pb.ExportAuditRequest(
        after_seq=after_seq, task_ids=list(task_ids), follow=follow, since_time_us=since_time_us
    )
    assembler = AuditRecordAssembler()  # a record too large for one message comes in parts
    try:
        async for message in client.stub.ExportAudit(request):
            record = assembler.add(message)
            if record is not None:
                yield record
        assembler.finish()
    except ValueError as exc:
        raise click.ClickException(f"the audit export is malformed: {exc}") from None


async def verify_live(client: AdminClient) -> Verification:
    info = await client.stub.GetAuditInfo(pb.GetAuditInfoRequest())
    records = [r async for r in stream_records(client, after_seq=info.anchor_seq - 1)]
    return verify_chain(
        records,
        [checkpoint_from_pb(c) for c in info.checkpoints],
        parse_jwks(info.jwks_json),
        start_seq=info.anchor_seq,
        start_prev_hash=info.anchor_prev_hash,
    )


def read_export(path: Path) -> tuple[dict[str, Any], list[AuditRecord], list[Checkpoint]]:
    header: dict[str, Any] = {}
    records: list[AuditRecord] = []
    checkpoints: list[Checkpoint] = []
    with path.open() as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                kind = doc.pop("type")
                if kind == "header":
                    header = doc
                elif kind == "record":
                    records.append(AuditRecord.from_json(doc))
                elif kind == "checkpoint":
                    checkpoints.append(Checkpoint(int(doc["seq"]), doc["hash"], doc["jws"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise click.ClickException(
                    f"{path}:{number}: not an audit export line ({exc})"
                ) from None
    return header, records, checkpoints


def verify_file(path: Path, jwks: bytes | None) -> Verification:
    header, records, checkpoints = read_export(path)
    keys_json = jwks if jwks is not None else json.dumps(header.get("jwks", {"keys": []})).encode()
    return verify_chain(
        records,
        checkpoints,
        parse_jwks(keys_json),
        start_seq=int(header.get("anchor_seq", 1)),
        start_prev_hash=str(header.get("anchor_prev_hash", "0" * 64)),
    )


def report(result: Verification) -> int:
    if result.ok:
        click.echo(
            f"ok: {result.records} records, {result.checkpoints} signed checkpoints, "
            f"head {result.head_hash[:16]}"
        )
        return 0
    click.echo(f"BROKEN at record {result.first_bad_seq}: {result.problem}", err=True)
    return 1


async def export_to(
    client: AdminClient, out: TextIO, *, since_time_us: int = 0, through_seq: int | None = None
) -> int:
    info = await client.stub.GetAuditInfo(pb.GetAuditInfoRequest())
    header = {
        "type": "header",
        "format": "agent-authority-audit/1",
        "anchor_seq": info.anchor_seq,
        "anchor_prev_hash": info.anchor_prev_hash,
        "jwks": json.loads(info.jwks_json),
        "exported_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    out.write(json.dumps(header) + "\n")
    count = 0
    last = info.anchor_seq - 1
    async for record in stream_records(
        client, after_seq=info.anchor_seq - 1, since_time_us=since_time_us
    ):
        if through_seq is not None and record.seq > through_seq:
            break
        out.write(json.dumps({"type": "record", **record.as_json()}) + "\n")
        count += 1
        last = record.seq
    fresh = await client.stub.GetAuditInfo(pb.GetAuditInfoRequest())
    for checkpoint in fresh.checkpoints:
        # Only checkpoints over what was exported: one signed after the last record was read
        # would make the export look truncated.
        if checkpoint.seq <= last:
            out.write(
                json.dumps(
                    {
                        "type": "checkpoint",
                        "seq": checkpoint.seq,
                        "hash": checkpoint.hash,
                        "jws": checkpoint.jws,
                    }
                )
                + "\n"
            )
    return count


async def trace(client: AdminClient, task_id: str) -> list[AuditRecord]:
    """The task's records and those of every task delegated from it, with the records of its
    surroundings (``audit.trace_surroundings``), in chain order."""
    found = await task_records(task_id, lambda batch: stream_records(client, task_ids=batch))
    belongs = trace_surroundings(found)
    if belongs is not None:
        async for record in stream_records(client):
            if belongs(record):
                found[record.seq] = record
    return [found[seq] for seq in sorted(found)]


def parse_since(text: str) -> int:
    """An ISO time, or a duration meaning that long ago; returns Unix microseconds."""
    try:
        when = dt.datetime.fromisoformat(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
    except ValueError:
        when = dt.datetime.now(dt.UTC) - parse_duration(text)
    return int(when.timestamp() * 1_000_000)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "export_to",
    "fsync_file",
    "parse_since",
    "read_export",
    "record_line",
    "report",
    "stream_records",
    "trace",
    "verify_file",
    "verify_live",
]
