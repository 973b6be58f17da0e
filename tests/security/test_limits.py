"""Oversized input: RESOURCE_EXHAUSTED, whether gRPC itself refuses the message (over
``Limits.max_message_bytes``) or the attestor host does (over ``Limits.max_evidence_bytes``);
either way the join token carried alongside is not spent and nothing is issued."""

from __future__ import annotations

from pathlib import Path

import grpc

from authority._pb import authority_v1_authority_pb2 as pb
from authority.client import make_csr, new_key
from authority.config import Limits
from tests.helpers import Running
from tests.security._attack import (
    AGENT,
    CALL_TIMEOUT,
    assert_status,
    attest_raw,
    attest_with_token,
    count_rows,
    issued_svids,
    params,
    rpc_error,
)

MIB = 1024 * 1024


async def test_message_over_grpc_limit_is_refused(authority: Running) -> None:
    assert Limits().max_message_bytes < MIB
    token = await authority.join_token(AGENT)
    client = await authority.workload()

    err = await rpc_error(
        attest_raw(client.tls_stub, [params(token.encode() + b"A" * MIB, make_csr(new_key()))])
    )

    # Refused by gRPC before any handler runs: no authority-reason.
    assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, None)
    assert issued_svids(authority.data_dir) == 0
    assert (await attest_with_token(client.tls_stub, token)).svids[0].spiffe_id == AGENT


async def test_evidence_over_evidence_limit_is_refused(authority: Running) -> None:
    limits = Limits()
    size = (limits.max_evidence_bytes + limits.max_message_bytes) // 2
    assert limits.max_evidence_bytes < size < limits.max_message_bytes - 4096
    token = await authority.join_token(AGENT)
    client = await authority.workload()

    err = await rpc_error(attest_raw(client.tls_stub, [params(b"A" * size, make_csr(new_key()))]))

    assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "EVIDENCE_TOO_LARGE")
    assert issued_svids(authority.data_dir) == 0
    assert (await attest_with_token(client.tls_stub, token)).svids[0].spiffe_id == AGENT


async def test_oversized_operator_request_is_refused(authority: Running) -> None:
    admin = authority.admin()

    err = await rpc_error(
        admin.stub.CreateEntry(
            pb.CreateEntryRequest(
                spiffe_id="spiffe://example.org/agent",
                selectors=[pb.Selector(type="join_token", value="v" * MIB)],
            ),
            timeout=CALL_TIMEOUT,
        )
    )

    assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, None)
    assert count_rows(authority.data_dir, "entries") == 0


async def test_oversized_jwt_request_is_refused(authority: Running, tmp_path: Path) -> None:
    holder = await authority.attested(AGENT, tmp_path / "svid")
    stub = await holder.mtls_stub()

    err = await rpc_error(
        stub.FetchJWTSVID(pb.FetchJWTSVIDRequest(audience=["a" * MIB]), timeout=CALL_TIMEOUT)
    )

    assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, None)
