#!/usr/bin/env python3
"""Attestation throughput of each attestor over the real wire, with the null RPC as the yardstick.

``python scripts/bench_attest.py [--duration 5] [--concurrency 16] [--json out.json]``

Starts one ``authority serve`` subprocess (temporary data directory, 127.0.0.1 ports, admin and
local sockets in a short /tmp folder; the local socket set by a TOML ``--config`` file), sets up
one attestor instance and registration entry per scenario through the admin socket, checks each
path once with the client SDK, then drives every scenario from ONE separate load process (spawned
with multiprocessing, so the server keeps a core of its own): a grpc.aio event loop keeping
``--concurrency`` Attest streams (or Pings) outstanding for ``--duration`` seconds.

* ``null``        - ``Ping`` over server TLS: the baseline (run first and again last; the ratios
  use the mean of the two, so drift shows);
* ``null-local``  - ``Ping`` over the local Unix socket (a different server stack, grpclib: the
  yardstick of the unix rows; its ratio is still to the TLS null);
* ``x509pop``     - a node certificate (CN node-0, issued by a CA made here) answering the nonce
  challenge with ``sign_challenge``: two round trips per attestation;
* ``join_token``  - one pre-created single-use join token per attestation;
* ``jwt``         - one pre-minted ES256 Kubernetes-style token (unique ``jti``) per attestation;
* ``unix``        - the kernel-identified caller on the local socket; the server hashes the
  caller's executable (the Python binary) on every attestation;
* ``unix-nohash`` - the same with ``hash_executable = false``.

Every attestation sends a CSR from a pool generated before timing (the client's key generation is
not measured) and must return an SVID for the expected SPIFFE ID. Errors are counted (warm-up
included), the first one is printed, and the exit status is 1 when any request failed. Tokens,
keys and evidence are never printed; the temporary folders are removed and the server is stopped
(SIGTERM) at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import multiprocessing.connection
import os
import platform
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from _benchlib import (
    CHANNEL_OPTIONS,
    READY_TIMEOUT,
    RPC_TIMEOUT,
    TRUST_DOMAIN,
    AuthorityServer,
    BenchError,
    LoadRun,
    PipeWorker,
    RequestFailed,
    add_log_level_argument,
    authority_version,
    bench_dirs,
    bundle_pem,
    cpu_percent,
    cpu_seconds,
    create_join_tokens,
    drive,
    machine_busy_seconds,
    nearest_rank,
    require_range,
    run_bench,
    serve_commands,
    start_authority,
    stop_and_report,
    usable_cores,
)

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc

CSR_POOL = 100
MAX_DURATION = 30.0
MAX_TOKENS = 20_000  # join tokens or JWTs made for one scenario
TOKEN_CREATION_BUDGET = 15.0  # seconds of CreateJoinToken calls at most
JWT_ISSUER = "https://issuer.example"
JWT_AUDIENCE = "agent-authority"
JWT_KID = "bench-es256"
JWT_NAMESPACE = "agents"
NODE_CN = "node-0"


# --- scenarios and what the load process is given and gives back -----------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    attestor: str  # the attestor instance; "" for Ping
    endpoint: str  # "tls" (server TLS) or "local" (the Unix socket, no TLS)
    closing: bool = False  # the baseline again, last

    @property
    def label(self) -> str:
        return self.name + (" (end)" if self.closing else "")

    @property
    def rpc(self) -> str:
        return "Attest" if self.attestor else "Ping"

    @property
    def consumable(self) -> bool:
        """Whether each attestation uses up one piece of evidence (a token)."""
        return self.name in ("join_token", "jwt")

    @property
    def is_baseline(self) -> bool:
        return self.name == "null"


SCENARIOS = (
    Scenario("null", "", "tls"),
    Scenario("null-local", "", "local"),
    Scenario("x509pop", "nodes", "tls"),
    Scenario("join_token", "join_token", "tls"),
    Scenario("jwt", "k8s", "tls"),
    Scenario("unix", "local", "local"),
    Scenario("unix-nohash", "local-nohash", "local"),
    Scenario("null", "", "tls", closing=True),
)

# The SPIFFE ID (or its prefix, for join tokens) each scenario's SVIDs must carry.
UID = os.getuid()
EXPECTED_ID = {
    "x509pop": f"spiffe://{TRUST_DOMAIN}/node/{NODE_CN}",
    "join_token": f"spiffe://{TRUST_DOMAIN}/bench/join-",
    "jwt": f"spiffe://{TRUST_DOMAIN}/k8s/{JWT_NAMESPACE}",
    "unix": f"spiffe://{TRUST_DOMAIN}/local/uid-{UID}",
    "unix-nohash": f"spiffe://{TRUST_DOMAIN}/local-nohash/uid-{UID}",
}


@dataclass(frozen=True)
class ClientInit:
    tls_address: str
    local_address: str  # unix:PATH
    bundle_pem: bytes
    csrs: list[bytes]
    node_chain_pem: bytes
    node_key_pem: bytes
    concurrency: int
    channels: int


@dataclass(frozen=True)
class RunSpec:
    scenario: Scenario
    duration: float
    warmup: int  # requests before the timed run (their errors count too)
    evidence: list[bytes] = field(default_factory=list)  # consumables; never printed


@dataclass
class ClientResult(LoadRun):
    first_error: str = ""  # "code: detail", the detail cut to 300 characters
    exhausted: bool = False  # ran out of tokens before the duration
    warmup_errors: int = 0


@dataclass
class Row:
    scenario: str
    endpoint: str
    rpc: str
    requests: int
    errors: int
    seconds: float
    rate: float
    p50_ms: float
    p99_ms: float
    ratio: float | None
    load_cpu_percent: float  # the load process; 100 = one core
    server_cpu_percent: float  # all the server's threads
    other_cpu_percent: float  # the rest of the machine
    error_codes: dict[str, int]
    first_error: str
    note: str = ""


# --- the load process ------------------------------------------------------------------------


class _Load:
    """The load process's channels, and the request each scenario sends."""

    def __init__(self, init: ClientInit) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        self.init = init
        creds = grpc.ssl_channel_credentials(root_certificates=init.bundle_pem)
        self.channels: dict[str, list[grpc.aio.Channel]] = {
            "tls": [
                grpc.aio.secure_channel(init.tls_address, creds, CHANNEL_OPTIONS)
                for _ in range(init.channels)
            ],
            "local": [
                grpc.aio.insecure_channel(init.local_address, CHANNEL_OPTIONS)
                for _ in range(init.channels)
            ],
        }
        self.stubs: dict[str, list[pb_grpc.WorkloadAsyncStub]] = {
            endpoint: [pb_grpc.WorkloadStub(c) for c in channels]
            for endpoint, channels in self.channels.items()
        }
        key = serialization.load_pem_private_key(init.node_key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise TypeError("the node key must be EC or RSA")
        self.node_key = key
        self._csr_turn = itertools.count()
        self.evidence: list[bytes] = []
        self.exhausted = False
        self.spec: RunSpec | None = None
        self.warm: ClientResult | None = None

    async def connect(self) -> None:
        for channels in self.channels.values():
            for channel in channels:
                await asyncio.wait_for(channel.channel_ready(), READY_TIMEOUT)

    async def close(self) -> None:
        for channels in self.channels.values():
            for channel in channels:
                await channel.close(None)

    async def prepare(self, spec: RunSpec) -> None:
        """Take the run's evidence and send its warm-up requests."""
        self.evidence = list(spec.evidence)
        self.exhausted = False
        self.spec = spec
        self.warm = None
        if spec.warmup > 0:
            self.warm = await self.drive(spec.scenario, READY_TIMEOUT, spec.warmup)

    async def go(self, _: object) -> ClientResult:
        """The prepared run; the warm-up's errors count too."""
        assert self.spec is not None
        result = await self.drive(self.spec.scenario, self.spec.duration)
        self.evidence = []
        warm = self.warm
        if warm is not None and warm.errors:
            result.warmup_errors = sum(warm.errors.values())
            for code, n in warm.errors.items():
                result.errors[code] = result.errors.get(code, 0) + n
            result.first_error = f"(warm-up) {warm.first_error}"
        return result

    async def drive(
        self, scenario: Scenario, seconds: float, max_requests: int | None = None
    ) -> ClientResult:
        run = await drive(
            lambda i: self.request(scenario, i),
            self.init.concurrency,
            seconds,
            max_requests=max_requests,
            catch_all=True,
        )
        return ClientResult(
            **vars(run), first_error=run.first_failure(300), exhausted=self.exhausted
        )

    def request(self, scenario: Scenario, worker: int) -> Callable[[], Awaitable[bool]]:
        """A callable sending one request; False when there is nothing left to send."""
        stubs = self.stubs[scenario.endpoint]
        stub = stubs[worker % len(stubs)]
        if not scenario.attestor:
            ping = pb.PingRequest()

            async def null() -> bool:
                await stub.Ping(ping, timeout=RPC_TIMEOUT)
                return True

            return null
        return lambda: self._attest(stub, scenario)

    async def _attest(self, stub: pb_grpc.WorkloadAsyncStub, scenario: Scenario) -> bool:
        from attestors.x509pop import sign_challenge

        if scenario.consumable:
            if not self.evidence:
                self.exhausted = True
                return False
            evidence = self.evidence.pop()
        elif scenario.name == "x509pop":
            evidence = self.init.node_chain_pem
        else:
            evidence = b""  # unix: the kernel is the evidence
        csrs = self.init.csrs
        csr = csrs[next(self._csr_turn) % len(csrs)]
        call = stub.Attest(None, timeout=RPC_TIMEOUT)
        params = pb.AttestParams(attestor=scenario.attestor, evidence=evidence, csr=csr)
        await call.write(pb.AttestRequest(params=params))
        if scenario.name == "x509pop":
            reply = await call.read()
            if not isinstance(reply, pb.AttestResponse) or reply.WhichOneof("step") != "challenge":
                await _raise_status(call, "x509pop: no challenge")
                raise RequestFailed("BAD_RESPONSE", "x509pop: expected a challenge")
            answer = sign_challenge(self.node_key, reply.challenge)
            await call.write(pb.AttestRequest(challenge_response=answer))
        await call.done_writing()
        reply = await call.read()
        await _raise_status(call, "Attest")
        if not isinstance(reply, pb.AttestResponse) or not reply.result.svids:
            raise RequestFailed("BAD_RESPONSE", "Attest returned no SVID")
        spiffe_id = reply.result.svids[0].spiffe_id
        if not spiffe_id.startswith(EXPECTED_ID[scenario.name]):
            raise RequestFailed("BAD_RESPONSE", f"unexpected SPIFFE ID {spiffe_id}")
        return True


async def _raise_status(call: grpc.aio.Call, what: str) -> None:
    code = await call.code()
    if code != grpc.StatusCode.OK:
        details = await call.details()
        raise RequestFailed(code.name, f"{what}: {details}")


async def _client_loop(conn: multiprocessing.connection.Connection, init: ClientInit) -> None:
    load = _Load(init)
    try:
        await load.connect()
        await serve_commands(conn, {"prepare": ("ready", load.prepare), "go": ("result", load.go)})
    finally:
        await load.close()


class LoadProcess:
    """The load process, driven in lock step over a pipe."""

    def __init__(self, init: ClientInit) -> None:
        self.worker = PipeWorker(_client_loop, init, "bench-load", "the load process")

    async def connected(self) -> None:
        await asyncio.to_thread(self.worker.expect, "ready", 60.0)

    async def prepare(self, spec: RunSpec) -> None:
        await self.worker.ask("prepare", spec, "ready", 2 * READY_TIMEOUT)

    async def go(self, duration: float) -> ClientResult:
        result: ClientResult = await self.worker.ask(
            "go", None, "result", duration + 2 * READY_TIMEOUT
        )
        return result

    def close(self) -> None:
        self.worker.close()


# --- CPU accounting (Linux /proc; zeros elsewhere) -------------------------------------------


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float
    server: float
    own: float
    machine_busy: float

    @classmethod
    def take(cls, server_pid: int) -> CpuSnapshot:
        return cls(
            time.monotonic(),
            cpu_seconds(server_pid, missing_ok=True),
            time.process_time(),
            machine_busy_seconds(missing_ok=True),
        )


# --- setup through the admin socket ----------------------------------------------------------


@dataclass(frozen=True)
class Material:
    """What the scenarios need, made before any timing."""

    bundle_pem: bytes
    csrs: list[bytes]
    node_chain_pem: bytes
    node_key_pem: bytes
    jwt_key_pem: bytes


def _make_node_pki() -> tuple[bytes, bytes, bytes]:
    """(CA PEM, node-0 certificate PEM, node-0 key PEM): an operator's node PKI."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def usage(*, sign: bool, ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=sign,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=ca,
            crl_sign=ca,
            encipher_only=False,
            decipher_only=False,
        )

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench node CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage(sign=False, ca=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    node_key = ec.generate_private_key(ec.SECP256R1())
    node = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NODE_CN)]))
        .issuer_name(ca_name)
        .public_key(node_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(sign=True, ca=False), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = node_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), node.public_bytes(pem), key_pem


def _jwt_keys() -> tuple[bytes, dict[str, Any]]:
    """(ES256 private key PEM, the JWK Set of its public key)."""
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    public: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    public.update(kid=JWT_KID, alg="ES256", use="sig")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, {"keys": [public]}


def mint_jwts(key_pem: bytes, count: int) -> list[bytes]:
    """``count`` Kubernetes service-account tokens, each with its own jti, valid 10 minutes."""
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("the JWT signing key must be EC (ES256)")
    iat = int(time.time())
    headers = {"kid": JWT_KID}
    tokens = []
    for i in range(count):
        claims = {
            "iss": JWT_ISSUER,
            "aud": [JWT_AUDIENCE],
            "sub": f"system:serviceaccount:{JWT_NAMESPACE}:agent",
            "iat": iat,
            "nbf": iat,
            "exp": iat + 600,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": JWT_NAMESPACE,
                "serviceaccount": {"name": "agent", "uid": "sa-0001"},
                "pod": {"name": f"agent-{i % 64}", "uid": f"pod-{i % 64:04d}"},
                "node": {"name": NODE_CN, "uid": "node-0001"},
            },
        }
        tokens.append(jwt.encode(claims, key, algorithm="ES256", headers=headers).encode())
    return tokens


async def create_tokens(server: AuthorityServer, count: int, budget: float) -> list[bytes]:
    """Up to ``count`` single-use join tokens, for at most ``budget`` seconds of creation."""
    ids = (f"{EXPECTED_ID['join_token']}{next(_JOIN_IDS)}" for _ in range(count))
    return await create_join_tokens(server.admin_socket, ids, budget=budget)


_JOIN_IDS = itertools.count()  # every join token for its own SPIFFE ID


async def setup(server: AuthorityServer) -> Material:
    """Attestor instances and entries (admin socket), keys, CSRs and certificates."""
    from authority.client import AdminClient, make_csr, new_key

    ca_pem, node_pem, node_key_pem = _make_node_pki()
    jwt_key_pem, jwks = _jwt_keys()
    instances = [
        ("nodes", "x509pop", {"ca_bundle": ca_pem.decode()}),
        (
            "k8s",
            "jwt",
            {
                "jwks": jwks,
                "issuer": JWT_ISSUER,
                "audience": JWT_AUDIENCE,
                "kind": "kubernetes",
                "algorithms": ["ES256"],
            },
        ),
        ("local", "unix", {}),
        ("local-nohash", "unix", {"hash_executable": False}),
    ]
    entries = [
        (EXPECTED_ID["x509pop"], "nodes", f"subject_cn:{NODE_CN}"),
        (EXPECTED_ID["jwt"], "k8s", f"namespace:{JWT_NAMESPACE}"),
        (EXPECTED_ID["unix"], "local", f"uid:{UID}"),
        (EXPECTED_ID["unix-nohash"], "local-nohash", f"uid:{UID}"),
    ]
    async with AdminClient(server.admin_socket) as admin:
        roots = await bundle_pem(admin.stub)
        for name, plugin, config in instances:
            await admin.stub.RegisterAttestor(
                pb.RegisterAttestorRequest(
                    name=name, plugin=plugin, config_json=json.dumps(config)
                ),
                timeout=RPC_TIMEOUT,
            )
        for spiffe_id, instance, value in entries:
            await admin.stub.CreateEntry(
                pb.CreateEntryRequest(
                    spiffe_id=spiffe_id, selectors=[pb.Selector(type=instance, value=value)]
                ),
                timeout=RPC_TIMEOUT,
            )
    csrs = [make_csr(new_key()) for _ in range(CSR_POOL)]
    return Material(
        bundle_pem=roots,
        csrs=csrs,
        node_chain_pem=node_pem,
        node_key_pem=node_key_pem,
        jwt_key_pem=jwt_key_pem,
    )


async def smoke_test(server: AuthorityServer, material: Material) -> None:
    """One attestation per attestor with the client SDK, before timing: setup errors show here
    with a clear message, not as a table of failures."""
    from authority.client import WorkloadClient, new_key, x509pop_responder

    [token] = await create_tokens(server, 1, READY_TIMEOUT)
    [jwt_token] = mint_jwts(material.jwt_key_pem, 1)
    tls = WorkloadClient(server.tls_address, material.bundle_pem, options=CHANNEL_OPTIONS)
    local = WorkloadClient(f"unix:{server.local_socket}", None, options=CHANNEL_OPTIONS)
    checks: list[tuple[str, WorkloadClient, str, bytes]] = [
        ("x509pop", tls, "nodes", material.node_chain_pem),
        ("join_token", tls, "join_token", token),
        ("jwt", tls, "k8s", jwt_token),
        ("unix", local, "local", b""),
        ("unix-nohash", local, "local-nohash", b""),
    ]
    try:
        for name, client, attestor, evidence in checks:
            respond = x509pop_responder(material.node_key_pem) if name == "x509pop" else None
            try:
                result = await asyncio.wait_for(
                    client.attest(attestor, evidence, new_key(), respond=respond), RPC_TIMEOUT
                )
            except grpc.aio.AioRpcError as exc:
                raise BenchError(
                    f"{name}: the check attestation failed: {exc.code().name} {exc.details()}"
                ) from None
            got = result.svids[0].spiffe_id if result.svids else "(no SVID)"
            if not got.startswith(EXPECTED_ID[name]):
                raise BenchError(f"{name}: the check attestation gave {got}")
    finally:
        await tls.close()
        await local.close()


# --- the run ---------------------------------------------------------------------------------


def summarize(
    scenario: Scenario, result: ClientResult, before: CpuSnapshot, after: CpuSnapshot
) -> Row:
    latencies = sorted(result.latencies)
    seconds = result.ended - result.started
    wall = after.wall - before.wall
    server_cpu = after.server - before.server
    ours = server_cpu + (after.own - before.own) + result.cpu_seconds
    other = max(0.0, (after.machine_busy - before.machine_busy) - ours)

    notes = []
    if result.exhausted:
        notes.append("ran out of tokens before the duration (the rate is over the time it ran)")
    if result.warmup_errors:
        notes.append(f"{result.warmup_errors} of the errors were in the warm-up")
    return Row(
        scenario=scenario.label,
        endpoint=scenario.endpoint,
        rpc=scenario.rpc,
        requests=len(latencies),
        errors=sum(result.errors.values()),
        seconds=round(seconds, 3),
        rate=round(len(latencies) / seconds, 1) if seconds > 0 else 0.0,
        p50_ms=round(nearest_rank(latencies, 0.50) * 1000, 2),
        p99_ms=round(nearest_rank(latencies, 0.99) * 1000, 2),
        ratio=None,
        load_cpu_percent=cpu_percent(result.cpu_seconds, seconds),
        server_cpu_percent=cpu_percent(server_cpu, wall),
        other_cpu_percent=cpu_percent(other, wall),
        error_codes=dict(result.errors),
        first_error=result.first_error,
        note="; ".join(notes),
    )


def _needed(rate: float, args: argparse.Namespace) -> int:
    """Tokens for a consumable scenario expected to run at about ``rate``, with margin."""
    count: int = int(max(rate, 200.0) * 1.5 * args.duration) + args.warmup + 4 * args.concurrency
    return min(count, MAX_TOKENS)


async def evidence_for(
    scenario: Scenario,
    server: AuthorityServer,
    material: Material,
    rates: dict[str, float],
    args: argparse.Namespace,
) -> list[bytes]:
    if not scenario.consumable:
        return []
    t0 = time.monotonic()
    if scenario.name == "join_token":
        # Without the challenge round trip, about twice as fast as x509pop at most.
        count = _needed(2 * rates.get("x509pop", 0.0), args)
        tokens = await create_tokens(server, count, TOKEN_CREATION_BUDGET)
        what = "join tokens created"
    else:
        count = _needed(max(rates.get("x509pop", 0.0), rates.get("join_token", 0.0)), args)
        tokens = await asyncio.to_thread(mint_jwts, material.jwt_key_pem, count)
        what = "JWTs minted"
    print(f"  setup: {len(tokens)} {what} in {time.monotonic() - t0:.1f}s", flush=True)
    return tokens


async def run_scenarios(args: argparse.Namespace, server: AuthorityServer) -> list[Row]:
    t0 = time.monotonic()
    material = await setup(server)
    await smoke_test(server, material)
    print(
        f"setup: 4 attestor instances and entries, {len(material.csrs)} CSRs, one check "
        f"attestation per attestor in {time.monotonic() - t0:.1f}s",
        flush=True,
    )
    load = LoadProcess(
        ClientInit(
            tls_address=server.tls_address,
            local_address=f"unix:{server.local_socket}",
            bundle_pem=material.bundle_pem,
            csrs=material.csrs,
            node_chain_pem=material.node_chain_pem,
            node_key_pem=material.node_key_pem,
            concurrency=args.concurrency,
            channels=args.channels,
        )
    )
    rows: list[Row] = []
    rates: dict[str, float] = {}
    try:
        await load.connected()
        for scenario in SCENARIOS:
            if args.only and scenario.name not in args.only and not scenario.is_baseline:
                continue
            evidence = await evidence_for(scenario, server, material, rates, args)
            await load.prepare(RunSpec(scenario, args.duration, args.warmup, evidence))
            before = CpuSnapshot.take(server.pid)
            result = await load.go(args.duration)
            row = summarize(scenario, result, before, CpuSnapshot.take(server.pid))
            rows.append(row)
            rates[scenario.name] = row.rate
            print(
                f"  {scenario.label:12} {row.rate:9.1f} req/s  p50 {row.p50_ms:7.2f} ms  "
                f"p99 {row.p99_ms:7.2f} ms  errors {row.errors}",
                flush=True,
            )
    finally:
        load.close()
    return rows


def apply_baseline(rows: list[Row]) -> float | None:
    """Each rate's ratio to the server-TLS null-RPC rate (the mean of its runs)."""
    runs = [r.rate for r in rows if r.scenario.startswith("null") and r.endpoint == "tls"]
    if not runs or not all(runs):
        return None
    baseline = sum(runs) / len(runs)
    for r in rows:
        r.ratio = round(r.rate / baseline, 3)
    return baseline


# --- output ----------------------------------------------------------------------------------


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import cryptography
    import jwt

    executable = Path(sys.executable).resolve()
    return {
        "authority": authority_version(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "python": platform.python_version(),
        "grpc": grpc.__version__,
        "cryptography": cryptography.__version__,
        "pyjwt": jwt.__version__,
        "platform": platform.platform(),
        "load_executable": str(executable),
        "load_executable_bytes": executable.stat().st_size,
        "duration": args.duration,
        "warmup_requests": args.warmup,
        "concurrency": args.concurrency,
        "channels": args.channels,
        "load_avg_at_start": os.getloadavg(),
    }


def format_table(rows: list[Row]) -> str:
    header = (
        f"{'scenario':12} {'over':5} {'rpc':6} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'errors':>6} {'vs null':>7} {'load CPU':>8} {'srv CPU':>8} {'other':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
        lines.append(
            f"{r.scenario:12} {r.endpoint:5} {r.rpc:6} {r.rate:9.1f} {r.p50_ms:8.2f} "
            f"{r.p99_ms:8.2f} {r.errors:6d} {ratio:>7} {r.load_cpu_percent:7.0f}% "
            f"{r.server_cpu_percent:7.0f}% {r.other_cpu_percent:5.0f}%"
        )
    for r in rows:
        if r.error_codes:
            codes = ", ".join(f"{c}={n}" for c, n in sorted(r.error_codes.items()))
            lines.append(f"  {r.scenario}: errors {codes}; first: {r.first_error}")
        if r.note:
            lines.append(f"  {r.scenario}: {r.note}")
    return "\n".join(lines)


def print_notes(rows: list[Row], baseline: float | None, env: dict[str, Any]) -> None:
    if baseline is None:
        print("no server-TLS null-RPC rate: no ratios")
    else:
        print(
            f"baseline: Ping over server TLS {baseline:.1f} req/s (mean of the first and last "
            "run); 'vs null' = rate / baseline"
        )
    print(
        f"unix hashes the load process's executable, {env['load_executable']} "
        f"({env['load_executable_bytes']:,} bytes), on every attestation"
    )
    saturated = [r.scenario for r in rows if r.load_cpu_percent >= 90]
    if saturated:
        print(
            f"note: the load process used >= 90% of a core in {', '.join(saturated)}: the load "
            "generator may be the bottleneck there"
        )
    noisy = [r.scenario for r in rows if r.other_cpu_percent >= 15]
    if noisy:
        print(
            f"warning: other processes used >= 15% of a core during {', '.join(noisy)}: those "
            "figures are disturbed; run again on a quiet machine"
        )
    print(
        "columns: CPU in % of one core over the timed window; 'srv CPU' is all the server's "
        "threads, 'other' the rest of the machine (neither the server nor the load)"
    )
    first = next((r for r in rows if r.errors), None)
    if first is not None:
        print(
            f"FAILED: {sum(r.errors for r in rows)} request(s) failed; first in {first.scenario}:"
        )
        print(f"  {first.first_error}")


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per scenario")
    parser.add_argument(
        "--concurrency", type=int, default=16, help="client coroutines (outstanding requests)"
    )
    parser.add_argument("--channels", type=int, default=2, help="connections per endpoint")
    parser.add_argument(
        "--warmup", type=int, default=64, help="untimed requests before each scenario"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted({s.name for s in SCENARIOS} - {"null"}),
        help="run only these (and the null baseline)",
    )
    add_log_level_argument(parser)
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration must be in (0, {MAX_DURATION:.0f}]")
    require_range(parser, "--concurrency", args.concurrency, 1, 1000)
    require_range(parser, "--channels", args.channels, 1, 16)
    require_range(parser, "--warmup", args.warmup, 0, 10_000)
    return args


async def bench(args: argparse.Namespace) -> list[Row]:
    with bench_dirs("authority-bench-attest-", "aba-") as (work, socket_dir):
        server = start_authority(work, socket_dir, log_level=args.log_level, local_socket=True)
        try:
            print(
                f"server: pid {server.pid}, tls {server.tls_address}, local {server.local_socket}"
            )
            return await run_scenarios(args, server)
        finally:
            stop_and_report(server)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment(args)
    load = ", ".join(f"{v:.2f}" for v in env["load_avg_at_start"])
    print(
        f"cores: {env['cores']} (usable {env['usable_cores']}); load average {load}; "
        f"Python {env['python']}; grpcio {env['grpc']}; cryptography {env['cryptography']}; "
        f"PyJWT {env['pyjwt']}"
    )
    print(f"authority {env['authority']}")
    print(
        f"1 load process x {args.concurrency} coroutines over {args.channels} connection(s) per "
        f"endpoint; {args.duration:g}s per scenario after {args.warmup} warm-up requests"
    )
    started = time.monotonic()
    rows = run_bench(bench(args))
    print()
    baseline = apply_baseline(rows)
    print(format_table(rows))
    print()
    print_notes(rows, baseline, env)
    total = time.monotonic() - started
    print(f"total run time {total:.1f}s")
    if args.json:
        document = {
            "environment": env,
            "total_seconds": round(total, 1),
            "baseline_rate": None if baseline is None else round(baseline, 1),
            "scenarios": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 1 if any(r.errors for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
