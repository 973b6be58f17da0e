"""The plumbing the benchmark scripts share: the authority as a subprocess, load processes driven
over pipes, CPU and memory from /proc, percentiles and the environment a run describes.

Imported as ``_benchlib`` from the scripts next to it: ``python scripts/bench_x.py`` puts this
folder first on ``sys.path``, and the load processes (spawned by multiprocessing) are given the
parent's ``sys.path``, so they import it too. Nothing here prints tokens or keys.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc

LOOPBACK = "127.0.0.1"
TRUST_DOMAIN = "example.org"
READY_TIMEOUT = 30.0  # for the authority to answer its health check
STOP_TIMEOUT = 15.0  # for a subprocess to exit after SIGTERM (and again after SIGKILL)
RPC_TIMEOUT = 10.0
EXAMPLE_POLICY = Path(__file__).resolve().parent.parent / "examples" / "policies"
# Every channel: no HTTP proxy (traffic stays on loopback), its own connection.
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.use_local_subchannel_pool", 1),
]
# The same, reconnecting quickly: for streams held open while the server is busy.
RECONNECTING_CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

Init = TypeVar("Init")
T = TypeVar("T")


class BenchError(Exception):
    """The benchmark could not run (the server did not start, setup failed...)."""


# --- temporary folders -----------------------------------------------------------------------


@contextlib.contextmanager
def bench_dirs(prefix: str, socket_prefix: str) -> Iterator[tuple[Path, Path]]:
    """(work folder, socket folder), both removed on exit. The socket folder is directly under
    /tmp: a Unix socket's path must stay short (108 bytes on Linux)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    socket_dir = Path(tempfile.mkdtemp(prefix=socket_prefix, dir="/tmp"))
    try:
        yield work, socket_dir
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


# --- subprocesses: the authority, its agent --------------------------------------------------


def free_port() -> int:
    """A TCP port on the loopback address nothing listens on now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def authority_command() -> list[str]:
    """The ``authority`` console script next to this Python, else ``python -m authority``."""
    script = Path(sys.executable).parent / "authority"
    return [str(script)] if script.exists() else [sys.executable, "-m", "authority"]


@dataclass
class ChildProcess:
    """A subprocess writing its output to a log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def check_alive(self) -> None:
        """Raise BenchError, with the end of the log, when the process has exited."""
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=STOP_TIMEOUT)


def spawn(name: str, command: Sequence[str], log_path: Path, stdin: bytes = b"") -> ChildProcess:
    """Start ``command`` with stdout and stderr to ``log_path``; ``stdin`` written, then closed."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if stdin:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
    return ChildProcess(name, proc, log_path)


@dataclass
class AuthorityServer(ChildProcess):
    """``authority serve`` on two loopback ports and an admin socket."""

    tls_address: str
    mtls_address: str
    admin_socket: Path
    local_socket: Path | None = None  # the local (Unix-socket) Workload endpoint, when enabled

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)


def start_authority(
    work: Path,
    socket_dir: Path,
    *,
    log_level: str = "WARNING",
    config: str = "",
    local_socket: bool = False,
    command: Sequence[str] | None = None,
    ready_timeout: float = READY_TIMEOUT,
) -> AuthorityServer:
    """``authority serve`` with its data and log in ``work``, sockets in ``socket_dir``, ready.

    ``config`` is TOML for a ``--config`` file; ``local_socket`` also opens the local Workload
    endpoint (``socket_dir/local.sock``); ``command`` replaces ``authority_command()``;
    ``ready_timeout`` is how long it may take to answer its health check.
    """
    port, mtls_port = free_port(), free_port()
    admin_socket = socket_dir / "admin.sock"
    local = socket_dir / "local.sock" if local_socket else None
    if local is not None:
        config = f"local_socket = {json.dumps(str(local))}\n{config}"
    options: list[str] = []
    if config:
        config_path = work / "authority.toml"
        config_path.write_text(config)
        options = ["--config", str(config_path)]
    serve = [
        *(authority_command() if command is None else command),
        "serve",
        *options,
        "--data-dir", str(work / "data"),
        "--listen", f"{LOOPBACK}:{port}",
        "--listen-mtls", f"{LOOPBACK}:{mtls_port}",
        "--admin-socket", str(admin_socket),
        "--trust-domain", TRUST_DOMAIN,
        "--log-level", log_level,
    ]  # fmt: skip
    child = spawn("authority serve", serve, work / "serve.log")
    server = AuthorityServer(
        child.name,
        child.proc,
        child.log_path,
        f"{LOOPBACK}:{port}",
        f"{LOOPBACK}:{mtls_port}",
        admin_socket,
        local,
    )
    try:
        wait_serving(server, ready_timeout)
    except BaseException:
        server.stop()
        raise
    return server


def stop_and_report(server: AuthorityServer) -> None:
    """Stop the server; on stderr, a warning with the end of its log if it exited in error."""
    code = server.stop()
    if code not in (0, None):
        print(f"warning: the server exited with {code}:\n{server.log_tail()}", file=sys.stderr)


def wait_serving(server: AuthorityServer, timeout: float = READY_TIMEOUT) -> None:
    """Until the admin socket answers a health check (the workload ports bind before it) and the
    local socket, if any, exists."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    paths = [p for p in (server.admin_socket, server.local_socket) if p is not None]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.check_alive()
        if all(p.exists() for p in paths):
            with (
                grpc.insecure_channel(f"unix:{server.admin_socket}") as channel,
                contextlib.suppress(grpc.RpcError),
            ):
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        time.sleep(0.05)
    raise BenchError(f"{server.name} did not become ready:\n{server.log_tail()}")


