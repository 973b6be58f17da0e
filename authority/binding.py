"""Whether the addresses a program is about to serve on are free, asked before it creates
anything: an authority started twice says so in one line instead of leaving a second CA and
database behind (or, on a Unix socket, taking the socket from the one already serving).

The TCP probe binds each address the way gRPC will (``SO_REUSEADDR``, no ``SO_REUSEPORT``) and
lets it go at once; a Unix socket is in use when something accepts a connection on it. A race
with another process between the probe and the real bind is still reported by the caller, in
the same words (``address_in_use``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Iterable
from pathlib import Path

from authority.config import split_host_port
from authority.errors import FailedPrecondition, InvalidArgument

ADDRESS_IN_USE = "ADDRESS_IN_USE"


def address_in_use(address: str | Path, key: str, program: str = "authority") -> FailedPrecondition:
    """The one-line error for ``address`` (named by its configuration ``key``) being taken."""
    return FailedPrecondition(
        f"{address} is already in use ({key}); another {program} running?",
        reason=ADDRESS_IN_USE,
    )


def check_tcp_free(address: str, key: str) -> None:
    """Raise ``address_in_use`` when ``address`` (HOST:PORT) cannot be bound; port 0 (any
    free port) is always free. A host that does not resolve is InvalidArgument."""
    host, port = split_host_port(address)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise InvalidArgument(f"{key} {address!r}: {exc.strerror}") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise address_in_use(address, key) from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise FailedPrecondition(
                        f"{address} is not an address of this machine ({key})",
                        reason="ADDRESS_NOT_AVAILABLE",
                    ) from None
                raise


def check_unix_socket_free(path: Path, key: str, program: str = "authority") -> None:
    """Raise ``address_in_use`` when a server answers on the Unix socket ``path``. A file
    nobody answers on (left by a process that died) is free: the server replaces it."""
    if not path.exists():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:  # refused (stale), gone, or not a socket: the bind will tell
            return
    raise address_in_use(path, key, program)


def lock_data_dir(path: Path) -> int:
    """Create ``path`` (0700) if it is missing and hold an exclusive lock on it for the life of
    the returned descriptor (``flock``, released by the kernel when the process dies): a second
    authority on the same data directory, whatever its sockets, is refused (``address_in_use``
    under the key ``data_dir``) before it opens the database or the keys."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise address_in_use(path, "data_dir") from None
    return fd


def check_free(tcp: Iterable[tuple[str, str]], unix: Iterable[tuple[Path, str]]) -> None:
    """Every (address, key) of ``tcp`` and (path, key) of ``unix``, in order; two TCP keys
    naming the same address are refused too."""
    seen: dict[str, str] = {}
    for address, key in tcp:
        if address in seen and split_host_port(address)[1] != 0:
            raise InvalidArgument(f"{seen[address]} and {key} are the same address ({address})")
        seen[address] = key
        check_tcp_free(address, key)
    for path, key in unix:
        check_unix_socket_free(path, key)


__all__ = [
    "ADDRESS_IN_USE",
    "address_in_use",
    "check_free",
    "check_tcp_free",
    "check_unix_socket_free",
    "lock_data_dir",
]
