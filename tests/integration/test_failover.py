"""Clients given several authority servers (replicas on one database): the node agent,
``authority workload ...``, ``authority watch`` and the relying library move to the next server
when one is dead or dies, make a call again there only when that is safe, and resume their
streams from the last sequence number: nothing missed, nothing delivered twice.

A second replica is played by the same data directory served again on other ports (the
database shared, as PostgreSQL replicas share theirs). Real servers on real sockets throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority.agent import AgentConfig, AttestProof, NodeAgent
from authority.backoff import Backoff
from authority.client import (
    RevocationWatcher,
    ServerRotation,
    TaskKeySource,
    WorkloadApiClient,
    WorkloadClient,
    server_addresses,
)
from authority.config import Config
from tests.helpers import (
    AGENT_ID,
    Running,
    ServeProcess,
    authority_command,
    free_port,
    interrupt,
    running_authority,
    short_socket_dir,
    start_serve_on,
    wait_held,
    wait_until,
)
from tests.helpers import test_config as make_config

WAIT = 25.0  # seconds for a watch to print what a move between replicas delays

TD = "example.org"
UID = os.getuid()


async def until(predicate: Callable[[], bool], what: str, timeout: float = 25.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def dead_address() -> str:
    """An address nothing listens on (connection refused)."""
    return f"127.0.0.1:{free_port()}"


# --- the rotation itself -----------------------------------------------------------------------


def test_the_rotation_moves_once_per_failure_of_the_current_server() -> None:
    rotation = ServerRotation(["a:1", "b:2", "a:1", "c:3"])
    assert rotation.addresses == ("a:1", "b:2", "c:3")  # each once, in the order given
    assert rotation.current == "a:1"
    assert rotation.failed("a:1", "UNAVAILABLE")
    # A second call failing on the server already left does not move it again.
    assert not rotation.failed("a:1", "UNAVAILABLE")
    assert rotation.current == "b:2"
    assert rotation.failed("b:2", "x")
    assert rotation.failed("c:3", "x")
    assert rotation.current == "a:1"  # round again
    assert rotation.moves == 3
    single = ServerRotation("only:1")
    assert not single.failed("only:1", "x")
    assert single.current == "only:1"
    with pytest.raises(ValueError, match="at least one"):
        server_addresses([])
    with pytest.raises(ValueError, match="at least one"):
        server_addresses(["a:1", " "])


# --- what is made again on the next server, and what never is ---------------------------------


class _Bundles(pb_grpc.WorkloadServicer):
    """GetBundle answering UNAVAILABLE (a server that may have run the call) or a bundle."""

    def __init__(self, unavailable: bool) -> None:
        self.unavailable = unavailable
        self.calls = 0

    async def GetBundle(self, request: Any, context: Any) -> pb.Bundle:
        self.calls += 1
        if self.unavailable:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
        return pb.Bundle(trust_domain=TD, sequence=7)


@contextlib.asynccontextmanager
async def fake_server(path: Path, servicer: _Bundles) -> AsyncIterator[str]:
    server = grpc.aio.server()
    pb_grpc.add_WorkloadServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    try:
        yield f"unix:{path}"
    finally:
        await server.stop(None)


async def test_only_a_repeatable_call_is_made_again_after_a_server_may_have_run_it(
    socket_dir: Path,
) -> None:
    # GetBundle alone: the other methods are grpc's UNIMPLEMENTED.
    failing = _Bundles(unavailable=True)  # type: ignore[abstract]
    answering = _Bundles(unavailable=False)  # type: ignore[abstract]
    request = pb.GetBundleRequest()
    fast = Backoff(0.01, 0.02)
    async with (
        fake_server(socket_dir / "one.sock", failing) as one,
        fake_server(socket_dir / "two.sock", answering) as two,
    ):
        # Not repeatable: the first server answered UNAVAILABLE after the call reached it
        # (it may have run it), so the second server is never asked.
        async with WorkloadClient([one, two], None, backoff=fast) as client:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.call(lambda s: s.GetBundle(request), mtls=False, repeatable=False)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert (failing.calls, answering.calls) == (1, 0)
            assert client.address == two  # the next call goes to the next server
        # Repeatable: made again on the next server, once.
        async with WorkloadClient([one, two], None, backoff=fast) as client:
            got = await client.call(lambda s: s.GetBundle(request), mtls=False, repeatable=True)
            assert got.sequence == 7
            assert (failing.calls, answering.calls) == (2, 1)
        # A server that could not even be connected to got nothing: any call moves on.
        dead = f"unix:{socket_dir / 'nobody.sock'}"
        async with WorkloadClient([dead, two], None, backoff=fast) as client:
            got = await client.call(lambda s: s.GetBundle(request), mtls=False, repeatable=False)
            assert got.sequence == 7
            assert answering.calls == 2
        # Every server down: the last one's error, as gRPC reported it, and no loop.
        async with WorkloadClient([dead, one], None, backoff=fast) as client:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.call(lambda s: s.GetBundle(request), mtls=False, repeatable=True)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert failing.calls == 3


# --- the relying library -----------------------------------------------------------------------


async def test_the_relying_library_uses_the_live_server_of_those_given(
    authority: Running, tmp_path: Path
) -> None:
    await authority.attested(f"spiffe://{TD}/relying/svc", tmp_path / "svid")
    dead = dead_address()
    async with WorkloadClient.from_svid_dir([dead, authority.address], tmp_path / "svid") as client:
        keys = TaskKeySource(client, issuer=TD)
        assert await keys.keys()  # fetched from the second server
        events: list[int] = []
        watcher = RevocationWatcher(
            client.watch_revocations, on_event=lambda e: events.append(e.seq)
        )
        watcher.start()
        try:
            await watcher.wait_synced(timeout=20)
            seq = await _revoke_subject(authority, f"spiffe://{TD}/elsewhere")
            await until(lambda: watcher.seq >= seq, "the revocation applied")
        finally:
            await watcher.close()
        assert client.address == authority.address
    assert events == [seq]


# --- the node agent: a dead server first, then its server dies and another takes over -----------


def _on_ports(config: Config, port: int, mtls_port: int) -> Config:
    return dataclasses.replace(
        config, listen=f"127.0.0.1:{port}", listen_mtls=f"127.0.0.1:{mtls_port}"
    )


async def _revoke_subject(running: Running, spiffe_id: str, *, register: bool = True) -> int:
    """Revoke ``spiffe_id`` (registered first, unless it is already: a name that exists)."""
    if register:
        await running.admin().stub.CreateEntry(
            pb.CreateEntryRequest(
                spiffe_id=spiffe_id, selectors=[pb.Selector(type="unix", value="uid:64999")]
            )
        )
    revoked = await running.admin().stub.Revoke(
        pb.RevokeRequest(kind="subject", target=spiffe_id, reason="test")
    )
    return max(r.seq for r in revoked.revocations)


async def _node_entry(running: Running, name: str) -> str:
    created = await running.admin().stub.CreateEntry(
        pb.CreateEntryRequest(
            spiffe_id=f"spiffe://{TD}/{name}",
            selectors=[pb.Selector(type="unix", value=f"uid:{UID}")],
            parent_id=AGENT_ID,
        )
    )
    return created.id


async def test_the_agent_moves_to_another_replica_and_its_feed_resumes(
    tmp_path: Path, socket_dir: Path
) -> None:
    base = make_config(tmp_path / "data", socket_dir)
    first = _on_ports(base, free_port(), free_port())
    second = _on_ports(base, free_port(), free_port())
    a_addr, b_addr = first.listen, second.listen
    agent_socket = socket_dir / "agent.sock"
    agent: NodeAgent | None = None
    try:
        async with running_authority(first) as a:
            kept = await _node_entry(a, "kept")
            dropped = await _node_entry(a, "dropped")
            before = await _revoke_subject(a, f"spiffe://{TD}/elsewhere")
            # The second replica is not up yet: the agent starts on the first one anyway.
            agent = NodeAgent(
                AgentConfig(
                    server=[b_addr, a_addr],
                    trust_bundle_pem=await a.bundle_pem(),
                    data_dir=tmp_path / "agent",
                    socket=agent_socket,
                    proof=AttestProof("join_token", (await a.join_token(AGENT_ID)).encode()),
                )
            )
            await agent.start(timeout=20)
            assert agent.server == a_addr
            await wait_held(agent, kept)
            await wait_held(agent, dropped)
            assert agent.feed_seq >= before
        # The first replica is gone; the second comes up on the same database.
        async with running_authority(second) as b:
            gone = await _revoke_subject(b, f"spiffe://{TD}/dropped", register=False)
            fresh = await _node_entry(b, "fresh")
            await until(lambda: agent is not None and agent.feed_seq >= gone, "the feed resumed")
            await until(lambda: dropped not in agent.held, "the revoked entry dropped")
            await wait_held(agent, fresh, timeout=25)  # signed by the second replica
            assert agent.server == b_addr
            assert kept in agent.held
            async with WorkloadApiClient(agent_socket) as workload:
                served = {s.spiffe_id for s in await workload.fetch_x509_svids()}
            assert served == {f"spiffe://{TD}/kept", f"spiffe://{TD}/fresh"}
            # Its own renewal goes to the second replica too.
            await agent.renew()
            assert agent.stats.own_renewals == 1
    finally:
        if agent is not None:
            await agent.stop()


# --- the commands, as processes ------------------------------------------------------------------


class Replicas:
    """One data directory served by one ``authority serve`` at a time, on either of two pairs
    of ports: a replica dies, another takes over the same database."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.socket_dir = short_socket_dir()
        self.ports = [(free_port(), free_port()), (free_port(), free_port())]
        self.served: ServeProcess = start_serve_on(data_dir, self.socket_dir, *self.ports[0])

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port, _ in self.ports]

    def move_to(self, which: int, sig: int = signal.SIGKILL) -> None:
        self.served.stop(sig)
        self.served = start_serve_on(self.data_dir, self.socket_dir, *self.ports[which])

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.served.cli(*args)

    def revoke(self, name: str) -> int:
        spiffe_id = f"spiffe://{TD}/{name}"
        self.cli("entry", "create", "--spiffe-id", spiffe_id, "--selector", "unix:uid:64999")
        out = self.cli("revoke", "--spiffe-id", spiffe_id, "--reason", "test", "--format", "json")
        return max(int(json.loads(line)["seq"]) for line in out.stdout.splitlines())

    def close(self) -> None:
        self.served.stop(signal.SIGKILL)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Replicas]:
    running = Replicas(tmp_path / "data")
    try:
        yield running
    finally:
        running.close()


