#!/usr/bin/env python3
"""Concurrent workloads fetching and rotating through one node agent (issue 7).

``python scripts/bench_agent.py [--workloads 100] [--processes 2] [--duration 5] [--entries 2]
[--rotation-ttl 20] [--rotation-time 60] [--ca-rotations 3] [--revocations 10] [--json out.json]``

Starts ``authority serve`` (temporary data directory, loopback ports, admin socket in a short /tmp
folder, ``[limits] min_ttl = "5s"`` so short X.509 TTLs are allowed) and ``authority agent``
(attested with a join token passed on its stdin), each a subprocess, and creates ``--entries``
node entries (``parent_id`` the agent's SPIFFE ID, selector ``unix:uid:<this uid>``). W =
``--workloads`` workloads, one gRPC channel (one Unix-socket connection) each, are spread over
``--processes`` load processes (spawned). They all run as this uid, so every workload matches
every entry: each reply carries one SVID (or token) per entry.

Rates (each scenario ``--duration`` seconds after ``--warmup``, every workload calling back to back:
the rate at saturation, with p50/p99 latency):

* ``baseline``: ``ValidateJWTSVID`` with a malformed token: the agent answers INVALID_ARGUMENT
  after the header check without identifying the caller: the least work a round trip on the
  agent's socket can do. Run first and again last; ratios use the mean of the two (drift shows).
* ``jwt-cached``: ``FetchJWTSVID``, one audience every time (the agent's cache after the first);
* ``jwt-new``: ``FetchJWTSVID`` with a new audience each call (each goes to the authority);
* ``x509-once``: ``FetchX509SVID`` opened, first message read, cancelled.

For each, CPU time per call of the agent, the authority and the load processes (from
/proc/<pid>/stat, all threads) and how busy the machine was (others share it: compare ratios).

Pushes, with W ``FetchX509SVID`` streams held open. Each stream notes, for every message, when it
arrived (``time.monotonic()``: CLOCK_MONOTONIC, one clock for every process on the machine) and,
per SVID, the serial and issuer of the leaf and a digest of the bundle:

* rotation: ``--entries`` fresh entries with an X.509 TTL of ``--rotation-ttl`` (the agent
  re-issues at half life) for ``--rotation-time`` seconds. For each new serial: the spread between
  the first and the last of the W streams receiving it; per stream and entry the rotations seen,
  against the new serials any stream saw and against window / (TTL / 2).
* CA rotation: ``RotateCA`` over the admin socket twice (prepare, then activate: what
  ``authority ca rotate`` run twice does); from prepare returning to the last stream holding the
  new bundle, and from activate returning to the last stream whose SVIDs all have the new issuer.
  ``--ca-rotations`` times.
* revocation: two fresh entries A and B; once every stream holds both, ``Revoke`` of A's SPIFFE ID
  (kind ``subject``) over the admin socket; from Revoke returning to the last stream receiving a
  message without A (and with B). ``--revocations`` times, fresh entries each time.

The admin calls go over the admin gRPC socket, not the CLI, so process start-up does not count.
The spreads and delays include the load processes reading W messages (their CPU is shared with
the agent and the authority on this machine). Memory: the agent's VmRSS before and after
attaching the W streams (on connections already open), per stream; once on the fresh agent and
again before the push scenarios.

Traffic stays on 127.0.0.1 and Unix sockets; tokens and keys are never printed; temporary folders
and processes are removed at the end, also on Ctrl-C. It always exits 0 when the run completes (a
benchmark is not a test); 1 when the setup fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing.connection
import os
import random
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from _benchlib import (  # noqa: E402
    RECONNECTING_CHANNEL_OPTIONS,
    TRUST_DOMAIN,
    AuthorityServer,
    BenchError,
    ChildProcess,
    PipeWorker,
    RequestFailed,
    authority_command,
    bench_dirs,
    bundle_pem,
    close_all,
    cpu_seconds,
    machine_busy_seconds,
    percentile,
    rss_kib,
    run_bench,
    serve_commands,
    short_environment,
    spawn,
    split_evenly,
    start_authority,
)
from cryptography import x509  # noqa: E402

from authority._pb import authority_v1_authority_pb2 as pb  # noqa: E402
from authority._pb import spiffe_workload_pb2 as wpb  # noqa: E402
from authority._pb import spiffe_workload_pb2_grpc as wgrpc  # noqa: E402

AGENT_ID = f"spiffe://{TRUST_DOMAIN}/agent/node1"
HEADER = (("workload.spiffe.io", "true"),)
MIN_TTL = 5  # seconds: the server's limits.min_ttl, so --rotation-ttl may be short
READY_TIMEOUT = 60.0
RPC_TIMEOUT = 30.0
SETTLE_TIMEOUT = 30.0  # for every stream to hold a new state
PUSH_TIMEOUT = 15.0  # for a push to reach every stream
RATE_SCENARIOS = ("baseline", "jwt-cached", "jwt-new", "x509-once", "baseline")


# --- what a stream received -----------------------------------------------------------------------

Item = tuple[str, str, str]  # (SPIFFE ID, leaf serial in hex, leaf issuer RFC 4514)
Message = tuple[float, tuple[Item, ...], str]  # (arrival, SVIDs, bundle digest)


def leaf_der(chain: bytes) -> bytes:
    """The first certificate of concatenated DER certificates (the Workload API's chains)."""
    if len(chain) < 2 or chain[0] != 0x30:
        raise ValueError("not a DER certificate chain")
    if chain[1] < 0x80:
        return chain[: 2 + chain[1]]
    size = chain[1] & 0x7F
    return chain[: 2 + size + int.from_bytes(chain[2 : 2 + size], "big")]


class _Summaries:
    """Serial and issuer of each chain, digest of each bundle: computed once per distinct value
    (the agent sends every stream the same bytes), so the W-th stream is not read late."""

    def __init__(self) -> None:
        self._chains: dict[bytes, tuple[str, str]] = {}
        self._bundles: dict[bytes, str] = {}

    def message(self, arrived: float, reply: wpb.X509SVIDResponse) -> Message:
        items = []
        for svid in reply.svids:
            known = self._chains.get(svid.x509_svid)
            if known is None:
                leaf = x509.load_der_x509_certificate(leaf_der(svid.x509_svid))
                known = (format(leaf.serial_number, "x"), leaf.issuer.rfc4514_string())
                if len(self._chains) > 4096:
                    self._chains.clear()
                self._chains[svid.x509_svid] = known
            items.append((svid.spiffe_id, *known))
        bundle = reply.svids[0].bundle if reply.svids else b""
        digest = self._bundles.get(bundle)
        if digest is None:
            digest = hashlib.sha256(bundle).hexdigest()[:16]
            if len(self._bundles) > 64:
                self._bundles.clear()
            self._bundles[bundle] = digest
        return arrived, tuple(items), digest


def _matches(message: Message, kind: str, arg: str | tuple[str, str]) -> bool:
    _, items, digest = message
    if kind == "issuer_not":  # every SVID from another issuer than ``arg``
        return bool(items) and all(issuer != arg for _, _, issuer in items)
    if kind == "bundle_not":
        return digest != arg
    if kind == "without" and isinstance(arg, tuple):  # ``arg`` = (gone, kept)
        ids = {spiffe_id for spiffe_id, _, _ in items}
        gone, kept = arg
        return gone not in ids and kept in ids
    raise ValueError(kind)


# --- load processes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadInit:
    index: int
    socket: str
    workloads: int


@dataclass(frozen=True)
class RateSpec:
    scenario: str
    tag: str  # makes jwt-new's audiences unique over the whole run
    start_at: float  # time.monotonic(); calls before it are the warm-up
    end_at: float


if TYPE_CHECKING:  # the async stub exists in the type stubs only
    Stub = wgrpc.SpiffeWorkloadAPIAsyncStub


async def _validate_malformed(stub: Stub, _: str) -> None:
    try:
        await stub.ValidateJWTSVID(
            wpb.ValidateJWTSVIDRequest(audience="bench", svid="not-a-jwt"),
            metadata=HEADER,
            timeout=RPC_TIMEOUT,
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
            return
        raise RequestFailed(exc.code().name, exc.details() or "") from None
    raise RequestFailed("ACCEPTED", "the malformed token was accepted")


async def _fetch_jwt(stub: Stub, audience: str) -> None:
    try:
        reply = await stub.FetchJWTSVID(
            wpb.JWTSVIDRequest(audience=[audience]), metadata=HEADER, timeout=RPC_TIMEOUT
        )
    except grpc.aio.AioRpcError as exc:
        raise RequestFailed(exc.code().name, exc.details() or "") from None
    if not reply.svids or not all(s.svid for s in reply.svids):
        raise RequestFailed("NO_SVID", "an empty reply")


async def _fetch_x509_once(stub: Stub, _: str) -> None:
    call = stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=HEADER, timeout=RPC_TIMEOUT)
    try:
        reply = await call.read()
    except grpc.aio.AioRpcError as exc:
        raise RequestFailed(exc.code().name, exc.details() or "") from None
    finally:
        call.cancel()
    if not isinstance(reply, wpb.X509SVIDResponse) or not reply.svids:
        raise RequestFailed("NO_SVID", "the stream ended or was empty")


class _Load:
    """One load process: a channel per workload; back-to-back calls, or held streams."""

    def __init__(self, init: LoadInit) -> None:
        self.init = init
        self.channels = [
            grpc.aio.insecure_channel(f"unix:{init.socket}", RECONNECTING_CHANNEL_OPTIONS)
            for _ in range(init.workloads)
        ]
        self.stubs: list[Stub] = [wgrpc.SpiffeWorkloadAPIStub(c) for c in self.channels]
        self.summaries = _Summaries()
        self.records: list[list[Message]] = []
        self.holders: list[asyncio.Task[None]] = []
        self.stream_errors: Counter[str] = Counter()

    async def connect(self) -> None:
        await asyncio.wait_for(
            asyncio.gather(*(c.channel_ready() for c in self.channels)), READY_TIMEOUT
        )

    async def rate(self, spec: RateSpec) -> dict[str, Any]:
        calls: dict[str, Callable[[Stub, str], Awaitable[None]]] = {
            "baseline": _validate_malformed,
            "jwt-cached": lambda stub, _: _fetch_jwt(stub, "bench-cached"),
            "jwt-new": _fetch_jwt,
            "x509-once": _fetch_x509_once,
        }
        call = calls[spec.scenario]
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        samples: dict[str, str] = {}

        async def loop(i: int) -> None:
            stub = self.stubs[i]
            n = 0
            while (began := time.monotonic()) < spec.end_at:
                n += 1
                try:
                    await call(stub, f"new-{spec.tag}-{self.init.index}-{i}-{n}")
                except RequestFailed as exc:
                    errors[exc.code] += 1
                    # The agent's messages name no token; kept short anyway.
                    samples.setdefault(exc.code, exc.detail[:200])
                    await asyncio.sleep(0.01)
                    continue
                done = time.monotonic()
                if spec.start_at <= done <= spec.end_at:
                    latencies.append(done - began)

        await asyncio.gather(*(loop(i) for i in range(len(self.stubs))))
        return {"latencies": latencies, "errors": dict(errors), "error_samples": samples}

    async def burst(self, audience: str) -> dict[str, Any]:
        """Every workload asks for the same audience at once, one call each."""
        began = time.monotonic()
        errors: Counter[str] = Counter()

        async def one(stub: Stub) -> None:
            try:
                await _fetch_jwt(stub, audience)
            except RequestFailed as exc:
                errors[exc.code] += 1

        await asyncio.gather(*(one(stub) for stub in self.stubs))
        return {"began": began, "ended": time.monotonic(), "errors": dict(errors)}

    # --- held streams ---

    async def attach(self) -> dict[str, Any]:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        ready: list[asyncio.Future[None]] = []
        self.records = [[] for _ in self.stubs]
        for i in range(len(self.stubs)):
            future: asyncio.Future[None] = loop.create_future()
            ready.append(future)
            self.holders.append(asyncio.create_task(self._hold(i, future)))
        await asyncio.wait_for(asyncio.gather(*ready), READY_TIMEOUT)
        return {"streams": len(self.holders), "seconds": time.monotonic() - started}

    async def _hold(self, i: int, ready: asyncio.Future[None]) -> None:
        record = self.records[i]
        delay = 0.1
        while True:
            call = self.stubs[i].FetchX509SVID(wpb.X509SVIDRequest(), metadata=HEADER)
            try:
                while True:
                    reply = await call.read()
                    arrived = time.monotonic()
                    if not isinstance(reply, wpb.X509SVIDResponse):
                        self.stream_errors["EOF"] += 1
                        break
                    record.append(self.summaries.message(arrived, reply))
                    delay = 0.1
                    if not ready.done():
                        ready.set_result(None)
            except grpc.aio.AioRpcError as exc:
                self.stream_errors[exc.code().name] += 1
            finally:
                call.cancel()
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(2.0, delay * 2)

    async def detach(self) -> dict[str, int]:
        for task in self.holders:
            task.cancel()
        for task in self.holders:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.holders = []
        self.records = []
        errors = dict(self.stream_errors)
        self.stream_errors.clear()
        return errors

    def state(self) -> dict[Any, int]:
        """How many streams hold each (SPIFFE IDs, issuers, bundle) in their latest message."""
        states: Counter[Any] = Counter()
        for record in self.records:
            if not record:
                states[None] += 1
                continue
            _, items, digest = record[-1]
            states[
                (
                    tuple(sorted({s for s, _, _ in items})),
                    tuple(sorted({i for _, _, i in items})),
                    digest,
                )
            ] += 1
        return dict(states)

    def first(self, since: float, kind: str, arg: Any) -> list[float | None]:
        """Per stream, when the first message since ``since`` matching ``kind`` arrived."""
        out: list[float | None] = []
        for record in self.records:
            out.append(
                next((m[0] for m in record if m[0] >= since and _matches(m, kind, arg)), None)
            )
        return out

    def serials(self, since: float, until: float) -> dict[str, Any]:
        """Each new serial first seen between ``since`` and ``until``: (streams, first, last
        arrival); and per stream and SPIFFE ID, how many times the serial changed then."""
        arrivals: dict[tuple[str, str], list[float]] = {}
        changes: list[dict[str, int]] = []
        for record in self.records:
            held: dict[str, str] = {}
            seen: Counter[str] = Counter()
            for arrived, items, _ in record:
                for spiffe_id, serial, _ in items:
                    before = held.get(spiffe_id)
                    held[spiffe_id] = serial
                    if before is None or before == serial or not since <= arrived <= until:
                        continue
                    seen[spiffe_id] += 1
                    got = arrivals.get((spiffe_id, serial))
                    if got is None:
                        arrivals[(spiffe_id, serial)] = [1, arrived, arrived]
                    else:
                        got[0] += 1
                        got[1] = min(got[1], arrived)
                        got[2] = max(got[2], arrived)
            changes.append(dict(seen))
        return {"arrivals": arrivals, "changes": changes}

    async def close(self) -> None:
        await self.detach()
        for channel in self.channels:
            await channel.close(None)


async def _load_loop(conn: multiprocessing.connection.Connection, init: LoadInit) -> None:
    load = _Load(init)
    try:
        await load.connect()
        await serve_commands(
            conn,
            {
                "rate": ("rated", load.rate),
                "burst": ("burst", load.burst),
                "attach": ("attached", lambda _: load.attach()),
                "detach": ("detached", lambda _: load.detach()),
                "state": ("state", lambda _: load.state()),
                "first": ("first", lambda payload: load.first(*payload)),
                "serials": ("serials", lambda payload: load.serials(*payload)),
            },
        )
    finally:
        await load.close()


class Loads:
    """The load processes, asked together."""

    def __init__(self, workers: list[PipeWorker]) -> None:
        self.workers = workers

    async def all(self, command: str, payload: Any, reply: str, within: float = 60.0) -> list[Any]:
        return list(
            await asyncio.gather(*(w.ask(command, payload, reply, within) for w in self.workers))
        )

    async def first(self, since: float, kind: str, arg: Any) -> list[float | None]:
        return [t for part in await self.all("first", (since, kind, arg), "first") for t in part]

    async def state(self) -> Counter[Any]:
        total: Counter[Any] = Counter()
        for part in await self.all("state", None, "state"):
            total.update(part)
        return total

    async def settle(self, spiffe_ids: set[str], streams: int) -> Counter[Any]:
        """Until every stream's latest message holds exactly ``spiffe_ids``."""
        want = tuple(sorted(spiffe_ids))
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            state = await self.state()
            if sum(n for key, n in state.items() if key and key[0] == want) == streams:
                return state
            if time.monotonic() > deadline:
                shown = {(k[0], len(k[1])) if k else None: n for k, n in state.items()}
                raise BenchError(f"the streams did not settle on {want}: {shown}")
            await asyncio.sleep(0.1)

    async def wait_all(self, since: float, kind: str, arg: Any) -> list[float | None]:
        """Per stream, the first matching arrival since ``since``, once every stream has one
        (or PUSH_TIMEOUT passed: missing ones are None)."""
        deadline = time.monotonic() + PUSH_TIMEOUT
        while True:
            times = await self.first(since, kind, arg)
            if all(t is not None for t in times) or time.monotonic() > deadline:
                return times
            await asyncio.sleep(0.05)


# --- CPU -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float
    agent: float
    server: float
    loads: float
    machine: float
    own: float

    @classmethod
    def take(cls, agent: int, server: int, loads: list[int]) -> CpuSnapshot:
        return cls(
            time.monotonic(),
            cpu_seconds(agent),
            cpu_seconds(server),
            sum(cpu_seconds(p) for p in loads),
            machine_busy_seconds(),
            time.process_time(),
        )


# --- the authority and the agent ------------------------------------------------------------------


def start_server(work: Path, socket_dir: Path) -> AuthorityServer:
    """``authority serve`` allowing X.509 TTLs down to MIN_TTL."""
    return start_authority(
        work,
        socket_dir,
        config=f'[limits]\nmin_ttl = "{MIN_TTL}s"\n',
        ready_timeout=READY_TIMEOUT,
    )


def start_agent(
    work: Path, socket_path: Path, server: AuthorityServer, bundle: Path, token: str
) -> ChildProcess:
    command = [
        *authority_command(),
        "agent",
        "--server", server.tls_address,
        "--trust-bundle", str(bundle),
        "--data-dir", str(work / "agent"),
        "--workload-api-socket", str(socket_path),
        "--join-token", "-",  # on stdin: never on a command line
        "--log-level", "WARNING",
    ]  # fmt: skip
    agent = spawn("authority agent", command, work / "agent.log", stdin=f"{token}\n".encode())
    deadline = time.monotonic() + READY_TIMEOUT
    while not socket_path.exists():
        agent.check_alive()
        if time.monotonic() > deadline:
            agent.stop()
            raise BenchError(f"authority agent did not open its socket:\n{agent.log_tail()}")
        time.sleep(0.05)
    return agent


async def agent_serves(socket_path: Path) -> set[str]:
    """The SPIFFE IDs the agent hands this process now (one FetchX509SVID message)."""
    async with grpc.aio.insecure_channel(
        f"unix:{socket_path}", RECONNECTING_CHANNEL_OPTIONS
    ) as channel:
        call = wgrpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            wpb.X509SVIDRequest(), metadata=HEADER, timeout=RPC_TIMEOUT
        )
        try:
            reply = await call.read()
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.PERMISSION_DENIED:
                return set()
            raise
        finally:
            call.cancel()
    return {s.spiffe_id for s in reply.svids} if isinstance(reply, wpb.X509SVIDResponse) else set()


