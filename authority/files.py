"""Files that hold keys and credentials: written atomically, never through a link.

A file is written to a temporary name of its own (random, created with O_CREAT | O_EXCL |
O_NOFOLLOW, so nothing planted there is opened), fsync'd, and renamed over its final name; a
rename replaces a symlink at the final name instead of following it. The folder of a workload's
credentials is the user's own: created 0700, or an existing one checked (a real folder, not a
link, owned by the user) and tightened to 0700 when others may look into it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from authority.errors import FailedPrecondition

log = logging.getLogger(__name__)

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def write_at(folder: int, name: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``name`` in the open folder ``folder`` with ``data``, ``mode`` from the first
    byte, durably (file and folder fsync'd)."""
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, _CREATE, mode, dir_fd=folder)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits away; never adds any
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=folder)
        raise
    os.fsync(folder)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (see ``write_at``); its folder must exist."""
    folder = os.open(path.parent, _FOLDER)
    try:
        write_at(folder, path.name, data, mode)
    finally:
        os.close(folder)


@contextlib.contextmanager
def private_folder(path: Path) -> Iterator[int]:
    """An open descriptor on ``path``, a folder only this user may enter.

    Missing: created (with its parents), mode 0700. Existing: it must be a folder itself, not a
    symlink to one, and owned by this user (else FailedPrecondition UNSAFE_FOLDER); group or
    other permissions on it are removed (0755 -> 0700), with a warning. Write into it with
    ``write_at``, relative to the descriptor, so a folder swapped after the check is not the
    one written."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, _FOLDER | os.O_NOFOLLOW)
    except OSError as exc:
        if os.path.islink(path):
            raise FailedPrecondition(
                f"{path} is a symlink; give the folder itself", reason="UNSAFE_FOLDER"
            ) from None
        if isinstance(exc, FileExistsError | NotADirectoryError):
            raise FailedPrecondition(f"{path} is not a folder", reason="UNSAFE_FOLDER") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISDIR(info.st_mode):
            raise FailedPrecondition(f"{path} is not a folder", reason="UNSAFE_FOLDER")
        if info.st_uid != os.geteuid():
            raise FailedPrecondition(
                f"{path} belongs to uid {info.st_uid}, not to this user", reason="UNSAFE_FOLDER"
            )
        loose = stat.S_IMODE(info.st_mode)
        if loose & 0o077:
            os.fchmod(fd, 0o700)
            log.warning("%s was mode %04o; now 0700 (it holds a private key)", path, loose)
        yield fd
    finally:
        os.close(fd)


def check_private_folder(path: Path) -> None:
    """``private_folder`` ahead of time: refuse an unsafe folder before anything is spent on
    what would be written into it (a join token, say). A folder that does not exist yet is
    left for the write to create (0700), so a refused call leaves nothing behind."""
    if not os.path.lexists(path):
        return
    with private_folder(path):
        pass


__all__ = ["check_private_folder", "private_folder", "write_at", "write_atomic"]
