"""No secret at rest or in the log: a realistic session against ``authority serve`` (join tokens,
attestation, JWT-SVIDs, exchanges with an approval, delegation, renewal, refusals), then every byte
of the database (with its -wal and -shm), of every other file in the data directory, and of the
server's log is searched for every join token, JWT-SVID, task token and workload private key the
session produced. The CA's own private keys live in ``keys/`` by design, and nowhere else. The
audit records carry each token's jti and SHA-256 instead."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import shutil
import signal
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from authority._pb import authority_v1_authority_pb2 as pb
from authority.client import AdminClient, WorkloadClient, der_chain_to_pem, new_key
from tests.helpers import ServeProcess, short_socket_dir, start_serve

TD = "example.org"
AGENT = f"spiffe://{TD}/agent/reporter"
HELPER = f"spiffe://{TD}/agent/helper"
POLICY = Path(__file__).resolve().parents[2] / "examples" / "policies" / "agents.cedar"


@dataclass
class Secrets:
    """Every secret the session produced, as the byte strings that would betray it."""

    needles: dict[str, bytes] = field(default_factory=dict)
    join_tokens: list[str] = field(default_factory=list)
    jwt_svids: list[str] = field(default_factory=list)
    task_tokens: list[str] = field(default_factory=list)

    def token(self, label: str, token: str) -> None:
        self.needles[label] = token.encode()
        self.needles[f"{label} (signature)"] = token.rsplit(".", 1)[-1].encode()

    def key(self, label: str, key: ec.EllipticCurvePrivateKey) -> None:
        self.needles.update(key_needles(label, key))


def key_needles(label: str, key: ec.EllipticCurvePrivateKey) -> dict[str, bytes]:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    traditional = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    scalar = key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big")
    return {
        f"{label} (PKCS#8 PEM)": pem,
        f"{label} (PEM body)": base64.b64encode(der),
        f"{label} (PKCS#8 DER)": der,
        f"{label} (SEC1 DER)": traditional,
        f"{label} (scalar)": scalar,
        f"{label} (scalar hex)": scalar.hex().encode(),
        f"{label} (scalar b64url)": base64.urlsafe_b64encode(scalar).rstrip(b"="),
    }


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def leaf_der(folder: Path) -> bytes:
    cert = x509.load_pem_x509_certificates((folder / "svid.pem").read_bytes())[0]
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServeProcess]:
    socket_dir = short_socket_dir()
    serve = start_serve(tmp_path / "data", socket_dir, "--log-level", "DEBUG")
    try:
        yield serve
    finally:
        serve.stop(signal.SIGKILL if serve.proc.poll() is None else signal.SIGTERM)
        shutil.rmtree(socket_dir, ignore_errors=True)


async def session(served: ServeProcess, folder: Path) -> Secrets:
    found = Secrets()
    served.cli("policy", "load", str(POLICY))
    async with AdminClient(served.admin_socket) as admin:
        bundle = await admin.stub.GetBundle(pb.GetBundleRequest())
        bundle_pem = der_chain_to_pem(list(bundle.x509_authorities))

        async def join_token(spiffe_id: str) -> str:
            created = await admin.stub.CreateJoinToken(
                pb.CreateJoinTokenRequest(spiffe_id=spiffe_id, ttl_seconds=600)
            )
            found.join_tokens.append(created.token)
            found.needles[f"join token {len(found.join_tokens)}"] = created.token.encode()
            return created.token

        async with WorkloadClient(served.address, bundle_pem) as anonymous:
            holders: dict[str, WorkloadClient] = {}
            for name, spiffe_id in (("agent", AGENT), ("helper", HELPER)):
                token = await join_token(spiffe_id)
                await anonymous.attest_to_folder("join_token", token.encode(), folder / name)
                found.key(f"{name} SVID key", load_key(folder / name / "svid.key"))
                holders[name] = WorkloadClient.from_svid_dir(served.address, folder / name)
            # Refusals: a replayed join token, and one that was never issued.
            stranger = secrets.token_urlsafe(32)
            found.needles["a join token never issued"] = stranger.encode()
            for evidence in (found.join_tokens[0], stranger):
                with pytest.raises(grpc.aio.AioRpcError):
                    await anonymous.attest("join_token", evidence.encode(), new_key())
            # An unused join token, left to expire.
            await join_token(f"spiffe://{TD}/agent/unused")

        agent, helper = holders["agent"], holders["helper"]
        try:
            for holder in (agent, helper):
                for audience in ("metrics-api", "tickets-api"):
                    svid = await holder.fetch_jwt([audience])
                    found.jwt_svids.append(svid.token)
                    found.token(f"JWT-SVID {len(found.jwt_svids)}", svid.token)

            stub = await agent.mtls_stub()
            context = pb.AuditContext(
                prompt_sha256=hashlib.sha256(b"the prompt").hexdigest(),
                tool_name="query",
                model="model-x",
            )
            read = await stub.Exchange(
                pb.ExchangeRequest(
                    intent=pb.Intent(action="read", resource="metrics/prod", purpose="report"),
                    audience="metrics-api",
                    task_id="task-secrets",
                    context=context,
                )
            )
            found.task_tokens.append(read.token.token)
            deploy = pb.ExchangeRequest(
                intent=pb.Intent(action="deploy", resource="deploy/production", purpose="ship"),
                audience="deployer",
                task_id="task-secrets",
                context=context,
            )
            pending = await stub.Exchange(deploy)
            assert pending.WhichOneof("result") == "pending"
            await admin.stub.Approve(pb.ApproveRequest(id=pending.pending.id, note="ok"))
            deploy.approval_id = pending.pending.id
            approved = await stub.Exchange(deploy)
            found.task_tokens.append(approved.token.token)
            delegated = await stub.Delegate(
                pb.DelegateRequest(
                    parent_token=read.token.token, delegate_svid=leaf_der(folder / "helper")
                )
            )
            found.task_tokens.append(delegated.token.token)
            for n, token in enumerate(found.task_tokens, 1):
                found.token(f"task token {n}", token)
            # A presented token with a broken signature is refused, and not kept either.
            head, payload, signature = read.token.token.split(".")
            forged = f"{head}.{payload}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"
            found.needles["a forged task token presented"] = forged.encode()
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Delegate(
                    pb.DelegateRequest(
                        parent_token=forged, delegate_svid=leaf_der(folder / "helper")
                    )
                )
            # A renewal: a fresh workload key.
            renewed_key = new_key()
            await agent.renew(renewed_key)
            found.key("agent renewed key", renewed_key)
            await stub.EndTask(pb.EndTaskRequest(task_id="task-secrets", reason="done"))
        finally:
            await agent.close()
            await helper.close()
    return found


def files_to_scan(data_dir: Path) -> list[Path]:
    """Every regular file of the data directory but the CA's key folder."""
    keys = data_dir / "keys"
    return sorted(
        p for p in data_dir.rglob("*") if p.is_file() and keys not in p.parents and p != keys
    )