async def wait_served(socket_path: Path, want: set[str]) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while (got := await agent_serves(socket_path)) != want:
        if time.monotonic() > deadline:
            raise BenchError(f"the agent serves {sorted(got)}, not {sorted(want)}")
        await asyncio.sleep(0.1)


class Admin:
    """The calls the benchmark makes on the admin socket."""

    def __init__(self, stub: Any, uid: int) -> None:
        self.stub = stub
        self.uid = uid
        self.entries: dict[str, str] = {}  # SPIFFE ID -> entry id

    async def create(self, path: str, x509_ttl: int = 0) -> str:
        spiffe_id = f"spiffe://{TRUST_DOMAIN}/bench/{path}"
        created = await self.stub.CreateEntry(
            pb.CreateEntryRequest(
                spiffe_id=spiffe_id,
                selectors=[pb.Selector(type="unix", value=f"uid:{self.uid}")],
                parent_id=AGENT_ID,
                x509_ttl_seconds=x509_ttl,
            ),
            timeout=RPC_TIMEOUT,
        )
        self.entries[spiffe_id] = created.id
        return spiffe_id

    async def delete(self, spiffe_ids: set[str]) -> None:
        for spiffe_id in spiffe_ids:
            entry_id = self.entries.pop(spiffe_id)
            await self.stub.DeleteEntry(pb.DeleteEntryRequest(id=entry_id), timeout=RPC_TIMEOUT)

    async def switch(self, old: set[str], paths: list[str], x509_ttl: int = 0) -> set[str]:
        """Create the new entries, then delete the old: a stream never holds nothing."""
        new = {await self.create(p, x509_ttl) for p in paths}
        await self.delete(old)
        return new