def _servers(*addresses: str) -> list[str]:
    return [arg for address in addresses for arg in ("--server", address)]


def test_workload_commands_use_the_live_server_of_those_given(
    replicas: Replicas, tmp_path: Path
) -> None:
    live, dead = replicas.served.address, dead_address()
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(replicas.cli("bundle", "show").stdout)
    svid = tmp_path / "svid"
    token = replicas.cli("token", "create", "--spiffe-id", f"spiffe://{TD}/w").stdout.strip()
    replicas.served.cli(
        "workload", "attest", *_servers(dead, live), "--trust-bundle", str(bundle),
        "--join-token", "-", "--out", str(svid), stdin=token + "\n",
    )  # fmt: skip
    jwt = replicas.cli(
        "workload", "jwt", *_servers(dead, live), "--svid-dir", str(svid), "--audience", "svc"
    ).stdout.strip()
    assert jwt.count(".") == 2  # a JWT (never printed here)
    replicas.cli("workload", "renew", *_servers(dead, live), "--svid-dir", str(svid))
    shown = replicas.cli(
        "bundle", "show", *_servers(dead, live), "--trust-bundle", str(bundle)
    ).stdout
    assert shown == bundle.read_text()
    # Every server dead: one line, the call's own status, no traceback.
    failed = replicas.served.cli(
        "workload", "jwt", *_servers(dead, dead_address()), "--svid-dir", str(svid),
        "--audience", "svc", check=False,
    )  # fmt: skip
    assert failed.returncode == 1
    assert failed.stderr.startswith("error: UNAVAILABLE"), failed.stderr
    assert "Traceback" not in failed.stderr


