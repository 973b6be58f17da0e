#!/usr/bin/env python3
"""A soak test: one authority, two node agents, workloads, watchers and faults on a schedule
(issue 12).

``python scripts/soak.py --minutes N [--seed S] [--report FILE] [--workloads 24]``

What runs, all on loopback and Unix sockets under temporary folders (removed at the end):

* ``authority serve`` (its own data directory, INFO logging as a new operator has it), reached by
  the agents and the Exchange load through a TCP proxy in this process (``advertise_mtls`` names
  the proxy's second port), so the connections can be cut without touching the processes;
* two ``authority agent`` processes, attested once with join tokens (their own SVIDs live
  AGENT_SVID_TTL, so their renewals keep meeting their entries' rotations), restarted later
  with the ``--trust-bundle`` they were first given and no token (as a unit file would);
* ``--workloads`` workloads (asyncio tasks here, half on each agent), each holding a Workload API
  ``FetchX509SVID`` stream on the stub of ``authority.client.WorkloadApiClient`` and reconnecting
  (0.1-2 s, jittered) when it breaks, so the soak knows when each is connected; every agent has
  three node entries (``unix:uid:<uid>``, 30-second X.509-SVIDs) that each of its workloads
  must hold; and ``--library-workloads`` more through ``WorkloadApiClient.watch_x509_svids``
  (the library's own reconnects and backoff), of which only the gaps are checked;
* an Exchange load (``--exchanges-per-second``, the example Cedar policy's ``read metrics``)
  over mutual TLS with the SVIDs the workloads hold;
* five ``authority watch --format json`` processes reading the revocation feed;
* ``authority ca rotate`` every ``--rotate-every`` seconds (a step: prepare, then activate);
* a revocation every ``--revoke-every`` seconds: a fresh node entry for one agent, waited for on
  all its workloads, then revoked (by entry id and by SPIFFE ID, in turn);
* faults every ``--fault-every`` seconds, kinds in a seeded order: the authority killed (SIGKILL)
  or stopped (SIGTERM) and started again, an agent killed or stopped and started again, the
  proxy cutting every connection to the authority for 3 s (the agents' revocation feeds and
  syncs), a watcher killed and started again with ``--since`` its last sequence, and an outage:
  the authority killed and started again OUTAGE_SECONDS later.

What it checks (every 0.25 s, and on every message; a violation is counted once per subject):

* ``served_expired``: an agent sent an SVID already past its ``not_after``;
* ``expired_held``: a workload connected to its agent still holds an SVID more than
  EXPIRY_GRACE seconds past its ``not_after`` (the agent did not rotate it nor drop it);
* ``revoked_held``: a connected workload still holds a revoked identity REVOCATION_GRACE
  seconds after the Revoke call returned;
* ``no_valid_svid``: a workload without a valid SVID (in its life, chaining to the bundle it was
  sent, not revoked) for each of its agent's entries for longer than OUTAGE_BOUND seconds; it
  keeps what it received while its stream is down, as a client library does;
* ``bad_chain``: an SVID that does not chain to the bundle in the same message;
* ``entry_not_served``: a new entry not held by every workload of its agent in ENTRY_DEADLINE s;
* ``revocation_missed``: a revocation not printed by every watcher within WATCH_DEADLINE s;
* ``ca_not_propagated``: after a CA activation, a workload not holding SVIDs of the new key
  within CA_DEADLINE s;
* ``exchange_outage``: no successful Exchange for EXCHANGE_OUTAGE_BOUND s;
* ``health_serving``: an agent's health check (polled every second) says SERVING while its
  workloads have been without a valid SVID past OUTAGE_BOUND;
* ``process_exit`` (a process exited without being told), ``restart_failed`` (an agent or the
  authority did not serve again within RESTART_DEADLINE s), ``stop_slow`` (SIGTERM not obeyed
  within STOP_DEADLINE s);
* at the end: ``audit_verify`` (``authority audit verify`` must pass), ``resource_growth`` (RSS,
  open fds and threads of each role, its start figures (see below) against its last sample,
  within the tolerances below: a role is compared across its restarts), ``log_rate`` (lines a
  process logs in any 60 s: LOG_LINES_PER_MINUTE, the authority LOG_LINES_PER_EXCHANGE_RATE
  more per Exchange a second, as it logs each token);
* ``slow_recovery``: RECOVERY_DEADLINE s after a fault, a workload not yet connected to its
  agent with valid SVIDs;

Figures reported beside the violations: faults by kind and how long after each every workload
held valid SVIDs again over a connected stream; the longest time any workload was without a
valid SVID; revocation latency to the watchers and off the workloads' streams (p50/p99, from the
Revoke call); the CA steps and how long an activation took to reach every workload (from the
``ca rotate`` command's start, its start-up included); Exchanges by
outcome; per process RSS, open fds and threads (start: the most over START_WINDOW s from WARMUP
s after setup; end: the last sample),
CPU in % of a core, and log lines (mean per minute, most in any 60 s).

It prints a summary and writes the report (JSON) to ``--report``; exit 0 when there is no
violation, 1 otherwise, 2 when the setup fails. Nothing printed names a token or a key.
``--keep DIR`` copies the work folder (every process's log, the data directories) to DIR.

A long run: ``python scripts/soak.py --minutes 30 --report soak-30.json`` (past 5 minutes the
defaults are a fault every 45 s, a CA step every 150 s and a revocation every 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import grpc  # noqa: E402
from _benchlib import (  # noqa: E402
    LOOPBACK,
    TRUST_DOMAIN,
    BenchError,
    authority_command,
    bench_dirs,
    cpu_seconds,
    free_port,
    percentile,
)
from cryptography import x509  # noqa: E402
from cryptography.exceptions import InvalidSignature  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

import authority  # noqa: E402
from authority._pb import authority_v1_authority_pb2 as pb  # noqa: E402
from authority._pb import spiffe_workload_pb2 as wpb  # noqa: E402
from authority.client import (  # noqa: E402
    AdminClient,
    FetchedX509Svid,
    WorkloadApiClient,
    WorkloadClient,
)

# --- the bounds, stated -------------------------------------------------------------------------

SVID_TTL = 30  # seconds: every node entry's X.509-SVID
AGENT_SVID_TTL = 60  # the agents' own: renewed at 30 s, as their entries rotate (issue 12's stall)
EXPIRY_GRACE = 2.0  # a connected workload may hold an SVID this long past its not_after
REVOCATION_GRACE = 5.0  # ... and a revoked identity this long after Revoke returned
OUTAGE_BOUND = 10.0  # the longest a workload may be without a valid SVID for one of its entries
ENTRY_DEADLINE = 30.0  # a new entry reaches every workload of its agent
WATCH_DEADLINE = 30.0  # a revocation reaches every watcher
CA_DEADLINE = 45.0  # after an activation, every workload holds SVIDs of the new key
EXCHANGE_OUTAGE_BOUND = 30.0  # the longest time without a successful Exchange
RESTART_DEADLINE = 30.0  # a restarted authority or agent serves again
STOP_DEADLINE = 15.0  # a process exits after SIGTERM
FEED_CUT_SECONDS = 3.0  # how long the proxy refuses connections in a feed cut
OUTAGE_SECONDS = 8.0  # an authority outage: killed, started again this much later (held SVIDs,
# re-issued at half their 30 s, outlive it; the agents' retries are logged all along)
LOG_LINES_PER_MINUTE = 300  # the most lines any process may log in any 60 s...
LOG_LINES_PER_EXCHANGE_RATE = 60  # ...the authority, 60 more per Exchange a second (one per token)
RECOVERY_DEADLINE = 30.0  # after a fault, every workload connected with valid SVIDs again
RSS_TOLERANCE = (1.5, 40 * 1024)  # end RSS <= start * 1.5 + 40 MiB
FD_TOLERANCE = 16  # end open fds <= start + 16
THREAD_TOLERANCE = 8  # end threads <= start + 8
WATCHERS = 5
# The example policy beside the authority package imported (the checkout's, as its code expects).
POLICY = Path(authority.__file__).resolve().parent.parent / "examples" / "policies" / "agents.cedar"
ENTRIES_PER_AGENT = 3
CHECK_EVERY = 0.25
WARMUP = 15.0  # seconds after setup: a process's "start" figures are its most over the
START_WINDOW = 30.0  # samples from WARMUP to WARMUP + START_WINDOW; its "end" its last sample
SAMPLE_EVERY = 5.0
RPC_TIMEOUT = 10.0
AGENTS = ("a", "b")
FAULT_KINDS = (
    "authority_sigkill",
    "authority_sigterm",
    "agent_sigkill",
    "agent_sigterm",
    "feed_cut",
    "watcher_kill",
    "authority_outage",
)
T = TypeVar("T")


def agent_id(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/soak-node/{name}"


def base_id(name: str, i: int) -> str:
    return f"spiffe://{TRUST_DOMAIN}/agent/soak/{name}/base-{i}"


# --- the run's record -----------------------------------------------------------------------------


class Record:
    """Everything the run observed: violations (once per subject), faults, figures."""

    def __init__(self) -> None:
        self.started = time.time()
        self.violations: list[dict[str, Any]] = []
        self._seen: set[tuple[str, str]] = set()
        self.faults: Counter[str] = Counter()
        self.fault_log: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def at(self, when: float | None = None) -> float:
        return round((time.time() if when is None else when) - self.started, 2)

    def violation(self, kind: str, subject: str, detail: str) -> None:
        if (kind, subject) in self._seen:
            return
        self._seen.add((kind, subject))
        entry = {"kind": kind, "subject": subject, "at_s": self.at(), "detail": detail}
        self.violations.append(entry)
        print(f"[{self.at():7.1f}s] VIOLATION {kind} {subject}: {detail}", flush=True)

    def note(self, what: str, **details: Any) -> None:
        self.events.append({"at_s": self.at(), "what": what, **details})
        print(f"[{self.at():7.1f}s] {what} {json.dumps(details) if details else ''}", flush=True)


# --- a TCP proxy in front of the authority --------------------------------------------------------


class Proxy:
    """Forwards a loopback port to the authority's; ``cut`` aborts every connection and refuses
    new ones for a while (the network between the agents and the authority failing)."""

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self._refuse_until = 0.0
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, LOOPBACK, self.listen_port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut(0.0)

    def cut(self, seconds: float) -> int:
        self._refuse_until = time.monotonic() + seconds
        links = list(self._links)
        for a, b in links:
            a.transport.abort()
            b.transport.abort()
        return len(links)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._refuse_until:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        link = (writer, up_writer)
        self._links.add(link)
        pumps = [
            asyncio.create_task(_pump(reader, up_writer)),
            asyncio.create_task(_pump(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            writer.transport.abort()
            up_writer.transport.abort()
            self._links.discard(link)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


# --- processes ------------------------------------------------------------------------------------


@dataclass
class Proc:
    """One role (the authority, an agent, a watcher): its current process and its history."""

    role: str
    logs: list[Path] = field(default_factory=list)
    popen: subprocess.Popen[bytes] | None = None
    aproc: asyncio.subprocess.Process | None = None
    instances: int = 0
    expected_exit: bool = False  # set before the soak stops or kills it
    starting: bool = False  # the soak is starting it and watches it itself

    @property
    def pid(self) -> int | None:
        if self.popen is not None and self.popen.poll() is None:
            return self.popen.pid
        if self.aproc is not None and self.aproc.returncode is None:
            return self.aproc.pid
        return None

    def returncode(self) -> int | None:
        if self.popen is not None:
            return self.popen.poll()
        if self.aproc is not None:
            return self.aproc.returncode
        return None

    def log_tail(self, lines: int = 15) -> list[str]:
        if not self.logs:
            return []
        with contextlib.suppress(OSError):
            return self.logs[-1].read_text(errors="replace").splitlines()[-lines:]
        return []

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.popen is not None and self.popen.poll() is None:
                self.popen.send_signal(sig)
            elif self.aproc is not None and self.aproc.returncode is None:
                self.aproc.send_signal(sig)

    async def wait(self, timeout: float) -> int | None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.returncode()
            if code is not None:
                return code
            await asyncio.sleep(0.05)
        return None

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_DEADLINE) -> bool:  # noqa: ASYNC109
        """Signal it and wait for it; True if it exited in time (else it is killed)."""
        self.expected_exit = True
        self.send_signal(sig)
        if await self.wait(timeout) is not None:
            return True
        self.send_signal(signal.SIGKILL)
        await self.wait(timeout)
        return False


def spawn_logged(
    command: list[str], log_path: Path, stdin: bytes | None
) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a ^C to the soak is not delivered to them directly
        )
    if stdin is not None:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
    return proc


def serving(socket: Path) -> bool:
    """Whether ``socket`` exists and answers its health check with SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if not socket.exists():
        return False
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def wait_healthy(proc: Proc, socket: Path, timeout: float) -> bool:  # noqa: ASYNC109
    """Until the process answers SERVING on ``socket``; False when it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode() is not None:
            return False
        if await asyncio.to_thread(serving, socket):
            return True
        await asyncio.sleep(0.1)
    return False


async def until(condition: Callable[[], bool], timeout: float, every: float = 0.1) -> bool:  # noqa: ASYNC109
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(every)


def open_log(path: Path) -> int:
    """A file descriptor for a child's output (the caller closes it once the child has it)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)