# --- scenarios ------------------------------------------------------------------------------------


async def audit_head(admin: Admin) -> int:
    """The authority's last audit sequence number: it appends one record per JWT-SVID (and per
    X.509-SVID) it issues, so the difference counts what it issued in between."""
    info = await admin.stub.GetAuditInfo(pb.GetAuditInfoRequest(), timeout=RPC_TIMEOUT)
    return int(info.head_seq)


@dataclass
class RateReport:
    scenario: str
    calls: int
    seconds: float
    rate: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    error_samples: dict[str, str]
    agent_cpu_us_per_call: float
    server_cpu_us_per_call: float
    load_cpu_us_per_call: float
    agent_cpu_percent: float  # 100 = one core
    server_cpu_percent: float
    load_cpu_percent: float
    machine_busy_percent: float  # 100 per core
    other_cpu_percent: float  # the machine minus all of the above and this process
    authority_issued: int = 0  # audit records, warm-up included: the SVIDs it issued
    ratio: float | None = None


async def run_rate(
    scenario: str,
    tag: str,
    args: argparse.Namespace,
    loads: Loads,
    pids: dict[str, Any],
    admin: Admin,
) -> RateReport:
    head = await audit_head(admin)
    now = time.monotonic()
    spec = RateSpec(scenario, tag, now + 0.3 + args.warmup, now + 0.3 + args.warmup + args.duration)
    for w in loads.workers:
        w.send("rate", spec)
    await asyncio.sleep(max(0.0, spec.start_at - time.monotonic()))
    c0 = CpuSnapshot.take(pids["agent"], pids["server"], pids["loads"])
    await asyncio.sleep(max(0.0, spec.end_at - time.monotonic()))
    c1 = CpuSnapshot.take(pids["agent"], pids["server"], pids["loads"])
    parts = await asyncio.gather(
        *(
            asyncio.to_thread(w.expect, "rated", args.duration + RPC_TIMEOUT + 30)
            for w in loads.workers
        )
    )
    latencies = [v * 1000 for p in parts for v in p["latencies"]]
    errors: Counter[str] = Counter()
    samples: dict[str, str] = {}
    for p in parts:
        errors.update(p["errors"])
        for code, detail in p["error_samples"].items():
            samples.setdefault(code, detail)
    issued = await audit_head(admin) - head
    calls = len(latencies)
    span = spec.end_at - spec.start_at
    per_call = 1e6 / max(1, calls)
    agent, server, load = c1.agent - c0.agent, c1.server - c0.server, c1.loads - c0.loads
    busy = (c1.machine - c0.machine) / span * 100
    own = (c1.own - c0.own) / span * 100
    return RateReport(
        scenario=scenario,
        calls=calls,
        seconds=span,
        rate=calls / span,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        errors=dict(errors),
        error_samples=samples,
        agent_cpu_us_per_call=agent * per_call,
        server_cpu_us_per_call=server * per_call,
        load_cpu_us_per_call=load * per_call,
        agent_cpu_percent=agent / span * 100,
        server_cpu_percent=server / span * 100,
        load_cpu_percent=load / span * 100,
        machine_busy_percent=busy,
        other_cpu_percent=max(0.0, busy - (agent + server + load) / span * 100 - own),
        authority_issued=issued,
    )


