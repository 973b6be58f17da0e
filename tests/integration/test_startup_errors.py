"""What a new operator gets wrong at start-up, answered in one line they can act on, by the real
``authority`` command in a subprocess: an address already in use (before anything is created
in the data directory), a ``--server`` without a port or naming the mutual-TLS port, a trust
bundle that cannot be read; and, on the server side, refusals logged with their reason and the
caller, bounded under a flood, in text or JSON lines that never carry a token."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from authority.api.status import REFUSAL_LOG_BURST, REFUSAL_LOG_WINDOW
from authority.binding import ADDRESS_IN_USE
from authority.client import WorkloadClient, new_key
from authority.errors import FailedPrecondition
from authority.server import _add_secure_port
from tests.helpers import (
    ServeProcess,
    authority_command,
    free_port,
    serve_process,
    start_serve,
)
from tests.integration.test_cli import AGENT, assert_one_error_line, attest, bundle_file
from tests.security._attack import key_pem

TD = "example.org"
WORKLOAD = f"spiffe://{TD}/startup/w"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*authority_command(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
        check=False,
    )


def assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    """No traceback and none of the gRPC core's own log lines (``E1207 12:00:00.0 ...]``)."""
    assert "Traceback" not in result.stderr, result.stderr
    assert not re.search(r"^[EWI]\d{4} ", result.stderr, re.M), result.stderr


@contextlib.contextmanager
def tcp_listener() -> Iterator[str]:
    """Another program listening on a port of 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@contextlib.contextmanager
def unix_listener(path: Path) -> Iterator[Path]:
    """Another program listening on a Unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
        yield path


def serve_args(data_dir: Path, socket_dir: Path, listen: str, listen_mtls: str) -> list[str]:
    return [
        "serve", "--data-dir", str(data_dir), "--listen", listen, "--listen-mtls", listen_mtls,
        "--admin-socket", str(socket_dir / "admin.sock"),
    ]  # fmt: skip


def free_address() -> str:
    return f"127.0.0.1:{free_port()}"


def assert_in_use(result: subprocess.CompletedProcess[str], address: object, key: str) -> None:
    line = assert_one_error_line(result)
    assert line == f"error: {address} is already in use ({key}); another authority running?"
    assert_clean(result)


# --- an address already in use -----------------------------------------------------------------


@pytest.mark.parametrize("key", ["listen", "listen_mtls"])
def test_a_taken_port_is_one_line_and_nothing_is_created(
    tmp_path: Path, socket_dir: Path, key: str
) -> None:
    data_dir = tmp_path / "fresh"
    with tcp_listener() as taken:
        listen, mtls = (taken, free_address()) if key == "listen" else (free_address(), taken)
        result = run(*serve_args(data_dir, socket_dir, listen, mtls))
    assert_in_use(result, taken, key)
    assert not data_dir.exists()
    assert list(socket_dir.iterdir()) == []


def test_a_second_authority_on_the_same_ports_creates_nothing(
    served: ServeProcess, tmp_path: Path, socket_dir: Path
) -> None:
    data_dir = tmp_path / "second"
    result = run(*serve_args(data_dir, socket_dir, served.address, served.mtls_address))
    assert_in_use(result, served.address, "listen")
    assert not data_dir.exists()
    assert served.cli("entry", "list").returncode == 0  # the first one is untouched


def test_the_admin_socket_of_a_running_authority_is_not_taken(
    served: ServeProcess, tmp_path: Path
) -> None:
    data_dir = tmp_path / "second"
    result = run(*serve_args(data_dir, served.admin_socket.parent, free_address(), free_address()))
    assert_in_use(result, served.admin_socket, "admin_socket")
    assert not data_dir.exists()
    assert served.admin_socket.exists()  # neither replaced nor removed
    assert served.cli("entry", "list").returncode == 0


