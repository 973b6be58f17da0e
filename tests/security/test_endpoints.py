"""Who may call what, where: operator calls never on the workload ports, SVID calls only over
mutual TLS with an SVID this authority issued and still stands behind, and clients that verify
the server never talk to an impostor."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority.client import SvidFiles, WorkloadClient, make_csr, new_key
from authority.ids import SpiffeId
from tests.fuzz.wire import Connection, Outcome, grpc_frame, tls_target
from tests.helpers import Running, running_authority
from tests.helpers import test_config as make_config
from tests.security._attack import (
    AGENT,
    CALL_TIMEOUT,
    assert_status,
    attest_raw,
    attest_with_token,
    count_rows,
    forged_svid,
    issued_svids,
    key_pem,
    params,
    pem,
    reason_of,
    rpc_error,
    self_made_ca,
    tls_channel,
)
from tests.security.conftest import Clocked

ADMIN_CALLS = ("CreateEntry", "CreateJoinToken", "RotateCA", "ListEntries")


async def _admin_call(stub: pb_grpc.AdminAsyncStub, name: str) -> object:
    if name == "CreateEntry":
        return await stub.CreateEntry(
            pb.CreateEntryRequest(
                spiffe_id="spiffe://example.org/backdoor",
                selectors=[pb.Selector(type="join_token", value="spiffe_id:x")],
                admin=True,
            ),
            timeout=CALL_TIMEOUT,
        )
    if name == "CreateJoinToken":
        return await stub.CreateJoinToken(
            pb.CreateJoinTokenRequest(spiffe_id="spiffe://example.org/backdoor"),
            timeout=CALL_TIMEOUT,
        )
    if name == "RotateCA":
        return await stub.RotateCA(pb.RotateCARequest(), timeout=CALL_TIMEOUT)
    return await stub.ListEntries(pb.ListEntriesRequest(), timeout=CALL_TIMEOUT)


def _state(running: Running) -> tuple[int, int, int]:
    return (
        count_rows(running.data_dir, "entries"),
        count_rows(running.data_dir, "join_tokens"),
        count_rows(running.data_dir, "authority_keys"),
    )


@pytest.mark.parametrize("call", ADMIN_CALLS)
async def test_operator_call_on_server_tls_port_is_refused(authority: Running, call: str) -> None:
    before = _state(authority)
    async with tls_channel(authority.address, await authority.bundle_pem()) as channel:
        err = await rpc_error(_admin_call(pb_grpc.AdminStub(channel), call))

    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "ADMIN_ON_WORKLOAD_ENDPOINT")
    assert _state(authority) == before


@pytest.mark.parametrize("call", ADMIN_CALLS)
async def test_operator_call_on_mtls_port_is_refused(
    authority: Running, tmp_path: Path, call: str
) -> None:
    await authority.attested(AGENT, tmp_path / "svid")
    chain, key, bundle = SvidFiles(tmp_path / "svid").read()
    before = _state(authority)
    async with tls_channel(authority.mtls_address, bundle, key=key, chain=chain) as channel:
        # The channel itself works: the refusal below is the authority's, not the handshake's.
        info = await pb_grpc.WorkloadStub(channel).GetServerInfo(
            pb.GetServerInfoRequest(), timeout=CALL_TIMEOUT
        )
        assert info.trust_domain == "example.org"
        err = await rpc_error(_admin_call(pb_grpc.AdminStub(channel), call))

    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "ADMIN_ON_WORKLOAD_ENDPOINT")
    assert _state(authority) == before


async def test_fetch_jwt_svid_without_client_svid_is_unauthenticated(authority: Running) -> None:
    client = await authority.workload()

    err = await rpc_error(
        client.tls_stub.FetchJWTSVID(pb.FetchJWTSVIDRequest(audience=["svc"]), timeout=CALL_TIMEOUT)
    )

    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "NO_CLIENT_SVID")


async def test_renew_without_client_svid_is_unauthenticated(authority: Running) -> None:
    client = await authority.workload()

    err = await rpc_error(
        client.tls_stub.RenewX509SVID(
            pb.RenewX509SVIDRequest(csr=make_csr(new_key())), timeout=CALL_TIMEOUT
        )
    )

    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "NO_CLIENT_SVID")
    assert issued_svids(authority.data_dir) == 0


async def test_svid_presented_on_server_tls_port_is_not_seen(
    authority: Running, tmp_path: Path
) -> None:
    """The server-TLS listener never asks for a client certificate, so offering a valid SVID
    there authenticates nothing."""
    await authority.attested(AGENT, tmp_path / "svid")
    chain, key, bundle = SvidFiles(tmp_path / "svid").read()
    async with tls_channel(authority.address, bundle, key=key, chain=chain) as channel:
        stub = pb_grpc.WorkloadStub(channel)
        jwt_err = await rpc_error(
            stub.FetchJWTSVID(pb.FetchJWTSVIDRequest(audience=["svc"]), timeout=CALL_TIMEOUT)
        )
        renew_err = await rpc_error(
            stub.RenewX509SVID(
                pb.RenewX509SVIDRequest(csr=make_csr(new_key())), timeout=CALL_TIMEOUT
            )
        )

    assert_status(jwt_err, grpc.StatusCode.UNAUTHENTICATED, "NO_CLIENT_SVID")
    assert_status(renew_err, grpc.StatusCode.UNAUTHENTICATED, "NO_CLIENT_SVID")
    assert issued_svids(authority.data_dir) == 1


async def test_client_certificate_from_another_ca_fails_the_handshake(
    authority: Running,
) -> None:
    """A self-made CA, claiming the same trust domain, and a leaf with the SVID profile."""
    ca_key, ca_cert = self_made_ca()
    leaf_key, leaf = forged_svid(ca_key, ca_cert, AGENT)
    bundle = await authority.bundle_pem()
    async with tls_channel(
        authority.mtls_address, bundle, key=key_pem(leaf_key), chain=pem(leaf) + pem(ca_cert)
    ) as channel:
        stub = pb_grpc.WorkloadStub(channel)
        jwt_err = await rpc_error(
            stub.FetchJWTSVID(pb.FetchJWTSVIDRequest(audience=["svc"]), timeout=CALL_TIMEOUT)
        )
        renew_err = await rpc_error(
            stub.RenewX509SVID(
                pb.RenewX509SVIDRequest(csr=make_csr(new_key())), timeout=CALL_TIMEOUT
            )
        )

    assert_status(jwt_err, grpc.StatusCode.UNAVAILABLE, None)
    assert_status(renew_err, grpc.StatusCode.UNAVAILABLE, None)
    assert issued_svids(authority.data_dir) == 0
    # The listener survives the attempt.
    client = await authority.workload()
    assert (await client.tls_stub.GetBundle(pb.GetBundleRequest(), timeout=CALL_TIMEOUT)).sequence


async def test_svid_of_deleted_entry_is_refused(authority: Running, tmp_path: Path) -> None:
    spiffe_id = "spiffe://example.org/agent/entry-backed"
    admin = authority.admin()
    entry = await admin.stub.CreateEntry(
        pb.CreateEntryRequest(
            spiffe_id=spiffe_id,
            selectors=[pb.Selector(type="join_token", value=f"spiffe_id:{spiffe_id}")],
        ),
        timeout=CALL_TIMEOUT,
    )
    token = await authority.join_token(spiffe_id)
    folder = tmp_path / "svid"
    result = await (await authority.workload()).attest_to_folder(
        "join_token", token.encode(), folder
    )
    # The SVID was issued from that entry, and works while the entry exists.
    assert [(s.spiffe_id, s.entry_id) for s in result.svids] == [(spiffe_id, entry.id)]
    async with WorkloadClient.from_svid_dir(authority.address, folder) as holder:
        assert (await holder.fetch_jwt(["svc"])).spiffe_id == spiffe_id
        assert issued_svids(authority.data_dir) == 1

        await admin.stub.DeleteEntry(pb.DeleteEntryRequest(id=entry.id), timeout=CALL_TIMEOUT)
        stub = await holder.mtls_stub()
        jwt_err = await rpc_error(
            stub.FetchJWTSVID(pb.FetchJWTSVIDRequest(audience=["svc"]), timeout=CALL_TIMEOUT)
        )
        renew_err = await rpc_error(
            stub.RenewX509SVID(
                pb.RenewX509SVIDRequest(csr=make_csr(new_key())), timeout=CALL_TIMEOUT
            )
        )

    assert_status(jwt_err, grpc.StatusCode.PERMISSION_DENIED, "ENTRY_DELETED")
    assert_status(renew_err, grpc.StatusCode.PERMISSION_DENIED, "ENTRY_DELETED")
    assert issued_svids(authority.data_dir) == 1


async def test_expired_svid_is_refused(clocked: Clocked, tmp_path: Path) -> None:
    """The TLS stack checks validity against the wall clock; the authority checks again with
    its own clock, and refuses an SVID past its notAfter."""
    running = clocked.running
    holder = await running.attested(AGENT, tmp_path / "svid")
    assert (await holder.fetch_jwt(["svc"])).spiffe_id == AGENT
    clocked.clock.advance(dt.timedelta(minutes=6))  # default X.509-SVID TTL is 5 minutes
    stub = await holder.mtls_stub()

    jwt_err = await rpc_error(
        stub.FetchJWTSVID(pb.FetchJWTSVIDRequest(audience=["svc"]), timeout=CALL_TIMEOUT)
    )
    renew_err = await rpc_error(
        stub.RenewX509SVID(pb.RenewX509SVIDRequest(csr=make_csr(new_key())), timeout=CALL_TIMEOUT)
    )

    assert_status(jwt_err, grpc.StatusCode.UNAUTHENTICATED, "SVID_EXPIRED")
    assert_status(renew_err, grpc.StatusCode.UNAUTHENTICATED, "SVID_EXPIRED")
    assert issued_svids(running.data_dir) == 1


async def test_client_with_wrong_trust_bundle_cannot_connect(authority: Running) -> None:
    """A workload that trusts another CA refuses the authority's certificate; its join token
    never leaves the client, so it is not spent."""
    _, other_ca = self_made_ca()
    token = await authority.join_token(AGENT)
    async with tls_channel(authority.address, pem(other_ca)) as channel:
        stub = pb_grpc.WorkloadStub(channel)
        bundle_err = await rpc_error(stub.GetBundle(pb.GetBundleRequest(), timeout=CALL_TIMEOUT))
        attest_err = await rpc_error(
            attest_raw(stub, [params(token.encode(), make_csr(new_key()))])
        )

    assert_status(bundle_err, grpc.StatusCode.UNAVAILABLE, None)
    assert_status(attest_err, grpc.StatusCode.UNAVAILABLE, None)
    assert issued_svids(authority.data_dir) == 0
    client = await authority.workload()
    assert (await attest_with_token(client.tls_stub, token)).svids[0].spiffe_id == AGENT


async def test_client_checks_the_server_name(authority: Running) -> None:
    """The right CA is not enough: the server's certificate must name the host dialled."""
    async with tls_channel(
        authority.address, await authority.bundle_pem(), target_name="impostor.example.org"
    ) as channel:
        err = await rpc_error(
            pb_grpc.WorkloadStub(channel).GetBundle(pb.GetBundleRequest(), timeout=CALL_TIMEOUT)
        )

    assert_status(err, grpc.StatusCode.UNAVAILABLE, None)


