"""Replicas on one PostgreSQL database under faults: a replica SIGKILLed mid-load, PostgreSQL
stopped (and killed) and started again under load. Nothing acknowledged is lost, every failure
is a clean UNAVAILABLE, and the audit chain still verifies."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority.client import AdminClient
from tests.helpers import (
    ServeProcess,
    authority_command,
    interrupt,
    short_socket_dir,
    start_serve,
    wait_until,
)
from tests.pg import PgServer

TD = "spiffe://example.org"
CALL_TIMEOUT = 10.0  # a call hanging this long shows as DEADLINE_EXCEEDED, not a stuck test
SLOW_CALL = 5.0  # no call, failed or not, may take longer than this


# --- replicas ----------------------------------------------------------------------------------


@contextlib.contextmanager
def replicas(url: str, folder: Path, count: int = 2) -> Iterator[list[ServeProcess]]:
    served: list[ServeProcess] = []
    try:
        for i in range(count):
            sockets = short_socket_dir()
            served.append(
                start_serve(
                    folder / f"r{i}" / "data", sockets, "--store", url, "--replica", f"replica-{i}"
                )
            )
        yield served
    finally:
        for s in served:
            s.stop(signal.SIGKILL if s.proc.poll() is None else signal.SIGTERM)


def holds_both_cas(served: ServeProcess) -> bool:
    return served.cli("bundle", "show").stdout.count("BEGIN CERTIFICATE") == 2


# --- load --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    replica: str
    op: str
    started: float
    elapsed: float
    code: grpc.StatusCode
    details: str


@dataclass
class Ledger:
    """Every call made, and what the acknowledged ones created."""

    calls: list[Call] = field(default_factory=list)
    revoked: dict[str, int] = field(default_factory=dict)  # target -> seq
    tokens: set[str] = field(default_factory=set)  # token_id
    entries: set[str] = field(default_factory=set)  # entry id

    def failures(self) -> list[Call]:
        return [c for c in self.calls if c.code != grpc.StatusCode.OK]

    def acknowledged(self) -> int:
        return len(self.calls) - len(self.failures())


async def one_call(
    ledger: Ledger, stub: pb_grpc.AdminAsyncStub, replica: str, op: str, name: str
) -> grpc.StatusCode:
    started = time.monotonic()
    code, details = grpc.StatusCode.OK, ""
    try:
        if op == "revoke":
            target = f"{TD}/revoked/{name}"
            reply = await stub.Revoke(
                pb.RevokeRequest(kind="subject", target=target, reason="fault", preemptive=True),
                timeout=CALL_TIMEOUT,
            )
            (seq,) = [e.seq for e in reply.revocations if e.target == target]
            ledger.revoked[target] = seq
        elif op == "token":
            token = await stub.CreateJoinToken(
                pb.CreateJoinTokenRequest(spiffe_id=f"{TD}/node/{name}"), timeout=CALL_TIMEOUT
            )
            ledger.tokens.add(token.token_id)
        else:
            entry = await stub.CreateEntry(
                pb.CreateEntryRequest(
                    spiffe_id=f"{TD}/entry/{name}",
                    selectors=[pb.Selector(type="unix", value="uid:64999")],
                ),
                timeout=CALL_TIMEOUT,
            )
            ledger.entries.add(entry.id)
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
    ledger.calls.append(Call(replica, op, started, time.monotonic() - started, code, details))
    return code


async def drive(
    ledger: Ledger, served: ServeProcess, replica: str, worker: int, ops: tuple[str, ...],
    stop: asyncio.Event,
) -> None:  # fmt: skip
    """Calls in a loop until ``stop``: ``ops`` in turn, each with a name of its own."""
    async with AdminClient(served.admin_socket) as admin:
        i = 0
        while not stop.is_set():
            op = ops[i % len(ops)]
            code = await one_call(ledger, admin.stub, replica, op, f"{replica}-{worker}-{i}")
            i += 1
            await asyncio.sleep(0.02 if code == grpc.StatusCode.OK else 0.05)


# --- checks through one replica ---------------------------------------------------------------


async def feed(served: ServeProcess, expected: set[int], patience: float = 20.0) -> dict[int, str]:
    """The replica's revocation feed from the start (seq -> target): read until every seq of
    ``expected`` came and the feed reached its head (a heartbeat) or was quiet for a second."""
    seen: dict[int, str] = {}
    async with AdminClient(served.admin_socket) as admin:
        stream = admin.stub.WatchRevocations(pb.WatchRevocationsRequest(since=0))
        deadline = time.monotonic() + patience
        try:
            while time.monotonic() < deadline:
                try:
                    message = await asyncio.wait_for(anext(aiter(stream)), 1.0)
                except TimeoutError:
                    if expected <= seen.keys():
                        break
                    continue
                body = message.WhichOneof("body")
                if body == "event":
                    seen[message.event.seq] = message.event.target
                elif body == "heartbeat":  # the head: read through it, and all expected came
                    if expected <= seen.keys() and message.heartbeat.seq <= max(seen, default=0):
                        break
                elif body == "snapshot":
                    seen.update({e.seq: e.target for e in message.snapshot.revocations})
        finally:
            stream.cancel()
    return seen


async def audit_records(served: ServeProcess) -> list[pb.AuditRecord]:
    async with AdminClient(served.admin_socket) as admin:
        return [r async for r in admin.stub.ExportAudit(pb.ExportAuditRequest())]


async def entry_ids(served: ServeProcess) -> set[str]:
    async with AdminClient(served.admin_socket) as admin:
        listed = await admin.stub.ListEntries(pb.ListEntriesRequest())
    return {e.id for e in listed.entries}


def check_nothing_lost(ledger: Ledger, served: ServeProcess) -> dict[int, str]:
    """Every acknowledged revocation is in ``served``'s feed under its seq, every acknowledged
    entry exists, the audit chain verifies and holds a record of each acknowledged action.
    The feed read."""
    seen = asyncio.run(feed(served, set(ledger.revoked.values())))
    missing = {t: s for t, s in ledger.revoked.items() if seen.get(s) != t}
    assert not missing, f"acknowledged revocations not in the feed: {missing}"
    assert ledger.entries <= asyncio.run(entry_ids(served)), "acknowledged entries lost"

    verified = served.cli("audit", "verify", check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    records = asyncio.run(audit_records(served))
    revoked = {r.subject for r in records if r.kind == "revocation.created"}
    tokens = {
        json.loads(r.details_json).get("token_id")
        for r in records
        if r.kind == "join_token.created"
    }
    entries = {r.subject for r in records if r.kind == "entry.created"}
    assert set(ledger.revoked) <= revoked, set(ledger.revoked) - revoked
    assert ledger.tokens <= tokens, ledger.tokens - tokens
    assert ledger.entries <= entries, ledger.entries - entries
    return seen


# --- 1: a replica SIGKILLed under load --------------------------------------------------------


@contextlib.contextmanager
def watching(served: ServeProcess, folder: Path, *args: str) -> Iterator[tuple[Path, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    out, err = folder / "watch.out", folder / "watch.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [*authority_command(), "watch", "--format", "json", "--since", "0", *args],
            env={**served.env(), "PYTHONUNBUFFERED": "1"},
            stdout=stdout,
            stderr=stderr,
        )
    try:
        yield out, err
    finally:
        interrupt(proc)


def printed(out: Path) -> list[tuple[int, str]]:
    events = []
    for line in out.read_text().splitlines():
        doc = json.loads(line)
        if "seq" in doc:
            events.append((int(doc["seq"]), str(doc["target"])))
    return events


def test_a_replica_killed_under_load_loses_nothing_it_acknowledged(
    pg_url: str, tmp_path: Path
) -> None:
    with replicas(pg_url, tmp_path) as (a, b):
        for served in (a, b):
            wait_until(functools.partial(holds_both_cas, served), "both CAs in every bundle")
        # A relying service's watcher, over mutual TLS, A first and B next.
        bundle = tmp_path / "bundle.pem"
        bundle.write_text(b.cli("bundle", "show").stdout)
        token = b.cli("token", "create", "--spiffe-id", f"{TD}/relying/watcher").stdout.strip()
        svid = tmp_path / "watcher"
        b.cli(
            "workload", "attest", "--server", b.address, "--trust-bundle", str(bundle),
            "--join-token", token, "--out", str(svid),
        )  # fmt: skip
        ledger = Ledger()
        with watching(
            a, tmp_path / "watch",
            "--server", a.address, "--server", b.address,
            "--svid-dir", str(svid), "--trust-bundle", str(bundle),
        ) as (out, err):  # fmt: skip

            async def load() -> float:
                stop = asyncio.Event()
                ops = ("revoke", "token", "entry")
                workers = [
                    asyncio.create_task(drive(ledger, s, name, w, ops, stop))
                    for s, name in ((a, "a"), (b, "b"))
                    for w in range(2)
                ]
                await asyncio.sleep(2.0)
                killed = time.monotonic()
                a.proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(a.proc.wait)
                await asyncio.sleep(2.0)
                stop.set()
                await asyncio.gather(*workers)
                return killed

            killed = asyncio.run(load())
            on_a = [c for c in ledger.calls if c.replica == "a"]
            acked_on_a = {c.op for c in on_a if c.code == grpc.StatusCode.OK}
            assert acked_on_a == {"revoke", "token", "entry"}, acked_on_a
            assert any(c.started > killed for c in on_a), "no call made to A after the kill"
            on_b = [c for c in ledger.calls if c.replica == "b"]
            assert all(c.code == grpc.StatusCode.OK for c in on_b), [
                c for c in on_b if c.code != grpc.StatusCode.OK
            ]
            seen = check_nothing_lost(ledger, b)
            # The watcher moved from A to B and printed the whole feed once, in order.
            wait_until(
                lambda: {s for s, _ in printed(out)} >= seen.keys(), "the watcher caught up", 20
            )
            events = printed(out)
            assert events == sorted(seen.items()), (events, sorted(seen.items()), err.read_text())
            assert " lost: " in err.read_text(), "the watcher was not on A: " + err.read_text()
        assert "Traceback" not in b.log(), b.log()


# --- 2: PostgreSQL stopped and killed under load ----------------------------------------------


@dataclass(frozen=True)
class Health:
    replica: str
    at: float
    status: str


async def watch_health(
    served: ServeProcess, replica: str, out: list[Health], stop: asyncio.Event
) -> None:
    async with grpc.aio.insecure_channel(f"unix:{served.admin_socket}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                status = exc.code().name
            out.append(Health(replica, time.monotonic(), status))
            await asyncio.sleep(0.1)


OUTAGE = 3.0
RECOVERY = 5.0  # seconds from PostgreSQL ready to calls succeeding and health SERVING


def transitions(health: list[Health], replica: str, origin: float) -> list[tuple[float, str]]:
    """The replica's health changes, in seconds from ``origin``."""
    changes: list[tuple[float, str]] = []
    for h in health:
        if h.replica == replica and (not changes or changes[-1][1] != h.status):
            changes.append((round(h.at - origin, 2), h.status))
    return changes


