from __future__ import annotations

import os
import shutil
import tempfile
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
from tests.pg import ENV_URL, ExternalPg, PgCluster, PgServer, Watchdog


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


# --- PostgreSQL: the server AUTHORITY_TEST_POSTGRES_URL names, else a throwaway one (tests/pg.py)


@pytest.fixture(scope="session")
def pg_passfile() -> Iterator[Path]:
    """The run's PGPASSFILE (mode 0600), set in the environment (so in the servers' children too)
    for the whole run: the throwaway servers' URLs carry no password."""
    folder = Path(tempfile.mkdtemp(prefix="pgpass-"))
    watchdog = Watchdog(folder)  # deletes it even if the run is killed
    passfile = folder / "pgpass"
    passfile.touch(mode=0o600)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PGPASSFILE", str(passfile))
            yield passfile
    finally:
        watchdog.close()


@pytest.fixture(scope="session")
def pg_server(pg_passfile: Path) -> Iterator[PgCluster]:
    """The run's PostgreSQL server, shared: AUTHORITY_TEST_POSTGRES_URL's, else a throwaway one.
    Databases only: a test that stops or kills PostgreSQL takes ``private_pg_server``."""
    url = os.environ.get(ENV_URL)
    if url:
        yield ExternalPg(url)
        return
    with PgServer(pg_passfile) as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PgCluster) -> Iterator[str]:
    """The URL of a new empty database (no password in it), dropped after the test."""
    with pg_server.database() as url:
        yield url


@pytest.fixture
def private_pg_server(pg_passfile: Path) -> Iterator[PgServer]:
    """A throwaway server of the test's own, always embedded (even with
    AUTHORITY_TEST_POSTGRES_URL set), that it may stop, kill and start again."""
    with PgServer(pg_passfile) as server:
        yield server