def test_watch_misses_nothing_while_it_moves_between_replicas(
    replicas: Replicas, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(replicas.cli("bundle", "show").stdout)
    svid = tmp_path / "watcher"
    token = replicas.cli(
        "token", "create", "--spiffe-id", f"spiffe://{TD}/relying/watcher"
    ).stdout.strip()
    replicas.served.cli(
        "workload", "attest", "--server", replicas.served.address, "--trust-bundle", str(bundle),
        "--join-token", "-", "--out", str(svid), stdin=token + "\n",
    )  # fmt: skip
    first = replicas.revoke("first")  # before the watch: replayed from --since
    out, err = tmp_path / "watch.out", tmp_path / "watch.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [
                *authority_command(), "watch", "--format", "json", "--since", str(first - 1),
                *_servers(*replicas.addresses), "--svid-dir", str(svid),
            ],
            env={**replicas.served.env(), "PYTHONUNBUFFERED": "1"},
            stdout=stdout,
            stderr=stderr,
        )  # fmt: skip

    def seqs() -> list[int]:
        return [int(json.loads(line)["seq"]) for line in out.read_text().splitlines() if line]

    try:
        wait_until(lambda: first in seqs(), "the replayed revocation", timeout=WAIT)
        # The replica it follows is killed; the other comes up and revokes at once, while the
        # watch is still moving (its backoff), then again once it has surely moved.
        replicas.move_to(1)
        moving = replicas.revoke("while-moving")
        after = replicas.revoke("after-moving")
        wait_until(
            lambda: after in seqs(), "the revocations made on the second replica", timeout=WAIT
        )
        # And back to the first pair of ports (the second replica dies in turn).
        replicas.move_to(0, signal.SIGTERM)
        back = replicas.revoke("back")
        wait_until(lambda: back in seqs(), "the revocation made after moving back", timeout=WAIT)
        assert proc.poll() is None
    finally:
        interrupt(proc)
    # Each once, in order: nothing missed, nothing printed twice.
    assert seqs() == [first, moving, after, back], seqs()
    log = err.read_text()
    assert "Traceback" not in log, log
    assert "moving to" in log, log  # the move is said (once per move from a working server)
    assert log.count("moving to") <= 4, log


def test_the_agent_command_takes_several_servers(tmp_path: Path) -> None:
    """``--server`` repeats; an address that is not HOST:PORT is one line, before dialing."""
    result = subprocess.run(
        [
            *authority_command(), "agent", "--server", "127.0.0.1:1", "--server", "nonsense",
            "--trust-bundle", str(tmp_path / "b.pem"), "--workload-api-socket",
            str(tmp_path / "a.sock"),
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--server must be HOST:PORT (got 'nonsense')" in result.stderr
    assert "Traceback" not in result.stderr
