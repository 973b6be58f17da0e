#!/usr/bin/env python3
"""Throughput and latency of one real authority, with the null RPC as the yardstick.

``python scripts/bench.py [--duration 5] [--concurrency 64] [--clients 1] [--json out.json]``

Starts ``authority serve`` as a subprocess (temporary data directory, loopback ports, admin
socket in a short /tmp folder), attests a few workloads through the admin socket and join
tokens, then drives each scenario from ``--clients`` separate load processes, each a grpc.aio
event loop keeping ``--concurrency`` requests outstanding for ``--duration`` seconds:

* ``null``   - ``Ping`` over mutual TLS (the baseline) and over server TLS;
* ``x509``   - ``RenewX509SVID`` over mutual TLS with pre-generated CSRs (distinct keys, reused
  round-robin, so the client's key generation is not measured);
* ``jwt``    - ``FetchJWTSVID`` over mutual TLS with one audience;
* ``attest`` - the ``join_token`` Attest stream over server TLS, one pre-created token per call.

It prints req/s, p50/p99 latency, errors and each rate's ratio to the mutual-TLS null-RPC rate
(run first and again last; the ratios use the mean of the two, so drift shows), with the issue's
targets (X.509-SVID >= 50 %, JWT-SVID >= 60 %) marked PASS or BELOW. It always exits 0 when the
run completes: a benchmark is not a test. Per scenario it also reports the CPU of the load
processes (a saturated load generator shows: try ``--clients 2``), of the server (all threads,
and its main thread, the Python event loop) and of everything else on the machine (other work
running at the same time disturbs the figures).

``--profile-server FILE`` runs the server under cProfile and writes its stats to FILE (the main
thread only: gRPC's C threads and the SQLite writer thread are not in it); the figures of such a
run are distorted by the profiler and are for finding hot spots, not for the targets.

Traffic goes to 127.0.0.1 only (HTTP proxies are disabled on every channel); tokens and keys are
never printed and the temporary folders are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc

LOOPBACK = "127.0.0.1"
TRUST_DOMAIN = "example.org"
CSR_POOL = 200
JWT_AUDIENCE = "bench.example"
RPC_TIMEOUT = 10.0
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
MAX_DURATION = 30.0
MAX_ATTEST_TOKENS = 20_000
TARGETS = {"x509": 0.50, "jwt": 0.60, "exchange": 0.40}
EXAMPLE_POLICY = Path(__file__).resolve().parent.parent / "examples" / "policies"
# Every channel: no HTTP proxy (traffic stays on loopback), its own connection.
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.use_local_subchannel_pool", 1),
]

# Runs ``authority serve`` under cProfile; argv: [stats file, serve arguments...].
_PROFILE_BOOTSTRAP = """
import cProfile, sys
out = sys.argv[1]
sys.argv = ["authority", *sys.argv[2:]]
from authority.cli import main
cProfile.run("main()", out)
"""


class BenchError(Exception):
    """The benchmark could not run (the server did not start, setup failed...)."""


# --- what the load processes are given and give back ---------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str  # null, x509, jwt, attest
    transport: str  # mtls or tls
    rpc: str
    closing: bool = False  # the baseline again, last: drift shows; the ratios use the mean

    @property
    def label(self) -> str:
        return f"{self.name}/{self.transport}" + (" (end)" if self.closing else "")

    @property
    def is_baseline(self) -> bool:
        return self.name == "null" and self.transport == "mtls"


SCENARIOS = (
    Scenario("null", "mtls", "Ping"),
    Scenario("null", "tls", "Ping"),
    Scenario("x509", "mtls", "RenewX509SVID"),
    Scenario("jwt", "mtls", "FetchJWTSVID"),
    Scenario("exchange", "mtls", "Exchange"),
    Scenario("attest", "tls", "Attest"),
    Scenario("null", "mtls", "Ping", closing=True),
)


@dataclass(frozen=True)
class ClientInit:
    index: int
    tls_address: str
    mtls_address: str
    bundle_pem: bytes
    identities: list[tuple[bytes, bytes]]  # (chain PEM, key PEM), one per mTLS channel
    csrs: list[bytes]
    concurrency: int


@dataclass(frozen=True)
class RunSpec:
    scenario: Scenario
    duration: float
    warmup: float
    tokens: list[bytes] = field(default_factory=list)  # attest only; never printed


@dataclass
class ClientResult:
    latencies: list[float]  # seconds, successful calls only
    errors: dict[str, int]
    error_samples: dict[str, str]
    started: float  # time.monotonic(), system-wide on Linux
    ended: float
    cpu_seconds: float
    exhausted: bool  # attest: ran out of tokens before the duration


@dataclass
class ScenarioReport:
    scenario: str
    transport: str
    rpc: str
    requests: int
    errors: int
    seconds: float
    rate: float
    p50_ms: float
    p99_ms: float
    ratio: float | None
    target: float | None
    verdict: str
    client_cpu_percent: float  # summed over load processes; 100 = one core
    server_cpu_percent: float  # all threads; 100 = one core
    server_loop_cpu_percent: float  # the main thread: the Python event loop
    other_cpu_percent: float  # the rest of the machine: anything else running disturbs the figures
    error_codes: dict[str, int]
    error_samples: dict[str, str]
    note: str = ""
    server_metrics: dict[str, Any] = field(default_factory=dict)  # GetMetrics over the run


# --- the load process ------------------------------------------------------------------------


def _channel(address: str, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, credentials, CHANNEL_OPTIONS)


class _Load:
    """One load process: its channels, and the request each scenario sends."""

    def __init__(self, init: ClientInit) -> None:
        self.init = init
        roots = init.bundle_pem
        self.tls = [
            _channel(init.tls_address, grpc.ssl_channel_credentials(root_certificates=roots))
            for _ in init.identities
        ]
        self.mtls = [
            _channel(
                init.mtls_address,
                grpc.ssl_channel_credentials(
                    root_certificates=roots, private_key=key, certificate_chain=chain
                ),
            )
            for chain, key in init.identities
        ]
        self.tls_stubs: list[pb_grpc.WorkloadAsyncStub] = [
            pb_grpc.WorkloadStub(c) for c in self.tls
        ]
        self.mtls_stubs: list[pb_grpc.WorkloadAsyncStub] = [
            pb_grpc.WorkloadStub(c) for c in self.mtls
        ]
        self.renewals = [pb.RenewX509SVIDRequest(csr=csr) for csr in init.csrs]
        self._csr_turn = itertools.count(init.index * 7919)
        self.index = init.index
        self.tokens: list[bytes] = []
        self.exhausted = False

    async def connect(self) -> None:
        for channel in (*self.tls, *self.mtls):
            await asyncio.wait_for(channel.channel_ready(), READY_TIMEOUT)

    async def close(self) -> None:
        for channel in (*self.tls, *self.mtls):
            await channel.close(None)

    def request(self, scenario: Scenario, worker: int) -> Callable[[], Awaitable[bool]]:
        """A callable sending one request; False when there is nothing left to send."""
        stubs = self.mtls_stubs if scenario.transport == "mtls" else self.tls_stubs
        stub = stubs[worker % len(stubs)]
        if scenario.name == "null":
            ping = pb.PingRequest()

            async def null() -> bool:
                await stub.Ping(ping, timeout=RPC_TIMEOUT)
                return True

            return null
        if scenario.name == "x509":
            renewals = self.renewals

            async def x509() -> bool:
                request = renewals[next(self._csr_turn) % len(renewals)]
                reply = await stub.RenewX509SVID(request, timeout=RPC_TIMEOUT)
                if not reply.svid.cert_chain:
                    raise _BadResponse("RenewX509SVID returned no certificate")
                return True

            return x509
        if scenario.name == "jwt":
            fetch = pb.FetchJWTSVIDRequest(audience=[JWT_AUDIENCE])

            async def jwt() -> bool:
                reply = await stub.FetchJWTSVID(fetch, timeout=RPC_TIMEOUT)
                if not reply.token:
                    raise _BadResponse("FetchJWTSVID returned no token")
                return True

            return jwt
        if scenario.name == "exchange":
            exchange = pb.ExchangeRequest(
                intent=pb.Intent(action="read", resource="metrics/prod", purpose="benchmark"),
                audience="metrics-api",
                ttl_seconds=60,
                task_id=f"bench-{self.index}-{worker}",
                context=pb.AuditContext(prompt_sha256="0" * 64, tool_name="bench", model="none"),
            )

            async def exchange_one() -> bool:
                reply = await stub.Exchange(exchange, timeout=RPC_TIMEOUT)
                if not reply.token.token:
                    raise _BadResponse("Exchange returned no token")
                return True

            return exchange_one
        if scenario.name == "attest":
            return lambda: self._attest(stub)
        raise ValueError(f"unknown scenario {scenario.name}")

    async def _attest(self, stub: pb_grpc.WorkloadAsyncStub) -> bool:
        if not self.tokens:
            self.exhausted = True
            return False
        token = self.tokens.pop()
        csr = self.init.csrs[next(self._csr_turn) % len(self.init.csrs)]
        call = stub.Attest(None, timeout=RPC_TIMEOUT)
        params = pb.AttestParams(attestor="join_token", evidence=token, csr=csr)
        await call.write(pb.AttestRequest(params=params))
        await call.done_writing()
        reply = await call.read()
        code = await call.code()
        if code != grpc.StatusCode.OK:
            raise _BadResponse(f"Attest ended with {code.name}")
        if not isinstance(reply, pb.AttestResponse) or not reply.result.svids:
            raise _BadResponse("Attest returned no SVID")
        return True


class _BadResponse(Exception):
    pass


async def _drive(load: _Load, scenario: Scenario, seconds: float) -> ClientResult:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    samples: dict[str, str] = {}
    clock = time.perf_counter
    cpu0 = time.process_time()
    started = time.monotonic()
    deadline = clock() + seconds
    last_end = [started]

    def failed(code: str, detail: str) -> None:
        errors[code] = errors.get(code, 0) + 1
        samples.setdefault(code, detail[:160])

    async def worker(index: int) -> None:
        send = load.request(scenario, index)
        while clock() < deadline:
            t0 = clock()
            try:
                if not await send():
                    return
            except grpc.aio.AioRpcError as exc:
                failed(exc.code().name, exc.details() or "")
            except _BadResponse as exc:
                failed("BAD_RESPONSE", str(exc))
            else:
                latencies.append(clock() - t0)
            last_end[0] = time.monotonic()

    await asyncio.gather(*(worker(i) for i in range(load.init.concurrency)))
    return ClientResult(
        latencies=latencies,
        errors=errors,
        error_samples=samples,
        started=started,
        ended=last_end[0],
        cpu_seconds=time.process_time() - cpu0,
        exhausted=load.exhausted,
    )


async def _client_loop(conn: multiprocessing.connection.Connection, init: ClientInit) -> None:
    load = _Load(init)
    try:
        await load.connect()
        conn.send(("ready", None))
        while True:
            command, payload = await asyncio.to_thread(conn.recv)
            if command == "stop":
                return
            spec: RunSpec = payload
            if spec.warmup > 0 and spec.scenario.name != "attest":
                await _drive(load, spec.scenario, spec.warmup)
            load.tokens = list(spec.tokens)
            load.exhausted = False
            conn.send(("ready", None))
            command, _ = await asyncio.to_thread(conn.recv)
            if command == "stop":
                return
            result = await _drive(load, spec.scenario, spec.duration)
            load.tokens = []
            conn.send(("result", result))
    finally:
        await load.close()


def client_main(conn: multiprocessing.connection.Connection, init: ClientInit) -> None:
    """Entry point of a load process (spawned: no gRPC state is inherited)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and stops us
    try:
        asyncio.run(_client_loop(conn, init))
    except Exception as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


