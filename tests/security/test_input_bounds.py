"""Hostile numbers, documents and strings in requests, one test each: every one is refused with
INVALID_ARGUMENT and a stable reason before it is parsed or stored (int64 TTLs near 2^63 used to
end in INTERNAL from an OverflowError, JSON nested 1,000 deep in INTERNAL from a RecursionError,
ExportAudit's failures in UNKNOWN), and the audit does not grow."""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable
from pathlib import Path
from typing import TypeAlias

import grpc
import pytest

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority.config import Limits
from tests.helpers import Running
from tests.security._attack import AGENT, assert_status, count_rows, rpc_error

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1
DEEP_JSON = "[" * 1000 + "]" * 1000
DEEP_OBJECT = '{"a":' * 1000 + "1" + "}" * 1000
LONG_REASON = "r" * (Limits().max_reason_chars + 1)

AdminCall: TypeAlias = "Callable[[pb_grpc.AdminAsyncStub], Awaitable[object]]"
WorkloadCall: TypeAlias = "Callable[[pb_grpc.WorkloadAsyncStub], Awaitable[object]]"


def audit_rows(running: Running) -> int:
    return count_rows(running.data_dir, "audit")


async def caller_stub(running: Running, folder: Path) -> pb_grpc.WorkloadAsyncStub:
    """The mutual-TLS stub of an attested workload (a caller with an SVID)."""
    client = await running.attested(AGENT, folder)
    return await client.mtls_stub()


# --- int64 seconds near the ends of the range: INVALID_ARGUMENT OUT_OF_RANGE ------------------

SECONDS = [INT64_MAX, INT64_MIN, -1]

WORKLOAD_TTLS: dict[str, Callable[[int], WorkloadCall]] = {
    "FetchJWTSVID": lambda v: (
        lambda s: s.FetchJWTSVID(pb.FetchJWTSVIDRequest(audience=["svc"], ttl_seconds=v))
    ),
    "Exchange": lambda v: (
        lambda s: s.Exchange(
            pb.ExchangeRequest(
                intent=pb.Intent(action="read", resource="metrics/prod", purpose="report"),
                audience="metrics-api",
                ttl_seconds=v,
            )
        )
    ),
    "Delegate": lambda v: (
        lambda s: s.Delegate(pb.DelegateRequest(parent_token="not-a-token", ttl_seconds=v))
    ),
}

ADMIN_SECONDS: dict[str, Callable[[int], AdminCall]] = {
    "CreateJoinToken": lambda v: (
        lambda a: a.CreateJoinToken(pb.CreateJoinTokenRequest(spiffe_id=AGENT, ttl_seconds=v))
    ),
    "CreateEntry.x509_ttl_seconds": lambda v: (
        lambda a: a.CreateEntry(
            pb.CreateEntryRequest(
                spiffe_id=AGENT,
                selectors=[pb.Selector(type="join_token", value="k:v")],
                x509_ttl_seconds=v,
            )
        )
    ),
    "CreateEntry.jwt_ttl_seconds": lambda v: (
        lambda a: a.CreateEntry(
            pb.CreateEntryRequest(
                spiffe_id=AGENT,
                selectors=[pb.Selector(type="join_token", value="k:v")],
                jwt_ttl_seconds=v,
            )
        )
    ),
    "Approve.grant_seconds": lambda v: (
        lambda a: a.Approve(pb.ApproveRequest(id="no-such-approval", grant_seconds=v))
    ),
}


@pytest.mark.parametrize("value", SECONDS)
@pytest.mark.parametrize("rpc", sorted(WORKLOAD_TTLS))
async def test_workload_ttl_out_of_int64_range_is_invalid_argument(
    authority: Running, tmp_path: Path, rpc: str, value: int
) -> None:
    stub = await caller_stub(authority, tmp_path / "svid")
    before = audit_rows(authority)

    err = await rpc_error(WORKLOAD_TTLS[rpc](value)(stub))

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "OUT_OF_RANGE")
    assert audit_rows(authority) == before


