"""The fuzz harness shared by ``tests/fuzz`` and ``scripts/fuzz.py``: the authority as a
subprocess with every endpoint on, the catalogue of endpoints and their RPCs (from the
descriptors), the driver that runs Hypothesis cases on one RPC, and the ledger of outcomes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority._pb import spiffe_workload_pb2 as wpb
from authority.client import AdminClient, WorkloadClient, der_chain_to_pem
from tests.fuzz.strategies import RawCase, raw_case, request_strategy
from tests.fuzz.wire import (
    CLOSED,
    NO_STATUS,
    OVERSIZED_HEADERS,
    UNANSWERED,
    Connection,
    Outcome,
    Target,
    grpc_frame,
    tls_target,
    unix_target,
)
from tests.helpers import ServeProcess, short_socket_dir, start_serve

TD = "spiffe://example.org"
WORKLOAD_ID = f"{TD}/fuzz/workload"
MEMORY_BOUND_MB = 50  # server RSS growth allowed over a whole fuzz run
# Server log written during one RPC's batch (at most 64 cases): refusals are one rate-limited
# line each, so this is far above what they write (~5 KB at most, measured) and far below what
# echoing a hostile 300 KB value, or a traceback per request, would.
LOG_BOUND_BYTES = 64 * 1024
TRACEBACK = "Traceback (most recent call last)"
WORKLOAD_API_HEADER = (("workload.spiffe.io", "true"),)

# Outcomes that fail the suite: an internal error or an unknown one, a call never answered, a
# stream ended without a status, a status outside gRPC's codes, a connection dropped without
# GOAWAY, response headers no gRPC client accepts. (A RST_STREAM or GOAWAY is the transport's
# own protocol error: accepted.)
BAD_STATUSES = frozenset({"UNKNOWN", "INTERNAL", UNANSWERED, NO_STATUS, CLOSED, OVERSIZED_HEADERS})


def is_bad(status: str) -> bool:
    return status in BAD_STATUSES or status.startswith(("CODE_", "BAD_STATUS_"))


GRPCIO_ENDPOINTS = frozenset({"tls", "mtls", "admin"})
# grpc core's own answers to a malformed header or frame, given before any application code
# runs (the application cannot choose their code; gRPC's compression spec prescribes INTERNAL
# for a message that does not decompress): the transport's protocol error, accepted on the
# grpcio endpoints and counted apart as "<CODE>(transport)". Exact messages only.
GRPC_CORE_TRANSPORT_ERRORS = (
    re.compile(r"Error parsing '[a-z0-9-]+' metadata(: [a-z0-9 ]+)?"),
    re.compile(r"Compression bit set but no encoding configured"),
    re.compile(r"Decompression failed due to (data|zlib) error"),
)


def classify(endpoint: str, outcome: Outcome) -> str:
    """The ledger's name for an outcome: its status, or "<CODE>(transport)" for grpc core's
    protocol errors on the grpcio endpoints."""
    if endpoint in GRPCIO_ENDPOINTS and any(
        p.fullmatch(outcome.message) for p in GRPC_CORE_TRANSPORT_ERRORS
    ):
        return f"{outcome.status}(transport)"
    return outcome.status


WORKLOAD = pb.DESCRIPTOR.services_by_name["Workload"]
ADMIN = pb.DESCRIPTOR.services_by_name["Admin"]
SPIFFE = wpb.DESCRIPTOR.services_by_name["SpiffeWorkloadAPI"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]

# Every service each endpoint serves, plus the ones it must refuse (Admin on the TCP ports).
# The admin socket comes last: operator calls change what the others see (rotations,
# revocations, policies).
ENDPOINT_SERVICES: dict[str, tuple[ServiceDescriptor, ...]] = {
    "tls": (WORKLOAD, HEALTH, REFLECTION, ADMIN),
    "mtls": (WORKLOAD, HEALTH, REFLECTION, ADMIN),
    "attest": (WORKLOAD,),
    "workload-api": (SPIFFE,),
    "admin": (ADMIN, HEALTH, REFLECTION),
}
ENDPOINTS = tuple(ENDPOINT_SERVICES)


@dataclass(frozen=True)
class Rpc:
    endpoint: str
    method: MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def name(self) -> str:
        return f"{self.endpoint}:{self.method.containing_service.name}.{self.method.name}"

    @property
    def refused_service(self) -> bool:
        """Admin on a TCP port: every call is refused before its body is read."""
        return self.endpoint in ("tls", "mtls") and self.method.containing_service is ADMIN


def all_rpcs() -> list[Rpc]:
    return [
        Rpc(endpoint, method)
        for endpoint, services in ENDPOINT_SERVICES.items()
        for service in services
        for method in service.methods
    ]


# --- the server ------------------------------------------------------------------------------


@dataclass
class FuzzServer:
    """The authority as a subprocess, and the credentials to reach each endpoint."""

    served: ServeProcess
    bundle_pem: bytes
    svid_dir: Path
    workload_api_socket: Path
    targets: dict[str, Target] = field(default_factory=dict)
    attestations: int = 0

    @property
    def pid(self) -> int:
        return self.served.proc.pid

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1])

    def log_size(self) -> int:
        return self.served.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.served.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def alive(self) -> bool:
        return self.served.proc.poll() is None

    def reattest(self) -> str | None:
        """A fresh SVID for the mutual-TLS port (the admin fuzzing may have revoked the first
        one, or rotated its CA out of the bundle), then fresh targets; the reason it could not
        be had (the join_token attestor revoked, say), else None."""
        self.attestations += 1
        spiffe_id = f"{WORKLOAD_ID}-{self.attestations}"
        try:
            asyncio.run(_attest(self.served, spiffe_id, self.svid_dir))
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        except ConnectionError as exc:
            return str(exc)
        finally:
            self.refresh_targets()
        return None

    def refresh_targets(self) -> None:
        """Targets for every endpoint, verifying the TLS ports against the current bundle (the
        admin fuzzing may rotate the CA)."""
        served = self.served
        with grpc.insecure_channel(f"unix:{served.admin_socket}") as channel:
            bundle = pb_grpc.AdminStub(channel).GetBundle(pb.GetBundleRequest(), timeout=30)
        self.bundle_pem = der_chain_to_pem(list(bundle.x509_authorities))
        self.targets = {
            "tls": tls_target("tls", served.address, self.bundle_pem),
            "mtls": tls_target(
                "mtls",
                served.mtls_address,
                self.bundle_pem,
                cert=self.svid_dir / "svid.pem",
                key=self.svid_dir / "svid.key",
            ),
            "admin": unix_target("admin", served.admin_socket),
            "attest": unix_target("attest", served.data_dir / "attest.sock"),
            "workload-api": unix_target(
                "workload-api", self.workload_api_socket, WORKLOAD_API_HEADER
            ),
        }


async def _attest(served: ServeProcess, spiffe_id: str, svid_dir: Path) -> None:
    """An SVID for ``spiffe_id`` in ``svid_dir``, by a fresh join token."""
    async with AdminClient(served.admin_socket) as admin:
        bundle = await admin.stub.GetBundle(pb.GetBundleRequest())
        token = await admin.stub.CreateJoinToken(
            pb.CreateJoinTokenRequest(spiffe_id=spiffe_id, ttl_seconds=3600)
        )
    bundle_pem = der_chain_to_pem(list(bundle.x509_authorities))
    async with WorkloadClient(served.address, bundle_pem) as client:
        await client.attest_to_folder("join_token", token.token.encode(), svid_dir)


async def _prepare(served: ServeProcess, svid_dir: Path) -> None:
    """An attested SVID for the mutual-TLS port; entries that give this process SVIDs on the
    Workload API and make the SVID's holder a node agent with one node entry."""
    await _attest(served, WORKLOAD_ID, svid_dir)
    async with AdminClient(served.admin_socket) as admin:
        await admin.stub.CreateEntry(
            pb.CreateEntryRequest(
                spiffe_id=f"{TD}/fuzz/local",
                selectors=[pb.Selector(type="unix", value=f"uid:{os.getuid()}")],
                force=True,  # the Workload API's built-in unix attestor, no instance registered
            )
        )
        await admin.stub.CreateEntry(
            pb.CreateEntryRequest(
                spiffe_id=f"{TD}/fuzz/node-entry",
                selectors=[pb.Selector(type="unix", value="uid:0")],
                parent_id=WORKLOAD_ID,
            )
        )


