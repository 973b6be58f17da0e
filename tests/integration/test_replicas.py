"""Three `authority serve` processes on one PostgreSQL database form one trust domain."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from authority._pb import authority_v1_authority_pb2 as pb
from authority.client import AdminClient, WorkloadApiClient, WorkloadClient, der_chain_to_pem
from tests.helpers import (
    ServeProcess,
    authority_command,
    interrupt,
    short_socket_dir,
    start_serve,
    wait_until,
)

TD = "spiffe://example.org"
UID = os.getuid()


@pytest.fixture
def replicas(pg_url: str, tmp_path: Path) -> Iterator[list[ServeProcess]]:
    served: list[ServeProcess] = []
    try:
        for i in range(3):
            sockets = short_socket_dir()
            served.append(
                start_serve(
                    tmp_path / f"r{i}" / "data",
                    sockets,
                    "--store",
                    pg_url,
                    "--replica",
                    f"replica-{i}",
                    "--workload-api-socket",
                    str(sockets / "workload.sock"),
                )
            )
        yield served
    finally:
        for s in served:
            s.stop()
        for s in served:
            assert "Traceback" not in s.log(), s.log()


def bundle_certs(served: ServeProcess) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(served.cli("bundle", "show").stdout.encode())


def holds_three_cas(served: ServeProcess) -> bool:
    return len(bundle_certs(served)) == 3


def test_every_replica_serves_the_union_bundle_and_its_svids_verify_with_any_other(
    replicas: list[ServeProcess], tmp_path: Path
) -> None:
    # Each replica holds its own CA key; every bundle comes to hold all three.
    for served in replicas:
        wait_until(functools.partial(holds_three_cas, served), "three CAs in every bundle")
    assert "replica=replica-0" in replicas[0].log()
    fingerprints = {
        frozenset(c.fingerprint(c.signature_hash_algorithm) for c in bundle_certs(s))  # type: ignore[arg-type]
        for s in replicas
    }
    assert len(fingerprints) == 1

    for i, served in enumerate(replicas):
        bundle = tmp_path / f"bundle-{i}.pem"
        bundle.write_text(served.cli("bundle", "show").stdout)
        token = served.cli("token", "create", "--spiffe-id", f"{TD}/w{i}").stdout.strip()
        out = tmp_path / f"svid-{i}"
        served.cli(
            "workload",
            "attest",
            "--server",
            served.address,
            "--trust-bundle",
            str(bundle),
            "--join-token",
            token,
            "--out",
            str(out),
        )
        for j, other in enumerate(replicas):
            if j == i:
                continue
            other_bundle = tmp_path / f"bundle-from-{j}.pem"
            other_bundle.write_text(other.cli("bundle", "show").stdout)
            verified = subprocess.run(
                ["openssl", "verify", "-CAfile", str(other_bundle), str(out / "svid.pem")],
                capture_output=True,
                text=True,
                check=False,
            )
            assert verified.returncode == 0, (i, j, verified.stdout, verified.stderr)


def test_an_entry_created_on_one_replica_is_served_by_another_within_a_second(
    replicas: list[ServeProcess],
) -> None:
    workload_socket = replicas[2].admin_socket.parent / "workload.sock"
    replicas[2].cli(
        "entry", "create", "--spiffe-id", f"{TD}/first", "--selector", f"unix:uid:{UID}"
    )

    async def scenario() -> float:
        async with WorkloadApiClient(workload_socket) as client:
            stream = client.watch_x509_svids()
            first = await asyncio.wait_for(anext(stream), 10)
            assert [s.spiffe_id for s in first] == [f"{TD}/first"]
            await asyncio.to_thread(
                replicas[0].cli,
                "entry",
                "create",
                "--spiffe-id",
                f"{TD}/pushed",
                "--selector",
                f"unix:uid:{UID}",
            )
            created = time.monotonic()
            while True:
                update = await asyncio.wait_for(anext(stream), 10)
                if any(s.spiffe_id == f"{TD}/pushed" for s in update):
                    return time.monotonic() - created

    delay = asyncio.run(scenario())
    assert delay < 1.0, f"replica 3 served the entry {delay:.3f} s after replica 1 created it"


def test_one_join_token_raced_over_the_replicas_admits_one(
    replicas: list[ServeProcess],
) -> None:
    token = replicas[0].cli("token", "create", "--spiffe-id", f"{TD}/node").stdout.strip()

    async def scenario() -> list[str]:
        clients: list[WorkloadClient] = []
        for served in replicas:
            async with AdminClient(served.admin_socket) as admin:
                bundle = await admin.stub.GetBundle(pb.GetBundleRequest())
            clients.append(
                WorkloadClient(served.address, der_chain_to_pem(list(bundle.x509_authorities)))
            )

        async def attempt(i: int, folder: Path) -> str:
            try:
                await clients[i % 3].attest_to_folder("join_token", token.encode(), folder)
            except grpc.aio.AioRpcError as exc:
                used = "already used" in (exc.details() or "")
                return f"{exc.code().name}{' (used)' if used else ''}"
            return "ok"

        try:
            return await asyncio.gather(
                *(attempt(i, replicas[0].data_dir.parent / f"race-{i}") for i in range(50))
            )
        finally:
            for client in clients:
                await client.close()

    outcomes = asyncio.run(scenario())
    assert outcomes.count("ok") == 1, outcomes
    assert set(outcomes) == {"ok", "PERMISSION_DENIED (used)"}, set(outcomes)


@contextlib.contextmanager
def watching(served: ServeProcess, out: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(out, "wb") as stdout:
        proc = subprocess.Popen(
            [*authority_command(), "watch", "--format", "json"],
            env={**served.env(), "PYTHONUNBUFFERED": "1"},
            stdout=stdout,
            stderr=subprocess.DEVNULL,
        )
    try:
        yield proc
    finally:
        interrupt(proc)


def printed(out: Path) -> list[dict[str, object]]:
    events = []
    for line in out.read_text().splitlines():
        doc = json.loads(line)
        if "seq" in doc:
            events.append(doc)
    return events


def printed_three(out: Path) -> bool:
    return len(printed(out)) == 3


def test_a_revocation_on_one_replica_reaches_subscribers_of_the_others_and_audit_verifies(
    replicas: list[ServeProcess], tmp_path: Path
) -> None:
    a, b, c = replicas
    with watching(b, tmp_path / "b.out"), watching(c, tmp_path / "c.out"):
        time.sleep(1.0)  # both subscribed
        for name in ("one", "two", "three"):
            a.cli("revoke", "--spiffe-id", f"{TD}/{name}", "--reason", "test", "--preemptive")
        for out in ("b.out", "c.out"):
            wait_until(
                functools.partial(printed_three, tmp_path / out), f"three revocations in {out}"
            )
    for out in ("b.out", "c.out"):
        events = printed(tmp_path / out)
        assert [e["target"] for e in events] == [f"{TD}/{n}" for n in ("one", "two", "three")]
        assert [e["seq"] for e in events] == [1, 2, 3]

    # One audit chain for the trust domain: every replica verifies what all of them wrote.
    for served in replicas:
        result = served.cli("audit", "verify")
        assert "ok" in result.stdout.lower() or "verified" in result.stdout.lower(), result.stdout