async def run_burst(loads: Loads, admin: Admin) -> dict[str, Any]:
    """W workloads ask for one new audience at the same time (jwt-cached's audience: this
    fills the cache for it). Ideally the authority issues one JWT-SVID per entry."""
    head = await audit_head(admin)
    parts = await loads.all("burst", "bench-cached", "burst", RPC_TIMEOUT + 30)
    errors: Counter[str] = Counter()
    for p in parts:
        errors.update(p["errors"])
    return {
        "authority_issued": await audit_head(admin) - head,
        "seconds": max(p["ended"] for p in parts) - min(p["began"] for p in parts),
        "errors": dict(errors),
    }


async def attach(loads: Loads, agent_pid: int, workloads: int, entries: set[str]) -> dict[str, Any]:
    await asyncio.sleep(1.0)
    before = rss_kib(agent_pid)
    attached = await loads.all("attach", None, "attached", READY_TIMEOUT + 10)
    await loads.settle(entries, workloads)
    await asyncio.sleep(1.0)  # let the attach settle before reading memory
    after = rss_kib(agent_pid)
    return {
        "streams": sum(a["streams"] for a in attached),
        "attach_seconds": max(a["seconds"] for a in attached),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_stream": (after - before) / workloads,
    }


async def run_rotation(
    args: argparse.Namespace, loads: Loads, agent_pid: int, entries: set[str]
) -> dict[str, Any]:
    """Streams already hold ``entries`` (X.509 TTL ``--rotation-ttl``)."""
    c0 = cpu_seconds(agent_pid), time.monotonic()
    since = time.monotonic()
    await asyncio.sleep(args.rotation_time)
    until = time.monotonic()
    agent_cpu = (cpu_seconds(agent_pid) - c0[0]) / (until - c0[1]) * 100
    await asyncio.sleep(min(PUSH_TIMEOUT, 3.0))  # the last rotations reach every stream
    parts = await loads.all("serials", (since, until), "serials")
    arrivals: dict[tuple[str, str], list[float]] = {}
    changes: list[dict[str, int]] = []
    for part in parts:
        changes.extend(part["changes"])
        for key, (count, first, last) in part["arrivals"].items():
            got = arrivals.setdefault(key, [0, first, last])
            got[0] += count
            got[1], got[2] = min(got[1], first), max(got[2], last)
    spreads = [(last - first) * 1000 for count, first, last in arrivals.values()]
    complete = [
        (last - first) * 1000 for count, first, last in arrivals.values() if count == args.workloads
    ]
    distinct = Counter(spiffe_id for spiffe_id, _ in arrivals)
    per_stream = [c.get(e, 0) for c in changes for e in entries]
    window = until - since
    return {
        "window_seconds": window,
        "rotations": len(arrivals),
        "complete": len(complete),
        "spread_p50_ms": percentile(complete, 0.50),
        "spread_p99_ms": percentile(complete, 0.99),
        "spread_max_ms": max(complete, default=float("nan")),
        "per_stream_min": min(per_stream, default=0),
        "per_stream_median": statistics.median(per_stream) if per_stream else 0,
        "per_stream_max": max(per_stream, default=0),
        "new_serials_per_entry": {e: distinct.get(e, 0) for e in sorted(entries)},
        "expected_per_entry": window / (args.rotation_ttl / 2),
        "agent_cpu_percent": agent_cpu,
        "spreads_ms": [round(v, 3) for v in spreads],
    }