# --- what a workload holds ----------------------------------------------------------------------


@dataclass(frozen=True)
class Svid:
    spiffe_id: str
    serial: str
    issuer: str
    not_before: float
    not_after: float
    chain_ok: bool
    chain_der: bytes
    key_der: bytes
    bundle_der: bytes


def split_der(der: bytes) -> list[bytes]:
    """Concatenated DER certificates, one by one."""
    out = []
    while der:
        if len(der) < 2 or der[0] != 0x30:
            raise ValueError("not a DER certificate")
        size, start = der[1], 2
        if size & 0x80:
            count = size & 0x7F
            size, start = int.from_bytes(der[2 : 2 + count], "big"), 2 + count
        out.append(der[: start + size])
        der = der[start + size :]
    return out


def der_to_pem(der: bytes) -> bytes:
    return b"".join(
        x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM)
        for c in split_der(der)
    )


class Parser:
    """Parses each distinct (chain, bundle) once: every workload of an agent gets the same."""

    def __init__(self) -> None:
        self._cache: dict[tuple[bytes, bytes], tuple[str, str, float, float, bool]] = {}

    def svid(self, item: wpb.X509SVID) -> Svid:
        key = (bytes(item.x509_svid), bytes(item.bundle))
        known = self._cache.get(key)
        if known is None:
            known = self._parse(*key)
            if len(self._cache) > 2048:
                self._cache.clear()
            self._cache[key] = known
        serial, issuer, not_before, not_after, ok = known
        return Svid(
            spiffe_id=item.spiffe_id,
            serial=serial,
            issuer=issuer,
            not_before=not_before,
            not_after=not_after,
            chain_ok=ok,
            chain_der=key[0],
            key_der=bytes(item.x509_svid_key),
            bundle_der=key[1],
        )

    def fetched(self, svid: FetchedX509Svid) -> Svid:
        """The same from what ``WorkloadApiClient.watch_x509_svids`` yields (PEM)."""
        key = (svid.chain_pem, svid.bundle_pem)
        known = self._cache.get(key)
        if known is None:
            known = self._check(
                x509.load_pem_x509_certificates(svid.chain_pem),
                x509.load_pem_x509_certificates(svid.bundle_pem),
            )
            if len(self._cache) > 2048:
                self._cache.clear()
            self._cache[key] = known
        serial, issuer, not_before, not_after, ok = known
        return Svid(svid.spiffe_id, serial, issuer, not_before, not_after, ok, b"", b"", b"")

    @staticmethod
    def _parse(chain_der: bytes, bundle_der: bytes) -> tuple[str, str, float, float, bool]:
        return Parser._check(
            [x509.load_der_x509_certificate(c) for c in split_der(chain_der)],
            [x509.load_der_x509_certificate(c) for c in split_der(bundle_der)],
        )

    @staticmethod
    def _check(
        chain: list[x509.Certificate], roots: list[x509.Certificate]
    ) -> tuple[str, str, float, float, bool]:
        """Serial, issuer, life, and whether the chain verifies up to one of ``roots``."""
        leaf = chain[0]
        ok = True
        try:
            for cert, parent in itertools.pairwise(chain):
                cert.verify_directly_issued_by(parent)
            top = chain[-1]
            anchors = [r for r in roots if r.subject == top.issuer]
            if top in roots:
                pass
            elif not anchors:
                ok = False
            else:
                top.verify_directly_issued_by(anchors[0])
        except (ValueError, TypeError, InvalidSignature):
            ok = False
        return (
            format(leaf.serial_number, "x"),
            leaf.issuer.rfc4514_string(),
            leaf.not_valid_before_utc.timestamp(),
            leaf.not_valid_after_utc.timestamp(),
            ok,
        )