def test_a_running_authority_s_data_directory_is_left_alone(
    served: ServeProcess, socket_dir: Path
) -> None:
    """Same data directory, other ports and admin socket: its attest socket answers."""
    before = sorted(p.name for p in served.data_dir.rglob("*"))
    result = run(*serve_args(served.data_dir, socket_dir, free_address(), free_address()))
    assert_in_use(result, served.data_dir / "attest.sock", "local_socket")
    assert sorted(p.name for p in served.data_dir.rglob("*")) == before
    assert list(socket_dir.iterdir()) == []


def test_a_running_authority_s_data_directory_is_locked(
    served: ServeProcess, tmp_path: Path, socket_dir: Path
) -> None:
    """Same data directory, every socket elsewhere: the directory's lock refuses it, before
    the database or the keys are opened."""
    config = tmp_path / "elsewhere.toml"
    config.write_text(f'local_socket = "{socket_dir / "attest.sock"}"\n')
    before = sorted(p.name for p in served.data_dir.rglob("*"))
    result = run(
        *serve_args(served.data_dir, socket_dir, free_address(), free_address()),
        "--config", str(config),
    )  # fmt: skip
    assert_in_use(result, served.data_dir, "data_dir")
    assert sorted(p.name for p in served.data_dir.rglob("*")) == before
    assert list(socket_dir.iterdir()) == []
    assert served.cli("entry", "list").returncode == 0


def test_a_taken_workload_api_socket_is_one_line(tmp_path: Path, socket_dir: Path) -> None:
    data_dir = tmp_path / "fresh"
    with unix_listener(socket_dir / "workload.sock") as taken:
        result = run(
            *serve_args(data_dir, socket_dir, free_address(), free_address()),
            "--workload-api-socket", str(taken),
        )  # fmt: skip
    assert_in_use(result, taken, "workload_api_socket")
    assert not data_dir.exists()


def test_a_stale_socket_file_is_not_in_use(tmp_path: Path, socket_dir: Path) -> None:
    """A socket file left by a process that died (nobody answers) is replaced, not refused."""
    stale = socket_dir / "admin.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))  # bound, never listening: connecting is refused
    served = start_serve(tmp_path / "data", socket_dir)  # its admin socket is ``stale``
    try:
        assert served.cli("entry", "list").returncode == 0
    finally:
        served.stop()


def test_an_agent_on_a_taken_socket_spends_no_join_token(
    served: ServeProcess, tmp_path: Path, socket_dir: Path
) -> None:
    token = served.cli("token", "create", "--spiffe-id", AGENT).stdout.strip()
    bundle = bundle_file(served, tmp_path)
    with unix_listener(socket_dir / "agent.sock") as taken:
        result = run(
            "agent", "--server", served.address, "--trust-bundle", str(bundle),
            "--data-dir", str(tmp_path / "agent"), "--workload-api-socket", str(taken),
            "--join-token", "-", stdin=token + "\n",
        )  # fmt: skip
    line = assert_one_error_line(result)
    assert line == (
        f"error: {taken} is already in use (--workload-api-socket); another agent running?"
    )
    assert_clean(result)
    # The token was never sent: it still attests.
    served.cli(
        "workload", "attest", "--server", served.address, "--trust-bundle", str(bundle),
        "--join-token", "-", "--out", str(tmp_path / "svid"), stdin=token + "\n",
    )  # fmt: skip


# --- --server and --trust-bundle ---------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("workload", "attest", "--join-token", "x", "--out", "{tmp}/out"),
        ("workload", "jwt", "--svid-dir", "{tmp}", "--audience", "a"),
        ("workload", "renew", "--svid-dir", "{tmp}"),
        ("agent", "--trust-bundle", "{tmp}/b.pem", "--workload-api-socket", "{tmp}/a.sock"),
        ("watch", "--svid-dir", "{tmp}"),
        ("bundle", "show", "--trust-bundle", "{tmp}/b.pem"),
    ],
)
@pytest.mark.parametrize("server", ["127.0.0.1", "authority.example.org", ":8081", "h:port"])
def test_a_server_without_a_port_says_so(
    socket_dir: Path, args: tuple[str, ...], server: str
) -> None:
    filled = [a.replace("{tmp}", str(socket_dir)) for a in args]
    result = run(*filled, "--server", server)
    line = assert_one_error_line(result)
    assert line.startswith(f"error: --server must be HOST:PORT (got {server!r})"), line
    assert "8081 by default" in line
    assert_clean(result)


