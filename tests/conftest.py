from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    Running,
    ServeProcess,
    running_authority,
    serve_process,
    short_socket_dir,
    test_config,
)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    folder = short_socket_dir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def authority(tmp_path: Path, socket_dir: Path) -> AsyncIterator[Running]:
    """A real authority in this process: real gRPC on real sockets, real SQLite, real keys."""
    async with running_authority(test_config(tmp_path / "data", socket_dir)) as running:
        yield running


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServeProcess]:
    """``authority serve`` as a subprocess, driven through the CLI."""
    with serve_process(tmp_path / "data") as proc:
        yield proc