def test_postgresql_stopped_and_killed_under_load_fails_cleanly_and_recovers(
    private_pg_server: PgServer, tmp_path: Path
) -> None:
    server = private_pg_server
    url = server.create_database()
    with replicas(url, tmp_path) as (a, b):
        ledger = Ledger()
        health: list[Health] = []
        outages: list[tuple[float, float]] = []  # (down, up again)

        async def scenario() -> None:
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(drive(ledger, s, name, w, ("revoke", "token"), stop))
                for s, name in ((a, "a"), (b, "b"))
                for w in range(2)
            ] + [
                asyncio.create_task(watch_health(s, n, health, stop))
                for s, n in ((a, "a"), (b, "b"))
            ]
            await asyncio.sleep(1.0)
            for down in (lambda: server.stop("fast"), server.kill):
                await asyncio.to_thread(down)
                went = time.monotonic()
                await asyncio.sleep(OUTAGE)
                await asyncio.to_thread(server.start)
                outages.append((went, time.monotonic()))
                await asyncio.sleep(4.0)
            stop.set()
            await asyncio.gather(*tasks)

        asyncio.run(scenario())

        wrong = [c for c in ledger.failures() if c.code != grpc.StatusCode.UNAVAILABLE]
        assert not wrong, wrong
        slow = [c for c in ledger.calls if c.elapsed > SLOW_CALL]
        assert not slow, slow
        problems: list[str] = []
        lags: list[str] = []
        for n, (went, back) in enumerate(outages):
            during = [c for c in ledger.calls if went <= c.started and c.started + c.elapsed < back]
            assert during, "no call made while PostgreSQL was down"
            assert all(c.code == grpc.StatusCode.UNAVAILABLE for c in during), [
                c for c in during if c.code != grpc.StatusCode.UNAVAILABLE
            ]
            for name in ("a", "b"):
                said = [h for h in health if h.replica == name and went <= h.at <= back]
                assert all(h.status in ("SERVING", "NOT_SERVING") for h in said), said
                timeline = transitions(health, name, went)
                if not any(h.status == "NOT_SERVING" for h in said):
                    problems.append(f"outage {n} ({back - went:.1f} s), {name}: {timeline}")
                serving = [
                    h.at
                    for h in health
                    if h.replica == name and h.at > back and h.status == "SERVING"
                ]
                if not serving or serving[0] - back > RECOVERY:
                    lags.append(f"outage {n}, {name}: not SERVING again in time: {timeline}")
                ok = [
                    c.started + c.elapsed
                    for c in ledger.calls
                    if c.replica == name and c.started > back and c.code == grpc.StatusCode.OK
                ]
                assert ok, (name, "no call succeeded after the restart")
                assert ok[0] - back < RECOVERY, (name, ok[0] - back)
        assert not problems, "\n".join(problems)
        assert ledger.acknowledged() > 0
        for served in (a, b):
            check_nothing_lost(ledger, served)
            assert served.proc.poll() is None, "a replica exited"
            assert "Traceback" not in served.log(), served.log()
        # The `store` job retries its ping at most a ping interval apart (backoff_cap), so
        # health follows the store's recovery.
        assert not lags, "health lags the store's recovery: " + "; ".join(lags)
