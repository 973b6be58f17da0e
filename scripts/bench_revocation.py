#!/usr/bin/env python3
"""Revocation fan-out: from Revoke returning to delivery at the last of N subscribers.

``python scripts/bench_revocation.py [--subscribers 10,100,1000] [--processes 4]
[--revocations 30] [--interval 0.1] [--streams-per-connection 100] [--exchange-concurrency 4]
[--idle 3] [--json out.json]``

Starts ``authority serve`` as a subprocess (temporary data directory, loopback ports, admin socket
in a short /tmp folder), loads the example agent policy and attests, through join tokens, one SVID
per subscriber process and one for an Exchange load process. Then:

* ``--processes`` subscriber processes (spawned) each hold their share of the N
  ``WatchRevocations`` streams over mutual TLS with their own SVID, ``--streams-per-connection``
  streams per connection (a relying service subscribes exactly so). Each stream records, per
  sequence number, when the event reached it (``time.monotonic()``: CLOCK_MONOTONIC, one clock
  for every process on the machine).
* N grows 10 -> 100 -> 1000 (streams are added, not restarted). Before and after attaching, the
  server's resident memory (VmRSS from /proc) is read: the difference over the streams added is
  the memory per subscriber. Streams the server refuses while attaching (gRPC core cancels calls
  beyond ``grpc.server.max_pending_requests``) are counted and retried with jittered backoff.
* Then, for ``--idle`` seconds without any revocation, the server's CPU is read: the cost of
  keeping N quiet streams (heartbeats), plus the Exchange load if one runs, whose rate over
  that window is reported too (N streams attached, none revoking).
* For each N, the main process issues ``--revocations`` subject revocations over the admin socket,
  one every ``--interval`` seconds, and records when each Revoke call started and returned.
  Latency = (delivery at the last of the N streams) - (Revoke returned); it can be negative when
  the feed delivers before the Revoke reply is back (the hub publishes before the reply is sent).
  The same figure from the call's start is shown too, and the CPU time the server and the
  subscriber processes spent per delivery (one event reaching one stream) during the run.
* Throughout, a load process keeps ``--exchange-concurrency`` Exchange calls in flight over
  mutual TLS; its rate is reported alone (before any subscriber) and during each revocation run.

Targets (issue 5): p99 <= 100 ms at N = 1000, p50 <= 10 ms at N = 10, while Exchange is served.
Traffic stays on 127.0.0.1; tokens and keys are never printed; temporary folders are removed.
It always exits 0 when the run completes: a benchmark is not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing.connection
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from _benchlib import (  # noqa: E402
    READY_TIMEOUT,
    RECONNECTING_CHANNEL_OPTIONS,
    RPC_TIMEOUT,
    TRUST_DOMAIN,
    AuthorityServer,
    PipeWorker,
    attest_join_tokens,
    bench_dirs,
    bundle_pem,
    close_all,
    cpu_seconds,
    create_join_tokens,
    load_example_policy,
    machine_busy_seconds,
    percentile,
    run_bench,
    serve_commands,
    short_environment,
    split_evenly,
    start_authority,
)

from authority._pb import authority_v1_authority_pb2 as pb  # noqa: E402
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc  # noqa: E402

ATTACH_TIMEOUT = 60.0
DRAIN_TIMEOUT = 10.0
TARGET_P99_MS_AT_1000 = 100.0
TARGET_P50_MS_AT_10 = 10.0


# --- subscriber processes ----------------------------------------------------------------------


@dataclass(frozen=True)
class SubscriberInit:
    index: int
    mtls_address: str
    bundle_pem: bytes
    chain_pem: bytes
    key_pem: bytes
    streams_per_connection: int


class _Subscribers:
    """One process's share of the streams, and when each event reached each of them."""

    def __init__(self, init: SubscriberInit) -> None:
        self.init = init
        self.credentials = grpc.ssl_channel_credentials(
            root_certificates=init.bundle_pem,
            private_key=init.key_pem,
            certificate_chain=init.chain_pem,
        )
        self.channels: list[grpc.aio.Channel] = []
        self.stubs: list[pb_grpc.WorkloadAsyncStub] = []
        self.tasks: list[asyncio.Task[None]] = []
        # seq -> [streams reached, last arrival, first arrival]
        self.deliveries: dict[int, list[float]] = {}
        self.refused: dict[str, int] = {}

    def _stub(self, stream: int) -> pb_grpc.WorkloadAsyncStub:
        wanted = stream // self.init.streams_per_connection
        while len(self.stubs) <= wanted:
            channel = grpc.aio.secure_channel(
                self.init.mtls_address, self.credentials, RECONNECTING_CHANNEL_OPTIONS
            )
            self.channels.append(channel)
            self.stubs.append(pb_grpc.WorkloadStub(channel))
        return self.stubs[wanted]

    async def attach(self, total: int, since: int) -> dict[str, Any]:
        started = time.monotonic()
        refused_before = dict(self.refused)
        ready: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        for n in range(len(self.tasks), total):
            future: asyncio.Future[None] = loop.create_future()
            ready.append(future)
            self.tasks.append(asyncio.create_task(self._watch(self._stub(n), since, future)))
        if ready:
            await asyncio.wait_for(asyncio.gather(*ready), ATTACH_TIMEOUT)
        return {
            "streams": len(self.tasks),
            "connections": len(self.channels),
            "seconds": time.monotonic() - started,
            "refused": sum(self.refused.values()) - sum(refused_before.values()),
            "refused_codes": {
                code: count - refused_before.get(code, 0)
                for code, count in self.refused.items()
                if count > refused_before.get(code, 0)
            },
        }

    async def _watch(
        self, stub: pb_grpc.WorkloadAsyncStub, since: int, ready: asyncio.Future[None]
    ) -> None:
        delay = 0.05
        while True:
            call = stub.WatchRevocations(pb.WatchRevocationsRequest(since=since))
            try:
                async for message in call:
                    body = message.WhichOneof("body")
                    if body == "event":
                        now = time.monotonic()
                        seq = message.event.seq
                        record = self.deliveries.get(seq)
                        if record is None:
                            self.deliveries[seq] = [1, now, now]
                        else:
                            record[0] += 1
                            record[1] = max(record[1], now)
                        since = max(since, seq)
                    elif body == "heartbeat":
                        delay = 0.05
                        if not ready.done():
                            ready.set_result(None)
                    elif body == "resync":
                        self.refused["RESYNC"] = self.refused.get("RESYNC", 0) + 1
                        break
            except grpc.aio.AioRpcError as exc:
                name = exc.code().name
                self.refused[name] = self.refused.get(name, 0) + 1
            finally:
                call.cancel()
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(2.0, delay * 2)

    def report(self, seqs: list[int]) -> dict[int, tuple[int, float, float]]:
        out: dict[int, tuple[int, float, float]] = {}
        for seq in seqs:
            record = self.deliveries.pop(seq, None)
            if record is not None:
                out[seq] = (int(record[0]), record[1], record[2])
        return out

    def reached(self, seqs: list[int]) -> int:
        """How many (seq, stream) deliveries happened so far."""
        return sum(int(self.deliveries[s][0]) for s in seqs if s in self.deliveries)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for channel in self.channels:
            await channel.close(None)


