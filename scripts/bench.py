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
import itertools
import json
import multiprocessing.connection
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
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
    attest_join_tokens,
    authority_version,
    bench_dirs,
    bundle_pem,
    close_all,
    cpu_percent,
    cpu_seconds,
    create_join_tokens,
    drive,
    expect_all,
    load_example_policy,
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

CSR_POOL = 200
JWT_AUDIENCE = "bench.example"
MAX_DURATION = 30.0
MAX_ATTEST_TOKENS = 20_000
TARGETS = {"x509": 0.50, "jwt": 0.60, "exchange": 0.40}

# Runs ``authority serve`` under cProfile; argv: [stats file, serve arguments...].
_PROFILE_BOOTSTRAP = """
import cProfile, sys
out = sys.argv[1]
sys.argv = ["authority", *sys.argv[2:]]
from authority.cli import main
cProfile.run("main()", out)
"""


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
class ClientResult(LoadRun):
    exhausted: bool = False  # attest: ran out of tokens before the duration


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
        self.spec: RunSpec | None = None

    async def connect(self) -> None:
        for channel in (*self.tls, *self.mtls):
            await asyncio.wait_for(channel.channel_ready(), READY_TIMEOUT)

    async def close(self) -> None:
        for channel in (*self.tls, *self.mtls):
            await channel.close(None)

    async def prepare(self, spec: RunSpec) -> None:
        """Warm up (untimed) and take the run's tokens."""
        if spec.warmup > 0 and spec.scenario.name != "attest":
            await self.drive(spec.scenario, spec.warmup)
        self.tokens = list(spec.tokens)
        self.exhausted = False
        self.spec = spec

    async def go(self, _: object) -> ClientResult:
        """The prepared run."""
        assert self.spec is not None
        result = await self.drive(self.spec.scenario, self.spec.duration)
        self.tokens = []
        return result

    async def drive(self, scenario: Scenario, seconds: float) -> ClientResult:
        run = await drive(lambda i: self.request(scenario, i), self.init.concurrency, seconds)
        return ClientResult(**vars(run), exhausted=self.exhausted)

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
                    raise RequestFailed("BAD_RESPONSE", "RenewX509SVID returned no certificate")
                return True

            return x509
        if scenario.name == "jwt":
            fetch = pb.FetchJWTSVIDRequest(audience=[JWT_AUDIENCE])

            async def jwt() -> bool:
                reply = await stub.FetchJWTSVID(fetch, timeout=RPC_TIMEOUT)
                if not reply.token:
                    raise RequestFailed("BAD_RESPONSE", "FetchJWTSVID returned no token")
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
                    raise RequestFailed("BAD_RESPONSE", "Exchange returned no token")
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
            raise RequestFailed("BAD_RESPONSE", f"Attest ended with {code.name}")
        if not isinstance(reply, pb.AttestResponse) or not reply.result.svids:
            raise RequestFailed("BAD_RESPONSE", "Attest returned no SVID")
        return True


async def _client_loop(conn: multiprocessing.connection.Connection, init: ClientInit) -> None:
    load = _Load(init)
    try:
        await load.connect()
        await serve_commands(conn, {"prepare": ("ready", load.prepare), "go": ("result", load.go)})
    finally:
        await load.close()


# --- the server ------------------------------------------------------------------------------


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
            server=cpu_seconds(server_pid, missing_ok=True),
            server_loop=cpu_seconds(server_pid, main_thread=True, missing_ok=True),
            own=time.process_time(),
            machine_busy=machine_busy_seconds(missing_ok=True),
        )


def start_server(
    work: Path, socket_dir: Path, profile: Path | None, log_level: str
) -> AuthorityServer:
    """``authority serve``, under cProfile when ``profile`` names the stats file."""
    command = None
    if profile is not None:
        command = [sys.executable, "-c", _PROFILE_BOOTSTRAP, str(profile)]
    return start_authority(work, socket_dir, log_level=log_level, command=command)


# --- setup through the admin socket ----------------------------------------------------------


def make_csr_pool(count: int) -> list[bytes]:
    from authority.client import make_csr, new_key

    return [make_csr(new_key()) for _ in range(count)]