# --- setup through the admin socket ----------------------------------------------------------


async def bundle_pem(admin: pb_grpc.AdminAsyncStub) -> bytes:
    """The trust bundle's X.509 authorities, PEM."""
    from authority.client import der_chain_to_pem

    bundle = await admin.GetBundle(pb.GetBundleRequest(), timeout=RPC_TIMEOUT)
    return der_chain_to_pem(list(bundle.x509_authorities))


async def load_example_policy(admin: pb_grpc.AdminAsyncStub) -> None:
    """The example agent policy (agents may read metrics: what the Exchange load asks)."""
    files = [
        pb.PolicyFile(name=f.name, content=f.read_text())
        for f in (EXAMPLE_POLICY / "agents.cedar", EXAMPLE_POLICY / "agents.tests.json")
    ]
    await admin.LoadPolicy(pb.LoadPolicyRequest(files=files), timeout=RPC_TIMEOUT)


async def create_join_tokens(
    admin_socket: Path,
    spiffe_ids: Iterable[str],
    *,
    parallel: int = 32,
    budget: float | None = None,
) -> list[bytes]:
    """A single-use join token (valid 10 minutes) per SPIFFE ID, in their order, ``parallel``
    calls at a time; with a ``budget`` (seconds), only those made before it ran out."""
    from authority.client import AdminClient

    deadline = None if budget is None else time.monotonic() + budget
    made: dict[int, bytes] = {}
    async with AdminClient(admin_socket) as admin:
        queue = iter(enumerate(spiffe_ids))

        async def one() -> None:
            for n, spiffe_id in queue:
                if deadline is not None and time.monotonic() > deadline:
                    return
                created = await admin.stub.CreateJoinToken(
                    pb.CreateJoinTokenRequest(spiffe_id=spiffe_id, ttl_seconds=600),
                    timeout=RPC_TIMEOUT,
                )
                made[n] = created.token.encode()

        await asyncio.gather(*(one() for _ in range(parallel)))
    return [made[n] for n in sorted(made)]


async def attest_join_tokens(
    tls_address: str, roots_pem: bytes, tokens: Sequence[bytes], folder: Path
) -> list[tuple[bytes, bytes]]:
    """Attest once per join token over server TLS; [(chain PEM, key PEM)] in token order."""
    from authority.client import SvidFiles, WorkloadClient

    identities: list[tuple[bytes, bytes]] = []
    async with WorkloadClient(tls_address, roots_pem, options=CHANNEL_OPTIONS) as client:
        for i, token in enumerate(tokens):
            target = folder / f"svid-{i}"
            await client.attest_to_folder("join_token", token, target)
            chain, key, _ = SvidFiles(target).read()
            identities.append((chain, key))
    return identities


# --- inside a load process ------------------------------------------------------------------


