"""Shared test plumbing: a real authority (in-process or as a subprocess) on ephemeral ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509

from authority._pb import authority_v1_authority_pb2 as pb
from authority.agent import AgentConfig, AttestProof, NodeAgent
from authority.client import AdminClient, WorkloadClient, der_chain_to_pem
from authority.clock import Clock
from authority.config import Config, Limits
from authority.server import AuthorityServer
from authority.supervisor import Sleep


def short_socket_dir() -> Path:
    """Unix socket paths must stay under ~100 bytes; pytest's tmp_path can be longer."""
    return Path(tempfile.mkdtemp(prefix="au-", dir="/tmp"))


@dataclass
class Running:
    """A running authority and the handles a test needs."""

    server: AuthorityServer
    data_dir: Path
    admin_socket: Path
    port: int
    mtls_port: int
    _clients: list[WorkloadClient | AdminClient] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def mtls_address(self) -> str:
        return f"127.0.0.1:{self.mtls_port}"

    def admin(self) -> AdminClient:
        client = AdminClient(self.admin_socket)
        self._clients.append(client)
        return client

    async def bundle_pem(self) -> bytes:
        bundle = await self.admin().stub.GetBundle(pb.GetBundleRequest())
        return der_chain_to_pem(list(bundle.x509_authorities))

    async def workload(self) -> WorkloadClient:
        client = WorkloadClient(self.address, await self.bundle_pem())
        self._clients.append(client)
        return client

    async def join_token(self, spiffe_id: str, ttl_seconds: int = 600) -> str:
        created = await self.admin().stub.CreateJoinToken(
            pb.CreateJoinTokenRequest(spiffe_id=spiffe_id, ttl_seconds=ttl_seconds)
        )
        return created.token

    async def attested(self, spiffe_id: str, folder: Path) -> WorkloadClient:
        """Attest ``spiffe_id`` with a fresh join token; return a client holding the SVID."""
        token = await self.join_token(spiffe_id)
        client = await self.workload()
        await client.attest_to_folder("join_token", token.encode(), folder)
        holder = WorkloadClient.from_svid_dir(self.address, folder)
        self._clients.append(holder)
        return holder

    async def close_clients(self) -> None:
        for client in self._clients:
            await client.close()
        self._clients.clear()


