"""The authority restarts (SIGTERM, SIGKILL) on the same data directory and ports while its
followers run: ``authority watch``, a relying service's revocation follower and a Workload API
client carry on, resume where they were, miss nothing, print nothing twice, and log the outage
once each way. A workload command on an SVID past (or before) its life says so before dialing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from authority._pb import authority_v1_authority_pb2 as pb
from authority.client import (
    RevocationWatcher,
    StaticKeys,
    SvidFiles,
    TaskTokenVerifier,
    WorkloadApiClient,
    WorkloadClient,
    stub_stream,
)
from authority.errors import Unauthenticated, Unavailable
from tests.helpers import (
    ServeProcess,
    authority_command,
    interrupt,
    restart_serve,
    short_socket_dir,
    start_serve,
)
from tests.unit._pki import ec_key, make_ca, make_leaf
from tests.unit.test_relying import AUDIENCE, HOLDER_CERT, TD, Signer

WATCHER_ID = "spiffe://example.org/relying/watcher"
OUTAGE = 10.0  # seconds the authority stays down in the log-volume check


class Authority:
    """One data directory and its ports, served by one ``authority serve`` at a time."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.socket_dir = short_socket_dir()
        self.extra = extra
        self.served: ServeProcess = start_serve(data_dir, self.socket_dir, *extra)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.served = restart_serve(self.served, *self.extra, sig=sig)

    def revoke(self, name: str) -> int:
        """Revoke the SPIFFE ID ``TD/name`` (registered first: a name that exists); its seq."""
        spiffe_id = f"spiffe://{TD}/{name}"
        self.served.cli("entry", "create", "--spiffe-id", spiffe_id, "--selector", "unix:uid:64999")
        out = self.served.cli(
            "revoke", "--spiffe-id", spiffe_id, "--reason", "test", "--format", "json"
        )
        return max(int(json.loads(line)["seq"]) for line in out.stdout.splitlines())

    def attest(self, spiffe_id: str, folder: Path) -> Path:
        token = self.served.cli("token", "create", "--spiffe-id", spiffe_id).stdout.strip()
        bundle = folder.parent / "bundle.pem"
        bundle.write_text(self.served.cli("bundle", "show").stdout)
        self.served.cli(
            "workload", "attest", "--server", self.served.address, "--trust-bundle", str(bundle),
            "--join-token", token, "--out", str(folder),
        )  # fmt: skip
        return folder

    def close(self) -> None:
        self.served.stop(signal.SIGKILL)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


@pytest.fixture
def authority(tmp_path: Path) -> Iterator[Authority]:
    running = Authority(tmp_path / "data")
    try:
        yield running
    finally:
        running.close()


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 90.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# --- authority watch, as a process -------------------------------------------------------------


@dataclass
class Watch:
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def events(self) -> list[dict[str, object]]:
        lines = self.out.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def seqs(self) -> list[int]:
        return [int(str(e["seq"])) for e in self.events()]

    def log_lines(self) -> list[str]:
        return self.err.read_text().splitlines()

    def count(self, needle: str) -> int:
        return sum(needle in line for line in self.log_lines())


@contextlib.contextmanager
def watching(authority: Authority, folder: Path, *args: str) -> Iterator[Watch]:
    folder.mkdir(parents=True, exist_ok=True)
    out, err = folder / "watch.out", folder / "watch.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [*authority_command(), "watch", "--format", "json", *args],
            env={**authority.served.env(), "PYTHONUNBUFFERED": "1"},
            stdout=stdout,
            stderr=stderr,
        )
    watch = Watch(proc, out, err)
    try:
        yield watch
    finally:
        interrupt(proc)