def _only(state: Counter[Any], index: int) -> Any:
    values = {key[index] for key in state if key}
    if len(values) != 1:
        raise BenchError(f"the streams disagree: {len(values)} different values")
    return values.pop()


def _latencies(times: list[float | None], reference: float) -> tuple[int, float, float]:
    """(streams reached, last arrival - reference, first arrival - reference) in ms."""
    got = [t for t in times if t is not None]
    if not got:
        return 0, float("nan"), float("nan")
    return len(got), (max(got) - reference) * 1000, (min(got) - reference) * 1000


async def run_ca_rotations(
    args: argparse.Namespace, loads: Loads, admin: Admin, entries: set[str], agent_pid: int
) -> dict[str, Any]:
    reps: list[dict[str, Any]] = []
    for _ in range(args.ca_rotations):
        state = await loads.settle(entries, args.workloads)
        old_issuers, old_bundle = _only(state, 1), _only(state, 2)
        if len(old_issuers) != 1:
            raise BenchError("the streams' SVIDs come from several issuers")
        began = time.monotonic()
        await admin.stub.RotateCA(pb.RotateCARequest(), timeout=RPC_TIMEOUT)  # prepare
        prepared = time.monotonic()
        bundle_times = await loads.wait_all(began, "bundle_not", old_bundle)
        await asyncio.sleep(1.0)
        cpu0 = cpu_seconds(agent_pid)
        began_activate = time.monotonic()
        await admin.stub.RotateCA(pb.RotateCARequest(), timeout=RPC_TIMEOUT)  # activate
        activated = time.monotonic()
        issuer_times = await loads.wait_all(began_activate, "issuer_not", old_issuers[0])
        cpu = (cpu_seconds(agent_pid) - cpu0) / args.workloads * 1e6
        reached_b, last_b, _ = _latencies(bundle_times, prepared)
        reached, last, first = _latencies(issuer_times, activated)
        reps.append(
            {
                "bundle_reached": reached_b,
                "bundle_last_ms": last_b,
                "issuer_reached": reached,
                "issuer_last_ms": last,
                "issuer_first_ms": first,
                "activate_call_ms": (activated - began_activate) * 1000,
                "agent_cpu_us_per_stream": cpu,
            }
        )
        await asyncio.sleep(1.0)
    state = await loads.settle(entries, args.workloads)
    complete = [r["issuer_last_ms"] for r in reps if r["issuer_reached"] == args.workloads]
    bundles = [r["bundle_last_ms"] for r in reps if r["bundle_reached"] == args.workloads]
    return {
        "rotations": len(reps),
        "complete": len(complete),
        "p50_ms": percentile(complete, 0.50),
        "max_ms": max(complete, default=float("nan")),
        "bundle_p50_ms": percentile(bundles, 0.50),
        "bundle_max_ms": max(bundles, default=float("nan")),
        "issuers_at_end": len(_only(state, 1)),
        "reps": reps,
    }


