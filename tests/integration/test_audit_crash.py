"""kill -9 during a burst of exchanges: after a restart the chain verifies, every token a client
received has its ``task_token.issued`` record, and every such record has its token's lineage row
(the action it records) in the store."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority.client import AdminClient, WorkloadClient, der_chain_to_pem
from tests.helpers import ServeProcess, short_socket_dir, start_serve

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"
AGENTS = [f"spiffe://example.org/agent/burst-{n}" for n in range(4)]
WORKERS_PER_AGENT = 4
PROMPT = hashlib.sha256(b"burst").hexdigest()


@dataclass
class Burst:
    """What the clients saw: every token handed to them, and how their calls ended."""

    tokens: dict[str, str] = field(default_factory=dict)  # jti -> token
    errors: list[grpc.StatusCode] = field(default_factory=list)
    first: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
def socket_dirs() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


def start(data_dir: Path, socket_dirs: list[Path]) -> ServeProcess:
    folder = short_socket_dir()
    socket_dirs.append(folder)
    return start_serve(data_dir, folder)


async def attested_stubs(
    served: ServeProcess, folder: Path
) -> tuple[list[WorkloadClient], list[pb_grpc.WorkloadAsyncStub]]:
    clients: list[WorkloadClient] = []
    stubs: list[pb_grpc.WorkloadAsyncStub] = []
    async with AdminClient(served.admin_socket) as admin:
        bundle = await admin.stub.GetBundle(pb.GetBundleRequest())
        bundle_pem = der_chain_to_pem(list(bundle.x509_authorities))
        for n, spiffe_id in enumerate(AGENTS):
            created = await admin.stub.CreateJoinToken(
                pb.CreateJoinTokenRequest(spiffe_id=spiffe_id, ttl_seconds=600)
            )
            async with WorkloadClient(served.address, bundle_pem) as anonymous:
                await anonymous.attest_to_folder(
                    "join_token", created.token.encode(), folder / f"agent-{n}"
                )
            holder = WorkloadClient.from_svid_dir(served.address, folder / f"agent-{n}")
            clients.append(holder)
            stubs.append(await holder.mtls_stub())
    return clients, stubs


def request(worker: int, n: int) -> pb.ExchangeRequest:
    return pb.ExchangeRequest(
        intent=pb.Intent(action="read", resource="metrics/prod", purpose="burst"),
        audience="metrics-api",
        task_id=f"task-burst-{worker}-{n}",
        context=pb.AuditContext(prompt_sha256=PROMPT, tool_name="query", model="model-x"),
    )


async def fire(stub: pb_grpc.WorkloadAsyncStub, worker: int, burst: Burst) -> None:
    """Exchange in a loop until the server goes away."""
    n = 0
    while True:
        try:
            response = await stub.Exchange(request(worker, n), timeout=20)
        except grpc.aio.AioRpcError as exc:
            burst.errors.append(exc.code())
            return
        issued = response.token
        burst.tokens[issued.jti] = issued.token
        burst.first.set()
        n += 1


def store_state(data_dir: Path) -> tuple[dict[str, dict[str, object]], set[str]]:
    """(task_token.issued records by jti, the jtis of the task_tokens table), read-only."""
    db = sqlite3.connect(f"file:{data_dir / 'authority.db'}?mode=ro", uri=True)
    try:
        issued: dict[str, dict[str, object]] = {}
        for task_id, details in db.execute(
            "SELECT task_id, details FROM audit WHERE kind = 'task_token.issued'"
        ):
            doc = json.loads(details)
            assert doc["jti"] not in issued, "two records for one token"
            issued[doc["jti"]] = {"task_id": task_id, **doc}
        rows = {str(jti) for (jti,) in db.execute("SELECT jti FROM task_tokens")}
    finally:
        db.close()
    return issued, rows


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [0.0, 0.3, 1.2], ids=["at-once", "early", "mid-burst"])
async def test_kill_9_during_a_burst_keeps_tokens_and_records_together(
    tmp_path: Path, socket_dirs: list[Path], kill_after: float
) -> None:
    data = tmp_path / "data"
    served = start(data, socket_dirs)
    clients: list[WorkloadClient] = []
    workers: list[asyncio.Task[None]] = []
    try:
        served.cli("policy", "load", str(EXAMPLES / "agents.cedar"))
        clients, stubs = await attested_stubs(served, tmp_path)
        burst = Burst()
        workers = [
            asyncio.create_task(fire(stubs[w % len(stubs)], w, burst))
            for w in range(len(stubs) * WORKERS_PER_AGENT)
        ]
        await asyncio.wait_for(burst.first.wait(), timeout=30)
        await asyncio.sleep(kill_after)
        killed_at = time.monotonic()
        os.kill(served.proc.pid, signal.SIGKILL)
        assert await asyncio.to_thread(served.proc.wait, 30) == -signal.SIGKILL
        await asyncio.wait_for(asyncio.gather(*workers), timeout=60)
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for client in clients:
            await client.close()
        if served.proc.poll() is None:
            served.stop(signal.SIGKILL)

    # The burst was cut short by the kill, not by anything else.
    assert len(burst.errors) == len(stubs) * WORKERS_PER_AGENT
    assert set(burst.errors) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert burst.tokens, "the burst issued nothing before the kill"
    assert time.monotonic() - killed_at < 60

    restarted = start(data, socket_dirs)
    try:
        result = restarted.cli("audit", "verify", check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("ok: ")
        issued, rows = store_state(data)
        # Every token a client holds was recorded, with its digest, in the chain...
        unrecorded = set(burst.tokens) - set(issued)
        assert not unrecorded, f"{len(unrecorded)} tokens issued without their record"
        for jti, token in burst.tokens.items():
            assert issued[jti]["token_sha256"] == hashlib.sha256(token.encode()).hexdigest()
        # ...and no record claims a token that the store does not know (and vice versa).
        assert set(issued) == rows
        # A record may outlive its response (the kill came between commit and reply), but the
        # chain holds no more than what was committed: here, every committed token is counted.
        assert len(issued) >= len(burst.tokens)
        # The authority serves on: a new exchange after the restart is recorded like the rest.
        folder = tmp_path / "agent-0"
        async with WorkloadClient.from_svid_dir(restarted.address, folder) as client:
            stub = await client.mtls_stub()
            response = await stub.Exchange(request(999, 0))
        after, rows_after = store_state(data)
        assert response.token.jti in after
        assert set(after) == rows_after
        result = restarted.cli("audit", "verify", check=False)
        assert result.returncode == 0, result.stderr
    finally:
        with contextlib.suppress(Exception):
            restarted.stop()