# --- the server ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds so far: the server (all threads; main thread), this process, the machine."""

    wall: float
    server: float
    server_loop: float
    own: float
    machine_busy: float

    @classmethod
    def take(cls, server_pid: int) -> CpuSnapshot:
        return cls(
            wall=time.monotonic(),
            server=_cpu_seconds(server_pid),
            server_loop=_cpu_seconds(server_pid, main_thread=True),
            own=time.process_time(),
            machine_busy=_machine_busy_seconds(),
        )


def _machine_busy_seconds() -> float:
    """Non-idle CPU seconds of the whole machine since boot, from /proc/stat (0 without)."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int, *, main_thread: bool = False) -> float:
    """User + system CPU of a process (all threads, or its main thread) from /proc; 0 without."""
    stat = Path(f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat")
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    tls_address: str
    mtls_address: str
    admin_socket: Path
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=STOP_TIMEOUT)


def _serve_command(profile: Path | None) -> list[str]:
    if profile is not None:
        return [sys.executable, "-c", _PROFILE_BOOTSTRAP, str(profile)]
    script = Path(sys.executable).parent / "authority"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from authority.cli import main; main()"]


def start_server(work: Path, socket_dir: Path, profile: Path | None, log_level: str) -> Server:
    port, mtls_port = _free_port(), _free_port()
    admin_socket = socket_dir / "admin.sock"
    log_path = work / "serve.log"
    command = [
        *_serve_command(profile),
        "serve",
        "--data-dir",
        str(work / "data"),
        "--listen",
        f"{LOOPBACK}:{port}",
        "--listen-mtls",
        f"{LOOPBACK}:{mtls_port}",
        "--admin-socket",
        str(admin_socket),
        "--trust-domain",
        TRUST_DOMAIN,
        "--log-level",
        log_level,
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    server = Server(proc, f"{LOOPBACK}:{port}", f"{LOOPBACK}:{mtls_port}", admin_socket, log_path)
    try:
        _wait_serving(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_serving(server: Server) -> None:
    """Until the admin socket answers a health check (the workload ports bind before it)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(f"authority serve exited early:\n{server.log_tail()}")
        if server.admin_socket.exists():
            with grpc.insecure_channel(f"unix:{server.admin_socket}") as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
        time.sleep(0.05)
    raise BenchError(f"authority serve did not become ready:\n{server.log_tail()}")


