"""Attest stream protocol abuse: INVALID_ARGUMENT, and a join token sent along is not spent."""

from __future__ import annotations

import grpc

from authority._pb import authority_v1_authority_pb2 as pb
from authority.client import make_csr, new_key
from tests.helpers import Running
from tests.security._attack import (
    AGENT,
    assert_status,
    attest_raw,
    attest_with_token,
    issued_svids,
    params,
    rpc_error,
)


async def test_first_message_is_a_challenge_response(authority: Running) -> None:
    client = await authority.workload()

    err = await rpc_error(
        attest_raw(client.tls_stub, [pb.AttestRequest(challenge_response=b"answer")])
    )

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert issued_svids(authority.data_dir) == 0


async def test_first_message_is_empty(authority: Running) -> None:
    client = await authority.workload()

    err = await rpc_error(attest_raw(client.tls_stub, [pb.AttestRequest()]))

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert issued_svids(authority.data_dir) == 0


async def test_stream_closed_without_a_message(authority: Running) -> None:
    client = await authority.workload()

    err = await rpc_error(attest_raw(client.tls_stub, []))

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert issued_svids(authority.data_dir) == 0


async def test_unknown_attestor(authority: Running) -> None:
    token = await authority.join_token(AGENT)
    client = await authority.workload()

    err = await rpc_error(
        attest_raw(
            client.tls_stub, [params(token.encode(), make_csr(new_key()), attestor="x509pop_nope")]
        )
    )

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_ATTESTOR")
    assert issued_svids(authority.data_dir) == 0
    assert (await attest_with_token(client.tls_stub, token)).svids[0].spiffe_id == AGENT


async def test_missing_attestor_name(authority: Running) -> None:
    token = await authority.join_token(AGENT)
    client = await authority.workload()

    err = await rpc_error(
        attest_raw(client.tls_stub, [params(token.encode(), make_csr(new_key()), attestor="")])
    )

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert issued_svids(authority.data_dir) == 0
    assert (await attest_with_token(client.tls_stub, token)).svids[0].spiffe_id == AGENT


async def test_hint_for_another_identity_grants_nothing(authority: Running) -> None:
    """A token bound to one ID cannot be steered to another, even one with a matching entry."""
    admin = authority.admin()
    await admin.stub.CreateEntry(
        pb.CreateEntryRequest(
            spiffe_id="spiffe://example.org/admin",
            selectors=[pb.Selector(type="join_token", value=f"spiffe_id:{AGENT}")],
            admin=True,
        )
    )
    token = await authority.join_token(AGENT)
    client = await authority.workload()

    err = await rpc_error(
        attest_raw(
            client.tls_stub,
            [params(token.encode(), make_csr(new_key()), hint="spiffe://example.org/admin")],
        )
    )

    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "NO_MATCHING_ENTRY")
    assert issued_svids(authority.data_dir) == 0


async def test_entry_on_token_selectors_cannot_widen_the_token(authority: Running) -> None:
    """An entry that matches a token's selectors but names another ID is not added to what the
    token grants: the token's identity is the only one issued."""
    admin = authority.admin()
    await admin.stub.CreateEntry(
        pb.CreateEntryRequest(
            spiffe_id="spiffe://example.org/admin",
            selectors=[pb.Selector(type="join_token", value=f"spiffe_id:{AGENT}")],
            admin=True,
        )
    )
    token = await authority.join_token(AGENT)
    client = await authority.workload()

    result = await attest_with_token(client.tls_stub, token)

    assert [s.spiffe_id for s in result.svids] == [AGENT]
    assert issued_svids(authority.data_dir) == 1