class RequestFailed(Exception):
    """One request went wrong: ``code`` (a gRPC status name or a reason) and a detail."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass
class LoadRun:
    """What ``drive`` measured in one load process."""

    latencies: list[float]  # seconds, successful calls only
    errors: dict[str, int]  # by code
    samples: dict[str, str]  # the first detail of each code, in the order the codes came
    started: float  # time.monotonic(), system-wide on Linux
    ended: float  # when the last call ended
    cpu_seconds: float  # of this process over the run

    def first_failure(self, limit: int) -> str:
        """The run's first error, as "code: detail" (the detail cut to ``limit``); "" if none."""
        code, detail = next(iter(self.samples.items()), ("", ""))
        return f"{code}: {detail[:limit]}" if code else ""


async def drive(
    sender: Callable[[int], Callable[[], Awaitable[bool]]],
    concurrency: int,
    seconds: float,
    *,
    max_requests: int | None = None,
    catch_all: bool = False,
) -> LoadRun:
    """``concurrency`` coroutines sending back to back for ``seconds`` (and ``max_requests`` in
    all, if given). ``sender(i)`` makes coroutine i's send: True when sent, False when there is
    nothing left to send (the coroutine stops). A gRPC error or RequestFailed counts as an error
    of that request; with ``catch_all``, any other exception too."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    samples: dict[str, str] = {}
    clock = time.perf_counter
    cpu0 = time.process_time()
    started = time.monotonic()
    deadline = clock() + seconds
    last_end = [started]
    budget = itertools.count() if max_requests is None else iter(range(max_requests))
    caught: tuple[type[Exception], ...] = (Exception,) if catch_all else ()

    def failed(code: str, detail: str) -> None:
        errors[code] = errors.get(code, 0) + 1
        samples.setdefault(code, detail)

    async def worker(index: int) -> None:
        send = sender(index)
        while clock() < deadline and next(budget, None) is not None:
            t0 = clock()
            try:
                if not await send():
                    return
            except grpc.aio.AioRpcError as exc:
                failed(exc.code().name, exc.details() or "")
            except RequestFailed as exc:
                failed(exc.code, exc.detail)
            except caught as exc:  # anything else is an error of this request too
                failed(type(exc).__name__, str(exc))
            else:
                latencies.append(clock() - t0)
            last_end[0] = time.monotonic()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return LoadRun(
        latencies=latencies,
        errors=errors,
        samples=samples,
        started=started,
        ended=last_end[0],
        cpu_seconds=time.process_time() - cpu0,
    )


# A command's handler: the reply's name, and a function of the payload giving the reply's payload
# (or an awaitable of it).
Handlers = Mapping[str, tuple[str, Callable[[Any], Any]]]


async def serve_commands(conn: multiprocessing.connection.Connection, handlers: Handlers) -> None:
    """Say "ready", then answer (command, payload) messages with ``handlers`` until "stop"."""
    conn.send(("ready", None))
    while True:
        command, payload = await asyncio.to_thread(conn.recv)
        if command == "stop":
            return
        if command not in handlers:
            raise ValueError(f"unknown command {command!r}")
        reply, handle = handlers[command]
        answer = handle(payload)
        conn.send((reply, await answer if inspect.isawaitable(answer) else answer))


# --- load processes, driven over pipes -------------------------------------------------------


def child_main(
    conn: multiprocessing.connection.Connection,
    loop: Callable[[multiprocessing.connection.Connection, Init], Coroutine[Any, Any, None]],
    init: Init,
) -> None:
    """Entry point of a spawned load process (no gRPC state is inherited): ``loop(conn, init)``
    on an event loop; an exception is sent to the parent as ("error", text)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and stops us
    try:
        asyncio.run(loop(conn, init))
    except Exception as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