@pytest.mark.parametrize("value", SECONDS)
@pytest.mark.parametrize("rpc", sorted(ADMIN_SECONDS))
async def test_operator_seconds_out_of_int64_range_are_invalid_argument(
    authority: Running, rpc: str, value: int
) -> None:
    before = audit_rows(authority)

    err = await rpc_error(ADMIN_SECONDS[rpc](value)(authority.admin().stub))

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "OUT_OF_RANGE")
    assert audit_rows(authority) == before


# --- sequence numbers past SQLite's int64: INVALID_ARGUMENT OUT_OF_RANGE ----------------------

SEQUENCES: dict[str, AdminCall] = {
    "CheckpointAudit.seq": lambda a: a.CheckpointAudit(pb.CheckpointAuditRequest(seq=UINT64_MAX)),
    "PruneAudit.through_seq": lambda a: a.PruneAudit(pb.PruneAuditRequest(through_seq=UINT64_MAX)),
}


@pytest.mark.parametrize("rpc", sorted(SEQUENCES))
async def test_sequence_past_int64_is_invalid_argument(authority: Running, rpc: str) -> None:
    before = audit_rows(authority)

    err = await rpc_error(SEQUENCES[rpc](authority.admin().stub))

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "OUT_OF_RANGE")
    assert audit_rows(authority) == before


async def _drain(call: AsyncIterable[object]) -> list[object]:
    return [message async for message in call]


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (pb.ExportAuditRequest(after_seq=UINT64_MAX), "OUT_OF_RANGE"),
        (pb.ExportAuditRequest(task_ids=["not a task id!"]), "BAD_INTENT"),
        (
            pb.ExportAuditRequest(
                task_ids=[f"task-{i}" for i in range(Limits().max_export_task_ids + 1)]
            ),
            "TOO_MANY_TASKS",
        ),
    ],
    ids=["after_seq-past-int64", "malformed-task-id", "too-many-task-ids"],
)
async def test_export_audit_bad_request_gets_a_precise_status(
    authority: Running, request_: pb.ExportAuditRequest, reason: str
) -> None:
    """ExportAudit has the same error mapping as every other handler: never UNKNOWN."""
    err = await rpc_error(_drain(authority.admin().stub.ExportAudit(request_)))

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, reason)


async def test_watch_revocations_since_past_int64_is_invalid_argument(authority: Running) -> None:
    call = authority.admin().stub.WatchRevocations(pb.WatchRevocationsRequest(since=UINT64_MAX))

    err = await rpc_error(_drain(call))

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "OUT_OF_RANGE")


# --- JSON nested 1,000 deep: INVALID_ARGUMENT JSON_TOO_DEEP, before any parser sees it ----------

JSON_CALLS: dict[str, Callable[[str], AdminCall]] = {
    "RegisterAttestor.config_json": lambda doc: (
        lambda a: a.RegisterAttestor(
            pb.RegisterAttestorRequest(name="deep", plugin="join_token", config_json=doc)
        )
    ),
    "UpdateAttestor.config_json": lambda doc: (
        lambda a: a.UpdateAttestor(pb.UpdateAttestorRequest(name="join_token", config_json=doc))
    ),
    "ExplainPolicy.input_json": lambda doc: (
        lambda a: a.ExplainPolicy(pb.ExplainPolicyRequest(input_json=doc))
    ),
    "LoadPolicy.tests_json": lambda doc: (
        lambda a: a.LoadPolicy(
            pb.LoadPolicyRequest(
                files=[
                    pb.PolicyFile(
                        name="deep.cedar", content="permit(principal, action, resource);"
                    ),
                    pb.PolicyFile(name="deep.tests.json", content=doc),
                ]
            )
        )
    ),
}