@contextlib.contextmanager
def fuzz_server(folder: Path) -> Iterator[FuzzServer]:
    """A fresh authority in ``folder`` with the Workload API on; stopped on exit."""
    socket_dir = short_socket_dir()
    workload_api = socket_dir / "w.sock"
    served = start_serve(folder / "data", socket_dir, "--workload-api-socket", str(workload_api))
    try:
        svid_dir = folder / "svid"
        asyncio.run(_prepare(served, svid_dir))
        server = FuzzServer(served, b"", svid_dir, workload_api)
        server.refresh_targets()
        yield server
    finally:
        served.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)


def still_answers(server: FuzzServer) -> list[str]:
    """Ping and GetBundle on the TLS port and the admin socket must succeed, Ping on the
    mutual-TLS port with a fresh SVID too; the Workload API and the attest socket must answer
    with a status that is not a failure (the admin fuzzing may have revoked the fuzzer's
    attestor or entries). Fresh connections; the problems found (empty: all answered)."""
    not_attested = server.reattest()
    checks = [
        ("tls", "/authority.v1.Workload/Ping", True),
        ("tls", "/authority.v1.Workload/GetBundle", True),
        ("admin", "/authority.v1.Admin/GetBundle", True),
        ("mtls", "/authority.v1.Workload/Ping", True),
        ("attest", "/authority.v1.Workload/Ping", True),
        ("workload-api", "/SpiffeWorkloadAPI/FetchJWTBundles", False),
    ]
    problems = []
    for endpoint, path, must_succeed in checks:
        if endpoint == "mtls" and not_attested is not None:
            # Without an SVID the port can only refuse the handshake: not a verdict on it.
            continue
        with Connection(server.targets[endpoint]) as conn:
            streaming = path.endswith("Bundles")
            outcome = conn.call(
                path, [grpc_frame(b"")], stream_idle=10.0 if streaming else None, max_responses=1
            )
        answered = outcome.status == "OK" or (streaming and outcome.responses == 1)
        if (must_succeed and not answered) or is_bad(outcome.status):
            problems.append(f"{endpoint} {path}: {outcome.status} {outcome.message[:200]}")
    return problems