# --- setup through the admin socket ----------------------------------------------------------


def make_csr_pool(count: int) -> list[bytes]:
    from authority.client import make_csr, new_key

    return [make_csr(new_key()) for _ in range(count)]


async def create_tokens(server: Server, spiffe_ids: list[str], parallel: int = 32) -> list[bytes]:
    from authority.client import AdminClient

    async with AdminClient(server.admin_socket) as admin:
        queue = iter(spiffe_ids)
        tokens: list[bytes] = []

        async def one() -> None:
            for spiffe_id in queue:
                created = await admin.stub.CreateJoinToken(
                    pb.CreateJoinTokenRequest(spiffe_id=spiffe_id, ttl_seconds=600),
                    timeout=RPC_TIMEOUT,
                )
                tokens.append(created.token.encode())

        await asyncio.gather(*(one() for _ in range(parallel)))
    return tokens


async def attest_workloads(
    server: Server, folder: Path, count: int
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Attest ``count`` workloads with join tokens; (bundle PEM, [(chain PEM, key PEM)])."""
    from authority.client import AdminClient, SvidFiles, WorkloadClient, der_chain_to_pem

    async with AdminClient(server.admin_socket) as admin:
        bundle = await admin.stub.GetBundle(pb.GetBundleRequest(), timeout=RPC_TIMEOUT)
        # The example agent policy: agents may read metrics (the Exchange scenario).
        files = [
            pb.PolicyFile(name=f.name, content=f.read_text())
            for f in (EXAMPLE_POLICY / "agents.cedar", EXAMPLE_POLICY / "agents.tests.json")
        ]
        await admin.stub.LoadPolicy(pb.LoadPolicyRequest(files=files), timeout=RPC_TIMEOUT)
    bundle_pem = der_chain_to_pem(list(bundle.x509_authorities))
    ids = [f"spiffe://{TRUST_DOMAIN}/agent/bench-{i}" for i in range(count)]
    tokens = await create_tokens(server, ids, parallel=4)
    identities: list[tuple[bytes, bytes]] = []
    async with WorkloadClient(server.tls_address, bundle_pem, options=CHANNEL_OPTIONS) as client:
        info = await client.tls_stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=RPC_TIMEOUT)
        advertised_port = info.mtls_address.rpartition(":")[2]
        if advertised_port != server.mtls_address.rpartition(":")[2]:
            raise BenchError(f"the server advertises mTLS on {info.mtls_address!r}, not our port")
        for i, token in enumerate(tokens):
            target = folder / f"workload-{i}"
            await client.attest_to_folder("join_token", token, target)
            chain, key, _ = SvidFiles(target).read()
            identities.append((chain, key))
    return bundle_pem, identities


# --- the orchestration -----------------------------------------------------------------------


class Clients:
    """The load processes, driven in lock step over pipes."""

    def __init__(self, inits: list[ClientInit]) -> None:
        context = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.conns: list[multiprocessing.connection.Connection] = []
        for init in inits:
            parent, child = context.Pipe()
            proc = context.Process(
                target=client_main, args=(child, init), name=f"bench-client-{init.index}"
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    def _expect(self, what: str, timeout: float) -> list[Any]:
        replies: list[Any] = []
        deadline = time.monotonic() + timeout
        for index, conn in enumerate(self.conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise BenchError(f"load process {index} did not answer within {timeout:.0f}s")
            try:
                kind, payload = conn.recv()
            except EOFError:
                raise BenchError(f"load process {index} died") from None
            if kind == "error":
                raise BenchError(f"load process {index} failed: {payload}")
            if kind != what:
                raise BenchError(f"load process {index} sent {kind!r}, expected {what!r}")
            replies.append(payload)
        return replies

    async def connected(self) -> None:
        await asyncio.to_thread(self._expect, "ready", 60.0)

    async def prepare(self, specs: list[RunSpec]) -> None:
        """Hand every process its run and let it warm up; returns when all are ready."""
        for conn, spec in zip(self.conns, specs, strict=True):
            conn.send(("prepare", spec))
        longest = max(s.warmup for s in specs)
        await asyncio.to_thread(self._expect, "ready", longest + READY_TIMEOUT)

    async def go(self, duration: float) -> list[ClientResult]:
        """Start the prepared run in every process at once; their results."""
        for conn in self.conns:
            conn.send(("go", None))
        return await asyncio.to_thread(self._expect, "result", duration + READY_TIMEOUT)

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop", None))
        for proc in self.procs:
            proc.join(timeout=STOP_TIMEOUT)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=STOP_TIMEOUT)
        for conn in self.conns:
            conn.close()


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(
    scenario: Scenario, results: list[ClientResult], before: CpuSnapshot, after: CpuSnapshot
) -> ScenarioReport:
    latencies = sorted(itertools.chain.from_iterable(r.latencies for r in results))
    errors: dict[str, int] = {}
    samples: dict[str, str] = {}
    for r in results:
        for code, n in r.errors.items():
            errors[code] = errors.get(code, 0) + n
        for code, text in r.error_samples.items():
            samples.setdefault(code, text)
    seconds = max(r.ended for r in results) - min(r.started for r in results)
    rate = len(latencies) / seconds if seconds > 0 else 0.0
    wall = after.wall - before.wall  # from just before "go" to the last result in
    client_cpu = sum(r.cpu_seconds for r in results)
    ours = (after.server - before.server) + (after.own - before.own) + client_cpu
    other = max(0.0, (after.machine_busy - before.machine_busy) - ours)

    def percent(cpu: float, over: float) -> float:
        return round(100 * cpu / over, 1) if over > 0 else 0.0

    note = "ran out of join tokens before the duration" if any(r.exhausted for r in results) else ""
    return ScenarioReport(
        scenario=scenario.name,
        transport=scenario.transport,
        rpc=scenario.rpc,
        requests=len(latencies),
        errors=sum(errors.values()),
        seconds=round(seconds, 3),
        rate=round(rate, 1),
        p50_ms=round(_percentile(latencies, 0.50) * 1000, 2),
        p99_ms=round(_percentile(latencies, 0.99) * 1000, 2),
        ratio=None,
        target=TARGETS.get(scenario.name) if scenario.transport == "mtls" else None,
        verdict="",
        client_cpu_percent=percent(client_cpu, seconds),
        server_cpu_percent=percent(after.server - before.server, wall),
        server_loop_cpu_percent=percent(after.server_loop - before.server_loop, wall),
        other_cpu_percent=percent(other, wall),
        error_codes=errors,
        error_samples=samples,
        note=note,
    )


def apply_baseline(reports: list[ScenarioReport]) -> float | None:
    """The ratios to the mutual-TLS null-RPC rate (the mean of its runs) and the verdicts."""
    runs = [r.rate for r in reports if r.scenario == "null" and r.transport == "mtls"]
    baseline = sum(runs) / len(runs) if runs and all(runs) else None
    for r in reports:
        if baseline is None:
            continue
        r.ratio = round(r.rate / baseline, 3)
        if r.target is not None:
            r.verdict = "PASS" if r.ratio >= r.target else "BELOW"
    return baseline


def _split(items: list[bytes], parts: int) -> Iterator[list[bytes]]:
    for i in range(parts):
        yield items[i::parts]


async def run_scenarios(
    args: argparse.Namespace, server: Server, work: Path
) -> list[ScenarioReport]:
    channels = args.channels
    t0 = time.monotonic()
    csrs = make_csr_pool(CSR_POOL)
    bundle_pem, identities = await attest_workloads(
        server, work / "svids", max(4, channels * args.clients)
    )
    print(
        f"setup: {len(identities)} workloads attested, {len(csrs)} CSRs pre-generated "
        f"in {time.monotonic() - t0:.1f}s",
        flush=True,
    )
    inits = [
        ClientInit(
            index=i,
            tls_address=server.tls_address,
            mtls_address=server.mtls_address,
            bundle_pem=bundle_pem,
            identities=[identities[(i * channels + c) % len(identities)] for c in range(channels)],
            csrs=csrs,
            concurrency=args.concurrency,
        )
        for i in range(args.clients)
    ]
    clients = Clients(inits)
    reports: list[ScenarioReport] = []
    try:
        await clients.connected()
        for scenario in SCENARIOS:
            if args.only and scenario.name not in args.only and not scenario.is_baseline:
                continue
            tokens: list[bytes] = []
            if scenario.name == "attest":
                tokens = await _attest_tokens(args, server, reports)
            specs = [
                RunSpec(scenario, args.duration, args.warmup, part)
                for part in _split(tokens, args.clients)
            ]
            await clients.prepare(specs)
            await server_metrics(server, reset=True)
            before = CpuSnapshot.take(server.proc.pid)
            results = await clients.go(args.duration)
            report = summarize(scenario, results, before, CpuSnapshot.take(server.proc.pid))
            report.server_metrics = await server_metrics(server, reset=False)
            report.rpc += " (end)" if scenario.closing else ""
            reports.append(report)
            print(
                f"  {scenario.label:16} {report.rate:9.1f} req/s  p50 {report.p50_ms:7.2f} ms  "
                f"p99 {report.p99_ms:7.2f} ms  errors {report.errors}",
                flush=True,
            )
    finally:
        clients.close()
    return reports


async def _attest_tokens(
    args: argparse.Namespace, server: Server, reports: list[ScenarioReport]
) -> list[bytes]:
    """Enough single-use tokens for the attest scenario, estimated from the renewal rate."""
    x509 = next((r for r in reports if r.scenario == "x509"), None)
    rate = x509.rate if x509 is not None and x509.rate > 0 else 400.0
    count = int(rate * args.duration * 1.5) + args.concurrency * args.clients + 50
    count = min(count, MAX_ATTEST_TOKENS)
    ids = [f"spiffe://{TRUST_DOMAIN}/bench/attest-{i}" for i in range(count)]
    t0 = time.monotonic()
    tokens = await create_tokens(server, ids)
    print(f"setup: {len(tokens)} join tokens created in {time.monotonic() - t0:.1f}s", flush=True)
    return tokens


# --- output ----------------------------------------------------------------------------------


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import cryptography
    import google.protobuf

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    import authority

    return {
        "authority": f"{authority.__version__} from {Path(authority.__file__).parent}",
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "grpc": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "cryptography": cryptography.__version__,
        "platform": platform.platform(),
        "duration": args.duration,
        "warmup": args.warmup,
        "concurrency_per_client": args.concurrency,
        "clients": args.clients,
        "channels_per_client": args.channels,
        "profiled": args.profile_server is not None,
    }


def format_table(reports: list[ScenarioReport]) -> str:
    header = (
        f"{'scenario':8} {'over':5} {'rpc':14} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'errors':>7} {'vs null':>8} {'target':>7} {'verdict':7} {'client CPU':>10} "
        f"{'server CPU':>10} {'srv loop':>8} {'other':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in reports:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        target = "-" if r.target is None else f">={r.target:.2f}"
        lines.append(
            f"{r.scenario:8} {r.transport:5} {r.rpc:14} {r.rate:9.1f} {r.p50_ms:8.2f} "
            f"{r.p99_ms:8.2f} {r.errors:7d} {ratio:>8} {target:>7} {r.verdict or '-':7} "
            f"{r.client_cpu_percent:9.0f}% {r.server_cpu_percent:9.0f}% "
            f"{r.server_loop_cpu_percent:7.0f}% {r.other_cpu_percent:5.0f}%"
        )
    for r in reports:
        if r.error_codes:
            codes = ", ".join(f"{c}={n}" for c, n in sorted(r.error_codes.items()))
            lines.append(f"  {r.scenario}/{r.transport} errors: {codes}")
            for code, sample in sorted(r.error_samples.items()):
                lines.append(f"    {code}: {sample}")
        if r.note:
            lines.append(f"  {r.scenario}/{r.transport}: {r.note}")
    return "\n".join(lines)


async def server_metrics(server: Server, *, reset: bool) -> dict[str, Any]:
    """The authority's own measurements (GetMetrics), read over the admin socket."""
    from authority.client import AdminClient

    async with AdminClient(server.admin_socket) as admin:
        reply = await admin.stub.GetMetrics(pb.GetMetricsRequest(reset=reset), timeout=RPC_TIMEOUT)
    value: dict[str, Any] = json.loads(reply.metrics_json)
    return value


def print_audit_share(reports: list[ScenarioReport]) -> None:
    """Issue 6's figure: how much of an Exchange's server time its audit record takes."""
    for r in reports:
        if r.scenario != "exchange" or not r.requests or not r.server_metrics:
            continue
        audit = r.server_metrics.get("store.audit_append", {})
        commit = r.server_metrics.get("store.commit", {})
        batch = r.server_metrics.get("store.batch_jobs", {})
        handler = r.server_metrics.get("exchange.handler", {})
        if "p50_us" not in audit:
            continue
        server_us = r.server_cpu_percent / 100 * r.seconds / r.requests * 1e6
        jobs = batch.get("mean", 1.0) or 1.0  # jobs per commit
        commit_share = commit.get("mean_us", 0.0) / jobs
        print(
            f"Exchange: {r.rate:.0f}/s; server CPU {server_us:.0f} us per Exchange; handler wall "
            f"p50 {handler.get('p50_us', 0):.0f} us p99 {handler.get('p99_us', 0):.0f} us"
        )
        print(
            f"  audit record (hash chain + INSERTs in the action's transaction, writer CPU): p50 "
            f"{audit['p50_us']:.0f} us, p99 {audit['p99_us']:.0f} us = "
            f"{audit['p50_us'] / server_us * 100:.1f}% (p50) / "
            f"{audit['p99_us'] / server_us * 100:.1f}% (p99) of an Exchange's server time "
            f"(target < 15%)"
        )
        print(
            f"  durable commit (fsync, shared by a batch of {jobs:.1f} jobs on average): "
            f"p50 {commit.get('p50_us', 0):.0f} us, {commit_share:.0f} us per job"
        )


def print_verdicts(reports: list[ScenarioReport], clients: int, baseline: float | None) -> None:
    if baseline is None:
        print("no mTLS null-RPC rate: no ratios")
    else:
        print(f"baseline: mTLS null-RPC rate {baseline:.1f} req/s (mean of the first and last run)")
    for r in reports:
        if r.target is not None and r.ratio is not None:
            print(
                f"{r.rpc} rate is {r.ratio * 100:.0f}% of the mTLS null-RPC rate "
                f"(target >= {r.target * 100:.0f}%): {r.verdict}"
            )
    print_audit_share(reports)
    saturated = [r for r in reports if r.client_cpu_percent / clients >= 90]
    if saturated:
        names = ", ".join(f"{r.scenario}/{r.transport}" for r in saturated)
        print(
            f"note: a load process used >= 90% of a core in {names}: the load generator may be "
            "the bottleneck there; compare with --clients 2"
        )
    cores = os.cpu_count() or 1
    busy = [r for r in reports if r.client_cpu_percent + r.server_cpu_percent >= 90 * cores]
    if busy:
        names = ", ".join(f"{r.scenario}/{r.transport}" for r in busy)
        print(
            f"note: load + server used >= 90% of all {cores} cores in {names}: the machine, "
            "not one process, is the limit there (client and server share it)"
        )
    noisy = [r for r in reports if r.other_cpu_percent >= 15]
    if noisy:
        names = ", ".join(f"{r.scenario}/{r.transport}" for r in noisy)
        print(
            f"warning: other processes used >= 15% of a core during {names}: those figures are "
            "disturbed; run again on a quiet machine"
        )
    print(
        "columns: CPU in % of one core over the timed window; 'server CPU' is all the server's "
        "threads, 'srv loop' its main thread (the Python event loop), 'other' the rest of the "
        "machine (neither the server nor the load)"
    )


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per scenario")
    parser.add_argument("--warmup", type=float, default=1.0, help="untimed seconds per scenario")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="outstanding requests per client"
    )
    parser.add_argument("--clients", type=int, default=1, help="load processes")
    parser.add_argument("--channels", type=int, default=2, help="channels (connections) per client")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--only", nargs="+", choices=sorted({s.name for s in SCENARIOS}), help="run only these"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="the server's log level (INFO: its default)",
    )
    parser.add_argument(
        "--profile-server", type=Path, help="run the server under cProfile; stats here"
    )
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration must be in (0, {MAX_DURATION:.0f}]")
    if not 0 <= args.warmup <= 10:
        parser.error("--warmup must be in [0, 10]")
    if not 1 <= args.concurrency <= 1000:
        parser.error("--concurrency must be in [1, 1000]")
    if not 1 <= args.clients <= 16:
        parser.error("--clients must be in [1, 16]")
    if not 1 <= args.channels <= 16:
        parser.error("--channels must be in [1, 16]")
    return args