def test_attesting_at_the_mutual_tls_port_says_so(served: ServeProcess, tmp_path: Path) -> None:
    token = served.cli("token", "create", "--spiffe-id", WORKLOAD).stdout.strip()
    bundle = bundle_file(served, tmp_path)
    args = ["workload", "attest", "--trust-bundle", str(bundle), "--join-token", "-"]
    result = served.cli(
        *args, "--server", served.mtls_address, "--out", str(tmp_path / "a"),
        stdin=token + "\n", check=False,
    )  # fmt: skip
    line = assert_one_error_line(result)
    assert line == (
        f"error: {served.mtls_address} is the mutual-TLS port; --server names the server-TLS "
        "port (8081 by default)"
    )
    assert_clean(result)
    # Nothing reached the authority: the token is unspent.
    served.cli(*args, "--server", served.address, "--out", str(tmp_path / "b"), stdin=token + "\n")


def test_a_workload_call_at_the_mutual_tls_port_says_so(
    served: ServeProcess, tmp_path: Path
) -> None:
    attest(served, WORKLOAD, tmp_path / "svid")
    for args in (
        ("workload", "jwt", "--svid-dir", str(tmp_path / "svid"), "--audience", "a"),
        ("workload", "renew", "--svid-dir", str(tmp_path / "svid")),
    ):
        result = served.cli(*args, "--server", served.mtls_address, check=False)
        assert_one_error_line(result, f"{served.mtls_address} is the mutual-TLS port")
        assert_clean(result)


def test_an_agent_at_the_mutual_tls_port_says_so(served: ServeProcess, tmp_path: Path) -> None:
    token = served.cli("token", "create", "--spiffe-id", AGENT).stdout.strip()
    result = run(
        "agent", "--server", served.mtls_address,
        "--trust-bundle", str(bundle_file(served, tmp_path)),
        "--data-dir", str(tmp_path / "agent"),
        "--workload-api-socket", str(tmp_path / "a.sock"), "--join-token", "-",
        stdin=token + "\n",
    )  # fmt: skip
    assert_one_error_line(result, f"{served.mtls_address} is the mutual-TLS port")
    assert_clean(result)


def test_an_unreachable_server_is_not_called_the_mutual_tls_port(
    served: ServeProcess, tmp_path: Path
) -> None:
    bundle = bundle_file(served, tmp_path)
    address = free_address()
    result = run("bundle", "show", "--server", address, "--trust-bundle", str(bundle))
    line = assert_one_error_line(result, "UNAVAILABLE")
    assert "mutual-TLS" not in line
    ok = run("bundle", "show", "--server", served.address, "--trust-bundle", str(bundle))
    assert ok.returncode == 0, ok.stderr


def _trust_bundle_commands(bundle: Path, tmp_path: Path, server: str) -> list[list[str]]:
    return [
        ["workload", "attest", "--server", server, "--trust-bundle", str(bundle),
         "--join-token", "x", "--out", str(tmp_path / "out")],
        ["agent", "--server", server, "--trust-bundle", str(bundle),
         "--data-dir", str(tmp_path / "agent"), "--workload-api-socket", str(tmp_path / "a.sock"),
         "--join-token", "x"],
        ["bundle", "show", "--server", server, "--trust-bundle", str(bundle)],
    ]  # fmt: skip