async def _subscriber_loop(
    conn: multiprocessing.connection.Connection, init: SubscriberInit
) -> None:
    subs = _Subscribers(init)
    try:
        await serve_commands(
            conn,
            {
                "attach": ("attached", lambda payload: subs.attach(*payload)),
                "reached": ("reached", subs.reached),
                "report": ("report", subs.report),
            },
        )
    finally:
        await subs.close()


# --- the Exchange load process -----------------------------------------------------------------


@dataclass(frozen=True)
class ExchangeInit:
    mtls_address: str
    bundle_pem: bytes
    chain_pem: bytes
    key_pem: bytes
    concurrency: int


async def _exchange_loop(conn: multiprocessing.connection.Connection, init: ExchangeInit) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=init.bundle_pem,
        private_key=init.key_pem,
        certificate_chain=init.chain_pem,
    )
    channel = grpc.aio.secure_channel(init.mtls_address, credentials, RECONNECTING_CHANNEL_OPTIONS)
    stub: pb_grpc.WorkloadAsyncStub = pb_grpc.WorkloadStub(channel)
    done: list[float] = []
    errors: dict[str, int] = {}
    stop = asyncio.Event()

    async def worker(n: int) -> None:
        request = pb.ExchangeRequest(
            intent=pb.Intent(action="read", resource="metrics/prod", purpose="benchmark"),
            audience="metrics-api",
            ttl_seconds=60,
            task_id=f"bench-exchange-{n}",
        )
        while not stop.is_set():
            try:
                reply = await stub.Exchange(request, timeout=RPC_TIMEOUT)
                if not reply.token.token:
                    errors["NO_TOKEN"] = errors.get("NO_TOKEN", 0) + 1
                    continue
                done.append(time.monotonic())
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(channel.channel_ready(), READY_TIMEOUT)
        workers = [asyncio.create_task(worker(n)) for n in range(init.concurrency)]
        conn.send(("ready", None))
        await asyncio.to_thread(conn.recv)  # "stop"
        stop.set()
        await asyncio.gather(*workers)
        conn.send(("result", (done, errors)))
    finally:
        await channel.close(None)