@pytest.mark.parametrize("doc", [DEEP_JSON, DEEP_OBJECT], ids=["arrays", "objects"])
@pytest.mark.parametrize("rpc", sorted(JSON_CALLS))
async def test_json_nested_1000_deep_is_invalid_argument(
    authority: Running, rpc: str, doc: str
) -> None:
    admin = authority.admin().stub
    attestors = await admin.ListAttestors(pb.ListAttestorsRequest())
    before = audit_rows(authority)

    err = await rpc_error(JSON_CALLS[rpc](doc)(admin))

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "JSON_TOO_DEEP")
    assert audit_rows(authority) == before
    assert await admin.ListAttestors(pb.ListAttestorsRequest()) == attestors


async def test_attestor_config_over_the_json_size_limit_is_invalid_argument(
    authority: Running,
) -> None:
    doc = '{"pad":"' + "x" * Limits().max_json_bytes + '"}'
    err = await rpc_error(
        authority.admin().stub.RegisterAttestor(
            pb.RegisterAttestorRequest(name="big", plugin="join_token", config_json=doc)
        )
    )

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "JSON_TOO_LARGE")


# --- strings that reach the audit: refused past their limit, never cut silently ----------------


async def test_revocation_reason_over_the_limit_is_invalid_argument(authority: Running) -> None:
    before = audit_rows(authority)
    err = await rpc_error(
        authority.admin().stub.Revoke(
            pb.RevokeRequest(kind="subject", target=AGENT, reason=LONG_REASON)
        )
    )

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "TOO_LONG")
    assert audit_rows(authority) == before
    assert count_rows(authority.data_dir, "revocations") == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda a: a.Deny(pb.DenyRequest(id="no-such-approval", reason=LONG_REASON)),
        lambda a: a.Approve(pb.ApproveRequest(id="no-such-approval", note=LONG_REASON)),
    ],
    ids=["Deny.reason", "Approve.note"],
)
async def test_approval_answer_text_over_the_limit_is_invalid_argument(
    authority: Running, call: AdminCall
) -> None:
    before = audit_rows(authority)

    err = await rpc_error(call(authority.admin().stub))

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "TOO_LONG")
    assert audit_rows(authority) == before


async def test_end_task_reason_over_the_limit_is_invalid_argument(
    authority: Running, tmp_path: Path
) -> None:
    stub = await caller_stub(authority, tmp_path / "svid")
    before = audit_rows(authority)

    err = await rpc_error(stub.EndTask(pb.EndTaskRequest(task_id="task-1", reason=LONG_REASON)))

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "TOO_LONG")
    assert audit_rows(authority) == before


LONG_ID = "A" * 65537


@pytest.mark.parametrize(
    ("rpc", "request_message"),
    [
        ("GetEntry", pb.GetEntryRequest(id=LONG_ID)),
        ("DeleteEntry", pb.DeleteEntryRequest(id=LONG_ID)),
        ("GetAttestor", pb.GetAttestorRequest(name=LONG_ID)),
        ("UnregisterAttestor", pb.UnregisterAttestorRequest(name=LONG_ID)),
        ("GetApproval", pb.GetApprovalRequest(id=LONG_ID)),
    ],
)
async def test_a_64k_id_is_not_echoed_back_in_full(
    authority: Running, rpc: str, request_message: object, tmp_path: Path
) -> None:
    """An id or name of 64 KiB that names nothing: the answer is that status (not a client-side
    error for trailers past gRPC's 16 KiB metadata limit), its message cut to a bounded size."""
    admin = authority.admin().stub
    if rpc == "GetApproval":
        holder = await authority.attested(AGENT, tmp_path / "svid")
        assert isinstance(request_message, pb.GetApprovalRequest)
        call = (await holder.mtls_stub()).GetApproval(request_message)
    else:
        call = getattr(admin, rpc)(request_message)
    err = await rpc_error(call)
    assert err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), (
        err.code(),
        (err.details() or "")[:200],
    )
    assert len(err.details() or "") <= 1100