def test_a_missing_trust_bundle_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    for args in _trust_bundle_commands(missing, tmp_path, free_address()):
        result = run(*args)
        line = assert_one_error_line(result)
        assert line == f"error: cannot read trust bundle {missing}: No such file or directory"
        assert_clean(result)
        assert not (tmp_path / "out").exists()
        assert not (tmp_path / "agent").exists()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a certificate\n",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ],
)
def test_a_trust_bundle_without_a_pem_certificate_is_one_line(
    tmp_path: Path, content: bytes
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(content)
    for args in _trust_bundle_commands(bundle, tmp_path, free_address()):
        result = run(*args)
        assert assert_one_error_line(result) == f"error: {bundle} holds no PEM certificate"
        assert_clean(result)


# --- refusals in the server's log --------------------------------------------------------------


def _refused(log: str, reason: str) -> list[str]:
    return [line for line in log.splitlines() if f"reason={reason} " in line]


def _suppressed(log: str, reason: str) -> int:
    pattern = re.compile(rf"(\d+) more refused \({re.escape(reason)}\) in the last ")
    return sum(int(m.group(1)) for m in pattern.finditer(log))


async def _bad_attestations(served: ServeProcess, bundle_pem: bytes, count: int) -> None:
    async with WorkloadClient(served.address, bundle_pem) as client:
        for _ in range(count):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.attest("join_token", b"no-such-token", new_key())
            assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_a_flood_of_refusals_is_logged_with_reason_and_caller_and_bounded(
    served: ServeProcess, tmp_path: Path
) -> None:
    bundle_pem = bundle_file(served, tmp_path).read_bytes()
    flood = 6 * REFUSAL_LOG_BURST
    began = time.monotonic()
    asyncio.run(_bad_attestations(served, bundle_pem, flood))
    elapsed = time.monotonic() - began
    reason = "JOIN_TOKEN_UNKNOWN"
    # Every refusal is either a line or counted in a summary line (written when its window
    # closes, a timer after the flood).
    deadline = time.monotonic() + 4 * REFUSAL_LOG_WINDOW
    while time.monotonic() < deadline:
        log = served.log()
        if len(_refused(log, reason)) + _suppressed(log, reason) == flood:
            break
        time.sleep(0.2)
    log = served.log()
    lines = _refused(log, reason)
    assert len(lines) + _suppressed(log, reason) == flood, log
    windows = math.ceil(elapsed / REFUSAL_LOG_WINDOW) + 1
    assert len(lines) <= REFUSAL_LOG_BURST * windows < flood
    for line in lines:
        assert "WARNING" in line
        assert "refused PERMISSION_DENIED" in line
        assert "method=WorkloadService.Attest" in line
        assert "peer=ipv4:127.0.0.1:" in line  # no SVID over server TLS: the address
        assert "no-such-token" not in line


def test_a_denied_exchange_is_logged_with_the_caller_s_spiffe_id(
    served: ServeProcess, tmp_path: Path
) -> None:
    """No policy loaded: every exchange is denied. The line names the SVID's SPIFFE ID."""
    attest(served, WORKLOAD, tmp_path / "svid")
    result = served.cli(
        "workload", "exchange", "--server", served.address, "--svid-dir", str(tmp_path / "svid"),
        "--action", "read", "--resource", "repo:x", "--audience", "svc", "--purpose", "test",
        check=False,
    )  # fmt: skip
    assert_one_error_line(result, "PERMISSION_DENIED", "[POLICY_DENIED]")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _refused(served.log(), "POLICY_DENIED"):
        time.sleep(0.1)
    (line,) = _refused(served.log(), "POLICY_DENIED")
    assert "refused PERMISSION_DENIED" in line
    assert f"spiffe_id={WORKLOAD} peer=ipv4:127.0.0.1:" in line
    assert "method=WorkloadService.Exchange" in line


def test_a_revoked_caller_is_logged_with_its_spiffe_id(
    served: ServeProcess, tmp_path: Path
) -> None:
    attest(served, WORKLOAD, tmp_path / "svid")
    served.cli("revoke", "--spiffe-id", WORKLOAD, "--reason", "test")
    result = served.cli(
        "workload", "jwt", "--server", served.address, "--svid-dir", str(tmp_path / "svid"),
        "--audience", "svc", check=False,
    )  # fmt: skip
    assert_one_error_line(result, "PERMISSION_DENIED", "[SUBJECT_REVOKED]")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _refused(served.log(), "SUBJECT_REVOKED"):
        time.sleep(0.1)
    (line,) = _refused(served.log(), "SUBJECT_REVOKED")
    assert f"spiffe_id={WORKLOAD} peer=ipv4:127.0.0.1:" in line
    assert "method=WorkloadService.FetchJWTSVID" in line


def test_json_log_lines_parse_and_carry_no_token(tmp_path: Path) -> None:
    with serve_process(tmp_path / "data", "--log-format", "json") as served:
        join_token = served.cli("token", "create", "--spiffe-id", WORKLOAD).stdout.strip()
        bundle = bundle_file(served, tmp_path)
        served.cli(
            "workload", "attest", "--server", served.address, "--trust-bundle", str(bundle),
            "--join-token", "-", "--out", str(tmp_path / "svid"), stdin=join_token + "\n",
        )  # fmt: skip
        jwt_svid = served.cli(
            "workload", "jwt", "--server", served.address, "--svid-dir", str(tmp_path / "svid"),
            "--audience", "svc",
        ).stdout.strip()  # fmt: skip
        again = served.cli(
            "workload", "attest", "--server", served.address, "--trust-bundle", str(bundle),
            "--join-token", "-", "--out", str(tmp_path / "again"), stdin=join_token + "\n",
            check=False,
        )  # fmt: skip
        assert again.returncode != 0  # a join token is single-use: refused, and logged
        # A JWT-SVID is not a task token: presented as one, it is refused, and logged.
        delegated = served.cli(
            "workload", "delegate", "--server", served.address,
            "--svid-dir", str(tmp_path / "svid"), "--token", jwt_svid,
            "--to-svid", str(tmp_path / "svid" / "svid.pem"), check=False,
        )  # fmt: skip
        assert delegated.returncode != 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            '"JOIN_TOKEN_USED"' in served.log() and "WorkloadService.Delegate" in served.log()
        ):
            time.sleep(0.1)
    log = served.log()
    records = [json.loads(line) for line in log.splitlines()]
    assert records
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
    (refusal,) = [r for r in records if r.get("reason") == "JOIN_TOKEN_USED"]
    assert refusal["level"] == "WARNING"
    assert refusal["code"] == "PERMISSION_DENIED"
    assert refusal["method"] == "WorkloadService.Attest"
    assert refusal["peer"].startswith("ipv4:127.0.0.1:")
    assert refusal["spiffe_id"] is None  # server TLS: no SVID, the address names the caller
    (bad_token,) = [r for r in records if r.get("method") == "WorkloadService.Delegate"]
    assert bad_token["code"] in ("UNAUTHENTICATED", "PERMISSION_DENIED")
    assert bad_token["spiffe_id"] == WORKLOAD
    assert join_token
    assert join_token not in log
    assert jwt_svid
    assert jwt_svid not in log
    assert jwt_svid.split(".")[2] not in log  # not even the signature