@pytest.mark.parametrize("transport", ["admin", "mtls"])
def test_watch_carries_on_across_restarts(
    authority: Authority, tmp_path: Path, transport: str
) -> None:
    args: tuple[str, ...] = ()
    if transport == "mtls":
        svid_dir = authority.attest(WATCHER_ID, tmp_path / "watcher")
        args = ("--server", authority.served.address, "--svid-dir", str(svid_dir))
    with watching(authority, tmp_path / "watch", *args) as watch:
        before = authority.revoke("before")
        wait_until(lambda: before in watch.seqs(), "the first revocation printed")

        authority.restart(signal.SIGTERM)
        after_term = authority.revoke("after-sigterm")
        wait_until(lambda: after_term in watch.seqs(), "a revocation made after SIGTERM")

        authority.served.stop(signal.SIGKILL)
        wait_until(lambda: watch.count(" lost: ") == 2, "the second loss logged")
        lines_at_loss = len(watch.log_lines())
        time.sleep(OUTAGE)  # the authority stays down: the watcher retries, quietly
        assert len(watch.log_lines()) == lines_at_loss, watch.log_lines()[lines_at_loss:]
        assert watch.proc.poll() is None, "authority watch exited while the authority was down"

        authority.restart()
        after_kill = authority.revoke("after-sigkill")
        wait_until(lambda: after_kill in watch.seqs(), "a revocation made after SIGKILL")
        wait_until(lambda: watch.count(" restored after ") == 2, "the recovery logged")
        assert watch.proc.poll() is None

    # Each revocation once, in order; nothing missed, nothing printed twice.
    assert watch.seqs() == [before, after_term, after_kill]
    assert [e["target"] for e in watch.events()] == [
        f"spiffe://{TD}/{name}" for name in ("before", "after-sigterm", "after-sigkill")
    ]
    log = watch.log_lines()
    assert watch.count(" lost: ") == 2
    assert watch.count(" restored after ") == 2
    assert len(log) <= 4, log  # two outages, a line each way: no line per retry
    assert not any("Traceback" in line for line in log), log