def leaks(needles: dict[str, bytes], haystacks: dict[str, bytes]) -> list[str]:
    return [
        f"{label} in {where}"
        for label, needle in needles.items()
        for where, data in haystacks.items()
        if needle in data
    ]


def ca_key_needles(data_dir: Path) -> dict[str, bytes]:
    needles: dict[str, bytes] = {}
    for path in sorted((data_dir / "keys").glob("*.pem")):
        needles.update(key_needles(f"CA key {path.name}", load_key(path)))
    return needles


async def test_no_secret_in_the_store_files_or_the_log(
    served: ServeProcess, tmp_path: Path
) -> None:
    found = await session(served, tmp_path / "workloads")
    assert len(found.join_tokens) == 3
    assert len(found.jwt_svids) == 4
    assert len(found.task_tokens) == 3
    ca_needles = ca_key_needles(served.data_dir)
    assert len(ca_needles) >= 3 * 7  # the x509, jwt and task keys

    # While serving: the write-ahead log holds the latest writes.
    running = {str(p): p.read_bytes() for p in files_to_scan(served.data_dir)}
    assert any(name.endswith("-wal") for name in running), sorted(running)
    running["the server log"] = served.log_path.read_bytes()
    assert b"task token issued: jti=" in running["the server log"]  # the log was captured
    assert leaks(found.needles, running) == []
    assert leaks(ca_needles, running) == []

    # Stopped: the write-ahead log folded into the database file.
    assert served.stop() == 0
    stopped = {str(p): p.read_bytes() for p in files_to_scan(served.data_dir)}
    assert any(name.endswith("authority.db") for name in stopped)
    stopped["the server log"] = served.log_path.read_bytes()
    assert leaks(found.needles, stopped) == []
    assert leaks(ca_needles, stopped) == []

    # The needles do find what they look for: the workload keys are in their own files.
    own = {str(p): p.read_bytes() for p in (tmp_path / "workloads").rglob("svid.key")}
    assert len(leaks({k: v for k, v in found.needles.items() if "SVID key" in k}, own)) >= 2

    # What the audit keeps instead: each token's jti and digest, each join token's digest.
    db = sqlite3.connect(f"file:{served.data_dir / 'authority.db'}?mode=ro", uri=True)
    try:
        records = [
            (kind, json.loads(details))
            for kind, details in db.execute("SELECT kind, details FROM audit ORDER BY seq")
        ]
    finally:
        db.close()

    def recorded(kinds: tuple[str, ...], token: str) -> list[dict[str, object]]:
        jti = jwt.decode(token, options={"verify_signature": False})["jti"]
        return [d for k, d in records if k in kinds and d.get("jti") == jti]

    for token in found.jwt_svids:
        (details,) = recorded(("jwt.issued",), token)
        assert details["token_sha256"] == hashlib.sha256(token.encode()).hexdigest()
    for token in found.task_tokens:
        (details,) = recorded(("task_token.issued", "task_token.delegated"), token)
        assert details["token_sha256"] == hashlib.sha256(token.encode()).hexdigest()
    created = {d["token_id"] for k, d in records if k == "join_token.created"}
    consumed = [d["token_id"] for k, d in records if k == "join_token.consumed"]
    digests = [hashlib.sha256(t.encode()).hexdigest() for t in found.join_tokens]
    assert created == set(digests)
    assert sorted(consumed) == sorted(digests[:2])  # the two used; the replay consumed nothing
    assert any(k == "attest.refused" for k, _ in records)
