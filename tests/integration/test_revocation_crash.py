"""No revocation is lost: ``authority serve`` killed with SIGKILL while revocations are being
written and subscribers are attached, then restarted on the same data directory and ports.

Every acknowledged revocation must be in the store after the restart, and every subscriber,
resuming from its last sequence number, must end with exactly what the store holds: the
acknowledged revocations, plus at most the one whose call was in flight when the server died
(committed, but its reply lost). Nothing twice, nothing out of order, no sequence number reused.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
import pytest

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority.client import SvidFiles, WorkloadClient, der_chain_to_pem
from authority.watch import RevocationWatcher, StreamFactory, stub_stream
from tests.helpers import (
    ServeProcess,
    authority_command,
    free_port,
    short_socket_dir,
    wait_serving,
)

pytestmark = pytest.mark.slow

# Quick reconnects once the authority is back (the channel's own backoff; the watcher adds its own).
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 300),
]
VICTIM = "spiffe://example.org/victim/{}"


class Crashable:
    """One data directory and one set of ports, served by one ``authority serve`` at a time."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.socket_dir = short_socket_dir()
        self.port, self.mtls_port = free_port(), free_port()
        self.log_path = data_dir.parent / "serve.log"
        self.current: ServeProcess | None = None

    @property
    def admin_socket(self) -> Path:
        return self.socket_dir / "admin.sock"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServeProcess:
        assert self.current is None
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                [
                    *authority_command(),
                    "serve",
                    "--data-dir", str(self.data_dir),
                    "--listen", self.address,
                    "--listen-mtls", f"127.0.0.1:{self.mtls_port}",
                    "--admin-socket", str(self.admin_socket),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.current = ServeProcess(
            proc,
            self.data_dir,
            self.admin_socket,
            self.address,
            f"127.0.0.1:{self.mtls_port}",
            self.log_path,
        )
        wait_serving(self.current)
        return self.current

    def kill(self) -> None:
        assert self.current is not None
        assert self.current.stop(signal.SIGKILL) == -signal.SIGKILL
        self.current = None

    def close(self) -> None:
        if self.current is not None:
            self.current.stop(signal.SIGTERM)
            self.current = None
        shutil.rmtree(self.socket_dir, ignore_errors=True)


@pytest.fixture
def crashable(tmp_path: Path) -> Iterator[Crashable]:
    served = Crashable(tmp_path / "data")
    try:
        yield served
    finally:
        served.close()


@dataclass
class Subscriber:
    """A watcher and every message it got, in order, across reconnects."""

    name: str
    since: list[int] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    watcher: RevocationWatcher = field(init=False)

    @classmethod
    def start(cls, name: str, inner: StreamFactory) -> Subscriber:
        sub = cls(name)
        sub.watcher = RevocationWatcher(
            sub._recording(inner), backoff_initial=0.02, backoff_max=0.3
        )
        sub.watcher.start()
        return sub

    def _recording(self, inner: StreamFactory) -> StreamFactory:
        def open_stream(since: int) -> AsyncIterator[pb.RevocationMessage]:
            self.since.append(since)
            return stream(since)

        async def stream(since: int) -> AsyncIterator[pb.RevocationMessage]:
            async for message in inner(since):
                body = str(message.WhichOneof("body"))
                self.bodies.append(body)
                if body == "event":
                    self.seqs.append(message.event.seq)
                    self.targets.append(message.event.target)
                yield message

        return open_stream

    def at(self, seq: int) -> bool:
        return self.watcher.seq == seq and self.watcher.fresh()


def admin_stub(socket: Path, channels: list[grpc.aio.Channel]) -> pb_grpc.AdminAsyncStub:
    channel = grpc.aio.insecure_channel(f"unix:{socket}", CHANNEL_OPTIONS)
    channels.append(channel)
    stub: pb_grpc.AdminAsyncStub = pb_grpc.AdminStub(channel)
    return stub


async def store_contents(socket: Path) -> list[tuple[int, str]]:
    """(seq, target) of every stored revocation: the admin feed's replay from 0, up to the
    heartbeat that ends it."""
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        stub: pb_grpc.AdminAsyncStub = pb_grpc.AdminStub(channel)
        call = stub.WatchRevocations(pb.WatchRevocationsRequest(since=0))
        found: list[tuple[int, str]] = []
        try:
            async for message in call:
                body = message.WhichOneof("body")
                assert body in ("event", "heartbeat"), body
                if body == "heartbeat":
                    assert message.heartbeat.seq == (found[-1][0] if found else 0)
                    return found
                found.append((message.event.seq, message.event.target))
        finally:
            call.cancel()
    raise AssertionError("the feed ended before its replay did")


@dataclass
class Writer:
    """Revokes victims one at a time; records what the authority acknowledged."""

    stub: pb_grpc.AdminAsyncStub
    acknowledged: list[tuple[int, str]] = field(default_factory=list)
    in_flight: str | None = None
    failure: grpc.StatusCode | None = None
    next_victim: int = 0

    async def run(self, limit: int | None = None, *, wait_for_ready: bool = False) -> None:
        written = 0
        while limit is None or written < limit:
            target = VICTIM.format(self.next_victim)
            self.next_victim += 1
            self.in_flight = target
            try:
                reply = await self.stub.Revoke(
                    pb.RevokeRequest(
                        kind="subject", target=target, reason="crash test", preemptive=True
                    ),
                    timeout=10,
                    wait_for_ready=wait_for_ready,
                )
            except grpc.aio.AioRpcError as exc:
                self.failure = exc.code()
                return
            [event] = reply.revocations
            assert event.target == target
            self.acknowledged.append((event.seq, target))
            self.in_flight = None
            written += 1


async def _attest(served: Crashable, spiffe_id: str, folder: Path) -> WorkloadClient:
    async with grpc.aio.insecure_channel(f"unix:{served.admin_socket}") as channel:
        admin: pb_grpc.AdminAsyncStub = pb_grpc.AdminStub(channel)
        created = await admin.CreateJoinToken(pb.CreateJoinTokenRequest(spiffe_id=spiffe_id))
        bundle = der_chain_to_pem(
            list((await admin.GetBundle(pb.GetBundleRequest())).x509_authorities)
        )
    async with WorkloadClient(served.address, bundle) as attesting:
        await attesting.attest_to_folder("join_token", created.token.encode(), folder)
    chain, key, bundle = SvidFiles(folder).read()
    return WorkloadClient(
        served.address, bundle, svid_chain_pem=chain, svid_key_pem=key, options=CHANNEL_OPTIONS
    )


async def _until(predicate: Callable[[], bool], what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("kill_after", [0.05, 0.2, 0.45, 0.8])
async def test_no_acknowledged_revocation_is_lost_across_a_kill(
    crashable: Crashable, tmp_path: Path, kill_after: float
) -> None:
    crashable.start()
    channels: list[grpc.aio.Channel] = []
    clients: list[WorkloadClient] = []
    subscribers: list[Subscriber] = []
    try:
        # Some history before the subscribers attach, so they start with a replay.
        writer = Writer(admin_stub(crashable.admin_socket, channels))
        await writer.run(limit=5)

        # Subscribers: two over the operator socket, two over mutual TLS with SVIDs of their own.
        factories: list[tuple[str, StreamFactory]] = []
        for n in range(2):
            factories.append(
                (f"admin-{n}", stub_stream(admin_stub(crashable.admin_socket, channels)))
            )
        for n in range(2):
            client = await _attest(
                crashable, f"spiffe://example.org/service/relying-{n}", tmp_path / f"svid-{n}"
            )
            clients.append(client)
            factories.append((f"mtls-{n}", stub_stream(await client.mtls_stub())))
        subscribers.extend(Subscriber.start(name, inner) for name, inner in factories)
        for sub in subscribers:
            await sub.watcher.wait_synced()
            assert sub.seqs == [seq for seq, _ in writer.acknowledged], sub.name

        # The burst, and SIGKILL somewhere in it.
        burst = asyncio.create_task(writer.run())
        await asyncio.sleep(kill_after + random.uniform(0, 0.05))
        acknowledged_before_kill = len(writer.acknowledged)
        crashable.kill()
        await asyncio.wait_for(burst, 15)
        assert writer.failure is not None, "the writer should have seen the server die"
        assert acknowledged_before_kill > 5, "the kill should land in the middle of the burst"
        in_doubt = writer.in_flight

        crashable.start()
        stored = await store_contents(crashable.admin_socket)
        acked = set(writer.acknowledged)
        # Every acknowledged revocation is there, with the sequence number it was given...
        assert acked <= set(stored)
        # ...and nothing else but, possibly, the one committed whose reply the kill swallowed.
        extra = [entry for entry in stored if entry not in acked]
        assert all(target == in_doubt for _, target in extra), extra
        assert len(extra) <= 1
        assert [seq for seq, _ in stored] == sorted({seq for seq, _ in stored})

        # Every subscriber resumes from its last sequence number and converges on the store.
        head = stored[-1][0]
        for sub in subscribers:
            await _until(partial(sub.at, head), f"{sub.name} to catch up")
        for sub in subscribers:
            assert list(zip(sub.seqs, sub.targets, strict=True)) == stored, sub.name
            assert sub.since[0] == 0
            assert sub.watcher.connects >= 2, sub.name
            assert all(since > 0 for since in sub.since[1:]), sub.since
            assert "snapshot" not in sub.bodies
            assert "resync" not in sub.bodies
            assert set(sub.watcher.revoked.targets["subject"]) == {t for _, t in stored}

        # Live again: new revocations get new sequence numbers (none reused) and reach everyone.
        writer.failure = None
        written = len(writer.acknowledged)
        await writer.run(limit=3, wait_for_ready=True)
        assert writer.failure is None
        assert len(writer.acknowledged) == written + 3
        final = await store_contents(crashable.admin_socket)
        assert final[: len(stored)] == stored
        assert [seq for seq, _ in final[len(stored) :]] == [s for s, _ in writer.acknowledged[-3:]]
        assert min(s for s, _ in final[len(stored) :]) > head
        for sub in subscribers:
            await _until(partial(sub.at, final[-1][0]), f"{sub.name} live")
            assert list(zip(sub.seqs, sub.targets, strict=True)) == final, sub.name
    finally:
        for sub in subscribers:
            await sub.watcher.close()
        for client in clients:
            await client.close()
        for channel in channels:
            await channel.close(None)