async def attest_workloads(
    server: AuthorityServer, folder: Path, count: int
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Attest ``count`` workloads with join tokens; (bundle PEM, [(chain PEM, key PEM)])."""
    from authority.client import AdminClient, WorkloadClient

    async with AdminClient(server.admin_socket) as admin:
        roots = await bundle_pem(admin.stub)
        await load_example_policy(admin.stub)  # agents may read metrics: the Exchange scenario
    ids = [f"spiffe://{TRUST_DOMAIN}/agent/bench-{i}" for i in range(count)]
    tokens = await create_join_tokens(server.admin_socket, ids, parallel=4)
    async with WorkloadClient(server.tls_address, roots, options=CHANNEL_OPTIONS) as client:
        info = await client.tls_stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=RPC_TIMEOUT)
    advertised_port = info.mtls_address.rpartition(":")[2]
    if advertised_port != server.mtls_address.rpartition(":")[2]:
        raise BenchError(f"the server advertises mTLS on {info.mtls_address!r}, not our port")
    return roots, await attest_join_tokens(server.tls_address, roots, tokens, folder)


# --- the orchestration -----------------------------------------------------------------------


class Clients:
    """The load processes, driven in lock step over pipes."""

    def __init__(self, inits: list[ClientInit]) -> None:
        self.workers = [
            PipeWorker(
                _client_loop, init, f"bench-client-{init.index}", f"load process {init.index}"
            )
            for init in inits
        ]

    async def connected(self) -> None:
        await asyncio.to_thread(expect_all, self.workers, "ready", 60.0)

    async def prepare(self, specs: list[RunSpec]) -> None:
        """Hand every process its run and let it warm up; returns when all are ready."""
        for worker, spec in zip(self.workers, specs, strict=True):
            worker.send("prepare", spec)
        longest = max(s.warmup for s in specs)
        await asyncio.to_thread(expect_all, self.workers, "ready", longest + READY_TIMEOUT)

    async def go(self, duration: float) -> list[ClientResult]:
        """Start the prepared run in every process at once; their results."""
        for worker in self.workers:
            worker.send("go")
        return await asyncio.to_thread(expect_all, self.workers, "result", duration + READY_TIMEOUT)

    def close(self) -> None:
        close_all(self.workers)


def summarize(
    scenario: Scenario, results: list[ClientResult], before: CpuSnapshot, after: CpuSnapshot
) -> ScenarioReport:
    latencies = sorted(itertools.chain.from_iterable(r.latencies for r in results))
    errors: dict[str, int] = {}
    samples: dict[str, str] = {}
    for r in results:
        for code, n in r.errors.items():
            errors[code] = errors.get(code, 0) + n
        for code, text in r.samples.items():
            samples.setdefault(code, text[:160])
    seconds = max(r.ended for r in results) - min(r.started for r in results)
    rate = len(latencies) / seconds if seconds > 0 else 0.0
    wall = after.wall - before.wall  # from just before "go" to the last result in
    client_cpu = sum(r.cpu_seconds for r in results)
    ours = (after.server - before.server) + (after.own - before.own) + client_cpu
    other = max(0.0, (after.machine_busy - before.machine_busy) - ours)

    note = "ran out of join tokens before the duration" if any(r.exhausted for r in results) else ""
    return ScenarioReport(
        scenario=scenario.name,
        transport=scenario.transport,
        rpc=scenario.rpc,
        requests=len(latencies),
        errors=sum(errors.values()),
        seconds=round(seconds, 3),
        rate=round(rate, 1),
        p50_ms=round(nearest_rank(latencies, 0.50) * 1000, 2),
        p99_ms=round(nearest_rank(latencies, 0.99) * 1000, 2),
        ratio=None,
        target=TARGETS.get(scenario.name) if scenario.transport == "mtls" else None,
        verdict="",
        client_cpu_percent=cpu_percent(client_cpu, seconds),
        server_cpu_percent=cpu_percent(after.server - before.server, wall),
        server_loop_cpu_percent=cpu_percent(after.server_loop - before.server_loop, wall),
        other_cpu_percent=cpu_percent(other, wall),
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
    args: argparse.Namespace, server: AuthorityServer, work: Path
) -> list[ScenarioReport]:
    channels = args.channels
    t0 = time.monotonic()
    csrs = make_csr_pool(CSR_POOL)
    roots, identities = await attest_workloads(
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
            bundle_pem=roots,
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
            before = CpuSnapshot.take(server.pid)
            results = await clients.go(args.duration)
            report = summarize(scenario, results, before, CpuSnapshot.take(server.pid))
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
    args: argparse.Namespace, server: AuthorityServer, reports: list[ScenarioReport]
) -> list[bytes]:
    """Enough single-use tokens for the attest scenario, estimated from the renewal rate."""
    x509 = next((r for r in reports if r.scenario == "x509"), None)
    rate = x509.rate if x509 is not None and x509.rate > 0 else 400.0
    count = int(rate * args.duration * 1.5) + args.concurrency * args.clients + 50
    count = min(count, MAX_ATTEST_TOKENS)
    ids = [f"spiffe://{TRUST_DOMAIN}/bench/attest-{i}" for i in range(count)]
    t0 = time.monotonic()
    tokens = await create_join_tokens(server.admin_socket, ids)
    print(f"setup: {len(tokens)} join tokens created in {time.monotonic() - t0:.1f}s", flush=True)
    return tokens


# --- output ----------------------------------------------------------------------------------


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import cryptography
    import google.protobuf

    return {
        "authority": authority_version(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
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


async def server_metrics(server: AuthorityServer, *, reset: bool) -> dict[str, Any]:
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
    add_log_level_argument(parser)
    parser.add_argument(
        "--profile-server", type=Path, help="run the server under cProfile; stats here"
    )
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration must be in (0, {MAX_DURATION:.0f}]")
    require_range(parser, "--warmup", args.warmup, 0, 10)
    require_range(parser, "--concurrency", args.concurrency, 1, 1000)
    require_range(parser, "--clients", args.clients, 1, 16)
    require_range(parser, "--channels", args.channels, 1, 16)
    return args


async def bench(args: argparse.Namespace, env: dict[str, Any]) -> list[ScenarioReport]:
    profile = args.profile_server.resolve() if args.profile_server else None
    with bench_dirs("authority-bench-", "aub-") as (work, socket_dir):
        server = start_server(work, socket_dir, profile, args.log_level)
        try:
            print(f"server: pid {server.pid}, tls {server.tls_address}, mtls {server.mtls_address}")
            return await run_scenarios(args, server, work)
        finally:
            stop_and_report(server)


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
    reports = run_bench(bench(args, env))
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
