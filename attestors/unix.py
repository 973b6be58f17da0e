"""``unix``: the caller's uid, gid, pid, executable path and its SHA-256, taken from the kernel.

Works only on the authority's local Unix socket, where the transport reads ``SO_PEERCRED`` and
pins the caller's process with a pidfd (``SO_PEERPIDFD``, or ``pidfd_open`` right after accept).
Nothing the caller sends is trusted: the evidence is ignored.

A PID that exits and is reused while we look at it must not be misattributed, so:
1. the process's start time (``/proc/<pid>/stat``) must not be later than the moment the
   connection was accepted: a reused PID belongs to a process started afterwards;
2. the executable is read through ``/proc/<pid>/exe`` (the mapped binary, even if the path was
   replaced on disk);
3. afterwards the pidfd must still name a live process and the start time must be unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import os
import pwd
import signal
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar, Self

from attestors.api import (
    MAX_SELECTOR_VALUE_CHARS,
    AttestationRefused,
    AttestContext,
    Attested,
    ConfigError,
    HostServices,
    PeerCredentials,
    require_keys,
)

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_CHUNK = 1 << 20
_DIGEST_CACHE_SIZE = 1024
_DIGESTS: OrderedDict[tuple[int, int, int, int, int], str] = OrderedDict()
_DIGESTS_LOCK = threading.Lock()  # attestations run in worker threads


@dataclass(frozen=True, slots=True)
class ProcessFacts:
    pid: int
    uid: int
    gid: int
    path: str
    sha256: str | None


def _selector_value(value: str) -> bool:
    """Whether ``value`` can be a selector value: the host matches selectors exactly, so it
    refuses empty or overlong values, wildcards and control characters (all legal in a path)."""
    return 0 < len(value) <= MAX_SELECTOR_VALUE_CHARS and not any(
        ch in "*?\x7f" or ch < " " for ch in value
    )


def _start_time(pid: int) -> float:
    """Seconds after boot at which ``pid`` started (CLOCK_BOOTTIME scale)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        data = fh.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[19]) / _CLOCK_TICKS  # field 22 of the whole line


class _NotHashedYet(Exception):
    """The executable's digest is not remembered: hashing it may take a while."""


def _executable_digest(fh: BinaryIO, max_bytes: int, *, remembered_only: bool = False) -> str:
    """The SHA-256 of the open executable, remembered by the file's identity and version
    (device, inode, size, mtime and ctime: the kernel sets ctime on every change, and no caller
    can set it back), so a busy Workload API hashes each binary once, not once a call."""
    st = os.fstat(fh.fileno())
    if st.st_size > max_bytes:
        raise AttestationRefused("UNIX_EXECUTABLE_TOO_LARGE", "the executable is too large to hash")
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _DIGESTS_LOCK:
        known = _DIGESTS.get(key)
        if known is not None:
            _DIGESTS.move_to_end(key)
            return known
    if remembered_only:
        raise _NotHashedYet
    digest = _hash_file(fh, max_bytes)
    with _DIGESTS_LOCK:
        _DIGESTS[key] = digest
        if len(_DIGESTS) > _DIGEST_CACHE_SIZE:
            _DIGESTS.popitem(last=False)
    return digest


def _hash_file(fh: BinaryIO, max_bytes: int) -> str:
    sha = hashlib.sha256()
    read = 0
    while chunk := fh.read(_CHUNK):
        read += len(chunk)
        if read > max_bytes:
            raise AttestationRefused(
                "UNIX_EXECUTABLE_TOO_LARGE", "the executable is too large to hash"
            )
        sha.update(chunk)
    return sha.hexdigest()


def _pidfd_alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, merely not ours to signal
    return True


def inspect_process(
    peer: PeerCredentials, *, hash_executable: bool, max_bytes: int, remembered_only: bool = False
) -> ProcessFacts:
    """The process's facts; with ``remembered_only``, raise ``_NotHashedYet`` rather than hash
    an executable whose digest is not remembered (the caller then runs it off the loop)."""
    pid = peer.pid
    try:
        started = _start_time(pid)
        if started > peer.connected_at + 0.5 / _CLOCK_TICKS:
            raise AttestationRefused(
                "UNIX_PID_REUSED", "the connecting process is gone and its PID was reused"
            )
        path = os.readlink(f"/proc/{pid}/exe")
        digest: str | None = None
        if hash_executable:
            with open(f"/proc/{pid}/exe", "rb") as fh:
                digest = _executable_digest(fh, max_bytes, remembered_only=remembered_only)
        if _start_time(pid) != started:
            raise AttestationRefused("UNIX_PID_REUSED", "the process changed while attesting")
    except (FileNotFoundError, ProcessLookupError):
        raise AttestationRefused("UNIX_PROCESS_GONE", "the connecting process has exited") from None
    except PermissionError:
        raise AttestationRefused(
            "UNIX_PROCESS_UNREADABLE", "the authority may not inspect the connecting process"
        ) from None
    if peer.pidfd is not None and not _pidfd_alive(peer.pidfd):
        raise AttestationRefused("UNIX_PROCESS_GONE", "the connecting process has exited")
    return ProcessFacts(pid, peer.uid, peer.gid, path, digest)


class UnixAttestor:
    plugin_name: ClassVar[str] = "unix"
    selector_kinds: ClassVar[frozenset[str]] = frozenset(
        {"uid", "gid", "pid", "path", "sha256", "user", "group"}
    )

    def __init__(self, hash_executable: bool, max_bytes: int) -> None:
        self._hash = hash_executable
        self._max_bytes = max_bytes

    @classmethod
    def configure(cls, config: Mapping[str, Any], host: HostServices) -> Self:
        require_keys(config, allowed={"hash_executable", "max_executable_bytes"}, required=set())
        hash_executable = config.get("hash_executable", True)
        if not isinstance(hash_executable, bool):
            raise ConfigError("hash_executable must be true or false")
        max_bytes = config.get("max_executable_bytes", 512 * 1024 * 1024)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ConfigError("max_executable_bytes must be a positive integer")
        return cls(hash_executable, max_bytes)

    async def attest(self, evidence: bytes, ctx: AttestContext) -> Attested:
        peer = ctx.peer
        if peer is None:
            raise AttestationRefused(
                "UNIX_NO_PEER", "the unix attestor works only on the authority's local socket"
            )
        # /proc reads take microseconds; only hashing a new executable may take long. A worker
        # thread costs ~250 us of hand-offs, so it is used only for that.
        try:
            facts = inspect_process(
                peer, hash_executable=self._hash, max_bytes=self._max_bytes, remembered_only=True
            )
        except _NotHashedYet:
            facts = await asyncio.to_thread(
                inspect_process, peer, hash_executable=self._hash, max_bytes=self._max_bytes
            )
        selectors: list[tuple[str, str]] = [
            ("uid", str(facts.uid)),
            ("gid", str(facts.gid)),
            ("pid", str(facts.pid)),
        ]
        # A path no selector can hold is left out: no entry could match it, and the host would
        # refuse the whole attestation over it. The sha256 still names the executable.
        if _selector_value(facts.path):
            selectors.append(("path", facts.path))
        if facts.sha256:
            selectors.append(("sha256", facts.sha256))
        with contextlib.suppress(KeyError):  # a uid or gid with no name
            selectors.append(("user", pwd.getpwuid(facts.uid).pw_name))
        with contextlib.suppress(KeyError):
            selectors.append(("group", grp.getgrgid(facts.gid).gr_name))
        return Attested(selectors=tuple(selectors), can_reattest=True)
