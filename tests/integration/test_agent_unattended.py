"""The node agent left alone for weeks (issue 12): the rotation stall, restarts after CA
rotations, never serving what is no longer valid, and an outage of the authority.

- The stall: the agent's own renewal closed its old channel while a ``SignAgentSVIDs`` call was in
  flight; the call ended in ``CancelledError``, which ended the rotation task without a word, and
  the agent went on serving an expired SVID while its health said SERVING. Reproduced here
  deterministically: the signing call is held on the server side until the renewal is done.
- After two CA rotations the trust bundle the agent was first given no longer verifies the
  authority: the agent keeps the latest bundle it received and starts with it.
- With the authority stopped, an SVID past its life is never handed out and health says
  NOT_SERVING; while the authority is down the agent logs a bounded number of lines (it wrote
  twenty a second), and it recovers when the authority is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import stat
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authority._pb import authority_v1_authority_pb2 as apb
from authority._pb import spiffe_workload_pb2 as wpb
from authority._pb import spiffe_workload_pb2_grpc as wgrpc
from authority.agent import RENEW_TASK, ROTATE_TASK, SYNC_TASK, AgentConfig, NodeAgent
from authority.clock import FakeClock
from authority.config import Config
from authority.server import AuthorityServer
from tests.helpers import (
    AGENT_ID,
    Running,
    running_agent,
    running_authority,
    split_der,
    wait_held,
)
from tests.helpers import test_config as make_config
from tests.security._attack import reason_of, running_with_clock

HEADER = (("workload.spiffe.io", "true"),)
TD = "spiffe://example.org"
UID = os.getuid()
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
AGENT_LOGGERS = ("authority.agent", "authority.watch", "authority.supervisor", "authority.client")


def short_lived(data_dir: Path, socket_dir: Path, own_ttl: float = 8.0) -> Config:
    """SVIDs of a few seconds: the agent's own (``own_ttl``) and its entries' (their own TTL)."""
    return make_config(
        data_dir,
        socket_dir,
        min_ttl=dt.timedelta(seconds=2),
        default_x509_ttl=dt.timedelta(seconds=own_ttl),
    )


@pytest.fixture
async def running(tmp_path: Path, socket_dir: Path) -> AsyncIterator[Running]:
    async with running_authority(short_lived(tmp_path / "data", socket_dir)) as running:
        yield running


async def node_entry(running: Running, path: str, ttl: int = 0) -> str:
    created = await running.admin().stub.CreateEntry(
        apb.CreateEntryRequest(
            spiffe_id=f"{TD}/{path}",
            selectors=[apb.Selector(type="unix", value=f"uid:{UID}")],
            parent_id=AGENT_ID,
            x509_ttl_seconds=ttl,
        )
    )
    return created.id


async def health(socket: Path) -> int:
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        return int(reply.status)


async def fetch_x509(socket: Path) -> wpb.X509SVIDResponse:
    """The first FetchX509SVID message (the stream is then closed)."""
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        call = wgrpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            wpb.X509SVIDRequest(), metadata=HEADER
        )
        async with asyncio.timeout(10):
            reply = await call.read()
        call.cancel()
        assert isinstance(reply, wpb.X509SVIDResponse), "the stream ended"
        return reply


async def next_leaf(call: Any) -> x509.Certificate:
    """The leaf of the first SVID of a FetchX509SVID stream's next message."""
    reply = await asyncio.wait_for(call.read(), 10)
    assert isinstance(reply, wpb.X509SVIDResponse), "the stream ended"
    return split_der(reply.svids[0].x509_svid)[0]