async def run_revocations(
    args: argparse.Namespace, loads: Loads, admin: Admin, entries: set[str], agent_pid: int
) -> tuple[dict[str, Any], set[str]]:
    latencies: list[float] = []
    from_call: list[float] = []
    first_arrivals: list[float] = []
    calls: list[float] = []
    cpu: list[float] = []
    reached_all = 0
    current = entries
    for n in range(args.revocations):
        current = await admin.switch(current, [f"revoke-{n}-a", f"revoke-{n}-b"])
        gone, kept = sorted(current)  # "...-a" sorts first
        await loads.settle(current, args.workloads)
        await asyncio.sleep(0.5)
        cpu0 = cpu_seconds(agent_pid)
        began = time.monotonic()
        await admin.stub.Revoke(
            pb.RevokeRequest(kind="subject", target=gone, reason="bench"), timeout=RPC_TIMEOUT
        )
        returned = time.monotonic()
        times = await loads.wait_all(began, "without", (gone, kept))
        cpu.append((cpu_seconds(agent_pid) - cpu0) / args.workloads * 1e6)
        calls.append((returned - began) * 1000)
        reached, last, first = _latencies(times, returned)
        if reached == args.workloads:
            reached_all += 1
            latencies.append(last)
            from_call.append(last + calls[-1])
            first_arrivals.append(first)
    return {
        "revocations": args.revocations,
        "complete": reached_all,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies, default=float("nan")),
        "from_call_p50_ms": percentile(from_call, 0.50),
        "first_arrival_p50_ms": percentile(first_arrivals, 0.50),
        "revoke_call_p50_ms": percentile(calls, 0.50),
        "agent_cpu_us_per_stream_p50": percentile(cpu, 0.50),
        "samples_ms": [round(v, 3) for v in latencies],
    }, current