@pytest.mark.parametrize("spiffe_id", [AGENT, "spiffe://example.org/authority"])
async def test_ca_signed_but_unrecorded_certificate_is_refused(
    authority: Running, spiffe_id: str
) -> None:
    """A certificate the CA key signed outside issuance (a signing oracle, a restored backup, the
    server's own identity) chains fine, but is not an SVID the authority stands behind."""
    assert authority.server.authority is not None
    ca = authority.server.authority.ca
    key = new_key()
    svid = ca.issue_x509_svid(SpiffeId.parse(spiffe_id), key.public_key(), dt.timedelta(minutes=5))
    chain = b"".join(pem(c) for c in svid.chain)
    async with tls_channel(
        authority.mtls_address, await authority.bundle_pem(), key=key_pem(key), chain=chain
    ) as channel:
        stub = pb_grpc.WorkloadStub(channel)
        jwt_err = await rpc_error(
            stub.FetchJWTSVID(pb.FetchJWTSVIDRequest(audience=["svc"]), timeout=CALL_TIMEOUT)
        )
        renew_err = await rpc_error(
            stub.RenewX509SVID(
                pb.RenewX509SVIDRequest(csr=make_csr(new_key())), timeout=CALL_TIMEOUT
            )
        )

    assert_status(jwt_err, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    assert_status(renew_err, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    assert issued_svids(authority.data_dir) == 0


ADMIN_METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["Admin"].methods]


async def _refusals(channel: grpc.aio.Channel) -> dict[str, tuple[str, str | None]]:
    """Every Admin method, called with an empty request: method -> (code, reason)."""
    seen: dict[str, tuple[str, str | None]] = {}
    for name in ADMIN_METHODS:
        call = channel.unary_unary(f"/authority.v1.Admin/{name}", None, None)
        err = await rpc_error(call(b"", timeout=CALL_TIMEOUT))
        seen[name] = (err.code().name, reason_of(err))
    return seen


async def test_every_operator_method_is_refused_on_both_workload_ports(
    authority: Running, tmp_path: Path
) -> None:
    assert {"CreateEntry", "RotateCA", "Revoke", "LoadPolicy"} <= set(ADMIN_METHODS)
    await authority.attested(AGENT, tmp_path / "svid")
    chain, key, bundle = SvidFiles(tmp_path / "svid").read()
    before = _state(authority)
    expected = {name: ("PERMISSION_DENIED", "ADMIN_ON_WORKLOAD_ENDPOINT") for name in ADMIN_METHODS}

    async with tls_channel(authority.address, bundle) as channel:
        assert await _refusals(channel) == expected
    async with tls_channel(authority.mtls_address, bundle, key=key, chain=chain) as channel:
        assert await _refusals(channel) == expected

    assert _state(authority) == before


# --- undecodable requests and reflection -------------------------------------------------------

GARBAGE = b"\xff\xff"  # a varint that never ends: no protobuf message decodes from it
MALFORMED_DETAILS = "the request message could not be decoded"


async def _garbage_stream(channel: grpc.aio.Channel, method: str) -> grpc.aio.AioRpcError:
    """One undecodable message on a client stream, held open until the server answers."""
    answered = asyncio.Event()

    async def requests() -> AsyncIterator[bytes]:
        yield GARBAGE
        await answered.wait()

    call = channel.stream_stream(method, None, None)(requests(), timeout=CALL_TIMEOUT)
    call.add_done_callback(lambda _: answered.set())
    return await rpc_error(_drain(call))


async def _drain(call: AsyncIterable[object]) -> None:
    async for _ in call:
        pass


@pytest.mark.parametrize("endpoint", ["server-tls", "admin"])
async def test_undecodable_request_is_invalid_argument_without_traceback(
    authority: Running, caplog: pytest.LogCaptureFixture, endpoint: str
) -> None:
    """Garbage bodies, unary and streamed, on our services and grpc's own health service: a
    fixed INVALID_ARGUMENT, and one throttled log line for all of them instead of a traceback
    (about 825 bytes) each."""
    if endpoint == "admin":
        channel = grpc.aio.insecure_channel(f"unix:{authority.admin_socket}")
        unary = ["/authority.v1.Admin/CreateEntry", "/grpc.health.v1.Health/Check"]
    else:
        channel = grpc.aio.secure_channel(
            authority.address, grpc.ssl_channel_credentials(await authority.bundle_pem())
        )
        unary = ["/authority.v1.Workload/GetBundle", "/grpc.health.v1.Health/Check"]
    caplog.set_level(logging.INFO)
    async with channel:
        errors = [
            await rpc_error(channel.unary_unary(method, None, None)(GARBAGE, timeout=CALL_TIMEOUT))
            for method in unary
            for _ in range(25)
        ]
        if endpoint == "server-tls":
            errors.append(await _garbage_stream(channel, "/authority.v1.Workload/Attest"))

    for err in errors:
        assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
        assert err.details() == MALFORMED_DETAILS
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    lines = [r for r in caplog.records if "undecodable request refused" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "peer=" in lines[0].getMessage()
    assert issued_svids(authority.data_dir) == 0


async def _listed_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=CALL_TIMEOUT
    )
    replies = [reply async for reply in call]
    return [s.name for reply in replies for s in reply.list_services_response.service]


async def test_reflection_is_off_on_the_workload_port(authority: Running) -> None:
    """The public port does not describe the Admin service (or anything): reflection answers
    only on the admin socket unless reflection_on_public is set."""
    async with tls_channel(authority.address, await authority.bundle_pem()) as channel:
        err = await rpc_error(_listed_services(channel))
    assert_status(err, grpc.StatusCode.UNIMPLEMENTED, None)

    async with grpc.aio.insecure_channel(f"unix:{authority.admin_socket}") as channel:
        assert "authority.v1.Admin" in await _listed_services(channel)


async def test_reflection_on_public_lists_no_operator_service(
    tmp_path: Path, socket_dir: Path
) -> None:
    config = dataclasses.replace(
        make_config(tmp_path / "data", socket_dir), reflection_on_public=True
    )
    async with running_authority(config) as running:
        bundle = await running.bundle_pem()
        async with tls_channel(running.address, bundle) as channel:
            listed = await _listed_services(channel)
    assert "authority.v1.Workload" in listed
    assert "authority.v1.Admin" not in listed


async def test_health_list_on_the_public_port_answers_without_a_traceback(
    authority: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """grpc.health.v1 List, unauthenticated on the server-TLS port: the library's servicer
    raised NotImplementedError (a traceback logged per call); it lists the public services."""
    caplog.set_level(logging.INFO)
    async with tls_channel(authority.address, await authority.bundle_pem()) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(3):
            listed = await stub.List(health_pb2.HealthListRequest(), timeout=CALL_TIMEOUT)
            assert set(listed.statuses) == {"", "authority.v1.Workload"}
            assert all(
                s.status == health_pb2.HealthCheckResponse.SERVING for s in listed.statuses.values()
            )
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("case", "frames"),
    [
        ("no message", []),
        ("half a length prefix", [b"\x00\x00"]),
        ("a length that lies", [grpc_frame(b"\x08", length=4)]),
    ],
)
@pytest.mark.parametrize("method", ["/authority.v1.Workload/Ping", "/grpc.health.v1.Health/Check"])
async def test_a_request_without_a_complete_message_is_answered(
    authority: Running, case: str, frames: list[bytes], method: str
) -> None:
    """grpc core never answers a single-request call whose body ends before one whole message:
    the call hung until the client gave up. Served as a request stream, it is refused."""
    target = tls_target("tls", authority.address, await authority.bundle_pem())

    def call() -> Outcome:
        with Connection(target) as connection:
            return connection.call(method, frames, answer_within=CALL_TIMEOUT)

    outcome = await asyncio.to_thread(call)
    assert outcome.status == "INVALID_ARGUMENT", (case, outcome)
