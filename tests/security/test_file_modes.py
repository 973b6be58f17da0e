"""The operator socket and the CA's files are the gate: only the authority's user may use them,
whatever the umask it was started with and whatever mode the data directory had before."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from tests import helpers
from tests.helpers import Running, ServeProcess, start_serve
from tests.security._attack import running_with_clock


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _check(data_dir: Path, admin_socket: Path) -> None:
    assert stat.S_ISSOCK(admin_socket.stat().st_mode)
    assert _mode(admin_socket) == 0o600, oct(_mode(admin_socket))
    assert _mode(data_dir) == 0o700, oct(_mode(data_dir))
    keys = data_dir / "keys"
    assert _mode(keys) == 0o700, oct(_mode(keys))
    key_files = sorted(p for p in keys.iterdir() if p.is_file())
    assert len(key_files) >= 2, key_files  # at least the X.509 and the JWT signing keys
    for path in key_files:
        assert _mode(path) == 0o600, f"{path}: {oct(_mode(path))}"
    # Wherever private key material sits in the data directory, only the owner can read it.
    holders = [p for p in data_dir.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    assert set(key_files) <= set(holders)
    for path in holders:
        assert _mode(path) == 0o600, f"{path}: {oct(_mode(path))}"


async def test_in_process_file_modes(authority: Running) -> None:
    _check(authority.data_dir, authority.admin_socket)


async def test_loose_data_dir_is_tightened(tmp_path: Path, socket_dir: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)  # noqa: S103 - the loose mode under test
    config = helpers.test_config(data_dir, socket_dir)
    async with running_with_clock(config, None) as running:
        _check(running.data_dir, running.admin_socket)


def test_served_file_modes(served: ServeProcess) -> None:
    _check(served.data_dir, served.admin_socket)


def test_served_file_modes_under_permissive_umask(tmp_path: Path, socket_dir: Path) -> None:
    old = os.umask(0)  # the child inherits it
    try:
        served = start_serve(tmp_path / "data", socket_dir)
    finally:
        os.umask(old)
    try:
        _check(served.data_dir, served.admin_socket)
    finally:
        assert served.stop() == 0
        shutil.rmtree(socket_dir, ignore_errors=True)