@dataclass
class Workload:
    name: str
    agent: str
    socket: Path
    held: dict[str, Svid] = field(default_factory=dict)
    connected: bool = False
    messages: int = 0
    reconnects: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    gap_since: float | None = None  # when it last stopped holding a valid SVID for each entry
    longest_gap: float = 0.0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # Through WorkloadApiClient.watch_x509_svids (its own reconnects, which it does not report:
    # such a workload is never "connected", so only its gaps are checked).
    library: bool = False


# --- the soak -------------------------------------------------------------------------------------


@dataclass
class Revocation:
    n: int
    agent: str
    spiffe_id: str
    entry_id: str
    kind: str
    target: str
    at: float = 0.0  # when the Revoke call was sent
    returned: float = 0.0
    watcher_at: dict[int, float] = field(default_factory=dict)
    dropped_at: dict[str, float] = field(default_factory=dict)  # workload -> first message without


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path, sockets: Path) -> None:
        self.args = args
        self.work = work
        self.sockets = sockets
        self.rng = random.Random(args.seed)  # the faults' order
        self.jitter = random.Random(args.seed + 1)  # the workloads' reconnect delays
        self.record = Record()
        self.duration = args.minutes * 60.0
        self.stopping = asyncio.Event()
        self.parser = Parser()
        self.uid = os.getuid()
        # the authority's real ports and the proxy's
        self.port, self.mtls_port = free_port(), free_port()
        self.proxy_port, self.proxy_mtls_port = free_port(), free_port()
        self.proxies = [
            Proxy(self.proxy_port, self.port),
            Proxy(self.proxy_mtls_port, self.mtls_port),
        ]
        self.admin_socket = sockets / "admin.sock"
        # What the client library logs in this process (its reconnects), as a process would.
        self.client_log = work / "soak-clients.log"
        self.log_handler = logging.FileHandler(self.client_log)
        self.log_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        logging.getLogger("authority").addHandler(self.log_handler)
        logging.getLogger("authority").setLevel(logging.INFO)
        self.bundle_file = work / "bundle.pem"  # what the agents were first given
        self.authority = Proc("authority")
        self.agents = {name: Proc(f"agent-{name}") for name in AGENTS}
        self.watchers = [Proc(f"watcher-{i + 1}") for i in range(WATCHERS)]
        self.watch_seq = [0] * WATCHERS
        self.watch_seen: list[dict[tuple[str, str], float]] = [{} for _ in range(WATCHERS)]
        self.workloads: list[Workload] = []
        self.entries: dict[str, list[str]] = {}  # agent -> the SPIFFE IDs each workload needs
        self.revoked: dict[str, float] = {}  # SPIFFE ID -> when Revoke was sent
        self.revocations: list[Revocation] = []
        self.exchanges: Counter[str] = Counter()
        self.exchange_samples: dict[str, str] = {}
        self.last_exchange_ok = 0.0
        self.longest_exchange_gap = 0.0
        self.ca_steps: list[dict[str, Any]] = []
        self.samples: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.log_offsets: dict[Path, int] = {}
        self.log_ticks: dict[str, list[tuple[float, int]]] = defaultdict(list)
        self.fault_recoveries: list[dict[str, Any]] = []
        self.health: dict[str, Counter[bool]] = {name: Counter() for name in AGENTS}
        self.measuring = False  # after setup: gaps and samples count
        self.t0 = time.time()  # the start of the measured run (set again after setup)
        self.exits: dict[str, Any] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.following: list[asyncio.Task[None]] = []  # revocations on their way to watchers

    # --- helpers ---

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task of the soak's own; should it fail, the run is not to be trusted: the error is
        a violation (``soak_error``), so the soak cannot pass with a check that stopped."""
        name = getattr(coroutine, "__qualname__", "task")

        async def guarded() -> None:
            try:
                await coroutine
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                tail = traceback.format_exc(limit=-3).strip().splitlines()[-4:]
                self.record.violation("soak_error", name, f"{exc!r}: {tail}")

        return asyncio.create_task(guarded(), name=name)

    def env(self) -> dict[str, str]:
        return {**os.environ, "AUTHORITY_ADMIN_SOCKET": str(self.admin_socket)}

    async def cli(self, *args: str, timeout: float = 60.0) -> tuple[int, str, str]:  # noqa: ASYNC109
        proc = await asyncio.create_subprocess_exec(
            *authority_command(),
            *args,
            env=self.env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return -1, "", "timed out"
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    async def admin(
        self,
        call: Callable[[Any], Awaitable[T]],
        within: float = 40.0,
    ) -> T:
        """An admin call, retried (the authority may be restarting) for ``within`` seconds."""
        deadline = time.monotonic() + within
        while True:
            try:
                async with AdminClient(self.admin_socket) as client:
                    return await call(client.stub)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.25)

    async def node_entry(self, spiffe_id: str, agent: str) -> pb.RegistrationEntry:
        """An entry served by ``agent`` to the processes of this uid, with SVID_TTL SVIDs."""
        request = pb.CreateEntryRequest(
            spiffe_id=spiffe_id,
            selectors=[pb.Selector(type="unix", value=f"uid:{self.uid}")],
            x509_ttl_seconds=SVID_TTL,
            parent_id=agent_id(agent),
        )
        return await self.admin(lambda stub: stub.CreateEntry(request, timeout=RPC_TIMEOUT))

    # --- the authority ---

    def authority_config(self) -> Path:
        path = self.work / "authority.toml"
        path.write_text(
            f'trust_domain = "{TRUST_DOMAIN}"\n'
            f'advertise_mtls = "{LOOPBACK}:{self.proxy_mtls_port}"\n'
        )
        return path

    async def start_authority(self) -> bool:
        a = self.authority
        a.instances += 1
        log = self.work / f"authority-{a.instances}.log"
        a.logs.append(log)
        a.expected_exit = False
        command = [
            *authority_command(), "serve",
            "--config", str(self.authority_config()),
            "--data-dir", str(self.work / "authority-data"),
            "--listen", f"{LOOPBACK}:{self.port}",
            "--listen-mtls", f"{LOOPBACK}:{self.mtls_port}",
            "--admin-socket", str(self.admin_socket),
        ]  # fmt: skip
        a.popen = spawn_logged(command, log, None)
        return await self.started(a, self.admin_socket)

    async def started(self, p: Proc, socket: Path) -> bool:
        """Whether ``p`` serves on ``socket`` within RESTART_DEADLINE (else it is stopped)."""
        p.starting = True
        try:
            if await wait_healthy(p, socket, RESTART_DEADLINE):
                return True
            await p.stop(signal.SIGKILL)
            return False
        finally:
            p.starting = False

    # --- agents ---

    def agent_socket(self, name: str) -> Path:
        return self.sockets / f"agent-{name}.sock"

    async def start_agent(
        self, name: str, token: str | None = None, bundle: Path | None = None
    ) -> bool:
        a = self.agents[name]
        a.instances += 1
        log = self.work / f"agent-{name}-{a.instances}.log"
        a.logs.append(log)
        a.expected_exit = False
        command = [
            *authority_command(), "agent",
            "--server", f"{LOOPBACK}:{self.proxy_port}",
            "--trust-bundle", str(bundle or self.bundle_file),
            "--data-dir", str(self.work / f"agent-{name}"),
            "--workload-api-socket", str(self.agent_socket(name)),
        ]  # fmt: skip
        if token is not None:
            command += ["--join-token", "-"]
        a.popen = spawn_logged(command, log, token.encode() if token is not None else None)
        return await self.started(a, self.agent_socket(name))

    async def restart_agent(self, name: str, why: str) -> None:
        """Start it as its unit file would (the first bundle, no token); when that fails, record
        it and start it with the current bundle, then from scratch, so the soak goes on."""
        if await self.start_agent(name):
            return
        a = self.agents[name]
        self.record.violation(
            "restart_failed",
            f"agent-{name}#{a.instances}",
            f"after {why}: agent with its first --trust-bundle did not serve within "
            f"{RESTART_DEADLINE:.0f}s (exit {a.returncode()}); log: {a.log_tail(8)}",
        )
        _, out, _ = await self.cli("bundle", "show")
        fresh = self.work / f"bundle-now-{a.instances}.pem"
        fresh.write_text(out)
        if await self.start_agent(name, bundle=fresh):
            return
        self.record.violation(
            "restart_failed",
            f"agent-{name}#{a.instances}",
            f"with the current bundle too (exit {a.returncode()}); log: {a.log_tail(8)}",
        )
        # Last resort, so the soak goes on: a fresh data directory and a new join token.
        await asyncio.to_thread(shutil.rmtree, self.work / f"agent-{name}", True)
        created = await self.admin(
            lambda stub: stub.CreateJoinToken(
                pb.CreateJoinTokenRequest(spiffe_id=agent_id(name), ttl_seconds=600),
                timeout=RPC_TIMEOUT,
            )
        )
        self.record.note("agent attested again", agent=name)
        if not await self.start_agent(name, token=created.token, bundle=fresh):
            self.record.violation(
                "restart_failed",
                f"agent-{name}#{a.instances}",
                f"attesting again too (exit {a.returncode()}); log: {a.log_tail(8)}",
            )

    # --- watchers ---

    async def start_watcher(self, i: int) -> None:
        w = self.watchers[i]
        w.instances += 1
        log = self.work / f"watcher-{i + 1}-{w.instances}.log"
        w.logs.append(log)
        w.expected_exit = False
        err = open_log(log)
        try:
            w.aproc = await asyncio.create_subprocess_exec(
                *authority_command(), "watch", "--format", "json",
                "--since", str(self.watch_seq[i]),
                env=self.env(),
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(err)
        self.tasks.append(self.spawn(self.read_watcher(i, w.aproc)))

    async def read_watcher(self, i: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        seen = self.watch_seen[i]
        while line := await proc.stdout.readline():
            now = time.time()
            try:
                event = json.loads(line)
            except ValueError:
                continue
            seen.setdefault((str(event.get("kind")), str(event.get("target"))), now)
            self.watch_seq[i] = max(self.watch_seq[i], int(event.get("seq", 0)))
        await proc.wait()
        w = self.watchers[i]
        if self.stopping.is_set() or w.expected_exit:
            return
        self.record.violation(
            "process_exit",
            f"{w.role}#{w.instances}",
            f"authority watch exited by itself (exit {proc.returncode}); stderr: {w.log_tail(6)}",
        )
        self.record.note("watcher restarted", watcher=w.role, since=self.watch_seq[i])
        await asyncio.sleep(0.5)
        if not self.stopping.is_set():
            await self.start_watcher(i)

    # --- workloads ---

    async def hold(self, w: Workload) -> None:
        """Hold a FetchX509SVID stream; reconnect with backoff and jitter when it breaks."""
        delay = 0.2
        while not self.stopping.is_set():
            client = WorkloadApiClient(w.socket)
            call = client.stub.FetchX509SVID(
                wpb.X509SVIDRequest(), metadata=WorkloadApiClient.HEADER
            )
            try:
                async for reply in call:
                    self.on_message(w, reply)
                    delay = 0.2
                w.errors["EOF"] += 1
            except grpc.aio.AioRpcError as exc:
                w.errors[exc.code().name] += 1
            finally:
                w.connected = False
                call.cancel()
                await client.close()
            w.reconnects += 1
            await asyncio.sleep(self.jitter.uniform(delay / 2, delay))
            delay = min(2.0, delay * 2)

    async def hold_library(self, w: Workload) -> None:
        """The same through the client library's own reconnecting stream."""
        async with WorkloadApiClient(w.socket) as client:
            async for svids in client.watch_x509_svids():
                w.messages += 1
                self.receive(w, [self.parser.fetched(s) for s in svids])

    def on_message(self, w: Workload, reply: wpb.X509SVIDResponse) -> None:
        w.messages += 1
        w.connected = True
        self.receive(w, [self.parser.svid(item) for item in reply.svids])

    def receive(self, w: Workload, svids: list[Svid]) -> None:
        now = time.time()
        held = {}
        for svid in svids:
            held[svid.spiffe_id] = svid
            if svid.not_after < now:
                self.record.violation(
                    "served_expired",
                    f"{w.name}:{svid.spiffe_id}:{svid.serial}",
                    f"agent-{w.agent} sent an SVID {now - svid.not_after:.1f}s past its not_after",
                )
            if not svid.chain_ok:
                self.record.violation(
                    "bad_chain",
                    f"{w.name}:{svid.serial}",
                    f"agent-{w.agent} sent {svid.spiffe_id} (issuer {svid.issuer}) with a bundle "
                    "that does not verify it",
                )
        for r in self.revocations:
            gone = r.spiffe_id in w.held and r.spiffe_id not in held
            if gone and r.at and w.name not in r.dropped_at:
                r.dropped_at[w.name] = now
        w.held = held
        if not w.ready.is_set() and all(s in held for s in self.entries[w.agent]):
            w.ready.set()

    def check(self) -> None:
        now = time.time()
        for w in self.workloads:
            valid = True
            for spiffe_id in self.entries[w.agent]:
                svid = w.held.get(spiffe_id)
                if svid is None or not (
                    svid.not_before - 1 <= now < svid.not_after and svid.chain_ok
                ):
                    valid = False
            for svid in w.held.values():
                if w.connected and now > svid.not_after + EXPIRY_GRACE:
                    self.record.violation(
                        "expired_held",
                        f"{w.name}:{svid.spiffe_id}:{svid.serial}",
                        f"connected to agent-{w.agent}, holds an SVID expired "
                        f"{now - svid.not_after:.1f}s ago (not rotated, not dropped)",
                    )
                revoked_at = self.revoked.get(svid.spiffe_id)
                if w.connected and revoked_at and now > revoked_at + REVOCATION_GRACE:
                    self.record.violation(
                        "revoked_held",
                        f"{w.name}:{svid.spiffe_id}",
                        f"connected to agent-{w.agent}, still holds {svid.spiffe_id} "
                        f"{now - revoked_at:.1f}s after its revocation",
                    )
            if not self.measuring:
                continue
            if valid:
                if w.gap_since is not None:
                    w.longest_gap = max(w.longest_gap, now - w.gap_since)
                    w.gap_since = None
            elif w.gap_since is None:
                w.gap_since = now
            elif now - w.gap_since > OUTAGE_BOUND:
                self.record.violation(
                    "no_valid_svid",
                    f"{w.name}@{self.record.at(w.gap_since)}",
                    f"without a valid SVID for each of agent-{w.agent}'s entries for "
                    f"{now - w.gap_since:.1f}s (connected={w.connected}, held="
                    f"{self.describe_held(w, now)})",
                )

    def describe_held(self, w: Workload, now: float) -> str:
        return ", ".join(
            f"{s.spiffe_id.rsplit('/', 1)[-1]}:{s.serial[:8]} expires {s.not_after - now:+.0f}s"
            for s in w.held.values()
        )

    async def checker(self) -> None:
        while not self.stopping.is_set():
            self.check()
            self.check_processes()
            await asyncio.sleep(CHECK_EVERY)

    def check_processes(self) -> None:
        for p in (self.authority, *self.agents.values()):
            code = p.returncode()
            if code is None or p.starting or p.expected_exit or self.stopping.is_set():
                continue
            p.expected_exit = True  # reported once; restarted below
            self.record.violation(
                "process_exit",
                f"{p.role}#{p.instances}",
                f"exited by itself (exit {code}); log: {p.log_tail(8)}",
            )
            self.tasks.append(self.spawn(self.revive(p)))

    async def revive(self, p: Proc) -> None:
        if p is self.authority:
            if not await self.start_authority():
                self.record.violation(
                    "restart_failed", f"authority#{p.instances}", f"log: {p.log_tail(8)}"
                )
            return
        name = p.role.split("-", 1)[1]
        await self.restart_agent(name, "it exited")

    # --- Exchange load ---

    async def exchange_load(self) -> None:
        # One client per (SVID, bundle) held: a workload builds its TLS from what it was sent.
        clients: dict[tuple[str, bytes], WorkloadClient] = {}
        period = 1.0 / self.args.exchanges_per_second
        n = 0
        request = pb.ExchangeRequest(
            intent=pb.Intent(action="read", resource="metrics/prod", purpose="soak"),
            audience="metrics-api",
        )
        raw = [w for w in self.workloads if not w.library]  # those that hold the keys as sent
        try:
            while not self.stopping.is_set():
                began = time.monotonic()
                w = raw[n % len(raw)]
                n += 1
                svid = w.held.get(self.entries[w.agent][0])
                if svid is not None and svid.not_after > time.time():
                    key = (svid.serial, svid.bundle_der)
                    client = clients.get(key)
                    if client is None:
                        held = self.held_svids()
                        for gone in [k for k in clients if k not in held]:
                            await clients.pop(gone).close()
                        client = WorkloadClient(
                            f"{LOOPBACK}:{self.proxy_port}",
                            der_to_pem(svid.bundle_der),
                            svid_chain_pem=der_to_pem(svid.chain_der),
                            svid_key_pem=key_pem(svid.key_der),
                        )
                        clients[key] = client
                    await self.exchange_once(client, request)
                await asyncio.sleep(max(0.0, period - (time.monotonic() - began)))
        finally:
            for client in clients.values():
                await client.close()

    def held_svids(self) -> set[tuple[str, bytes]]:
        return {(s.serial, s.bundle_der) for w in self.workloads for s in w.held.values()}

    async def exchange_once(self, client: WorkloadClient, request: pb.ExchangeRequest) -> None:
        try:
            stub = await client.mtls_stub()
            response = await stub.Exchange(request, timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            self.exchanges[code] += 1
            self.exchange_samples.setdefault(code, (exc.details() or "")[:200])
            return
        if response.WhichOneof("result") != "token":
            self.exchanges["NOT_ISSUED"] += 1
            return
        self.exchanges["OK"] += 1
        now = time.time()
        if self.measuring and self.last_exchange_ok:
            self.longest_exchange_gap = max(self.longest_exchange_gap, now - self.last_exchange_ok)
        self.last_exchange_ok = now

    async def exchange_watchdog(self) -> None:
        while not self.stopping.is_set():
            await asyncio.sleep(1.0)
            now = time.time()
            if self.measuring and self.last_exchange_ok:
                gap = now - self.last_exchange_ok
                self.longest_exchange_gap = max(self.longest_exchange_gap, gap)
                if gap > EXCHANGE_OUTAGE_BOUND:
                    self.record.violation(
                        "exchange_outage",
                        f"@{self.record.at(self.last_exchange_ok)}",
                        f"no Exchange succeeded for {gap:.0f}s; errors so far "
                        f"{dict(self.exchanges)}, samples {self.exchange_samples}",
                    )

    # --- revocations ---

    async def revoker(self) -> None:
        n = 0
        await self.sleep_until(10.0)
        while not self.stopping.is_set():
            began = time.monotonic()
            n += 1
            await self.revoke_one(n, AGENTS[n % len(AGENTS)])
            await self.sleep(self.args.revoke_every - (time.monotonic() - began))

    async def revoke_one(self, n: int, agent: str) -> None:
        spiffe_id = f"spiffe://{TRUST_DOMAIN}/agent/soak/{agent}/rev-{n}"
        try:
            entry = await self.node_entry(spiffe_id, agent)
        except grpc.aio.AioRpcError as exc:
            self.record.note("entry create failed", spiffe_id=spiffe_id, code=exc.code().name)
            return
        mine = [w for w in self.workloads if w.agent == agent]
        await until(lambda: all(spiffe_id in w.held for w in mine), ENTRY_DEADLINE)
        missing = [w.name for w in mine if spiffe_id not in w.held]
        if missing:
            self.record.violation(
                "entry_not_served",
                spiffe_id,
                f"{len(missing)} workloads of agent-{agent} did not hold it within "
                f"{ENTRY_DEADLINE:.0f}s: {missing[:4]}...",
            )
        kind, target = ("entry", entry.id) if n % 2 else ("subject", spiffe_id)
        r = Revocation(n, agent, spiffe_id, entry.id, kind, target)
        self.revocations.append(r)
        r.at = time.time()
        self.revoked[spiffe_id] = r.at
        try:
            await self.admin(
                lambda stub: stub.Revoke(
                    pb.RevokeRequest(kind=kind, target=target, reason="soak"), timeout=RPC_TIMEOUT
                )
            )
        except grpc.aio.AioRpcError as exc:
            self.record.note("revoke failed", target=spiffe_id, code=exc.code().name)
            self.revocations.remove(r)
            return
        r.returned = time.time()
        self.revoked[spiffe_id] = r.returned
        for w in mine:  # those that never held it have nothing to drop
            if spiffe_id not in w.held:
                r.dropped_at.setdefault(w.name, r.at)
        self.following.append(self.spawn(self.follow(r)))

    async def follow(self, r: Revocation) -> None:
        """Until every watcher printed ``r`` (or its deadline passed)."""
        deadline = r.returned + WATCH_DEADLINE
        while time.time() < deadline:
            for i in range(WATCHERS):
                got = self.watch_seen[i].get((r.kind, r.target))
                if got is not None:
                    r.watcher_at[i] = got
            if len(r.watcher_at) == WATCHERS:
                return
            await asyncio.sleep(0.1)
        missing = [self.watchers[i].role for i in range(WATCHERS) if i not in r.watcher_at]
        self.record.violation(
            "revocation_missed",
            f"{r.kind}:{r.spiffe_id}",
            f"not printed by {missing} within {WATCH_DEADLINE:.0f}s of Revoke returning",
        )

    # --- CA rotation ---

    async def rotator(self) -> None:
        await self.sleep_until(self.args.rotate_every)
        while not self.stopping.is_set():
            began = time.monotonic()
            deadline = time.monotonic() + 40.0  # the authority may be restarting
            while True:
                sent = time.time()  # the command's start: propagation is counted from here
                code, _, err = await self.cli("ca", "rotate", "--format", "json")
                if code == 0 or time.monotonic() > deadline or self.stopping.is_set():
                    break
                await asyncio.sleep(1.0)
            if code != 0:
                self.record.note("ca rotate failed", exit=code, stderr=err.strip()[-300:])
            else:
                await self.after_rotation(sent)
            await self.sleep(self.args.rotate_every - (time.monotonic() - began))

    async def after_rotation(self, began: float) -> None:
        listed = await self.admin(
            lambda stub: stub.ListAuthorities(pb.ListAuthoritiesRequest(), timeout=RPC_TIMEOUT)
        )
        x509s = [a for a in listed.authorities if a.kind == "x509"]
        active = [a for a in x509s if a.state == "active"]
        prepared = [a for a in x509s if a.state == "prepared"]
        step = {"at_s": self.record.at(), "step": "prepare" if prepared else "activate"}
        self.ca_steps.append(step)
        self.record.note("ca rotate", step=step["step"])
        if prepared or not active:
            return
        subject = x509.load_der_x509_certificate(
            active[0].x509_certificate
        ).subject.rfc4514_string()
        deadline = time.monotonic() + CA_DEADLINE
        while time.monotonic() < deadline:
            if all(
                all(w.held.get(s) and w.held[s].issuer == subject for s in self.entries[w.agent])
                for w in self.workloads
            ):
                step["propagated_s"] = round(time.time() - began, 2)
                return
            await asyncio.sleep(0.2)
        lagging = [
            w.name
            for w in self.workloads
            if not all(w.held.get(s) and w.held[s].issuer == subject for s in self.entries[w.agent])
        ]
        self.record.violation(
            "ca_not_propagated",
            f"activate@{step['at_s']}",
            f"{len(lagging)} workloads still hold SVIDs of the previous key after "
            f"{CA_DEADLINE:.0f}s: {lagging[:4]}",
        )

    # --- faults ---

    def fault_order(self) -> list[str]:
        kinds = list(FAULT_KINDS)
        self.rng.shuffle(kinds)
        return kinds

    async def faulter(self) -> None:
        order: list[str] = []
        k = 0
        while True:
            k += 1
            at = k * self.args.fault_every
            if at > self.duration - self.args.fault_every / 2:  # the end is quiet
                return
            await self.sleep_until(at)
            if self.stopping.is_set():
                return
            if not order:
                order = self.fault_order()
            kind = order.pop(0)
            began = time.time()
            target = await self.inject(kind, k)
            self.record.faults[kind] += 1
            self.record.fault_log.append(
                {"at_s": self.record.at(began), "kind": kind, "target": target,
                 "took_s": round(time.time() - began, 2)}
            )  # fmt: skip
            self.tasks.append(self.spawn(self.recovery(kind, target, began)))

    async def inject(self, kind: str, k: int) -> str:
        self.record.note("fault", kind=kind)
        if kind in ("authority_sigkill", "authority_sigterm", "authority_outage"):
            a = self.authority
            if kind != "authority_sigterm":
                await a.stop(signal.SIGKILL)
                if kind == "authority_outage":
                    await asyncio.sleep(OUTAGE_SECONDS)
            elif not await a.stop(signal.SIGTERM):
                self.record.violation(
                    "stop_slow", f"authority#{a.instances}", f"log: {a.log_tail(8)}"
                )
            if not await self.start_authority():
                self.record.violation(
                    "restart_failed", f"authority#{a.instances}", f"log: {a.log_tail(8)}"
                )
            return "authority"
        if kind in ("agent_sigkill", "agent_sigterm"):
            name = AGENTS[k % len(AGENTS)]
            a = self.agents[name]
            if kind == "agent_sigkill":
                await a.stop(signal.SIGKILL)
            elif not await a.stop(signal.SIGTERM):
                self.record.violation("stop_slow", f"{a.role}#{a.instances}", str(a.log_tail(8)))
            await self.restart_agent(name, kind)
            return a.role
        if kind == "feed_cut":
            cut = sum(p.cut(FEED_CUT_SECONDS) for p in self.proxies)
            self.record.note("proxy cut", connections=cut)
            await asyncio.sleep(FEED_CUT_SECONDS)
            return "proxy"
        if kind == "watcher_kill":
            i = k % WATCHERS
            await self.watchers[i].stop(signal.SIGKILL)
            await self.start_watcher(i)
            return self.watchers[i].role
        raise ValueError(kind)

    async def recovery(self, kind: str, target: str, began: float) -> None:
        """How long after the fault every workload held valid SVIDs again, over a connected
        stream (the no_valid_svid check bounds it)."""
        figures: dict[str, Any] = {
            "kind": kind, "target": target, "at_s": self.record.at(began), "recovered_s": None
        }  # fmt: skip
        self.fault_recoveries.append(figures)
        deadline = time.monotonic() + RECOVERY_DEADLINE
        await asyncio.sleep(0.5)
        while not self.stopping.is_set():
            now = time.time()
            if all(w.library or (w.connected and not w.gap_since) for w in self.workloads):
                figures["recovered_s"] = round(now - began, 2)
                return
            if time.monotonic() > deadline:
                lagging = [
                    w.name
                    for w in self.workloads
                    if not w.library and (not w.connected or w.gap_since)
                ]
                self.record.violation(
                    "slow_recovery",
                    f"{kind}@{figures['at_s']}",
                    f"{len(lagging)} workloads not connected with valid SVIDs "
                    f"{RECOVERY_DEADLINE:.0f}s after the fault: {lagging[:4]}",
                )
                return
            await asyncio.sleep(0.1)

    # --- resources and logs ---

    def sample(self) -> None:
        now = time.time()
        roles: list[tuple[str, int | None]] = [("soak", os.getpid())]
        roles += [(p.role, p.pid) for p in (self.authority, *self.agents.values(), *self.watchers)]
        for role, pid in roles:
            if pid is None:
                continue
            with contextlib.suppress(OSError, ValueError, KeyError):  # gone, or a zombie
                status = Path(f"/proc/{pid}/status").read_text()
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                self.samples[role].append(
                    {
                        "at_s": self.record.at(now),
                        "pid": pid,
                        "rss_kib": int(fields["VmRSS"].split()[0]),
                        "threads": int(fields["Threads"]),
                        "fds": len(os.listdir(f"/proc/{pid}/fd")),
                        "cpu_s": round(cpu_seconds(pid), 2),
                    }
                )
        logs = [(p.role, p.logs) for p in (self.authority, *self.agents.values(), *self.watchers)]
        for role, paths in [*logs, ("soak", [self.client_log])]:
            count = 0
            for log in paths:
                offset = self.log_offsets.get(log, 0)
                with contextlib.suppress(OSError), open(log, "rb") as f:
                    f.seek(offset)
                    data = f.read()
                    self.log_offsets[log] = offset + len(data)
                    count += data.count(b"\n")
            self.log_ticks[role].append((now, count))

    async def prober(self) -> None:
        """Each agent's health check, every second: SERVING while its workloads have been
        without valid SVIDs past OUTAGE_BOUND is a lie (``health_serving``)."""
        while not self.stopping.is_set():
            now = time.time()
            for name, a in self.agents.items():
                if a.pid is None or a.starting:
                    continue
                ok = await asyncio.to_thread(serving, self.agent_socket(name))
                self.health[name][ok] += 1
                # The soak's own streams (the library's may be waiting out its own backoff).
                mine = [w for w in self.workloads if w.agent == name and not w.library]
                stale = [w for w in mine if w.gap_since and now - w.gap_since > OUTAGE_BOUND]
                if ok and stale:
                    self.record.violation(
                        "health_serving",
                        f"agent-{name}#{a.instances}",
                        f"health SERVING while {len(stale)} of its workloads have been without "
                        f"a valid SVID for more than {OUTAGE_BOUND:.0f}s",
                    )
            await self.sleep(1.0)

    async def sampler(self) -> None:
        while not self.stopping.is_set():
            self.sample()
            await asyncio.sleep(SAMPLE_EVERY)

    # --- timing ---

    async def sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), max(0.0, seconds))

    async def sleep_until(self, at: float) -> None:
        await self.sleep(self.t0 + at - time.time())

    # --- the run ---

    async def setup(self) -> None:
        for proxy in self.proxies:
            await proxy.start()
        if not await self.start_authority():
            raise BenchError(f"the authority did not start: {self.authority.log_tail()}")
        code, _, err = await self.cli("policy", "load", str(POLICY))
        if code != 0:
            raise BenchError(f"policy load failed: {err.strip()}")
        code, out, err = await self.cli("bundle", "show")
        if code != 0:
            raise BenchError(f"bundle show failed: {err.strip()}")
        self.bundle_file.write_text(out)
        for name in AGENTS:
            self.entries[name] = [base_id(name, i) for i in range(ENTRIES_PER_AGENT)]
            for spiffe_id in self.entries[name]:
                await self.node_entry(spiffe_id, name)
            # The agent's own SVID: short, so its renewals meet its entries' rotations often.
            await self.admin(
                lambda stub, n=name: stub.CreateEntry(
                    pb.CreateEntryRequest(
                        spiffe_id=agent_id(n),
                        selectors=[
                            pb.Selector(type="join_token", value=f"spiffe_id:{agent_id(n)}")
                        ],
                        x509_ttl_seconds=AGENT_SVID_TTL,
                    ),
                    timeout=RPC_TIMEOUT,
                )
            )
            created = await self.admin(
                lambda stub, n=name: stub.CreateJoinToken(
                    pb.CreateJoinTokenRequest(spiffe_id=agent_id(n), ttl_seconds=600),
                    timeout=RPC_TIMEOUT,
                )
            )
            if not await self.start_agent(name, token=created.token):
                raise BenchError(f"agent-{name} did not start: {self.agents[name].log_tail()}")
        for i in range(WATCHERS):
            await self.start_watcher(i)
        for i in range(self.args.workloads):
            name = AGENTS[i % len(AGENTS)]
            self.workloads.append(Workload(f"w{i:02d}", name, self.agent_socket(name)))
        for i in range(self.args.library_workloads):
            name = AGENTS[i % len(AGENTS)]
            self.workloads.append(
                Workload(f"lib{i:02d}", name, self.agent_socket(name), library=True)
            )
        self.tasks += [
            self.spawn(self.hold_library(w) if w.library else self.hold(w)) for w in self.workloads
        ]
        self.tasks.append(self.spawn(self.checker()))
        async with asyncio.timeout(60):
            await asyncio.gather(*(w.ready.wait() for w in self.workloads))

    async def run(self) -> int:
        try:
            await self.setup()
        except (BenchError, TimeoutError, grpc.aio.AioRpcError) as exc:
            print(f"setup failed: {exc!r}", file=sys.stderr)
            await self.teardown()
            return 2
        self.t0 = time.time()
        self.record.started = self.t0
        self.record.note("setup done", workloads=len(self.workloads))
        self.sample()  # the start figures
        self.measuring = True
        self.last_exchange_ok = 0.0
        workers = [
            self.spawn(self.exchange_load()),
            self.spawn(self.exchange_watchdog()),
            self.spawn(self.sampler()),
            self.spawn(self.prober()),
            self.spawn(self.revoker()),
            self.spawn(self.rotator()),
            self.spawn(self.faulter()),
        ]
        await self.sleep_until(self.duration)
        # The last fault finishes (its restart done), the last revocations reach the watchers;
        # then the checks close.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(workers[-1]), 2 * RESTART_DEADLINE)
        await asyncio.gather(*self.following, return_exceptions=True)
        self.stopping.set()
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self.sample()
        self.check()
        code, out, err = await self.cli("audit", "verify")
        audit = {"exit": code, "output": (out + err).strip()[-400:]}
        if code != 0:
            self.record.violation("audit_verify", "end", audit["output"])
        await self.teardown()
        report = self.report(audit)
        self.check_resources(report)
        report["violations"] = self.record.violations
        report["violation_count"] = len(self.record.violations)
        self.write(report)
        return 1 if self.record.violations else 0

    async def teardown(self) -> None:
        self.stopping.set()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        # Watchers and agents first (in parallel), the authority last.
        exits: dict[str, Any] = {}
        for group in ([*self.watchers, *self.agents.values()], [self.authority]):
            live = [p for p in group if p.pid is not None]
            stopped = await asyncio.gather(*(p.stop() for p in live))
            exits.update({p.role: ok for p, ok in zip(live, stopped, strict=True)})
            for p, ok in zip(live, stopped, strict=True):
                if not ok:
                    self.record.violation("stop_slow", f"{p.role}#{p.instances}", "at the end")
        for proxy in self.proxies:
            await proxy.close()
        logging.getLogger("authority").removeHandler(self.log_handler)
        self.log_handler.close()
        self.exits = exits

    # --- the report ---

    def report(self, audit: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        for w in self.workloads:
            if w.gap_since is not None:
                w.longest_gap = max(w.longest_gap, now - w.gap_since)
        watch_latencies = [
            at - r.at for r in self.revocations for at in r.watcher_at.values()
        ]  # fmt: skip
        drop_latencies = [
            at - r.at for r in self.revocations for at in r.dropped_at.values() if at > r.at
        ]
        missed = sum(WATCHERS - len(r.watcher_at) for r in self.revocations)
        longest = max(self.workloads, key=lambda w: w.longest_gap)
        resources = {}
        for role, samples in sorted(self.samples.items()):
            # Once warm (start-up done): the most of each figure over START_WINDOW seconds
            # (threads and fds come and go with connections), against the last sample.
            warm = [s for s in samples if WARMUP <= s["at_s"] <= WARMUP + START_WINDOW]
            warm = warm or samples[:1]
            start = {
                "at_s": warm[0]["at_s"],
                **{k: max(s[k] for s in warm) for k in ("rss_kib", "fds", "threads")},
            }
            resources[role] = {
                "start": start,
                "end": samples[-1],
                "cpu_percent": cpu_share(samples),
                "max_rss_kib": max(s["rss_kib"] for s in samples),
                "instances": len({s["pid"] for s in samples}),
            }
        logs = {}
        for role, ticks in sorted(self.log_ticks.items()):
            total = sum(c for _, c in ticks)
            window = max(
                (sum(c for t, c in ticks if t0 - 60 < t <= t0) for t0, _ in ticks), default=0
            )
            logs[role] = {
                "lines": total,
                "per_minute_mean": round(total / max(1.0, self.duration / 60), 1),
                "max_in_60s": window,
                "bound_per_minute": self.log_bound(role),
            }
        return {
            "minutes": self.args.minutes,
            "seed": self.args.seed,
            "workloads": len(self.workloads),
            "library_workloads": sum(w.library for w in self.workloads),
            "bounds": {
                "svid_ttl_s": SVID_TTL,
                "expiry_grace_s": EXPIRY_GRACE,
                "revocation_grace_s": REVOCATION_GRACE,
                "outage_bound_s": OUTAGE_BOUND,
                "entry_deadline_s": ENTRY_DEADLINE,
                "watch_deadline_s": WATCH_DEADLINE,
                "ca_deadline_s": CA_DEADLINE,
                "exchange_outage_bound_s": EXCHANGE_OUTAGE_BOUND,
                "restart_deadline_s": RESTART_DEADLINE,
                "stop_deadline_s": STOP_DEADLINE,
                "log_lines_per_minute": LOG_LINES_PER_MINUTE,
                "authority_log_lines_per_exchange_per_second": LOG_LINES_PER_EXCHANGE_RATE,
                "recovery_deadline_s": RECOVERY_DEADLINE,
                "rss_tolerance": {"factor": RSS_TOLERANCE[0], "plus_kib": RSS_TOLERANCE[1]},
                "fd_tolerance": FD_TOLERANCE,
                "thread_tolerance": THREAD_TOLERANCE,
            },
            "fault_kinds": list(FAULT_KINDS),
            "faults": dict(sorted(self.record.faults.items())),
            "fault_count": sum(self.record.faults.values()),
            "fault_log": self.record.fault_log,
            "fault_recoveries": self.fault_recoveries,
            "longest_without_valid_svid_s": round(longest.longest_gap, 2),
            "longest_without_valid_svid_workload": longest.name,
            "without_valid_svid_by_workload_s": {
                w.name: round(w.longest_gap, 2) for w in self.workloads if w.longest_gap > 0
            },
            "revocations": len(self.revocations),
            "revocations_missed": missed,
            "watch_latency_s": {
                "p50": round(percentile(watch_latencies, 0.5), 3) if watch_latencies else None,
                "p99": round(percentile(watch_latencies, 0.99), 3) if watch_latencies else None,
                "max": round(max(watch_latencies), 3) if watch_latencies else None,
                "n": len(watch_latencies),
            },
            "stream_drop_latency_s": {
                "p50": round(percentile(drop_latencies, 0.5), 3) if drop_latencies else None,
                "p99": round(percentile(drop_latencies, 0.99), 3) if drop_latencies else None,
                "n": len(drop_latencies),
            },
            "ca_rotations": self.ca_steps,
            "exchanges": dict(self.exchanges),
            "exchange_error_samples": self.exchange_samples,
            "longest_without_exchange_s": round(self.longest_exchange_gap, 2),
            "workload_stream_errors": dict(sum((w.errors for w in self.workloads), Counter())),
            "workload_reconnects": sum(w.reconnects for w in self.workloads),
            "audit_verify": audit,
            "agent_health_checks": {
                f"agent-{name}": {"serving": c[True], "not_serving": c[False]}
                for name, c in self.health.items()
            },
            "resources": resources,
            "log_lines": logs,
            "process_instances": {
                p.role: p.instances for p in (self.authority, *self.agents.values(), *self.watchers)
            },
            "stopped_in_time_at_end": self.exits,
            "events": self.record.events,
        }

    def log_bound(self, role: str) -> int:
        extra = LOG_LINES_PER_EXCHANGE_RATE * self.args.exchanges_per_second
        return LOG_LINES_PER_MINUTE + round(extra if role == "authority" else 0)

    def check_resources(self, report: dict[str, Any]) -> None:
        for role, figures in report["resources"].items():
            start, end = figures["start"], figures["end"]
            factor, plus = RSS_TOLERANCE
            if end["rss_kib"] > start["rss_kib"] * factor + plus:
                self.record.violation(
                    "resource_growth",
                    f"{role}:rss",
                    f"RSS {start['rss_kib']} -> {end['rss_kib']} KiB",
                )
            if end["fds"] > start["fds"] + FD_TOLERANCE:
                self.record.violation(
                    "resource_growth", f"{role}:fds", f"open fds {start['fds']} -> {end['fds']}"
                )
            if end["threads"] > start["threads"] + THREAD_TOLERANCE:
                self.record.violation(
                    "resource_growth",
                    f"{role}:threads",
                    f"threads {start['threads']} -> {end['threads']}",
                )
        for role, figures in report["log_lines"].items():
            if figures["max_in_60s"] > figures["bound_per_minute"]:
                self.record.violation(
                    "log_rate",
                    role,
                    f"{figures['max_in_60s']} lines in 60 s (bound {figures['bound_per_minute']})",
                )

    def write(self, report: dict[str, Any]) -> None:
        if self.args.report:
            Path(self.args.report).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(summary(report), flush=True)


def cpu_share(samples: list[dict[str, Any]]) -> float:
    """CPU used over the samples, in % of one core (summed over the role's instances)."""
    used = 0.0
    by_pid: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for sample in samples:
        by_pid[sample["pid"]].append(sample)
    for same in by_pid.values():
        used += same[-1]["cpu_s"] - same[0]["cpu_s"]
    span = samples[-1]["at_s"] - samples[0]["at_s"]
    return round(100 * used / span, 1) if span > 0 else 0.0


def key_pem(der: bytes) -> bytes:
    key = serialization.load_der_private_key(der, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def summary(report: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        return "-" if missing else f"{value}"

    lines = [
        f"soak: {report['minutes']} min, seed {report['seed']}, {report['workloads']} workloads "
        f"({report['library_workloads']} through watch_x509_svids), {WATCHERS} watchers, 2 agents",
        f"faults injected: {report['fault_count']} {report['faults']}",
        f"violations: {report['violation_count']}",
    ]
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for v in report["violations"]:
        by_kind[v["kind"]].append(v)
    for kind, found in by_kind.items():
        lines.append(f"  {kind}: {len(found)}")
        for v in found[:3]:
            lines.append(f"    - {v['subject']} at {v['at_s']}s: {v['detail'][:300]}")
    watch, drop = report["watch_latency_s"], report["stream_drop_latency_s"]
    lines += [
        f"longest without a valid SVID: {report['longest_without_valid_svid_s']}s "
        f"(bound {OUTAGE_BOUND:.0f}s)",
        f"revocations: {report['revocations']}, missed by watchers: "
        f"{report['revocations_missed']}; to watchers p50 {fmt(watch['p50'])}s "
        f"p99 {fmt(watch['p99'])}s; off workload streams p50 {fmt(drop['p50'])}s "
        f"p99 {fmt(drop['p99'])}s",
        "CA rotation steps (step, seconds to every workload): "
        f"{[(s['step'], s.get('propagated_s')) for s in report['ca_rotations']]}",
        f"exchanges: {report['exchanges']}, longest without one: "
        f"{report['longest_without_exchange_s']}s",
        f"audit verify: exit {report['audit_verify']['exit']}",
        f"agent health checks: {report['agent_health_checks']}",
        "processes (start -> end: RSS MiB, fds, threads; instances; CPU % of a core; log lines: "
        "mean/min, max in 60 s):",
    ]
    for role, r in report["resources"].items():
        s, e = r["start"], r["end"]
        logs = report["log_lines"].get(role, {})
        lines.append(
            f"  {role:10} {s['rss_kib'] / 1024:6.1f} -> {e['rss_kib'] / 1024:6.1f}  "
            f"{s['fds']:3} -> {e['fds']:3}  {s['threads']:3} -> {e['threads']:3}  "
            f"x{r['instances']}  {r['cpu_percent']:5.1f}%  "
            + (f"{logs['per_minute_mean']}/min, {logs['max_in_60s']}" if logs else "")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--report", help="write the report (JSON) here")
    parser.add_argument("--workloads", type=int, default=24)
    parser.add_argument(
        "--library-workloads",
        type=int,
        default=4,
        help="more, through WorkloadApiClient.watch_x509_svids (only their gaps are checked)",
    )
    parser.add_argument("--exchanges-per-second", type=float, default=2.0)
    parser.add_argument("--fault-every", type=float, help="seconds (default: 20, or 45 past 5 min)")
    parser.add_argument("--rotate-every", type=float, help="seconds (default: 40, or 150)")
    parser.add_argument("--revoke-every", type=float, help="seconds (default: 15, or 30)")
    parser.add_argument("--keep", type=Path, help="copy the work folder (logs, data) here")
    args = parser.parse_args()
    if args.minutes <= 0 or args.workloads < 2:
        parser.error("--minutes must be positive and --workloads at least 2")
    long_run = args.minutes > 5
    args.fault_every = args.fault_every or (45.0 if long_run else 20.0)
    args.rotate_every = args.rotate_every or (150.0 if long_run else 40.0)
    args.revoke_every = args.revoke_every or (30.0 if long_run else 15.0)

    async def go() -> int:
        with bench_dirs("soak-", "sk-") as (work, sockets):
            soak = Soak(args, work, sockets)
            try:
                return await soak.run()
            finally:
                if args.keep:
                    await asyncio.to_thread(shutil.copytree, work, args.keep, dirs_exist_ok=True)
                    print(f"work folder copied to {args.keep}")

    try:
        code = asyncio.run(go())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