def test_the_log_format_is_checked_in_the_configuration(tmp_path: Path) -> None:
    config = tmp_path / "authority.toml"
    config.write_text('log_format = "xml"\n')
    result = run("serve", "--config", str(config), "--data-dir", str(tmp_path / "d"))
    assert_one_error_line(result, "log_format must be one of text, json")
    assert_clean(result)
    assert not (tmp_path / "d").exists()


def test_the_log_format_from_the_configuration_file(tmp_path: Path) -> None:
    config = tmp_path / "authority.toml"
    config.write_text('log_format = "json"\n')
    with serve_process(tmp_path / "data", "--config", str(config)) as served:
        served.cli("entry", "list")
    lines = served.log().splitlines()
    assert lines
    assert all(isinstance(json.loads(line), dict) for line in lines)


def test_a_refusal_on_the_workload_api_names_the_local_caller(
    tmp_path: Path, socket_dir: Path
) -> None:
    """No entry for this process: refused, and the line names its uid and pid (the kernel's)."""
    socket_path = socket_dir / "workload.sock"
    with serve_process(tmp_path / "data", "--workload-api-socket", str(socket_path)) as served:
        result = run(
            "workload", "fetch", "--socket", str(socket_path), "--out", str(tmp_path / "o")
        )
        assert_one_error_line(result, "PERMISSION_DENIED", "[NO_IDENTITY_ISSUED]")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _refused(served.log(), "NO_IDENTITY_ISSUED"):
            time.sleep(0.1)
        (line,) = _refused(served.log(), "NO_IDENTITY_ISSUED")
    assert f"peer=local uid={os.getuid()} pid=" in line
    assert "method=/SpiffeWorkloadAPI/FetchX509SVID" in line