# --- orchestration --------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with bench_dirs("bench-agent-", "ba-") as (work, socket_dir):
        server = start_server(work, socket_dir)
        try:
            return await measure(args, server, work, socket_dir / "agent.sock")
        finally:
            server.stop()


async def measure(
    args: argparse.Namespace, server: AuthorityServer, work: Path, agent_socket: Path
) -> dict[str, Any]:
    """Start the agent and the load processes, then run every scenario."""
    from authority.client import AdminClient

    workers: list[PipeWorker] = []
    agent: ChildProcess | None = None
    try:
        async with AdminClient(server.admin_socket) as client:
            admin = Admin(client.stub, os.getuid())
            bundle_path = work / "bundle.pem"
            bundle_path.write_bytes(await bundle_pem(admin.stub))
            token = (
                await admin.stub.CreateJoinToken(
                    pb.CreateJoinTokenRequest(spiffe_id=AGENT_ID), timeout=RPC_TIMEOUT
                )
            ).token
            entries = {await admin.create(f"rate-{k}") for k in range(args.entries)}
            agent = start_agent(work, agent_socket, server, bundle_path, token)
            del token
            await wait_served(agent_socket, entries)
            await asyncio.sleep(1.0)
            rss_idle = rss_kib(agent.pid)

            workers.extend(
                PipeWorker(_load_loop, LoadInit(i, str(agent_socket), share), f"load-{i}")
                for i, share in enumerate(split_evenly(args.workloads, args.processes))
            )
            loads = Loads(workers)
            for w in workers:
                await asyncio.to_thread(w.expect, "ready", READY_TIMEOUT + 30)
            await asyncio.sleep(1.0)
            rss_connected = rss_kib(agent.pid)
            print(f"  {args.workloads} workloads connected", file=sys.stderr)

            # Memory per stream on the fresh agent; the streams go again for the rates.
            memory = [await attach(loads, agent.pid, args.workloads, entries)]
            detached = await loads.all("detach", None, "detached")
            stream_errors: Counter[str] = Counter()
            for d in detached:
                stream_errors.update(d)

            pids = {
                "agent": agent.pid,
                "server": server.pid,
                "loads": [w.pid for w in workers],
            }
            rates: list[RateReport] = []
            burst: dict[str, Any] = {}
            for n, scenario in enumerate(RATE_SCENARIOS):
                agent.check_alive()
                if scenario == "jwt-cached":  # the cold cache, once; then what it holds
                    burst = await run_burst(loads, admin)
                report = await run_rate(scenario, str(n), args, loads, pids, admin)
                rates.append(report)
                print(
                    f"  {scenario}: {report.rate:.0f}/s p50 {report.p50_ms:.1f} ms "
                    f"p99 {report.p99_ms:.1f} ms",
                    file=sys.stderr,
                )
            baseline = statistics.mean([r.rate for r in rates if r.scenario == "baseline"])
            for r in rates:
                r.ratio = r.rate / baseline if baseline else None

            # Rotation: short-lived SVIDs, W streams held.
            ttl = int(args.rotation_ttl)
            entries = await admin.switch(
                entries, [f"rotate-{k}" for k in range(args.entries)], x509_ttl=ttl
            )
            await wait_served(agent_socket, entries)
            memory.append(await attach(loads, agent.pid, args.workloads, entries))
            print(f"  rotation: {args.rotation_time:.0f} s with {ttl} s SVIDs", file=sys.stderr)
            rotation = await run_rotation(args, loads, agent.pid, entries)

            # CA rotation and revocation, on entries with the default TTL.
            entries = await admin.switch(entries, ["steady-a", "steady-b"])
            await loads.settle(entries, args.workloads)
            print("  CA rotations", file=sys.stderr)
            ca = await run_ca_rotations(args, loads, admin, entries, agent.pid)
            print("  revocations", file=sys.stderr)
            revocation, entries = await run_revocations(args, loads, admin, entries, agent.pid)
            agent.check_alive()
            rss_end = rss_kib(agent.pid)
            for d in await loads.all("detach", None, "detached"):
                stream_errors.update(d)

        return {
            "environment": short_environment(),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "baseline_per_second": baseline,
            "rates": [asdict(r) for r in rates],
            "burst": burst,
            "memory": {
                "rss_idle_kib": rss_idle,
                "rss_connected_kib": rss_connected,
                "rss_end_kib": rss_end,
                "attaches": memory,
            },
            "rotation": rotation,
            "ca_rotation": ca,
            "revocation": revocation,
            "stream_errors": dict(stream_errors),
        }
    finally:
        close_all(workers)
        if agent is not None:
            agent.stop()