async def setup(
    server: AuthorityServer, work: Path, subscribers: int
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Load the example policy; attest one SVID per subscriber process and one for the
    Exchange load (the last). Returns (bundle PEM, [(chain PEM, key PEM)])."""
    from authority.client import AdminClient

    ids = [f"spiffe://{TRUST_DOMAIN}/service/bench-subscriber-{i}" for i in range(subscribers)]
    ids.append(f"spiffe://{TRUST_DOMAIN}/agent/bench-exchange")
    async with AdminClient(server.admin_socket) as admin:
        await load_example_policy(admin.stub)
        roots = await bundle_pem(admin.stub)
    tokens = await create_join_tokens(server.admin_socket, ids)
    return roots, await attest_join_tokens(server.tls_address, roots, tokens, work)


# --- one N ---------------------------------------------------------------------------------------


@dataclass
class RunReport:
    subscribers: int
    connections: int
    attach_seconds: float
    refused_while_attaching: int
    refused_codes: dict[str, int]
    revocations: int
    complete: int  # revocations that reached all N streams
    p50_ms: float
    p99_ms: float
    max_ms: float
    from_call_p50_ms: float
    from_call_p99_ms: float
    revoke_call_p50_ms: float
    first_arrival_p50_ms: float
    rss_before_kib: int
    rss_after_kib: int
    kib_per_subscriber: float
    server_cpu_percent: float  # during the revocation run; 100 = one core
    subscriber_cpu_percent: float  # the subscriber processes, summed
    exchange_load_cpu_percent: float  # the Exchange load process
    machine_busy_percent: float  # everything on the machine (100 per core)
    other_cpu_percent: float  # the machine minus all of the above and this process
    # CPU time per (revocation, stream) delivery during the run: less sensitive than latency to
    # what else the machine runs. The server's includes the Exchange calls it served meanwhile.
    server_cpu_us_per_delivery: float
    subscriber_cpu_us_per_delivery: float
    server_idle_cpu_percent: float  # N streams, no revocation (heartbeats and Exchange only)
    exchange_per_second: float = 0.0  # filled in once the load process reports
    exchange_idle_per_second: float = 0.0  # the same, N streams attached but quiet
    samples_ms: list[float] = field(default_factory=list)


async def run_one(
    n: int,
    args: argparse.Namespace,
    server: AuthorityServer,
    admin: pb_grpc.AdminAsyncStub,
    subscribers: list[PipeWorker],
    victims: Iterator[int],
    attached_before: int,
    load_pid: int | None,
) -> tuple[RunReport, tuple[float, float], tuple[float, float]]:
    """Grow to ``n`` streams (from ``attached_before``), then time the revocations."""
    head = (await admin.Revoke(
        pb.RevokeRequest(  # made-up subjects: revoked before they exist
            kind="subject", target=f"spiffe://{TRUST_DOMAIN}/warm/{n}", reason="w", preemptive=True
        )
    )).revocations[0].seq  # fmt: skip
    rss_before = server.rss_kib()
    shares = split_evenly(n, len(subscribers))
    attached = await asyncio.gather(
        *(
            w.ask("attach", (share, head), "attached", ATTACH_TIMEOUT + 10)
            for w, share in zip(subscribers, shares, strict=True)
        )
    )
    await asyncio.sleep(1.0)  # let the attach settle before reading memory and timing
    rss_after = server.rss_kib()
    # Idle: no revocation, only heartbeats to the N streams.
    idle0, idle_wall0 = server.cpu_seconds(), time.monotonic()
    await asyncio.sleep(args.idle)
    idle_window = (idle_wall0, time.monotonic())
    idle_cpu = (server.cpu_seconds() - idle0) / (idle_window[1] - idle_window[0]) * 100

    timings: dict[int, tuple[float, float]] = {}
    pids = [w.pid for w in subscribers]
    cpu0, wall0 = server.cpu_seconds(), time.monotonic()
    subs_cpu0, busy0 = sum(cpu_seconds(p) for p in pids), machine_busy_seconds()
    load_cpu0, own0 = (cpu_seconds(load_pid) if load_pid else 0.0), time.process_time()
    for _ in range(args.revocations):
        target = f"spiffe://{TRUST_DOMAIN}/victim/{next(victims)}"
        started = time.monotonic()
        reply = await admin.Revoke(
            pb.RevokeRequest(kind="subject", target=target, reason="bench", preemptive=True),
            timeout=RPC_TIMEOUT,
        )
        returned = time.monotonic()
        timings[reply.revocations[0].seq] = (started, returned)
        await asyncio.sleep(args.interval)
    window = (wall0, time.monotonic())
    span = window[1] - window[0]
    server_cpu = server.cpu_seconds() - cpu0
    subscribers_cpu = sum(cpu_seconds(p) for p in pids) - subs_cpu0
    cpu = server_cpu / span * 100
    subs_cpu = subscribers_cpu / span * 100
    deliveries = max(1, args.revocations * n)
    busy = (machine_busy_seconds() - busy0) / span * 100
    load_cpu = ((cpu_seconds(load_pid) if load_pid else 0.0) - load_cpu0) / span * 100
    own = (time.process_time() - own0) / span * 100
    seqs = sorted(timings)

    deadline = time.monotonic() + DRAIN_TIMEOUT
    while time.monotonic() < deadline:
        reached = await asyncio.gather(
            *(w.ask("reached", seqs, "reached", 10) for w in subscribers)
        )
        if sum(reached) >= n * len(seqs):
            break
        await asyncio.sleep(0.1)
    reports = await asyncio.gather(*(w.ask("report", seqs, "report", 10) for w in subscribers))

    latencies, from_call, calls, first = [], [], [], []
    complete = 0
    for seq in seqs:
        started, returned = timings[seq]
        calls.append((returned - started) * 1000)
        got = [r[seq] for r in reports if seq in r]
        if sum(c for c, _, _ in got) < n:
            continue
        complete += 1
        last = max(t for _, t, _ in got)
        latencies.append((last - returned) * 1000)
        from_call.append((last - started) * 1000)
        first.append((min(t for _, _, t in got) - returned) * 1000)
    report = RunReport(
        subscribers=n,
        connections=sum(a["connections"] for a in attached),
        attach_seconds=max(a["seconds"] for a in attached),
        refused_while_attaching=sum(a["refused"] for a in attached),
        refused_codes=dict(sum((Counter(a["refused_codes"]) for a in attached), Counter())),
        revocations=len(seqs),
        complete=complete,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        max_ms=max(latencies, default=float("nan")),
        from_call_p50_ms=percentile(from_call, 0.50),
        from_call_p99_ms=percentile(from_call, 0.99),
        revoke_call_p50_ms=percentile(calls, 0.50),
        first_arrival_p50_ms=percentile(first, 0.50),
        rss_before_kib=rss_before,
        rss_after_kib=rss_after,
        kib_per_subscriber=(rss_after - rss_before) / max(1, n - attached_before),
        server_cpu_percent=cpu,
        subscriber_cpu_percent=subs_cpu,
        exchange_load_cpu_percent=load_cpu,
        machine_busy_percent=busy,
        other_cpu_percent=max(0.0, busy - cpu - subs_cpu - load_cpu - own),
        server_cpu_us_per_delivery=server_cpu / deliveries * 1e6,
        subscriber_cpu_us_per_delivery=subscribers_cpu / deliveries * 1e6,
        server_idle_cpu_percent=idle_cpu,
        samples_ms=[round(v, 3) for v in latencies],
    )
    return report, window, idle_window


# --- orchestration -------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with bench_dirs("bench-revocation-", "br-") as (work, socket_dir):
        server = start_authority(work, socket_dir)
        try:
            return await measure(args, server, work)
        finally:
            server.stop()


async def measure(args: argparse.Namespace, server: AuthorityServer, work: Path) -> dict[str, Any]:
    """Start the subscriber and Exchange processes, then grow N and time the revocations."""
    workers: list[PipeWorker] = []
    try:
        roots, identities = await setup(server, work, args.processes)
        subscribers = [
            PipeWorker(
                _subscriber_loop,
                SubscriberInit(
                    i, server.mtls_address, roots, *identities[i], args.streams_per_connection
                ),
                f"subscribers-{i}",
            )
            for i in range(args.processes)
        ]
        workers.extend(subscribers)
        exchange: PipeWorker | None = None
        if args.exchange_concurrency > 0:
            exchange = PipeWorker(
                _exchange_loop,
                ExchangeInit(
                    server.mtls_address, roots, *identities[-1], args.exchange_concurrency
                ),
                "exchange-load",
            )
            workers.append(exchange)
        for w in workers:
            await asyncio.to_thread(w.expect, "ready", 60)

        # Exchange alone: no subscriber attached, no revocation.
        alone_window = (0.0, 0.0)
        if exchange is not None:
            await asyncio.sleep(1.0)
            alone_window = (time.monotonic(), time.monotonic() + args.exchange_alone)
            await asyncio.sleep(args.exchange_alone)

        windows: list[tuple[float, float]] = []
        idle_windows: list[tuple[float, float]] = []
        reports: list[RunReport] = []
        victims = iter(range(10**9))
        from authority.client import AdminClient

        async with AdminClient(server.admin_socket) as admin:
            attached = 0
            for n in args.subscribers:
                report, window, idle_window = await run_one(
                    n,
                    args,
                    server,
                    admin.stub,
                    subscribers,
                    victims,
                    attached,
                    exchange.pid if exchange is not None else None,
                )
                attached = n
                reports.append(report)
                windows.append(window)
                idle_windows.append(idle_window)
                print(
                    f"  N={n}: p50 {report.p50_ms:.1f} ms, p99 {report.p99_ms:.1f} ms "
                    f"({report.complete}/{report.revocations} complete)",
                    file=sys.stderr,
                )
        done: list[float] = []
        errors: dict[str, int] = {}
        if exchange is not None:
            exchange.send("stop")
            done, errors = await asyncio.to_thread(exchange.expect, "result", 30)
        alone = (
            sum(1 for t in done if alone_window[0] <= t <= alone_window[1]) / args.exchange_alone
        )

        def rate(window: tuple[float, float]) -> float:
            return sum(1 for t in done if window[0] <= t <= window[1]) / (window[1] - window[0])

        for report, window, idle_window in zip(reports, windows, idle_windows, strict=True):
            report.exchange_per_second = rate(window)
            report.exchange_idle_per_second = rate(idle_window)
        return {
            "environment": short_environment(),
            "settings": {
                k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()
            },
            "exchange_alone_per_second": alone,
            "exchange_errors": errors,
            "runs": [asdict(r) for r in reports],
        }
    finally:
        close_all(workers)


def format_table(result: dict[str, Any]) -> str:
    header = (
        "| N | conns | attach s | refused | p50 ms | p99 ms | max ms | p50/p99 from call ms "
        "| Revoke call p50 ms | complete | server RSS MiB before->after | KiB/subscriber "
        "| CPU % server/subscribers/load/other | CPU us/delivery server/subscribers "
        "| server idle CPU % | Exchange/s quiet/revoking |"
    )
    lines = [header, "|" + "---|" * 16]
    for r in result["runs"]:
        lines.append(
            f"| {r['subscribers']} | {r['connections']} | {r['attach_seconds']:.2f} "
            f"| {r['refused_while_attaching']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r['max_ms']:.1f} | {r['from_call_p50_ms']:.1f}/{r['from_call_p99_ms']:.1f} "
            f"| {r['revoke_call_p50_ms']:.1f} | {r['complete']}/{r['revocations']} "
            f"| {r['rss_before_kib'] / 1024:.1f}->{r['rss_after_kib'] / 1024:.1f} "
            f"| {r['kib_per_subscriber']:.1f} | {r['server_cpu_percent']:.0f}/"
            f"{r['subscriber_cpu_percent']:.0f}/{r['exchange_load_cpu_percent']:.0f}/"
            f"{r['other_cpu_percent']:.0f} "
            f"| {r['server_cpu_us_per_delivery']:.0f}/{r['subscriber_cpu_us_per_delivery']:.0f} "
            f"| {r['server_idle_cpu_percent']:.1f} "
            f"| {r['exchange_idle_per_second']:.0f}/{r['exchange_per_second']:.0f} |"
        )
    cores = result["environment"]["cpus"]
    lines.append(
        f"\nCPU during each revocation run: 100 % = one core; the machine has {cores}. 'other' is "
        "whatever else ran on the machine meanwhile: it disturbs the figures."
    )
    if result["settings"]["exchange_concurrency"]:
        lines.append(f"Exchange alone: {result['exchange_alone_per_second']:.0f}/s")
    if result["exchange_errors"]:
        lines.append(f"Exchange errors: {result['exchange_errors']}")
    return "\n".join(lines)


def verdicts(result: dict[str, Any]) -> list[str]:
    out = []
    by_n = {r["subscribers"]: r for r in result["runs"]}
    if 1000 in by_n:
        p99 = by_n[1000]["p99_ms"]
        verdict = "PASS" if p99 <= TARGET_P99_MS_AT_1000 else "ABOVE TARGET"
        out.append(
            f"p99 at N=1000: {p99:.1f} ms (target <= {TARGET_P99_MS_AT_1000:.0f}): {verdict}"
        )
    if 10 in by_n:
        p50 = by_n[10]["p50_ms"]
        verdict = "PASS" if p50 <= TARGET_P50_MS_AT_10 else "ABOVE TARGET"
        out.append(f"p50 at N=10: {p50:.1f} ms (target <= {TARGET_P50_MS_AT_10:.0f}): {verdict}")
    for r in result["runs"]:
        if r["refused_while_attaching"]:
            out.append(
                f"N={r['subscribers']}: {r['refused_while_attaching']} stream opens refused "
                f"({r['refused_codes']}), retried with jitter: gRPC core cancels calls beyond "
                "grpc.server.max_pending_requests (gRPC's default 1000; authority/server.py sets "
                "3000, also the hard limit, grpc.server.max_pending_requests_hard_limit)"
            )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--subscribers",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[10, 100, 1000],
        help="N values, ascending (streams are added between them)",
    )
    parser.add_argument("--processes", type=int, default=4, help="subscriber processes")
    parser.add_argument("--revocations", type=int, default=30, help="revocations per N")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between revocations")
    parser.add_argument("--streams-per-connection", type=int, default=100)
    parser.add_argument(
        "--exchange-concurrency", type=int, default=4, help="Exchange calls in flight (0: none)"
    )
    parser.add_argument("--exchange-alone", type=float, default=3.0, help="seconds measured")
    parser.add_argument(
        "--idle", type=float, default=3.0, help="seconds of server CPU measured with no revocation"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.subscribers != sorted(args.subscribers) or min(args.subscribers) < args.processes:
        parser.error("--subscribers must ascend, each at least --processes")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    result = run_bench(bench(args), failed="benchmark failed")
    result["wall_seconds"] = time.monotonic() - started
    print(format_table(result))
    for line in verdicts(result):
        print(line)
    print(f"(whole run {result['wall_seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
