"""``unix``: the caller's uid, gid, pid, executable and its digest, from the kernel, checked on a
real process this test starts (its pid pinned with a real pidfd)."""

from __future__ import annotations

import asyncio
import grp
import hashlib
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from attestors import unix as unix_module
from attestors.api import AttestationRefused, Attestor, ConfigError, PeerCredentials
from attestors.testing import FakeHost, ScriptedContext
from attestors.unix import UnixAttestor
from authority.attestation import AttestorHost
from authority.clock import FakeClock
from authority.config import Limits
from authority.models import Selector
from authority.store.memory import MemoryStore

SLEEP = shutil.which("sleep") or "/bin/sleep"
EXECUTABLE = os.path.realpath(SLEEP)  # what /proc/<pid>/exe names


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@contextmanager
def process(executable: str = SLEEP) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([executable, "30"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@contextmanager
def pinned(
    proc: subprocess.Popen[bytes], *, connected_at: float | None = None
) -> Iterator[PeerCredentials]:
    """What the local endpoint hands the plugin for a caller: kernel ids, a pidfd, the time."""
    pidfd = os.pidfd_open(proc.pid)
    try:
        yield PeerCredentials(
            pid=proc.pid,
            uid=os.getuid(),
            gid=os.getgid(),
            pidfd=pidfd,
            connected_at=boottime() if connected_at is None else connected_at,
        )
    finally:
        os.close(pidfd)


def exited_unreaped(proc: subprocess.Popen[bytes]) -> None:
    """Wait for ``proc`` to exit and leave it a zombie (until ``proc.wait()`` reaps it)."""
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)


def unix(**config: Any) -> UnixAttestor:
    return UnixAttestor.configure(config, FakeHost())


async def refused(attestor: UnixAttestor, peer: PeerCredentials | None) -> AttestationRefused:
    with pytest.raises(AttestationRefused) as info:
        await attestor.attest(b"", ScriptedContext(peer=peer))
    return info.value


def sha256_of(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- success ---------------------------------------------------------------------------------


async def test_the_selectors_come_from_the_kernel() -> None:
    with process() as proc, pinned(proc) as peer:
        ctx = ScriptedContext(peer=peer)
        attested = await unix().attest(b"uid=12345 path=/usr/bin/admin", ctx)
    assert sorted(attested.selectors) == sorted(
        [
            ("uid", str(os.getuid())),
            ("gid", str(os.getgid())),
            ("pid", str(proc.pid)),
            ("path", EXECUTABLE),
            ("sha256", sha256_of(EXECUTABLE)),
            ("user", pwd.getpwuid(os.getuid()).pw_name),
            ("group", grp.getgrgid(os.getgid()).gr_name),
        ]
    )
    # The keys it declares (entry create refuses others) are exactly those it produces.
    assert {k for k, _ in attested.selectors} == UnixAttestor.selector_kinds
    assert attested.bound_spiffe_id is None
    assert ctx.payloads == []


async def test_the_evidence_is_ignored() -> None:
    with process() as proc, pinned(proc) as peer:
        plain = await unix().attest(b"", ScriptedContext(peer=peer))
        claimed = await unix().attest(b"uid=0 path=/sbin/init", ScriptedContext(peer=peer))
    assert plain == claimed


async def test_without_hashing_there_is_no_sha256() -> None:
    with process() as proc, pinned(proc) as peer:
        attested = await unix(hash_executable=False).attest(b"", ScriptedContext(peer=peer))
    keys = {k for k, _ in attested.selectors}
    assert "sha256" not in keys
    assert ("path", EXECUTABLE) in attested.selectors


async def test_the_ids_are_the_kernels_peer_credentials() -> None:
    # The uid and gid recorded at connect are what counts, not a later look at the process.
    with process() as proc, pinned(proc) as peer:
        other = PeerCredentials(peer.pid, 4242, 4343, peer.pidfd, peer.connected_at)
        attested = await unix().attest(b"", ScriptedContext(peer=other))
    assert ("uid", "4242") in attested.selectors
    assert ("gid", "4343") in attested.selectors


async def test_a_copied_executable_is_named_by_its_own_path(tmp_path: Path) -> None:
    copy = tmp_path / "agent"
    shutil.copy(EXECUTABLE, copy)
    with process(str(copy)) as proc, pinned(proc) as peer:
        attested = await unix().attest(b"", ScriptedContext(peer=peer))
    assert ("path", str(copy)) in attested.selectors
    assert ("sha256", sha256_of(str(copy))) in attested.selectors


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


async def test_an_executable_is_hashed_once_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The digest is remembered by the file's identity and version: a second caller running the
    same binary costs no hashing; rewriting the binary in place (same inode) is seen."""
    hashed: list[int] = []
    real = unix_module._hash_file

    def counting(fh: Any, max_bytes: int) -> str:
        hashed.append(1)
        return real(fh, max_bytes)

    monkeypatch.setattr(unix_module, "_hash_file", counting)
    copy = tmp_path / "agent"
    shutil.copy(EXECUTABLE, copy)
    for _ in range(2):
        with process(str(copy)) as proc, pinned(proc) as peer:
            attested = await unix().attest(b"", ScriptedContext(peer=peer))
        assert ("sha256", sha256_of(str(copy))) in attested.selectors
    assert len(hashed) == 1
    inode = copy.stat().st_ino
    await asyncio.to_thread(_append, copy, b"\0" * 16)  # same inode, new content
    assert copy.stat().st_ino == inode
    with process(str(copy)) as proc, pinned(proc) as peer:
        attested = await unix().attest(b"", ScriptedContext(peer=peer))
    assert ("sha256", sha256_of(str(copy))) in attested.selectors
    assert len(hashed) == 2


async def test_a_path_no_selector_can_hold_is_left_out(tmp_path: Path) -> None:
    # Through the real host: a '*' in a selector would be refused there as a whole.
    copy = tmp_path / "ag*ent"
    shutil.copy(EXECUTABLE, copy)
    plugins: dict[str, type[Attestor]] = {"unix": UnixAttestor}
    host = AttestorHost(store=MemoryStore(), clock=FakeClock(), limits=Limits(), plugins=plugins)
    await host.register("local", "unix", {})
    with process(str(copy)) as proc, pinned(proc) as peer:
        outcome = await host.attest("local", b"", ScriptedContext(peer=peer))
    assert Selector("local", f"pid:{proc.pid}") in outcome.selectors
    assert Selector("local", f"sha256:{sha256_of(str(copy))}") in outcome.selectors
    assert not [s for s in outcome.selectors if s.value.startswith("path:")]


# --- refusals --------------------------------------------------------------------------------


async def test_a_network_caller_has_no_peer() -> None:
    assert (await refused(unix(), None)).reason == "UNIX_NO_PEER"


async def test_a_process_that_exited_and_was_reaped_is_gone() -> None:
    with process() as proc, pinned(proc) as peer:
        proc.kill()
        proc.wait()
        assert (await refused(unix(), peer)).reason == "UNIX_PROCESS_GONE"


async def test_a_process_that_exited_but_was_not_reaped_is_gone() -> None:
    with process() as proc, pinned(proc) as peer:
        proc.kill()
        exited_unreaped(proc)
        assert (await refused(unix(), peer)).reason == "UNIX_PROCESS_GONE"


async def test_a_pid_reused_after_the_connection_is_refused() -> None:
    # The caller connected, exited, and its pid went to a process started afterwards.
    connected_at = boottime() - 1.0
    with process() as proc, pinned(proc, connected_at=connected_at) as peer:
        assert (await refused(unix(), peer)).reason == "UNIX_PID_REUSED"


async def test_a_pinned_process_that_exited_is_gone_even_if_its_pid_is_alive() -> None:
    # The pidfd names the caller; a live process at the same pid number is not it.
    with process() as caller, pinned(caller) as peer, process() as other:
        caller.kill()
        caller.wait()
        impostor = PeerCredentials(other.pid, peer.uid, peer.gid, peer.pidfd, boottime())
        assert (await refused(unix(), impostor)).reason == "UNIX_PROCESS_GONE"


async def test_an_executable_over_the_limit_is_refused() -> None:
    with process() as proc, pinned(proc) as peer:
        error = await refused(unix(max_executable_bytes=1024), peer)
    assert error.reason == "UNIX_EXECUTABLE_TOO_LARGE"


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ({"hash_executable": "yes"}, "hash_executable"),
        ({"hash_executable": 1}, "hash_executable"),
        ({"max_executable_bytes": 0}, "max_executable_bytes"),
        ({"max_executable_bytes": -1}, "max_executable_bytes"),
        ({"max_executable_bytes": True}, "max_executable_bytes"),
        ({"max_executable_bytes": "1G"}, "max_executable_bytes"),
        ({"uid": 0}, "unknown configuration keys: uid"),
    ],
)
def test_bad_configuration_is_refused(config: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        UnixAttestor.configure(config, FakeHost())


def test_the_defaults_hash_the_executable() -> None:
    assert isinstance(UnixAttestor.configure({}, FakeHost()), UnixAttestor)