def test_the_agent_logs_json_lines_without_its_join_token(
    served: ServeProcess, tmp_path: Path, socket_dir: Path
) -> None:
    token = served.cli("token", "create", "--spiffe-id", AGENT).stdout.strip()
    socket_path, log_path = socket_dir / "agent.sock", tmp_path / "agent.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                *authority_command(), "agent", "--server", served.address,
                "--trust-bundle", str(bundle_file(served, tmp_path)),
                "--data-dir", str(tmp_path / "agent"), "--workload-api-socket", str(socket_path),
                "--join-token", "-", "--log-format", "json",
            ],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        assert proc.stdin is not None
        proc.stdin.write(f"{token}\n".encode())
        proc.stdin.close()
        deadline = time.monotonic() + 30
        while "agent serving" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        # This process has no node entry: the agent refuses it, and logs who asked.
        fetch = run("workload", "fetch", "--socket", str(socket_path), "--out", str(tmp_path / "o"))
        assert_one_error_line(fetch, "PERMISSION_DENIED")
        while '"reason": "NO_IDENTITY_ISSUED"' not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    text = log_path.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert any(r["message"].startswith("agent serving") for r in records)
    (refusal,) = [r for r in records if r.get("reason") == "NO_IDENTITY_ISSUED"]
    assert refusal["peer"].startswith(f"local uid={os.getuid()} pid=")
    assert token not in text


def test_a_folder_given_as_trust_bundle_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "bundles"
    folder.mkdir()
    for args in _trust_bundle_commands(folder, tmp_path, free_address()):
        result = run(*args)
        assert assert_one_error_line(result) == (
            f"error: cannot read trust bundle {folder}: Is a directory"
        )
        assert_clean(result)


def test_an_svid_folder_whose_key_is_not_the_certificate_s_is_one_line(
    served: ServeProcess, tmp_path: Path
) -> None:
    folder = tmp_path / "svid"
    attest(served, WORKLOAD, folder)
    (folder / "svid.key").write_bytes(key_pem(new_key()))
    for args in (
        ("workload", "jwt", "--audience", "a"),
        (
            "workload",
            "renew",
        ),
        ("watch",),
    ):
        result = served.cli(
            *args, "--server", served.address, "--svid-dir", str(folder), check=False
        )
        line = assert_one_error_line(result)
        assert line == f"error: {folder / 'svid.key'} is not the key of {folder / 'svid.pem'}"
        assert_clean(result)


def test_watching_at_the_mutual_tls_port_says_so(served: ServeProcess, tmp_path: Path) -> None:
    """``watch`` retries a lost stream for ever: the wrong port is said before the first try."""
    attest(served, WORKLOAD, tmp_path / "svid")
    result = served.cli(
        "watch", "--server", served.mtls_address, "--svid-dir", str(tmp_path / "svid"),
        check=False,
    )  # fmt: skip
    assert_one_error_line(result, f"{served.mtls_address} is the mutual-TLS port")
    assert_clean(result)


async def test_a_port_taken_after_the_check_is_the_same_one_line_error() -> None:
    """The check and gRPC's bind are two steps: a port taken between them (a race) is refused
    by the bind in the same words, not with gRPC's RuntimeError."""
    server = grpc.aio.server()
    with tcp_listener() as taken, pytest.raises(FailedPrecondition) as refused:
        _add_secure_port(server, taken, "listen", grpc.local_server_credentials())
    assert str(refused.value) == f"{taken} is already in use (listen); another authority running?"
    assert refused.value.reason == ADDRESS_IN_USE
    await server.stop(None)
