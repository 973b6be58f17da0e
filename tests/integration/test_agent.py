"""The node agent against the real authority: node entries served by their agent alone, the
agent's own identity (kept across restarts, renewed, revoked), what revoking reaches, and the
``authority agent`` command as a process of its own.

The Workload API conformance of the agent (py-spiffe, raw gRPC) runs in
``tests/conformance/test_py_spiffe_workload_api.py`` and ``tests/integration/test_workload_api.py``
(each test there runs against the authority and against an agent).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from spiffe import JwtSvid, TrustDomain, WorkloadApiClient, X509BundleSet, X509Svid

from authority._pb import authority_v1_authority_pb2 as apb
from authority._pb import spiffe_workload_pb2 as wpb
from authority._pb import spiffe_workload_pb2_grpc as wgrpc
from authority.agent import AgentConfig, AttestProof, NodeAgent
from authority.client import WorkloadClient, make_csr, new_key
from authority.errors import InvalidArgument
from tests.conformance.verifiers import verify_client
from tests.helpers import (
    AGENT_ID,
    Running,
    ServeProcess,
    authority_command,
    running_agent,
    running_authority,
    serve_process,
    short_socket_dir,
    split_der,
    wait_held,
)
from tests.helpers import test_config as make_config
from tests.security._attack import reason_of

HEADER = (("workload.spiffe.io", "true"),)
TD = "spiffe://example.org"
UID = os.getuid()


@pytest.fixture
async def running(tmp_path: Path, socket_dir: Path) -> AsyncIterator[Running]:
    config = dataclasses.replace(
        make_config(
            tmp_path / "data",
            socket_dir,
            min_ttl=dt.timedelta(seconds=4),
            default_x509_ttl=dt.timedelta(seconds=8),  # the agent's own SVID: renewed at 4 s
        ),
        workload_api_socket=socket_dir / "workload.sock",
    )
    async with running_authority(config) as running:
        yield running


async def node_entry(running: Running, path: str, parent: str = AGENT_ID, **extra: Any) -> str:
    created = await running.admin().stub.CreateEntry(
        apb.CreateEntryRequest(
            spiffe_id=f"{TD}/{path}",
            selectors=[apb.Selector(type="unix", value=f"uid:{UID}")],
            parent_id=parent,
            **extra,
        )
    )
    return created.id


async def _next(call: Any, within: float = 3.0) -> Any:
    async with asyncio.timeout(within):
        message = await call.read()
    assert isinstance(message, Message), "the stream ended"
    return message


def _reason(err: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> str | None:
    return reason_of(err.value)


def _svid_files(reply: wpb.X509SVIDResponse) -> tuple[bytes, bytes, bytes]:
    """(chain PEM, key PEM, bundle PEM) of the first SVID of a Workload API reply."""
    svid = reply.svids[0]
    key = serialization.load_der_private_key(svid.x509_svid_key, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    chain = split_der(svid.x509_svid)
    bundle = split_der(svid.bundle)
    pem = serialization.Encoding.PEM
    return (
        b"".join(c.public_bytes(pem) for c in chain),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        b"".join(c.public_bytes(pem) for c in bundle),
    )


# --- node entries belong to their agent --------------------------------------------------------


async def test_node_entries_are_served_by_their_agent_alone(
    running: Running, tmp_path: Path, socket_dir: Path
) -> None:
    entry_id = await node_entry(running, "on-node1")
    # Not by the authority's own Workload API, though the selectors match this process.
    async with grpc.aio.insecure_channel(f"unix:{socket_dir / 'workload.sock'}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await wgrpc.SpiffeWorkloadAPIStub(channel).FetchJWTSVID(
                wpb.JWTSVIDRequest(audience=["a"]), metadata=HEADER
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Not by Attest either: the local socket's unix attestation matches no node entry.
    await running.admin().stub.RegisterAttestor(
        apb.RegisterAttestorRequest(name="unix", plugin="unix")
    )
    local = WorkloadClient(f"unix:{running.data_dir / 'attest.sock'}", None)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await local.attest("unix", b"", new_key())
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # ... while the same selectors in an entry of the authority's own attest at once.
        await running.admin().stub.CreateEntry(
            apb.CreateEntryRequest(
                spiffe_id=f"{TD}/local",
                selectors=[apb.Selector(type="unix", value=f"uid:{UID}")],
            )
        )
        attested = await local.attest("unix", b"", new_key())
        assert [s.spiffe_id for s in attested.svids] == [f"{TD}/local"]
    finally:
        await local.close()
    # Not to another agent: it cannot sign for, nor fetch a JWT-SVID of, node1's entry.
    node2 = await running.attested(f"{TD}/agent/node2", tmp_path / "node2")
    stub = await node2.mtls_stub()
    sync = stub.SyncAgent(apb.SyncAgentRequest())
    state = await _next(sync)
    assert list(state.entries) == []
    sync.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SignAgentSVIDs(
            apb.SignAgentSVIDsRequest(
                csrs=[apb.AgentCSR(entry_id=entry_id, csr=make_csr(new_key()))]
            )
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _reason(err) == "NOT_NODE_ENTRY"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.FetchAgentJWTSVID(
            apb.FetchAgentJWTSVIDRequest(entry_id=entry_id, audience=["a"])
        )
    assert _reason(err) == "NOT_NODE_ENTRY"
    # node1 gets it, and the SVID chains to the bundle under cryptography's verifier.
    async with running_agent(running, socket_dir / "a.sock", tmp_path / "agent") as agent:
        held = agent.held[entry_id]
        async with grpc.aio.insecure_channel(f"unix:{socket_dir / 'a.sock'}") as channel:
            reply = await _next(
                wgrpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
                    wpb.X509SVIDRequest(), metadata=HEADER
                )
            )
    assert [s.spiffe_id for s in reply.svids] == [f"{TD}/on-node1"]
    leaf, *rest = split_der(reply.svids[0].x509_svid)
    roots = split_der(reply.svids[0].bundle)
    sans, _ = verify_client(leaf, roots, rest)
    assert sans == [x509.UniformResourceIdentifier(f"{TD}/on-node1")]
    assert format(leaf.serial_number, "x") == held.item.serial


async def test_admin_node_entries_and_oversized_or_duplicate_batches_are_refused(
    running: Running, tmp_path: Path
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node_entry(running, "root-on-node", admin=True)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    entry_id = await node_entry(running, "w")
    agent = await running.attested(AGENT_ID, tmp_path / "agent")
    stub = await agent.mtls_stub()
    cases = {
        "NO_CSR": [],
        "DUPLICATE_ENTRY": [(entry_id, make_csr(new_key())), (entry_id, make_csr(new_key()))],
        "TOO_MANY_CSRS": [(entry_id, make_csr(new_key()))] * 65,
    }
    for reason, csrs in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SignAgentSVIDs(
                apb.SignAgentSVIDsRequest(csrs=[apb.AgentCSR(entry_id=e, csr=c) for e, c in csrs])
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, reason
        assert _reason(err) == reason
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SignAgentSVIDs(
            apb.SignAgentSVIDsRequest(csrs=[apb.AgentCSR(entry_id=entry_id, csr=b"not a csr")])
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Nothing was issued by the refused calls.
    assert running.server.authority is not None
    records = await running.server.authority.audit_records()
    assert not [r for r in records if r.kind == "x509.issued" and r.subject == f"{TD}/w"]


async def test_concurrent_asks_for_a_new_jwt_svid_make_one_upstream_call(
    running: Running, tmp_path: Path, socket_dir: Path
) -> None:
    await node_entry(running, "w")
    async with running_agent(running, socket_dir / "a.sock", tmp_path / "agent") as agent:
        channels = [grpc.aio.insecure_channel(f"unix:{socket_dir / 'a.sock'}") for _ in range(20)]
        try:
            replies = await asyncio.gather(
                *(
                    wgrpc.SpiffeWorkloadAPIStub(c).FetchJWTSVID(
                        wpb.JWTSVIDRequest(audience=["fresh-audience"]), metadata=HEADER
                    )
                    for c in channels
                )
            )
        finally:
            for channel in channels:
                await channel.close(None)
        assert len({r.svids[0].svid for r in replies}) == 1  # one token, shared
        assert agent.stats.jwt_fetched == 1
    assert running.server.authority is not None
    records = await running.server.authority.audit_records()
    issued = [r for r in records if r.kind == "jwt.issued" and "fresh-audience" in r.details_json]
    assert len(issued) == 1


async def test_the_agent_answers_health_checks_on_its_socket(
    running: Running, tmp_path: Path, socket_dir: Path
) -> None:
    """grpc.health.v1 with grpcio's own client (what grpc_health_probe speaks)."""
    async with (
        running_agent(running, socket_dir / "a.sock", tmp_path / "agent") as agent,
        grpc.aio.insecure_channel(f"unix:{socket_dir / 'a.sock'}") as channel,
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "SpiffeWorkloadAPI"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Check(health_pb2.HealthCheckRequest(service="authority.v1.Admin"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # Cut the feed as a dead link would, and let its silence outlast the bound.
        watcher = agent._watcher
        await watcher.close()
        watcher._last_heard = time.monotonic() - 3600
        reply = await stub.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("fail_closed", [False, True])
async def test_a_silent_feed_keeps_serving_or_fails_closed_as_configured(
    running: Running, tmp_path: Path, socket_dir: Path, fail_closed: bool
) -> None:
    await node_entry(running, "w")
    token = await running.join_token(AGENT_ID)
    agent = NodeAgent(
        AgentConfig(
            server=running.address,
            trust_bundle_pem=await running.bundle_pem(),
            data_dir=tmp_path / "agent",
            socket=socket_dir / "a.sock",
            proof=AttestProof("join_token", token.encode()),
            fail_closed=fail_closed,
        )
    )
    await agent.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{socket_dir / 'a.sock'}") as channel:
            stub = wgrpc.SpiffeWorkloadAPIStub(channel)
            ask = wpb.JWTSVIDRequest(audience=["a"])
            assert (await stub.FetchJWTSVID(ask, metadata=HEADER)).svids
            watcher = agent._watcher  # cut the feed as a dead link would, past its bound
            await watcher.close()
            watcher._last_heard = time.monotonic() - 3600
            if not fail_closed:  # availability: what is held is still served
                assert (await stub.FetchJWTSVID(ask, metadata=HEADER)).svids
                return
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.FetchJWTSVID(ask, metadata=HEADER)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert _reason(err) == "AGENT_FEED_STALE"
    finally:
        await agent.stop()


def test_a_socket_path_past_the_kernel_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="107 bytes"):
        AgentConfig(
            server="127.0.0.1:1",
            trust_bundle_pem=b"",
            data_dir=tmp_path,
            socket=Path("/tmp/" + "s" * 110),
        )


# --- the agent's own identity -----------------------------------------------------------------


async def test_a_restarted_agent_reuses_its_saved_svid(
    running: Running, tmp_path: Path, socket_dir: Path
) -> None:
    entry_id = await node_entry(running, "w")
    data = tmp_path / "agent"
    async with running_agent(running, socket_dir / "a.sock", data) as agent:
        first_id = agent.spiffe_id
    saved = data / "agent" / "identity.pem"
    assert saved.stat().st_mode & 0o777 == 0o600
    assert (data / "agent").stat().st_mode & 0o777 == 0o700
    # No proof this time: the join token is spent, the saved SVID is enough.
    again = NodeAgent(
        AgentConfig(
            server=running.address,
            trust_bundle_pem=await running.bundle_pem(),
            data_dir=data,
            socket=socket_dir / "a.sock",
        )
    )
    await again.start()
    try:
        assert again.spiffe_id == first_id
        assert again.stats.attestations == 0
        assert entry_id in again.held
    finally:
        await again.stop()


async def test_a_saved_svid_beside_another_key_is_not_used(
    running: Running, tmp_path: Path, socket_dir: Path
) -> None:
    data = tmp_path / "agent"
    async with running_agent(running, socket_dir / "a.sock", data):
        pass
    saved = data / "agent" / "identity.pem"
    chain, _, _ = saved.read_bytes().partition(b"-----BEGIN PRIVATE KEY-----")
    other = new_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    saved.write_bytes(chain + other)
    # The mismatched pair is ignored: the agent attests again with the proof it was given.
    async with running_agent(running, socket_dir / "a.sock", data) as agent:
        assert agent.stats.attestations == 1
    leaf, *_ = x509.load_pem_x509_certificates(saved.read_bytes().partition(b"-----BEGIN PRIV")[0])
    key = serialization.load_pem_private_key(
        b"-----BEGIN PRIV" + saved.read_bytes().partition(b"-----BEGIN PRIV")[2], password=None
    )
    assert key.public_key() == leaf.public_key()


async def test_the_agent_renews_its_svid_at_half_life_and_keeps_its_streams(
    running: Running, tmp_path: Path, socket_dir: Path
) -> None:
    """The agent's SVID lives 8 s here: renewed at about 4 s, the sync and revocation streams
    move to the new channel, and changes still arrive."""
    async with running_agent(running, socket_dir / "a.sock", tmp_path / "agent") as agent:
        before = (tmp_path / "agent" / "agent" / "identity.pem").read_bytes()
        async with asyncio.timeout(8.0):
            while agent.stats.own_renewals == 0:  # noqa: ASYNC110 - a counter, no event
                await asyncio.sleep(0.05)
        assert (tmp_path / "agent" / "agent" / "identity.pem").read_bytes() != before
        entry_id = await node_entry(running, "after-renewal")
        await wait_held(agent, entry_id)
        began = time.monotonic()
        await running.admin().stub.Revoke(
            apb.RevokeRequest(kind="entry", target=entry_id, reason="test")
        )
        async with asyncio.timeout(2.0):
            while entry_id in agent.held:  # noqa: ASYNC110 - a dict, no event
                await asyncio.sleep(0.005)
        assert time.monotonic() - began < 1.0


# --- what revoking reaches ---------------------------------------------------------------------


async def test_revoking_the_agent_drops_its_workloads_everywhere(
    running: Running, tmp_path: Path, socket_dir: Path
) -> None:
    entry_id = await node_entry(running, "w")
    async with running_agent(running, socket_dir / "a.sock", tmp_path / "agent") as agent:
        await wait_held(agent, entry_id)
        async with grpc.aio.insecure_channel(f"unix:{socket_dir / 'a.sock'}") as channel:
            call = wgrpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
                wpb.X509SVIDRequest(), metadata=HEADER
            )
            reply = await _next(call)
            chain, key, bundle = _svid_files(reply)
            # The workload's SVID (issued through the agent) is good at the authority.
            async with WorkloadClient(
                running.address, bundle, svid_chain_pem=chain, svid_key_pem=key
            ) as workload:
                assert (await workload.fetch_jwt(["svc"])).spiffe_id == f"{TD}/w"

                began = time.monotonic()
                revoked = await running.admin().stub.Revoke(
                    apb.RevokeRequest(kind="subject", target=AGENT_ID, reason="node compromised")
                )
                # The cascade names the workloads too, so relying services drop them as well.
                assert {(r.kind, r.target) for r in revoked.revocations} == {
                    ("subject", AGENT_ID),
                    ("subject", f"{TD}/w"),
                }
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _next(call, 1.0)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert time.monotonic() - began < 1.0
                # The authority refuses the workload's SVID too: its agent is revoked.
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await workload.fetch_jwt(["svc"])
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert _reason(err) == "AGENT_REVOKED"
        assert agent.held == {}


async def test_what_was_revoked_before_the_agent_started_is_never_served(
    running: Running, tmp_path: Path, socket_dir: Path
) -> None:
    revoked = await node_entry(running, "revoked-earlier")
    await running.admin().stub.Revoke(
        apb.RevokeRequest(kind="subject", target=f"{TD}/revoked-earlier", reason="test")
    )
    async with running_agent(running, socket_dir / "a.sock", tmp_path / "agent") as agent:
        assert revoked not in agent.held
        assert agent.stats.signed == 0
        async with grpc.aio.insecure_channel(f"unix:{socket_dir / 'a.sock'}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await wgrpc.SpiffeWorkloadAPIStub(channel).FetchJWTSVID(
                    wpb.JWTSVIDRequest(audience=["a"]), metadata=HEADER
                )
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_deleting_a_node_entry_removes_it_from_the_stream(
    running: Running, tmp_path: Path, socket_dir: Path
) -> None:
    keep = await node_entry(running, "keep")
    doomed_entry = await running.admin().stub.CreateEntry(
        apb.CreateEntryRequest(
            spiffe_id=f"{TD}/doomed",
            selectors=[apb.Selector(type="unix", value=f"gid:{os.getgid()}")],
            parent_id=AGENT_ID,
        )
    )
    async with running_agent(running, socket_dir / "a.sock", tmp_path / "agent") as agent:
        await wait_held(agent, doomed_entry.id)
        async with grpc.aio.insecure_channel(f"unix:{socket_dir / 'a.sock'}") as channel:
            call = wgrpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
                wpb.X509SVIDRequest(), metadata=HEADER
            )
            assert len((await _next(call)).svids) == 2
            await running.admin().stub.DeleteEntry(apb.DeleteEntryRequest(id=doomed_entry.id))
            after = await _next(call, 1.0)
            assert [s.spiffe_id for s in after.svids] == [f"{TD}/keep"]
            call.cancel()
        assert set(agent.held) == {keep}