async def until(predicate: Any, what: str, timeout: float = 20.0) -> None:  # noqa: ASYNC109
    """Poll ``predicate`` (a counter or a clock, nothing to wait on) until it holds."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - counters and clocks, no event
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {timeout:.0f}s: {what}") from None


def failing_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " failing: " in r.getMessage()]


class SigningGate:
    """Holds every SignAgentSVIDs call on the server side until ``release``."""

    def __init__(self, running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
        authority = running.server.authority
        assert authority is not None
        self._sign = authority.sign_node_svids
        self.calls = 0
        self.entered = asyncio.Event()
        self._open = asyncio.Event()
        monkeypatch.setattr(authority, "sign_node_svids", self.sign)

    async def sign(self, agent: Any, requests: Sequence[tuple[str, bytes]]) -> Any:
        self.calls += 1
        self.entered.set()
        await self._open.wait()
        return await self._sign(agent, requests)

    def release(self) -> None:
        self._open.set()

    def hold(self) -> None:
        self._open.clear()


# --- the stall ---------------------------------------------------------------------------------


async def test_an_own_renewal_during_a_signing_call_does_not_stop_rotation(
    running: Running,
    tmp_path: Path,
    socket_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with running_agent(running, socket_dir / "a.sock", tmp_path / "agent") as agent:
        gate = SigningGate(running, monkeypatch)
        entry_id = await node_entry(running, "w", ttl=4)  # rotated every 2 s
        await asyncio.wait_for(gate.entered.wait(), 10)  # a signing call is in flight
        renewals = agent.stats.own_renewals
        await agent.renew()  # the agent's own renewal: its old channel closes
        assert agent.stats.own_renewals == renewals + 1
        # The cut call is made again on the new channel (before the fix: the task ended).
        await until(lambda: gate.calls >= 2, "the signing call made again")
        gate.release()
        await wait_held(agent, entry_id, timeout=10)
        # Rotation goes on past the second rotation of the entry's SVID.
        serials = [agent.held[entry_id].item.serial]

        def rotated() -> bool:
            serial = agent.held[entry_id].item.serial if entry_id in agent.held else None
            if serial is not None and serial != serials[-1]:
                serials.append(serial)
            return len(serials) >= 3

        await until(rotated, "two more rotations of the entry's SVID")
        assert agent.supervisor.restarts(ROTATE_TASK) == 0
        assert agent.supervisor.down() == {}
        assert failing_lines(caplog) == []
        assert await health(socket_dir / "a.sock") == SERVING


async def test_a_task_ended_by_a_stray_cancellation_is_restarted_and_logged(
    running: Running,
    tmp_path: Path,
    socket_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Any other end of a task (here: a CancelledError that no channel swap explains) is a
    failure: logged once, the task restarted, and health NOT_SERVING while it is down."""
    caplog.set_level(logging.INFO)
    async with running_agent(running, socket_dir / "a.sock", tmp_path / "agent") as agent:
        real = agent._reconcile
        broken = True

        async def reconcile_once_cancelled() -> float:
            if broken:
                raise asyncio.CancelledError
            return await real()

        monkeypatch.setattr(agent, "_reconcile", reconcile_once_cancelled)
        agent._wake.set()
        await until(lambda: agent.supervisor.is_down(ROTATE_TASK), "the rotation task down")
        assert await health(socket_dir / "a.sock") == NOT_SERVING
        broken = False
        await until(lambda: not agent.supervisor.is_down(ROTATE_TASK), "the task recovered")
        assert await health(socket_dir / "a.sock") == SERVING
        lines = [r.getMessage() for r in caplog.records if ROTATE_TASK in r.getMessage()]
        assert lines[0] == (
            f"task {ROTATE_TASK} failing: a call was cancelled under the task (CancelledError)"
        )
        assert lines[1].startswith(f"task {ROTATE_TASK} recovered after ")
        assert len(lines) == 2


# --- restarts after CA rotations ----------------------------------------------------------------


async def test_an_agent_starts_again_after_two_ca_rotations_with_its_first_trust_bundle(
    tmp_path: Path, socket_dir: Path
) -> None:
    # The agent's own SVID lives a minute: still good when it starts again.
    config = short_lived(tmp_path / "data", socket_dir, own_ttl=60.0)
    async with running_authority(config) as running:
        await _restart_after_rotations(running, tmp_path / "agent", socket_dir)


