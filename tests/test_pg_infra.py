"""The PostgreSQL the tests run against (tests/pg.py, the fixtures in conftest.py): reachable with
PGPASSFILE and no password in the URL, durable across stop, kill and start, one empty database
per test, and nothing left running once a server is closed or its test process dies."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.pg import PgCluster, PgServer, StopMode, child_pids, process_alive

ROOT = Path(__file__).resolve().parent.parent


def _rows(url: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url, connect_timeout=10) as conn:
        return conn.execute("SELECT id, note FROM kept ORDER BY id").fetchall()


def _commit_rows(url: str, count: int) -> None:
    with psycopg.connect(url, connect_timeout=10) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS kept (id int PRIMARY KEY, note text)")
        for i in range(count):
            conn.execute("INSERT INTO kept VALUES (%s, %s)", (i, f"row {i}"))
        conn.commit()


def _user_tables(url: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url, connect_timeout=10) as conn:
        return conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()


def test_a_fresh_database_is_reached_by_its_url_with_the_password_in_pgpassfile_only(
    pg_url: str,
) -> None:
    assert urlsplit(pg_url).password is None
    assert "PGPASSFILE" in os.environ
    with psycopg.connect(pg_url, connect_timeout=10) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
    assert row == (urlsplit(pg_url).path.lstrip("/"),)
    assert _user_tables(pg_url) == []


def test_two_fresh_databases_are_isolated(pg_server: PgCluster) -> None:
    with pg_server.database() as first, pg_server.database() as second:
        assert first != second
        _commit_rows(first, 3)
        assert _user_tables(second) == []
        assert len(_rows(first)) == 3


def test_the_throwaway_server_is_durable_unprivileged_and_has_room_for_replicas(
    private_pg_server: PgServer,
) -> None:
    with psycopg.connect(private_pg_server.url(), connect_timeout=10) as conn:
        settings = {
            name: conn.execute(f"SHOW {name}").fetchone()
            for name in ("fsync", "synchronous_commit", "full_page_writes", "max_connections")
        }
    assert settings == {
        "fsync": ("on",),
        "synchronous_commit": ("on",),
        "full_page_writes": ("on",),
        "max_connections": ("200",),
    }
    pid = private_pg_server.pid
    assert pid is not None
    uid = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0]
    assert uid != "0"  # initdb and postgres refuse root; as root, the server runs as nobody
    assert private_pg_server.passfile.stat().st_mode & 0o077 == 0


def test_without_the_password_the_server_refuses(
    private_pg_server: PgServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "absent"))
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(private_pg_server.url(), connect_timeout=10).close()
    with psycopg.connect(private_pg_server.url_with_password(), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_the_unix_socket_url_works_too(private_pg_server: PgServer) -> None:
    with psycopg.connect(private_pg_server.socket_url(), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_stop_then_start_keeps_committed_data_on_the_same_port(
    private_pg_server: PgServer, mode: StopMode
) -> None:
    pg = private_pg_server
    url = pg.create_database()
    _commit_rows(url, 5)
    port = pg.port
    pg.stop(mode)
    assert not pg.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2).close()
    pg.start()
    assert pg.port == port
    assert _rows(url) == [(i, f"row {i}") for i in range(5)]


def test_kill_leaves_no_process_and_start_recovers_committed_data(
    private_pg_server: PgServer,
) -> None:
    pg = private_pg_server
    url = pg.create_database()
    _commit_rows(url, 5)
    held = psycopg.connect(url, connect_timeout=10)  # a backend of its own, killed too
    pid = pg.pid
    assert pid is not None
    children = child_pids(pid)
    assert len(children) >= 2
    pg.kill()
    assert not any(process_alive(p) for p in [pid, *children])
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")
    held.close()
    pg.start()
    assert "automatic recovery in progress" in pg.log_tail(50)
    assert _rows(url) == [(i, f"row {i}") for i in range(5)]


def test_close_stops_the_server_and_deletes_its_folder(pg_passfile: Path) -> None:
    server = PgServer(pg_passfile)
    pid = server.pid
    assert pid is not None
    children = child_pids(pid)
    server.close()
    assert not server.root.exists()
    assert not any(process_alive(p) for p in [pid, *children])
    server.close()  # again: nothing to do


_DIES = """
import os, sys
from tests.pg import PgServer
server = PgServer()
print(server.pid, server.root, flush=True)
sys.stdin.read()
os._exit(1)  # no cleanup at all: what SIGKILL or a pytest-timeout thread timeout leaves
"""


def test_a_test_process_that_dies_leaves_no_server_behind() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _DIES],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        assert child.stdin is not None
        line = child.stdout.readline().split()
        assert len(line) == 2, line
        pid, root = int(line[0]), Path(line[1])
        assert process_alive(pid)
        child.stdin.close()
        child.wait(timeout=30)
    deadline = time.monotonic() + 20
    while (process_alive(pid) or root.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(pid)
    assert not root.exists()
