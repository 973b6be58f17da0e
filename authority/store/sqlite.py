"""The embedded store: one SQLite file in WAL mode (or a database in memory), one writer thread.

The rules are ``queries.SqlStore``'s, the thread and its group commit ``writer.Writer``'s, the
schema ``sqlite_schema``'s. Commits are fsync'd (``synchronous=FULL``). One process owns the
file (the server holds the data directory's lock), so the writer may cache the audit chain's
head between transactions.
"""

from __future__ import annotations

import os
import pathlib
import sqlite3
from collections.abc import Sequence
from typing import Any, Final

from sqlite_utils import Database

from authority.errors import AuthorityError, FailedPrecondition, Unavailable
from authority.store.queries import SqlStore
from authority.store.sql import Duplicate, MissingReference
from authority.store.sqlite_schema import migrate, refuse_newer, user_version

BUSY_TIMEOUT_MS: Final = 5000
FILE_MODE: Final = 0o600
MEMORY: Final = ":memory:"


class SqliteConnection:
    """``writer.Connection`` on a sqlite3 connection in autocommit mode (explicit BEGIN)."""

    shared = False
    for_update = ""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.cache: dict[str, Any] = {}
        self.topics: list[str] = []

    def one(self, sql: str, params: Sequence[object] = ()) -> dict[str, Any] | None:
        cursor = self._conn.execute(sql, params)
        row = cursor.fetchone()
        if row is None:
            return None
        return dict(zip([d[0] for d in cursor.description], row, strict=True))

    def all(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, Any]]:
        cursor = self._conn.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        try:
            return self._conn.execute(sql, params).rowcount
        except sqlite3.IntegrityError as exc:
            if "FOREIGN KEY" in str(exc):
                raise MissingReference(str(exc)) from None
            if "UNIQUE" in str(exc):
                raise Duplicate(str(exc)) from None
            raise

    def notify(self, topic: str) -> None:
        self.topics.append(topic)

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    def begin(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def savepoint(self) -> None:
        self._conn.execute("SAVEPOINT job")

    def release(self) -> None:
        self._conn.execute("RELEASE job")

    def rollback_to(self) -> None:
        if not self._conn.in_transaction:
            # SQLite rolled the whole transaction back (a full disk, say): the jobs before
            # this one are lost too.
            raise sqlite3.OperationalError("the transaction was rolled back")
        self._conn.execute("ROLLBACK TO job")
        self._conn.execute("RELEASE job")

    def commit(self) -> None:
        self._conn.execute("COMMIT")

    def rollback(self) -> None:
        self._conn.execute("ROLLBACK")

    def close(self) -> None:
        self._conn.close()


class SqliteBackend:
    def __init__(self, path: pathlib.Path | str) -> None:
        self._path = path
        self.name = MEMORY if path == MEMORY else pathlib.Path(path).name

    def connect(self) -> SqliteConnection:
        if self._path == MEMORY:
            conn = sqlite3.connect(MEMORY, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA foreign_keys = ON")
            migrate(Database(conn, execute_plugins=False), pathlib.Path(MEMORY))
            return SqliteConnection(conn)
        return SqliteConnection(_connect(pathlib.Path(self._path)))

    def error(self, exc: Exception) -> tuple[AuthorityError, bool, bool] | None:
        if not isinstance(exc, sqlite3.Error):
            return None
        error = Unavailable(f"the store failed ({type(exc).__name__})", reason="STORE_ERROR")
        error.__cause__ = exc
        return error, False, False


class SqliteStore(SqlStore):
    """``Store`` on one SQLite file. Open with ``await SqliteStore.open(path)``."""

    @classmethod
    async def open(cls, path: pathlib.Path) -> SqliteStore:
        """Open (creating, mode 0600, and migrating as needed) the database at ``path``."""
        store = cls(SqliteBackend(path))
        await store._ready()
        return store


def _connect(path: pathlib.Path) -> sqlite3.Connection:
    """Create the file 0600 if needed, open it, set the pragmas, migrate."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    conn = sqlite3.connect(
        str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
    )
    try:
        db = Database(conn, execute_plugins=False)
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS:d}")
        db.execute("PRAGMA foreign_keys = ON")
        refuse_newer(user_version(db), path)
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise FailedPrecondition(
                f"database {path} cannot use WAL journaling (got {mode!r})",
                reason="STORE_NO_WAL",
            )
        db.execute("PRAGMA synchronous = FULL")
        migrate(db, path)
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                os.chmod(side, FILE_MODE)
    except BaseException:
        conn.close()
        raise
    return conn