# --- the command --------------------------------------------------------------------------------


def _start_agent(
    served: ServeProcess,
    bundle: Path,
    data: Path,
    socket: Path,
    log_path: Path,
    token: str | None,
) -> subprocess.Popen[bytes]:
    """``authority agent`` as a process of its own, once its socket is there."""
    proof = ["--join-token", "-"] if token is not None else []
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                *authority_command(),
                "agent",
                "--server",
                served.address,
                "--trust-bundle",
                str(bundle),
                "--data-dir",
                str(data),
                "--workload-api-socket",
                str(socket),
                *proof,
            ],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    assert proc.stdin is not None
    proc.stdin.write(f"{token}\n".encode() if token is not None else b"")
    proc.stdin.close()
    deadline = time.monotonic() + 30
    while not socket.exists() or proc.poll() is not None:
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)
    return proc


def _fetch(socket: Path) -> tuple[X509Svid, JwtSvid, X509BundleSet]:
    with WorkloadApiClient(socket_path=f"unix:{socket}", default_timeout=10) as client:
        return client.fetch_x509_svid(), client.fetch_jwt_svid({"svc"}), client.fetch_x509_bundles()


def test_the_agent_command_serves_py_spiffe_and_survives_kill_9(tmp_path: Path) -> None:
    """``authority serve`` and ``authority agent``, each a process of its own; py-spiffe in this
    process fetches from the agent. Killed with SIGKILL, the agent starts again without a new
    join token (its saved SVID); SIGTERM stops it and removes its socket."""
    socket_dir = short_socket_dir()
    socket = socket_dir / "agent.sock"
    try:
        with serve_process(tmp_path / "data") as served:
            bundle = tmp_path / "bundle.pem"
            bundle.write_text(served.cli("bundle", "show").stdout)
            token = served.cli("token", "create", "--spiffe-id", AGENT_ID).stdout.strip()
            served.cli(
                "entry",
                "create",
                "--spiffe-id",
                f"{TD}/via-agent",
                "--selector",
                f"unix:uid:{UID}",
                "--parent-id",
                AGENT_ID,
            )
            data, log_path = tmp_path / "agent", tmp_path / "agent.log"
            proc = _start_agent(served, bundle, data, socket, log_path, token)
            try:
                assert socket.stat().st_mode & 0o777 == 0o666
                svid, token_svid, bundles = _fetch(socket)
                assert str(svid.spiffe_id) == f"{TD}/via-agent"
                assert str(token_svid.spiffe_id) == f"{TD}/via-agent"
                roots = bundles.get_bundle_for_trust_domain(TrustDomain("example.org"))
                assert roots is not None
                verify_client(svid.leaf, list(roots.x509_authorities), svid.cert_chain[1:])
                proc.kill()
                proc.wait(timeout=30)
                socket.unlink()  # left by the killed agent; the new one must make its own
                proc = _start_agent(served, bundle, data, socket, log_path, None)
                again, _, _ = _fetch(socket)
                assert str(again.spiffe_id) == f"{TD}/via-agent"
                assert again.leaf.serial_number != svid.leaf.serial_number  # a new key, signed
            finally:
                proc.terminate()
                assert proc.wait(timeout=30) == 0, log_path.read_text()
            agent_log = log_path.read_text()
            assert token not in agent_log
            assert token_svid.token not in agent_log  # tokens are never logged
            assert agent_log.count("agent serving") == 2
            assert agent_log.count("agent attested") == 1
        assert not socket.exists()
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