async def _restart_after_rotations(running: Running, data_dir: Path, socket_dir: Path) -> None:
    first_bundle = await running.bundle_pem()
    entry_id = await node_entry(running, "w")
    async with running_agent(running, socket_dir / "a.sock", data_dir) as agent:
        await wait_held(agent, entry_id)
        for _ in range(2):
            await running.admin().stub.RotateCA(apb.RotateCARequest(immediate=True))
        sequence = (await running.admin().stub.GetBundle(apb.GetBundleRequest())).sequence
        await until(lambda: agent.bundle().sequence == sequence, "the agent has the new bundle")
    kept = data_dir / "agent" / "bundle.pem"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    current = await running.bundle_pem()
    assert set(x509.load_pem_x509_certificates(kept.read_bytes())) == set(
        x509.load_pem_x509_certificates(current)
    )

    config = AgentConfig(
        server=running.address,
        trust_bundle_pem=first_bundle,  # what it was first given; no proof: its saved SVID
        data_dir=data_dir,
        socket=socket_dir / "b.sock",
    )
    # Without the bundle it kept, the first trust bundle does not verify the authority now.
    saved = kept.read_bytes()
    kept.unlink()
    refused = NodeAgent(config)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await refused.start(timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await refused.stop()
    kept.write_bytes(saved)
    kept.chmod(0o600)

    agent = NodeAgent(config)
    await agent.start()
    try:
        reply = await fetch_x509(socket_dir / "b.sock")
        leaf = split_der(reply.svids[0].x509_svid)[0]
        assert leaf.not_valid_after_utc > dt.datetime.now(dt.UTC)
        assert await health(socket_dir / "b.sock") == SERVING
    finally:
        await agent.stop()


# --- never serve what is no longer valid --------------------------------------------------------


async def test_with_the_authority_gone_an_expired_svid_is_never_handed_out(
    tmp_path: Path, socket_dir: Path
) -> None:
    config = short_lived(tmp_path / "data", socket_dir, own_ttl=30.0)
    socket = socket_dir / "a.sock"
    async with (
        running_authority(config) as running,
        running_agent(running, socket, tmp_path / "agent") as agent,
    ):
        entry_id = await node_entry(running, "w", ttl=3)
        await wait_held(agent, entry_id)
        await running.server.stop(grace=0.5)  # the authority is gone: nothing is renewed
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            call = wgrpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
                wpb.X509SVIDRequest(), metadata=HEADER
            )
            # Every SVID the stream sends is valid when it arrives; then it ends.
            received: list[x509.Certificate] = []
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await _valid_on_arrival(call, received)
            assert received
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert reason_of(ended.value) == "AGENT_NO_VALID_SVID"
            # A new ask is refused too, the JWT path and the bundle alike; health says so.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await fetch_x509(socket)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await health(socket) == NOT_SERVING
        assert entry_id not in agent.held or agent.held[entry_id].not_after <= dt.datetime.now(
            dt.UTC
        )