# --- the ledger ------------------------------------------------------------------------------


@dataclass
class BadCase:
    rpc: str
    kind: str  # "message" or the raw case's kind
    status: str
    message: str
    digest: str
    size: int
    headers: tuple[tuple[str, str], ...]
    frames: tuple[bytes, ...]

    def summary(self) -> str:
        headers = f" headers={list(self.headers)}" if self.headers else ""
        return (
            f"{self.rpc} [{self.kind}] -> {self.status} {self.message[:160]!r} "
            f"(request {self.digest}, {self.size} bytes{headers})"
        )


@dataclass
class RpcReport:
    rpc: str
    endpoint: str
    cases: int = 0
    # Kinds of request left unanswered on this endpoint (shared by its RPCs): not sent again.
    unanswered_kinds: set[str] = field(default_factory=set)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    bad: list[BadCase] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)
    rss_before_kb: int = 0
    rss_after_kb: int = 0
    rss_grown_kb: int = 0  # summed over this RPC's batches (the others' growth left out)
    log_bytes: int = 0
    seconds: float = 0.0

    def record(self, case: RawCase, outcome: Outcome | None) -> None:
        self.cases += 1
        if outcome is None:
            self.statuses["SKIPPED"] += 1
            return
        status = classify(self.endpoint, outcome)
        self.statuses[status] += 1
        if not is_bad(status):
            return
        if status == UNANSWERED:
            self.unanswered_kinds.add(case.kind)
        bad = BadCase(
            self.rpc,
            case.kind,
            status,
            outcome.message,
            hashlib.sha256(repr(case.headers).encode() + b"".join(case.frames)).hexdigest()[:16],
            sum(len(f) for f in case.frames),
            case.headers,
            case.frames,
        )
        # Keep the smallest request per (kind, status): the reproduction to look at first.
        for index, seen in enumerate(self.bad):
            if (seen.kind, seen.status) == (bad.kind, bad.status):
                if bad.size < seen.size:
                    self.bad[index] = bad
                return
        self.bad.append(bad)

    def failures(self) -> list[str]:
        return [b.summary() for b in self.bad] + [
            f"{self.rpc}: traceback in the server log:\n{t}" for t in self.tracebacks[:3]
        ]

    def line(self) -> str:
        statuses = ", ".join(f"{k}={v}" for k, v in sorted(self.statuses.items()))
        return (
            f"{self.rpc:58} cases={self.cases:<5} {statuses}; "
            f"rss {self.rss_before_kb // 1024}->{self.rss_after_kb // 1024} MB "
            f"(own batches {self.rss_grown_kb / 1024:+.1f}); "
            f"tracebacks={len(self.tracebacks)}; log +{self.log_bytes} B; {self.seconds:.1f}s"
        )


def tracebacks_in(log: str) -> list[str]:
    """Each traceback in ``log``: from its first line to the exception line."""
    found = []
    lines = log.splitlines()
    for index, line in enumerate(lines):
        if TRACEBACK in line:
            block = [lines[index - 1]] if index else []
            for following in lines[index:]:
                block.append(following)
                if following and not following.startswith((" ", TRACEBACK)):
                    break
            found.append("\n".join(block[-12:]))
    return found


def rpc_by_name(name: str) -> Rpc:
    return next(rpc for rpc in all_rpcs() if rpc.name == name)


