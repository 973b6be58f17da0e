"""Exhaustion of the grpcio listeners: idle connections past the file-descriptor limit, handshakes
that never finish, idle connections, one peer holding every call slot, and a limit that cannot
hold the configured caps."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority.client import AdminClient, SvidFiles, WorkloadClient, der_chain_to_pem
from authority.config import Limits
from tests.helpers import (
    Running,
    ServeProcess,
    authority_command,
    running_authority,
    serve_process,
    short_socket_dir,
)
from tests.helpers import test_config as make_config
from tests.security._attack import AGENT, CALL_TIMEOUT, assert_status, rpc_error, tls_channel

FD_LIMIT = 1024  # the limit under which 1,100 idle connections took every endpoint down
ATTACK_CONNECTIONS = 1100
WAIT = 60.0  # generous: conditions are waited for, never timed


@contextlib.contextmanager
def limited_serve(tmp_path: Path, nofile: int, toml: str) -> Iterator[ServeProcess]:
    """``authority serve`` with this configuration, its RLIMIT_NOFILE (soft and hard) then
    lowered to ``nofile`` from outside."""
    config = tmp_path / "authority.toml"
    config.write_text(toml)
    with serve_process(tmp_path / "data", "--config", str(config)) as served:
        resource.prlimit(served.proc.pid, resource.RLIMIT_NOFILE, (nofile, nofile))
        yield served


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed ``sock`` (EOF or reset); never blocks."""
    try:
        return sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def wait_until_closed(sock: socket.socket, timeout: float = WAIT) -> bool:
    """Read (and drop) whatever the server sends until it closes ``sock``; False on timeout."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


async def admin_serves(admin_socket: Path) -> bool:
    async with AdminClient(admin_socket) as admin:
        entries = await admin.stub.ListEntries(pb.ListEntriesRequest(), timeout=CALL_TIMEOUT)
        return entries is not None


async def _svid(served: ServeProcess, folder: Path) -> None:
    """An SVID for ``AGENT`` in ``folder``, attested over the server-TLS port."""
    async with AdminClient(served.admin_socket) as admin:
        bundle = await admin.stub.GetBundle(pb.GetBundleRequest(), timeout=CALL_TIMEOUT)
        token = await admin.stub.CreateJoinToken(
            pb.CreateJoinTokenRequest(spiffe_id=AGENT), timeout=CALL_TIMEOUT
        )
    async with WorkloadClient(
        served.address, der_chain_to_pem(list(bundle.x509_authorities))
    ) as client:
        await client.attest_to_folder("join_token", token.token.encode(), folder)


@contextlib.contextmanager
def idle_connections(address: str, count: int) -> Iterator[list[socket.socket]]:
    host, port = address.rsplit(":", 1)
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection((host, int(port)), timeout=WAIT)
            sock.settimeout(None)  # blocking, so MSG_DONTWAIT peeks without waiting
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


async def test_idle_connections_past_the_fd_limit_leave_the_admin_socket_and_mtls_served(
    tmp_path: Path,
) -> None:
    """1,100 connections that never say a word, against a server limited to 1,024 descriptors:
    the server-TLS listener holds its cap and closes the rest at once; the admin socket and a
    fresh client on the mutual-TLS listener are served meanwhile."""
    cap = 300
    toml = (
        "[limits]\n"
        f"max_connections_per_listener = {cap}\n"
        "max_admin_connections = 32\n"
        "fd_reserve = 256\n"
        'handshake_timeout = "10m"\n'  # the idle connections stay while the test looks
    )
    with limited_serve(tmp_path, FD_LIMIT, toml) as served:
        assert "file descriptors: limit=" in served.log()
        await _svid(served, tmp_path / "svid")
        before = open_fds(served.proc.pid)

        with idle_connections(served.address, ATTACK_CONNECTIONS) as socks:
            deadline = time.monotonic() + WAIT
            while sum(map(closed_by_server, socks)) < ATTACK_CONNECTIONS - cap:
                assert time.monotonic() < deadline, "the listener did not close the excess"
                await asyncio.sleep(0.1)

            assert await admin_serves(served.admin_socket)
            chain, key, bundle = SvidFiles(tmp_path / "svid").read()
            async with tls_channel(served.mtls_address, bundle, key=key, chain=chain) as channel:
                info = await pb_grpc.WorkloadStub(channel).GetServerInfo(
                    pb.GetServerInfoRequest(), timeout=CALL_TIMEOUT
                )
            assert info.trust_domain == "example.org"
            assert sum(not closed_by_server(s) for s in socks) <= cap
            assert open_fds(served.proc.pid) <= before + cap + 32
            assert served.proc.poll() is None


@contextlib.asynccontextmanager
async def running_with(
    tmp_path: Path, socket_dir: Path, **limits: object
) -> AsyncIterator[Running]:
    async with running_authority(make_config(tmp_path / "data", socket_dir, **limits)) as running:
        yield running


async def _bundle_call(address: str, bundle: bytes) -> pb.Bundle:
    async with tls_channel(address, bundle) as channel:
        return await pb_grpc.WorkloadStub(channel).GetBundle(
            pb.GetBundleRequest(), timeout=CALL_TIMEOUT
        )


async def test_handshake_that_never_completes_is_dropped(tmp_path: Path, socket_dir: Path) -> None:
    """A client that opens a TLS record and never finishes its ClientHello (and one that sends
    nothing) loses the connection once the handshake timeout passes (grpc's own default waits
    120 s); the listener serves the next client."""
    async with running_with(
        tmp_path, socket_dir, handshake_timeout=dt.timedelta(seconds=1)
    ) as running:
        bundle = await running.bundle_pem()
        with idle_connections(running.address, 2) as (silent, partial):
            partial.sendall(b"\x16\x03\x01\x02\x00\x01")  # a handshake record, cut short
            for sock in (silent, partial):
                assert await asyncio.to_thread(wait_until_closed, sock, WAIT)
        assert (await _bundle_call(running.address, bundle)).x509_authorities


async def test_raw_connection_to_admin_socket_is_dropped(tmp_path: Path, socket_dir: Path) -> None:
    """The plaintext admin socket: a connection that never sends the HTTP/2 preface is closed
    after the same timeout."""
    async with running_with(
        tmp_path, socket_dir, handshake_timeout=dt.timedelta(seconds=1)
    ) as running:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.closing(sock):
            sock.connect(str(running.admin_socket))
            assert await asyncio.to_thread(wait_until_closed, sock, WAIT)
        assert await admin_serves(running.admin_socket)


async def test_idle_connection_is_closed(tmp_path: Path, socket_dir: Path) -> None:
    """A connection with no call in flight gets GOAWAY after the idle timeout (the client's own
    idle timer is 30 minutes); a client reconnects on its next call."""
    async with running_with(
        tmp_path, socket_dir, connection_idle_timeout=dt.timedelta(seconds=1)
    ) as running:
        bundle = await running.bundle_pem()
        async with tls_channel(running.address, bundle) as channel:
            stub = pb_grpc.WorkloadStub(channel)
            await stub.GetBundle(pb.GetBundleRequest(), timeout=CALL_TIMEOUT)
            assert channel.get_state() is grpc.ChannelConnectivity.READY
            async with asyncio.timeout(WAIT):
                await channel.wait_for_state_change(grpc.ChannelConnectivity.READY)
            assert channel.get_state() is not grpc.ChannelConnectivity.READY
            assert (await stub.GetBundle(pb.GetBundleRequest(), timeout=CALL_TIMEOUT)).sequence


async def test_one_peer_cannot_hold_every_call(tmp_path: Path, socket_dir: Path) -> None:
    """Streams held open by one address count against its budget; one more call is refused
    (RESOURCE_EXHAUSTED) and a slot comes back when a stream ends."""
    cap = 3
    async with running_with(tmp_path, socket_dir, max_calls_per_peer=cap) as running:
        bundle = await running.bundle_pem()
        async with tls_channel(running.address, bundle) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(cap)]
            for watch in watches:
                first = await watch.read()
                assert first.status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.WorkloadStub(channel)

            err = await rpc_error(stub.GetBundle(pb.GetBundleRequest(), timeout=CALL_TIMEOUT))
            assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "PEER_CALL_LIMIT")
            # The admin socket is not the peer's to exhaust.
            assert await admin_serves(running.admin_socket)

            watches[0].cancel()
            for _ in range(int(WAIT / 0.05)):  # until the ended stream's slot comes back
                code = await _code(stub)
                if code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                    break
                await asyncio.sleep(0.05)
            assert code is grpc.StatusCode.OK
            for watch in watches[1:]:
                watch.cancel()


async def _code(stub: pb_grpc.WorkloadAsyncStub) -> grpc.StatusCode:
    try:
        await stub.GetBundle(pb.GetBundleRequest(), timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _serve_under_fd_limit(tmp_path: Path, limit: int) -> subprocess.CompletedProcess[str]:
    """``authority serve`` under ``ulimit -n LIMIT``, stopped by SIGTERM once it serves (or as
    soon as it exits by itself); its exit and its log."""
    socket_dir = short_socket_dir()
    admin_socket = socket_dir / "admin.sock"
    serve = [
        *authority_command(), "serve", "--data-dir", str(tmp_path / "data"),
        "--listen", "127.0.0.1:0", "--listen-mtls", "127.0.0.1:0",
        "--admin-socket", str(admin_socket),
    ]  # fmt: skip
    proc = subprocess.Popen(
        ["/bin/sh", "-c", f'ulimit -n {limit} && exec "$@"', "sh", *serve],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + WAIT
        while proc.poll() is None and not admin_socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(socket_dir, ignore_errors=True)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_default_caps_fit_themselves_to_a_low_fd_limit(tmp_path: Path) -> None:
    """Under a 1,024 descriptor limit the default caps (2 x 1000 TCP connections, 1024 on the
    attest socket, and more) cannot all be held: the server lowers the TCP and Unix caps in
    proportion to what fits beside the admin socket's and the reserve's descriptors, says so,
    and serves."""
    result = _serve_under_fd_limit(tmp_path, FD_LIMIT)
    limits = Limits()
    room = FD_LIMIT - limits.max_admin_connections - limits.fd_reserve
    share = room / (2 * limits.max_connections_per_listener + limits.max_local_connections)
    fitted = int(limits.max_connections_per_listener * share)
    fitted_local = int(limits.max_local_connections * share)
    assert "cannot hold limits.max_connections_per_listener 1000" in result.stderr
    assert (
        f"each TCP listener takes at most {fitted} connections and each Unix socket "
        f"{fitted_local}" in result.stderr
    )
    needed = 2 * fitted + fitted_local + limits.max_admin_connections + limits.fd_reserve
    assert needed <= FD_LIMIT
    assert f"caps need {needed}: {fitted} per TCP listener" in result.stderr
    assert "authority serving" in result.stderr
    assert "Traceback" not in result.stderr


def test_server_refuses_to_start_when_no_useful_cap_fits(tmp_path: Path) -> None:
    """Under 300 descriptors, the admin socket's 64 and the reserve's 256 leave no connection
    for the TCP listeners: the server says so in one line and does not start."""
    result = _serve_under_fd_limit(tmp_path, 300)
    assert result.returncode != 0
    assert "RLIMIT_NOFILE hard limit 300 leaves 0 connections per TCP listener" in result.stderr
    assert "and 0 per Unix socket" in result.stderr
    assert "Traceback" not in result.stderr
    assert "authority serving" not in result.stderr


def test_start_raises_the_soft_fd_limit_to_the_hard_limit(tmp_path: Path) -> None:
    """A soft limit of 1,024 under a higher hard limit: the server raises it rather than run
    out of descriptors below what its caps allow, and says so in one line."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= FD_LIMIT:
        pytest.skip(f"needs a hard RLIMIT_NOFILE above {FD_LIMIT}")
    with contextlib.ExitStack() as stack:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, hard))  # the server inherits it
        try:
            served = stack.enter_context(serve_process(tmp_path / "data"))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        limits = Path(f"/proc/{served.proc.pid}/limits").read_text()
        (line,) = [x for x in limits.splitlines() if x.startswith("Max open files")]
        server_soft, server_hard = line.split()[3:5]
        assert server_soft == server_hard != str(FD_LIMIT)
        logged = [x for x in served.log().splitlines() if "file descriptors:" in x]
        assert len(logged) == 1
        assert f"limit={server_soft}" in logged[0]