async def test_health_says_not_serving_once_an_svid_is_overdue_for_rotation(
    running: Running, tmp_path: Path, socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    socket = socket_dir / "a.sock"
    async with running_agent(running, socket, tmp_path / "agent") as agent:
        gate = SigningGate(running, monkeypatch)  # nothing can be signed from now on
        entry_id = await node_entry(running, "w", ttl=4)
        await asyncio.wait_for(gate.entered.wait(), 10)
        gate.release()
        await wait_held(agent, entry_id)
        gate.hold()  # rotations hang from here
        assert await health(socket) == SERVING
        overdue_at = agent.held[entry_id].overdue_at
        await until(lambda: dt.datetime.now(dt.UTC) >= overdue_at, "3/4 of the SVID's life")
        assert await health(socket) == NOT_SERVING
        gate.release()
        await until(lambda: agent.held[entry_id].overdue_at > overdue_at, "rotated at last")
        assert await health(socket) == SERVING


async def test_an_svid_whose_signing_key_left_the_bundle_is_not_served(
    running: Running, tmp_path: Path, socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CA key that signed the agent's SVIDs is revoked (it leaves the bundle) while the agent
    cannot get new ones: what it holds is not handed out again, with or without the new bundle."""
    socket = socket_dir / "a.sock"
    entry_id = await node_entry(running, "w", ttl=60)
    async with running_agent(running, socket, tmp_path / "agent") as agent:
        await wait_held(agent, entry_id)
        SigningGate(running, monkeypatch)  # nothing is signed for the agent from now on
        listed = await running.admin().stub.ListAuthorities(apb.ListAuthoritiesRequest())
        (active,) = [
            a.key_id for a in listed.authorities if a.kind == "x509" and a.state == "active"
        ]
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            call = wgrpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
                wpb.X509SVIDRequest(), metadata=HEADER
            )
            first = await next_leaf(call)
            await running.admin().stub.Revoke(
                apb.RevokeRequest(kind="key", target=active, reason="test")
            )
            received: list[x509.Certificate] = []
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await _valid_on_arrival(call, received)
            assert all(leaf.issuer != first.issuer for leaf in received)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert reason_of(ended.value) == "AGENT_NO_VALID_SVID"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch_x509(socket)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def _valid_on_arrival(call: Any, received: list[x509.Certificate]) -> None:
    """Read the stream to its end, each SVID checked valid when it arrives."""
    async with asyncio.timeout(20):
        while isinstance(reply := await call.read(), wpb.X509SVIDResponse):
            leaf = split_der(reply.svids[0].x509_svid)[0]
            assert leaf.not_valid_after_utc > dt.datetime.now(dt.UTC)
            received.append(leaf)


async def test_the_authority_own_workload_api_never_sends_an_svid_past_its_life(
    tmp_path: Path, socket_dir: Path
) -> None:
    """The authority's clock jumps past an SVID's life while a stream holds it (a suspended VM,
    a stalled loop): the next message carries a new SVID, never the expired one."""
    clock = FakeClock(dt.datetime.now(dt.UTC))
    config = dataclasses.replace(
        make_config(tmp_path / "data", socket_dir), workload_api_socket=socket_dir / "w.sock"
    )
    async with running_with_clock(config, clock) as running:
        await running.admin().stub.CreateEntry(
            apb.CreateEntryRequest(
                spiffe_id=f"{TD}/w",
                selectors=[apb.Selector(type="unix", value=f"uid:{UID}")],
                x509_ttl_seconds=60,
            )
        )
        async with grpc.aio.insecure_channel(f"unix:{socket_dir / 'w.sock'}") as channel:
            call = wgrpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
                wpb.X509SVIDRequest(), metadata=HEADER
            )
            first = await next_leaf(call)
            clock.advance(dt.timedelta(minutes=5))  # past its life, by the authority's clock
            await running.admin().stub.CreateEntry(  # any change wakes the stream at once
                apb.CreateEntryRequest(
                    spiffe_id=f"{TD}/other",
                    selectors=[apb.Selector(type="unix", value="uid:65534")],
                )
            )
            leaf = await next_leaf(call)
            call.cancel()
        assert leaf.serial_number != first.serial_number
        assert first.not_valid_after_utc <= clock.now() < leaf.not_valid_after_utc


# --- an outage of the authority -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def authority_at(config: Config) -> AsyncIterator[AuthorityServer]:
    server = AuthorityServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


async def test_an_outage_of_the_authority_is_logged_once_and_the_agent_recovers(
    tmp_path: Path, socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = make_config(tmp_path / "data", socket_dir)  # 5-minute SVIDs: none expires here
    socket = socket_dir / "a.sock"
    async with running_authority(config) as running:
        fixed = dataclasses.replace(
            config, listen=running.address, listen_mtls=running.mtls_address
        )
        agent_cm = running_agent(running, socket, tmp_path / "agent")
        agent = await agent_cm.__aenter__()
        await wait_held(agent, await node_entry(running, "before-outage"))
        caplog.clear()
    try:
        # The authority is down now (its context ended); the agent keeps serving.
        outage = 6.0
        await asyncio.sleep(outage)  # the outage itself: what the agent does meanwhile counts
        during = [r for r in caplog.records if r.name.startswith(AGENT_LOGGERS)]
        assert await health(socket) == SERVING  # what it holds is valid for minutes
        assert (await fetch_x509(socket)).svids
        # It wrote about twenty lines a second; with backoff and state-change logging, a few.
        messages = [r.getMessage() for r in during]
        assert len(during) <= 15, messages
        assert sum(m.startswith("authority lost") for m in messages) == 1

        async with authority_at(fixed) as server:
            back = Running(server, fixed.data_dir, fixed.admin_socket_path, server.port, 0)
            await until(lambda: agent.reachable, "the agent reached the authority again", 60)
            entry_id = await node_entry(back, "after-outage")
            await wait_held(agent, entry_id, timeout=60)
            # Its revocation feed is back too: a revocation reaches it.
            await back.admin().stub.Revoke(
                apb.RevokeRequest(kind="entry", target=entry_id, reason="test")
            )
            await until(lambda: entry_id not in agent.held, "the revoked entry dropped", 30)
            await back.close_clients()
            assert agent.supervisor.down() == {}
            assert {SYNC_TASK, ROTATE_TASK, RENEW_TASK} <= set(agent.supervisor.names)
        restored = [
            m
            for m in (r.getMessage() for r in caplog.records)
            if m.startswith("authority restored")
        ]
        assert len(restored) == 1
    finally:
        await agent_cm.__aexit__(None, None, None)


async def test_an_identity_the_authority_refuses_to_sign_is_dropped_at_once(
    running: Running, tmp_path: Path, socket_dir: Path
) -> None:
    """The agent's revocation feed is away when a workload's SPIFFE ID is revoked. The next time
    the agent asks for that identity (a CA rotation makes it re-sign), the authority refuses:
    what the agent still holds for it is not handed out a moment longer, feed or no feed."""
    socket = socket_dir / "a.sock"
    entry_id = await node_entry(running, "w", ttl=60)
    async with running_agent(running, socket, tmp_path / "agent") as agent:
        await wait_held(agent, entry_id)
        assert (await fetch_x509(socket)).svids
        await agent._watcher.close()  # the feed is away: the agent will not hear of it
        await running.admin().stub.Revoke(
            apb.RevokeRequest(kind="subject", target=f"{TD}/w", reason="test")
        )
        await running.admin().stub.RotateCA(apb.RotateCARequest(immediate=True))
        await until(lambda: entry_id not in agent._held, "the refused identity dropped")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch_x509(socket)
        assert err.value.code() in (
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAVAILABLE,
        )


async def test_an_agent_stopped_across_rotations_starts_with_the_current_trust_bundle(
    tmp_path: Path, socket_dir: Path
) -> None:
    """The agent is down while the CA rotates twice: the bundle it saved knows none of the new
    keys. Its operator restarts it with the current bundle as --trust-bundle: it trusts both
    (the saved one no longer shadows the one it is given) and serves (soak finding 7)."""
    config = short_lived(tmp_path / "data", socket_dir, own_ttl=60.0)
    data_dir = tmp_path / "agent"
    async with running_authority(config) as running:
        entry_id = await node_entry(running, "w")
        async with running_agent(running, socket_dir / "a.sock", data_dir) as agent:
            await wait_held(agent, entry_id)
        for _ in range(2):
            await running.admin().stub.RotateCA(apb.RotateCARequest(immediate=True))
        saved = x509.load_pem_x509_certificates((data_dir / "agent" / "bundle.pem").read_bytes())
        current = x509.load_pem_x509_certificates(await running.bundle_pem())
        assert not set(current) <= set(saved)  # the saved bundle missed the rotations

        agent = NodeAgent(
            AgentConfig(
                server=running.address,
                trust_bundle_pem=await running.bundle_pem(),
                data_dir=data_dir,
                socket=socket_dir / "b.sock",
            )
        )
        await agent.start(timeout=20)
        try:
            reply = await fetch_x509(socket_dir / "b.sock")
            assert reply.svids
        finally:
            await agent.stop()