def test_watch_ends_when_its_reader_does(authority: Authority) -> None:
    """``authority watch | head -1``: a closed pipe ends the watch; it is not an outage to
    retry forever."""
    proc = subprocess.Popen(
        [*authority_command(), "watch", "--format", "json"],
        env={**authority.served.env(), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        authority.revoke("first")
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["target"] == f"spiffe://{TD}/first"
        proc.stdout.close()
        authority.revoke("second")  # printing it meets the closed pipe
        assert proc.wait(timeout=60) == 0
        assert proc.stderr is not None
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


# --- a relying service's revocation follower, in this process ---------------------------------


async def test_the_relying_follower_resumes_from_its_last_seq_and_fails_closed_meanwhile(
    authority: Authority, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authority.watch")
    svid_dir = authority.attest(WATCHER_ID, tmp_path / "relying")
    signer = Signer()
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    # Tokens told apart by the actor of their delegation chain, which is what gets revoked.
    before, after, kept = (
        signer.mint(HOLDER_CERT, now=now, actors=actors)
        for actors in ((f"spiffe://{TD}/before",), (f"spiffe://{TD}/after",), ())
    )
    sinces: list[int] = []
    async with WorkloadClient.from_svid_dir(authority.served.address, svid_dir) as client:
        opened = stub_stream(await client.mtls_stub())

        def recording(since: int) -> AsyncIterator[pb.RevocationMessage]:
            sinces.append(since)
            return opened(since)

        watcher = RevocationWatcher(recording, stale_after=dt.timedelta(seconds=1))
        verifier = TaskTokenVerifier(
            issuer=TD, audience=AUDIENCE, keys=StaticKeys(signer.public), revocations=watcher
        )

        async def refusal(token: str) -> str:
            try:
                await verifier.verify(token, action="read", peer_cert_der=HOLDER_CERT)
            except (Unauthenticated, Unavailable) as exc:
                return exc.reason
            return "accepted"

        watcher.start()
        try:
            await watcher.wait_synced(timeout=30)
            first = await asyncio.to_thread(authority.revoke, "before")
            await until(lambda: watcher.seq >= first, "the first revocation applied")
            assert await refusal(before.token) == "TOKEN_REVOKED"
            assert await refusal(kept.token) == "accepted"

            await asyncio.to_thread(authority.served.stop, signal.SIGKILL)
            await until(lambda: not watcher.fresh(), "the feed going stale")
            # Disconnected and stale: every token is refused, the good one included.
            assert await refusal(kept.token) == "REVOCATION_FEED_STALE"
            assert await refusal(after.token) == "REVOCATION_FEED_STALE"

            await asyncio.to_thread(authority.restart)
            second = await asyncio.to_thread(authority.revoke, "after")
            await until(lambda: watcher.seq >= second and watcher.fresh(), "the feed caught up")
        finally:
            await watcher.close()

    assert len(sinces) >= 2
    assert sinces[0] == 0
    assert set(sinces[1:]) == {first}, sinces  # every reconnect resumed from the last seq seen
    assert second > first
    assert await refusal(before.token) == "TOKEN_REVOKED"
    assert await refusal(after.token) == "TOKEN_REVOKED"
    assert await refusal(kept.token) == "accepted"
    said = [r.getMessage() for r in caplog.records if r.name == "authority.watch"]
    assert sum(" lost: " in line for line in said) == 1, said
    assert sum(" restored after " in line for line in said) == 1, said
    assert len(said) == 2, said


# --- the Workload API client's stream -----------------------------------------------------------


async def test_the_workload_api_stream_carries_on_across_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authority.client")
    api_dir = short_socket_dir()
    api_socket = api_dir / "api.sock"
    authority = Authority(tmp_path / "data", "--workload-api-socket", str(api_socket))
    try:
        authority.served.cli(
            "entry", "create", "--spiffe-id", f"spiffe://{TD}/streamed", "--selector",
            f"unix:uid:{os.getuid()}",
        )  # fmt: skip
        async with WorkloadApiClient(api_socket) as client:
            updates = client.watch_x509_svids()
            async with asyncio.timeout(30):
                first = await anext(updates)
            await asyncio.to_thread(authority.restart, signal.SIGKILL)
            async with asyncio.timeout(90):
                again = await anext(updates)
            await updates.aclose()  # type: ignore[attr-defined]
    finally:
        authority.close()
        shutil.rmtree(api_dir, ignore_errors=True)
    assert [s.spiffe_id for s in first] == [f"spiffe://{TD}/streamed"]
    assert [s.spiffe_id for s in again] == [f"spiffe://{TD}/streamed"]
    said = [r.getMessage() for r in caplog.records if r.name == "authority.client"]
    assert sum(" lost: " in line for line in said) == 1, said
    assert sum(" restored after " in line for line in said) == 1, said


# --- an SVID past (or before) its life: said before dialing ------------------------------------


def _svid_dir(folder: Path, not_before: dt.datetime, not_after: dt.datetime) -> Path:
    ca = make_ca(
        not_before=not_before - dt.timedelta(hours=1), not_after=not_after + dt.timedelta(days=1)
    )
    key = ec_key()
    leaf = make_leaf(ca, key.public_key(), not_before=not_before, not_after=not_after)
    pem = serialization.Encoding.PEM
    SvidFiles(folder).write(leaf.public_bytes(pem), key, ca[0].public_bytes(pem))
    return folder


SVID_COMMANDS = {
    "workload renew": [],
    "workload jwt": ["--audience", "svc"],
    "workload exchange": [
        "--action", "read", "--resource", "r", "--audience", "svc", "--purpose", "p",
    ],
    "workload delegate": ["--token", "t", "--to-svid", "SVID"],
    "workload end-task": ["--task", "t1"],
    "watch": [],  # a relying service's subscription, over mutual TLS
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(SVID_COMMANDS))
@pytest.mark.parametrize("when", ["expired", "not-yet-valid"])
def test_a_workload_command_on_an_svid_out_of_its_life_says_so_before_dialing(
    tmp_path: Path, command: str, when: str
) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    if when == "expired":
        window = (now - dt.timedelta(minutes=10), now - dt.timedelta(minutes=5))
        expected = f"SVID expired at {window[1]:%Y-%m-%d %H:%M:%S} UTC, attest again"
    else:
        window = (now + dt.timedelta(minutes=5), now + dt.timedelta(minutes=10))
        expected = f"SVID not valid until {window[0]:%Y-%m-%d %H:%M:%S} UTC"
    folder = _svid_dir(tmp_path / "svid", *window)
    args = [a.replace("SVID", str(folder / "svid.pem")) for a in SVID_COMMANDS[command]]
    with socket.socket() as listener:  # where the command would dial: it must not
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        server = f"127.0.0.1:{listener.getsockname()[1]}"
        result = subprocess.run(
            [*authority_command(), *command.split(), "--server", server,
             "--svid-dir", str(folder), *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing connected
    assert result.returncode != 0
    assert result.stderr.startswith(f"error: {expected}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert x509.load_pem_x509_certificates((folder / "svid.pem").read_bytes())  # left as it was