def format_tables(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"W={s['workloads']} workloads over P={s['processes']} processes, {s['entries']} entries, "
        f"{s['duration']:.0f} s per rate; baseline {result['baseline_per_second']:.0f}/s "
        f"(mean of first and last)",
        "",
        "| scenario | calls/s | ratio | p50 ms | p99 ms | errors | CPU us/call agent/authority/"
        "load | CPU % agent/authority/load/other | authority issued |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rates"]:
        errors = sum(r["errors"].values())
        lines.append(
            f"| {r['scenario']} | {r['rate']:.0f} | {r['ratio']:.2f} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {errors} | {r['agent_cpu_us_per_call']:.0f}/"
            f"{r['server_cpu_us_per_call']:.0f}/{r['load_cpu_us_per_call']:.0f} "
            f"| {r['agent_cpu_percent']:.0f}/{r['server_cpu_percent']:.0f}/"
            f"{r['load_cpu_percent']:.0f}/{r['other_cpu_percent']:.0f} "
            f"| {r['authority_issued']} |"
        )
    for r in result["rates"]:
        for code, detail in r["error_samples"].items():
            lines.append(f"  {r['scenario']} error {code} x{r['errors'][code]}: {detail}")
    b = result["burst"]
    lines.append(
        f"cold cache: {s['workloads']} workloads asking one new audience at once: the authority "
        f"issued {b['authority_issued']} JWT-SVIDs (one per entry, {s['entries']}, would do), "
        f"all answered in {b['seconds'] * 1000:.0f} ms, errors {b['errors'] or 0}"
    )
    m = result["memory"]
    lines += [
        "",
        f"agent RSS: {m['rss_idle_kib'] / 1024:.1f} MiB idle, "
        f"{m['rss_connected_kib'] / 1024:.1f} MiB with W connections, "
        f"{m['rss_end_kib'] / 1024:.1f} MiB at the end",
    ]
    for n, a in enumerate(m["attaches"]):
        when = "fresh agent" if n == 0 else "after the rates: freed heap is reused, a floor only"
        lines.append(
            f"attach {n + 1} ({when}): {a['streams']} streams in {a['attach_seconds']:.2f} s, RSS "
            f"{a['rss_before_kib'] / 1024:.1f} -> {a['rss_after_kib'] / 1024:.1f} MiB: "
            f"{a['kib_per_stream']:.1f} KiB/stream"
        )
    rot = result["rotation"]
    lines += [
        "",
        "| push | events | complete | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
        f"| rotation spread (first..last stream) | {rot['rotations']} | {rot['complete']} "
        f"| {rot['spread_p50_ms']:.1f} | {rot['spread_p99_ms']:.1f} | {rot['spread_max_ms']:.1f} |",
    ]
    ca = result["ca_rotation"]
    lines.append(
        f"| CA activate -> last stream, new issuer | {ca['rotations']} | {ca['complete']} "
        f"| {ca['p50_ms']:.1f} | - | {ca['max_ms']:.1f} |"
    )
    lines.append(
        f"| CA prepare -> last stream, new bundle | {ca['rotations']} | - "
        f"| {ca['bundle_p50_ms']:.1f} | - | {ca['bundle_max_ms']:.1f} |"
    )
    rev = result["revocation"]
    lines.append(
        f"| Revoke returned -> last stream without A | {rev['revocations']} | {rev['complete']} "
        f"| {rev['p50_ms']:.1f} | {rev['p99_ms']:.1f} | {rev['max_ms']:.1f} |"
    )
    lines += [
        "",
        f"rotation: {rot['window_seconds']:.0f} s window, {s['rotation_ttl']:.0f} s TTL: per "
        f"stream and entry {rot['per_stream_min']}/{rot['per_stream_median']}/"
        f"{rot['per_stream_max']} rotations (min/median/max); new serials per entry (any stream) "
        f"{sorted(rot['new_serials_per_entry'].values())}; window / (TTL/2) = "
        f"{rot['expected_per_entry']:.1f}; agent CPU {rot['agent_cpu_percent']:.1f} %",
        "CA rotations (activate -> last ms): "
        + ", ".join(f"{r['issuer_last_ms']:.0f}" for r in ca["reps"])
        + f"; first stream p50 {percentile([r['issuer_first_ms'] for r in ca['reps']], 0.5):.0f}"
        " ms; agent CPU per stream p50 "
        f"{percentile([r['agent_cpu_us_per_stream'] for r in ca['reps']], 0.5):.0f} us",
        f"revocation: from Revoke's start p50 {rev['from_call_p50_ms']:.1f} ms; first stream p50 "
        f"{rev['first_arrival_p50_ms']:.1f} ms; Revoke call p50 "
        f"{rev['revoke_call_p50_ms']:.1f} ms; agent CPU per stream p50 "
        f"{rev['agent_cpu_us_per_stream_p50']:.0f} us",
    ]
    if result["stream_errors"]:
        lines.append(f"stream errors (reconnected): {result['stream_errors']}")
    lines.append(
        f"CPU: 100 % = one core; the machine has {result['environment']['cpus']}. 'other' is "
        "whatever else ran meanwhile: it disturbs the figures."
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workloads", type=int, default=100, help="W: workloads (channels)")
    parser.add_argument("--processes", type=int, default=2, help="P: load processes")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per rate scenario")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each")
    parser.add_argument("--entries", type=int, default=2, help="node entries every workload has")
    parser.add_argument("--rotation-ttl", type=float, default=20.0, help="X.509 TTL, seconds")
    parser.add_argument("--rotation-time", type=float, default=60.0, help="seconds observed")
    parser.add_argument("--ca-rotations", type=int, default=3)
    parser.add_argument("--revocations", type=int, default=10)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.processes < 1 or args.workloads < args.processes:
        parser.error("--workloads must be at least --processes, which must be positive")
    if args.entries < 1 or args.duration <= 0 or args.rotation_time <= 0:
        parser.error("--entries, --duration and --rotation-time must be positive")
    if args.rotation_ttl < MIN_TTL or args.rotation_ttl != int(args.rotation_ttl):
        parser.error(f"--rotation-ttl must be whole seconds, at least {MIN_TTL}")
    if args.ca_rotations < 1 or args.revocations < 1:
        parser.error("--ca-rotations and --revocations must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up as on Ctrl-C
    started = time.monotonic()
    result = run_bench(bench(args), failed="benchmark failed")
    result["wall_seconds"] = time.monotonic() - started
    print(format_tables(result))
    print(f"(whole run {result['wall_seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