def describe(rpc_name: str, kind: str, frames: list[bytes]) -> str:
    """A failing request for a human: a well-framed message decoded (long values cut), any
    other request as the hex of its first bytes."""
    if kind == "message":
        from google.protobuf import message_factory, text_format

        cls = message_factory.GetMessageClass(rpc_by_name(rpc_name).method.input_type)
        parts = []
        for frame in frames:
            message = cls.FromString(frame[5:])
            text = text_format.MessageToString(message, as_one_line=True, as_utf8=True)
            parts.append(_cut_long_values(text))
        return " | ".join(parts) or "(no message)"
    return " ".join(f.hex()[:120] + ("..." if len(f) > 60 else "") for f in frames) or "(empty)"


def _cut_long_values(text: str, keep: int = 60) -> str:
    return re.sub(
        r'"((?:[^"\\]|\\.){' + str(keep) + r'})(?:[^"\\]|\\.)+"',
        lambda m: f'"{m.group(1)}..." ({len(m.group(0))} chars)',
        text,
    )


def save_bad_cases(reports: list[RpcReport], path: Path) -> None:
    """The failing requests, hex-encoded, one JSON object a line (random inputs: no secrets)."""
    with open(path, "w") as out:
        for report in reports:
            for bad in report.bad:
                out.write(
                    json.dumps(
                        {
                            "rpc": bad.rpc,
                            "kind": bad.kind,
                            "status": bad.status,
                            "message": bad.message[:500],
                            "digest": bad.digest,
                            "headers": bad.headers,
                            "frames": [f.hex() for f in bad.frames],
                        }
                    )
                    + "\n"
                )


# --- the driver ------------------------------------------------------------------------------

STREAM_IDLE = 0.3  # a quiet server stream is cancelled after this long
# A call with no status after this long is UNANSWERED (generous: the box may be busy).
# Refusals take milliseconds; the worst Ping measured during a 2,000-stream storm on this box
# waited 0.75 s. Each kind of request left unanswered costs this once per endpoint.
ANSWER_WITHIN = float(os.environ.get("FUZZ_ANSWER_WITHIN", "5"))


def run_case(conn: Connection, rpc: Rpc, case: RawCase, report: RpcReport) -> Outcome | None:
    """One request; None when a request of its kind already went unanswered on this endpoint
    (it would only wait out the same deadline again: the failure is on record)."""
    if case.kind in report.unanswered_kinds:
        return None
    server_stream = rpc.method.server_streaming
    return conn.call(
        rpc.path,
        case.frames,
        headers=case.headers,
        end_stream=case.end_stream,
        answer_within=ANSWER_WITHIN,
        stream_idle=STREAM_IDLE if server_stream or not case.end_stream else None,
        max_responses=1,
    )


def _drive(
    strategy: st.SearchStrategy[Any], examples: int, seed: int | None, body: Callable[[Any], None]
) -> None:
    if examples <= 0:
        return

    @settings(
        max_examples=examples,
        derandomize=seed is None,
        database=None,
        deadline=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(strategy)
    def run(case: Any) -> None:
        body(case)

    if seed is not None:
        run = hypothesis_seed(seed)(run)
    run()


def fuzz_rpc(
    server: FuzzServer,
    conn: Connection,
    rpc: Rpc,
    *,
    messages: int,
    raw: int,
    seed: int | None = None,
    report: RpcReport | None = None,
    unanswered: set[str] | None = None,
) -> RpcReport:
    """``messages`` well-framed hostile messages and ``raw`` malformed requests on ``rpc``;
    then the server's log since the first case is searched for tracebacks."""

    report = report or RpcReport(rpc.name, rpc.endpoint)
    if unanswered is not None:
        report.unanswered_kinds = unanswered
    started = time.monotonic()
    log_offset = server.log_size()
    rss_before = server.rss_kb()
    if not report.rss_before_kb:
        report.rss_before_kb = rss_before

    def structured(frames: list[bytes]) -> None:
        case = RawCase("message", tuple(grpc_frame(f) for f in frames))
        report.record(case, run_case(conn, rpc, case, report))

    def malformed(case: RawCase) -> None:
        report.record(case, run_case(conn, rpc, case, report))

    _drive(request_strategy(rpc.method), messages, seed, structured)
    _drive(raw_case(rpc.method), raw, seed, malformed)
    report.tracebacks += tracebacks_in(server.log_since(log_offset))
    report.log_bytes += server.log_size() - log_offset
    report.rss_after_kb = server.rss_kb()
    report.rss_grown_kb += report.rss_after_kb - rss_before
    report.seconds += time.monotonic() - started
    return report