LOCAL_CAP = 24
LOCAL_CAP_PER_UID = 8
LOCAL_FLOOD = 40


def _server_greeted(sock: socket.socket) -> bool:
    """True when the server sent its HTTP/2 SETTINGS (admitted), False on EOF (refused)."""
    sock.settimeout(WAIT)
    try:
        return bool(sock.recv(64))
    except (ConnectionResetError, TimeoutError):
        return False


async def test_one_uid_cannot_hold_every_local_connection(tmp_path: Path, socket_dir: Path) -> None:
    """The attest socket is 0666: 40 connections from one uid that never send a byte. Only
    the per-uid cap (8) is admitted, the rest are closed as they come; the admin socket and
    the TLS port are still served; when the flood hangs up its slots come back."""
    config = make_config(
        tmp_path / "data",
        socket_dir,
        max_local_connections=LOCAL_CAP,
        max_local_connections_per_uid=LOCAL_CAP_PER_UID,
    )
    async with running_authority(config) as running:
        flood = []
        try:
            for _ in range(LOCAL_FLOOD):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(config.local_socket_path))
                flood.append(sock)
            greeted = await asyncio.gather(
                *(asyncio.to_thread(_server_greeted, sock) for sock in flood)
            )
            assert sum(greeted) == LOCAL_CAP_PER_UID

            listed = await running.admin().stub.ListEntries(
                pb.ListEntriesRequest(), timeout=CALL_TIMEOUT
            )
            assert list(listed.entries) == []
            workload = await running.workload()
            await workload.tls_stub.Ping(pb.PingRequest(), timeout=CALL_TIMEOUT)
        finally:
            for sock in flood:
                sock.close()

        async def admitted_again() -> bool:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(config.local_socket_path))
                return await asyncio.to_thread(_server_greeted, sock)
            finally:
                sock.close()

        deadline = time.monotonic() + WAIT
        while not await admitted_again():
            assert time.monotonic() < deadline, "the flood's slots never came back"
            await asyncio.sleep(0.05)