class PipeWorker:
    """A spawned process running ``loop(conn, init)``, talked to with (command, payload) pairs.

    ``loop`` must be a module-level coroutine function (it is pickled by name); ``label`` names
    the process in errors (``name`` by default).
    """

    def __init__(
        self,
        loop: Callable[[multiprocessing.connection.Connection, Init], Coroutine[Any, Any, None]],
        init: Init,
        name: str,
        label: str = "",
    ) -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self.name = name
        self.label = label or name
        self.proc: multiprocessing.process.BaseProcess = context.Process(
            target=child_main, args=(child, loop, init), name=name
        )
        self.proc.start()
        child.close()
        self.conn = parent

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def send(self, command: str, payload: Any = None) -> None:
        self.conn.send((command, payload))

    def expect(self, what: str, timeout: float, *, wait: float | None = None) -> Any:
        """The payload of the next message, which must be ``what``, within ``timeout`` seconds
        (``wait``, when given, is how long to poll; ``timeout`` is then only reported)."""
        if not self.conn.poll(timeout if wait is None else wait):
            raise BenchError(f"{self.label} did not answer within {timeout:.0f}s")
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            raise BenchError(f"{self.label} died") from None
        if kind == "error":
            raise BenchError(f"{self.label} failed: {payload}")
        if kind != what:
            raise BenchError(f"{self.label} sent {kind!r}, expected {what!r}")
        return payload

    async def ask(self, command: str, payload: Any, reply: str, within: float = 60.0) -> Any:
        """Send ``command`` and wait (in a thread) for ``reply``'s payload."""
        self.send(command, payload)
        return await asyncio.to_thread(self.expect, reply, within)

    def join(self) -> None:
        """Wait for the process to exit (it was told to stop); kill it when it does not."""
        self.proc.join(STOP_TIMEOUT)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(STOP_TIMEOUT)
        self.conn.close()

    def close(self) -> None:
        """Tell the process to stop and wait for it."""
        close_all([self])


def expect_all(workers: Sequence[PipeWorker], what: str, timeout: float) -> list[Any]:
    """Each worker's next payload, ``what``, all within ``timeout`` seconds together."""
    deadline = time.monotonic() + timeout
    return [w.expect(what, timeout, wait=max(0.0, deadline - time.monotonic())) for w in workers]


def close_all(workers: Sequence[PipeWorker]) -> None:
    """Tell every worker to stop, then wait for each (they stop in parallel)."""
    for w in workers:
        with contextlib.suppress(OSError):
            w.send("stop")
    for w in workers:
        w.join()


# --- /proc (Linux) ---------------------------------------------------------------------------


def cpu_seconds(pid: int, *, main_thread: bool = False, missing_ok: bool = False) -> float:
    """User + system CPU of a process (all its threads, or its main thread) from /proc.

    Without /proc (or the process), 0.0 when ``missing_ok``, else OSError.
    """
    stat = Path(f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat")
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        if missing_ok:
            return 0.0
        raise
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def machine_busy_seconds(*, missing_ok: bool = False) -> float:
    """Non-idle CPU seconds of the whole machine since boot, from /proc/stat.

    Without it, 0.0 when ``missing_ok``, else OSError.
    """
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        if missing_ok:
            return 0.0
        raise
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """The resident memory of a process (VmRSS), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


# --- figures ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The value at rank round(q * (n - 1)) of the sorted values; NaN when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def nearest_rank(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (rank ceil(q * n)) of already sorted values; NaN if none."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def cpu_percent(cpu: float, over: float) -> float:
    """CPU seconds over a wall-clock span in % of one core, to 0.1; 0.0 for an empty span."""
    return round(100 * cpu / over, 1) if over > 0 else 0.0


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares differing by one at most, the larger first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# --- the environment -------------------------------------------------------------------------


def usable_cores() -> int:
    """The cores this process may run on (its affinity), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


def authority_version() -> str:
    """The authority package measured: its version and where it was imported from."""
    import authority

    return f"{authority.__version__} from {Path(authority.__file__).parent}"


def short_environment() -> dict[str, Any]:
    """Python, grpcio, the core count and the platform."""
    return {
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


# --- the command line ------------------------------------------------------------------------


def add_log_level_argument(parser: argparse.ArgumentParser) -> None:
    """``--log-level``: the server's, INFO by default."""
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="the server's log level (INFO: its default)",
    )


def require_range(
    parser: argparse.ArgumentParser, flag: str, value: float, low: float, high: float
) -> None:
    """Exit with a usage error unless ``low <= value <= high``."""
    if not low <= value <= high:
        parser.error(f"{flag} must be in [{low}, {high}]")


def run_bench(coroutine: Coroutine[Any, Any, T], *, failed: str = "error") -> T:
    """``asyncio.run(coroutine)``; a BenchError is printed as "<failed>: <error>" and exits 1,
    Ctrl-C prints "interrupted" and exits 130 (the coroutine's cleanup has run by then)."""
    try:
        return asyncio.run(coroutine)
    except BenchError as exc:
        print(f"{failed}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