async def bench(args: argparse.Namespace, env: dict[str, Any]) -> list[ScenarioReport]:
    work = Path(tempfile.mkdtemp(prefix="authority-bench-"))
    socket_dir = Path(tempfile.mkdtemp(prefix="aub-", dir="/tmp"))
    profile = args.profile_server.resolve() if args.profile_server else None
    server: Server | None = None
    try:
        server = start_server(work, socket_dir, profile, args.log_level)
        print(
            f"server: pid {server.proc.pid}, tls {server.tls_address}, mtls {server.mtls_address}"
        )
        return await run_scenarios(args, server, work)
    finally:
        if server is not None:
            code = server.stop()
            if code not in (0, None):
                print(
                    f"warning: the server exited with {code}:\n{server.log_tail()}", file=sys.stderr
                )
        shutil.rmtree(socket_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment(args)
    print(
        f"cores: {env['cores']} (usable {env['usable_cores']}); Python {env['python']}; "
        f"grpcio {env['grpc']}; protobuf {env['protobuf']}; cryptography {env['cryptography']}"
    )
    print(f"authority {env['authority']}")
    print(
        f"{args.clients} load process(es) x {args.concurrency} outstanding x {args.channels} "
        f"channel(s); {args.duration:g}s per scenario after {args.warmup:g}s warm-up"
    )
    started = time.monotonic()
    try:
        reports = asyncio.run(bench(args, env))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print()
    baseline = apply_baseline(reports)
    print(format_table(reports))
    print()
    print_verdicts(reports, args.clients, baseline)
    total = time.monotonic() - started
    print(f"total run time {total:.1f}s")
    if args.profile_server:
        print(
            f"server profile written to {args.profile_server} (figures distorted by the profiler)"
        )
    if args.json:
        document = {
            "environment": env,
            "total_seconds": round(total, 1),
            "baseline_rate": None if baseline is None else round(baseline, 1),
            "targets": TARGETS,
            "scenarios": [asdict(r) for r in reports],
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