def test_config(data_dir: Path, socket_dir: Path, **limits: object) -> Config:
    return Config(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        listen_mtls="127.0.0.1:0",
        admin_socket=socket_dir / "admin.sock",
        limits=Limits(**limits),  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def running_authority(
    config: Config, clock: Clock | None = None, *, sleep: Sleep = asyncio.sleep
) -> AsyncIterator[Running]:
    """A real authority on ``config`` (on ``clock``, its scheduled jobs waiting with ``sleep``
    when a test gives them), stopped at the end."""
    server = AuthorityServer(config, clock=clock, sleep=sleep)
    await server.start()
    running = Running(
        server, config.data_dir, config.admin_socket_path, server.port, server.mtls_port
    )
    try:
        yield running
    finally:
        await running.close_clients()
        await server.stop(grace=0.5)


def split_der(der: bytes) -> list[x509.Certificate]:
    """Concatenated DER certificates, as the Workload API carries chains and bundles."""
    certs = []
    while der:
        if der[0] != 0x30 or len(der) < 2:
            raise ValueError("not a DER SEQUENCE")
        size, start = der[1], 2
        if size & 0x80:  # long form: the next (size & 0x7f) bytes hold the length
            count = size & 0x7F
            size, start = int.from_bytes(der[2 : 2 + count], "big"), 2 + count
        certs.append(x509.load_der_x509_certificate(der[: start + size]))
        der = der[start + size :]
    return certs


AGENT_ID = "spiffe://example.org/agent/node1"


@contextlib.asynccontextmanager
async def running_agent(
    running: Running, socket: Path, data_dir: Path, spiffe_id: str = AGENT_ID
) -> AsyncIterator[NodeAgent]:
    """A node agent in this process, attested to ``running`` with a join token, serving the
    Workload API on ``socket``."""
    token = await running.join_token(spiffe_id)
    agent = NodeAgent(
        AgentConfig(
            server=running.address,
            trust_bundle_pem=await running.bundle_pem(),
            data_dir=data_dir,
            socket=socket,
            proof=AttestProof("join_token", token.encode()),
        )
    )
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


async def wait_held(agent: NodeAgent, entry_id: str, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Until ``agent`` holds an X.509-SVID for the entry."""
    with agent.watch() as changed:
        async with asyncio.timeout(timeout):
            while entry_id not in agent.held:
                await changed.wait()
                changed.clear()


# --- the real command, in a subprocess ---------------------------------------------------------


def authority_command() -> list[str]:
    """The installed console script when present, else the module, with this interpreter."""
    script = Path(sys.executable).parent / "authority"
    return [str(script)] if script.exists() else [sys.executable, "-m", "authority"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    admin_socket: Path
    address: str
    mtls_address: str
    log_path: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "AUTHORITY_ADMIN_SOCKET": str(self.admin_socket)}

    def cli(
        self, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*authority_command(), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
            input=stdin,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"authority {' '.join(args)} failed: {result.stderr}")
        return result

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


def start_serve(data_dir: Path, socket_dir: Path, *extra: str) -> ServeProcess:
    return start_serve_on(data_dir, socket_dir, free_port(), free_port(), *extra)


def restart_serve(served: ServeProcess, *extra: str, sig: int = signal.SIGTERM) -> ServeProcess:
    """Stop ``served`` with ``sig`` and serve its data directory again on the same ports and
    admin socket (``extra``: the options it was started with, if any)."""
    served.stop(sig)
    port, mtls_port = (int(a.rpartition(":")[2]) for a in (served.address, served.mtls_address))
    return start_serve_on(served.data_dir, served.admin_socket.parent, port, mtls_port, *extra)


def start_serve_on(
    data_dir: Path, socket_dir: Path, port: int, mtls_port: int, *extra: str
) -> ServeProcess:
    """``authority serve`` on these ports; its output in a log file of its own."""
    admin_socket = socket_dir / "admin.sock"
    log_path = data_dir.parent / f"serve-{port}.log"
    runs = 1
    while log_path.exists():  # a restart on the same port: keep the earlier run's log
        runs += 1
        log_path = data_dir.parent / f"serve-{port}.{runs}.log"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                *authority_command(),
                "serve",
                "--data-dir",
                str(data_dir),
                "--listen",
                f"127.0.0.1:{port}",
                "--listen-mtls",
                f"127.0.0.1:{mtls_port}",
                "--admin-socket",
                str(admin_socket),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    served = ServeProcess(
        proc, data_dir, admin_socket, f"127.0.0.1:{port}", f"127.0.0.1:{mtls_port}", log_path
    )
    wait_serving(served)
    return served


def wait_serving(served: ServeProcess, timeout: float = 30.0) -> None:
    """Until the admin socket answers a health check (the workload ports bind before it)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.proc.poll() is not None:
            raise AssertionError(f"authority serve exited early:\n{served.log()}")
        if served.admin_socket.exists():
            with grpc.insecure_channel(f"unix:{served.admin_socket}") as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
        time.sleep(0.05)
    raise AssertionError(f"authority serve did not become ready:\n{served.log()}")


@contextlib.contextmanager
def serve_process(data_dir: Path, *extra: str) -> Iterator[ServeProcess]:
    socket_dir = short_socket_dir()
    served = start_serve(data_dir, socket_dir, *extra)
    try:
        yield served
    finally:
        served.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``predicate`` until it holds; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def interrupt(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a command as ^C would (SIGINT), killing it if it has not exited in ``timeout``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
