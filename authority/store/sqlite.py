"""The embedded store: one SQLite file in WAL mode, written by one thread with group commit.

Every public method hands a closure to the store's thread and awaits its future. The thread takes
the first waiting job and whatever else is already queued (up to ``MAX_BATCH``), runs them in one
``BEGIN IMMEDIATE`` transaction with a savepoint per job, commits (fsync'd: ``synchronous=FULL``),
and only then settles the futures. A job that raises is rolled back to its savepoint alone.

Storage mapping: instants are integer microseconds since the Unix epoch (UTC), durations integer
microseconds, SPIFFE IDs their URI, selectors a sorted JSON list of ``type:value`` strings, DER
chains a JSON list of base64 strings. The schema version is ``PRAGMA user_version``; a later
schema change appends a function to ``MIGRATIONS``.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import json
import os
import pathlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias, TypeVar

from sqlite_utils import Database

from authority.audit import GENESIS, AuditEvent, AuditRecord, Checkpoint, chain
from authority.errors import (
    AlreadyExists,
    AuthorityError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from authority.ids import SpiffeId
from authority.metrics import METRICS
from authority.models import (
    Approval,
    ApprovalState,
    AttestorInstance,
    AuthorityKeyInfo,
    Identity,
    IssuedX509,
    JoinToken,
    KeyKind,
    KeyState,
    RegistrationEntry,
    Revocation,
    RevocationKind,
    Selector,
    TaskRecord,
    TaskTokenRecord,
)
from authority.store import audit_page

T = TypeVar("T")

MAX_BATCH: Final = 256
LINGER_SECONDS: Final = 0.0005
BUSY_TIMEOUT_MS: Final = 5000
PRUNE_GRACE: Final = dt.timedelta(days=1)
FILE_MODE: Final = 0o600

_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND: Final = dt.timedelta(microseconds=1)
_SEQUENCE_KEY: Final = "bundle_sequence"
_HEAD_CACHE: Final = "_authority_audit_head"
# Measured in the writer thread: appending audit records (its CPU time, inside an action's
# savepoint), the durable commit (fsync, wall time) of a batch, and the batch sizes (jobs).
_AUDIT_APPEND: Final = METRICS.samples("store.audit_append")
_COMMIT: Final = METRICS.samples("store.commit")
_BATCH: Final = METRICS.samples("store.batch_jobs", unit="")


# --- value encodings -------------------------------------------------------------------------


def _instant(value: dt.datetime) -> int:
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidArgument("datetimes given to the store must be timezone-aware")
    return (value - _EPOCH) // _MICROSECOND


def _from_instant(value: int) -> dt.datetime:
    return _EPOCH + value * _MICROSECOND


def _duration(value: dt.timedelta) -> int:
    return value // _MICROSECOND


def _from_duration(value: int) -> dt.timedelta:
    return value * _MICROSECOND


def _selectors(selectors: Iterable[Selector]) -> str:
    return json.dumps(sorted(str(s) for s in selectors), separators=(",", ":"))


def _from_selectors(text: str) -> frozenset[Selector]:
    return frozenset(Selector.parse(s) for s in json.loads(text))


def _names(names: Iterable[str]) -> str:
    return json.dumps(list(names), separators=(",", ":"))


def _from_names(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


def _chain(chain: Iterable[bytes]) -> str:
    return json.dumps([base64.b64encode(der).decode("ascii") for der in chain])


def _from_chain(text: str) -> tuple[bytes, ...]:
    return tuple(base64.b64decode(item) for item in json.loads(text))


def _short(token_id: str) -> str:
    """A prefix of a token digest, enough to tell tokens apart in a message."""
    return token_id[:8]


# --- schema ----------------------------------------------------------------------------------


def _migration_1(db: Database) -> None:
    """Keys, the bundle sequence, entries, join tokens, identities and issued X.509-SVIDs."""
    db.create_table(
        "meta", {"key": str, "value": int}, pk="key", not_null={"key", "value"}, strict=True
    )
    db.execute("INSERT INTO meta (key, value) VALUES (?, 0)", [_SEQUENCE_KEY])
    db.create_table(
        "authority_keys",
        {
            "kind": str,
            "key_id": str,
            "state": str,
            "not_before_us": int,
            "not_after_us": int,
            "certificate": bytes,
            "upstream_chain": str,
            "tainted": int,
        },
        pk=("kind", "key_id"),
        not_null={
            "kind",
            "key_id",
            "state",
            "not_before_us",
            "not_after_us",
            "certificate",
            "upstream_chain",
            "tainted",
        },
        strict=True,
    )
    db.create_table(
        "entries",
        {
            "id": str,
            "spiffe_id": str,
            "selectors": str,
            "x509_ttl_us": int,
            "jwt_ttl_us": int,
            "dns_names": str,
            "admin": int,
            "created_at_us": int,
        },
        pk="id",
        not_null={
            "id",
            "spiffe_id",
            "selectors",
            "x509_ttl_us",
            "jwt_ttl_us",
            "dns_names",
            "admin",
            "created_at_us",
        },
        strict=True,
    )
    # The canonical key: one entry per SPIFFE ID and selector set (selectors are sorted JSON).
    db.table("entries").create_index(
        ["spiffe_id", "selectors"], index_name="entries_by_id_and_selectors", unique=True
    )
    db.create_table(
        "join_tokens",
        {
            "token_id": str,
            "spiffe_id": str,
            "expires_at_us": int,
            "created_at_us": int,
            "used_at_us": int,
        },
        pk="token_id",
        not_null={"token_id", "spiffe_id", "expires_at_us", "created_at_us"},
        strict=True,
    )
    db.table("join_tokens").create_index(["expires_at_us"], index_name="join_tokens_by_expiry")
    db.create_table(
        "identities",
        {
            "id": str,
            "spiffe_id": str,
            "entry_id": str,
            "attestor": str,
            "selectors": str,
            "attested_at_us": int,
            "x509_ttl_us": int,
            "jwt_ttl_us": int,
            "dns_names": str,
            "admin": int,
        },
        pk="id",
        not_null={
            "id",
            "spiffe_id",
            "attestor",
            "selectors",
            "attested_at_us",
            "x509_ttl_us",
            "jwt_ttl_us",
            "dns_names",
            "admin",
        },
        strict=True,
    )
    db.table("identities").create_index(["attested_at_us"], index_name="identities_by_attested_at")
    db.create_table(
        "issued_x509",
        {"serial": str, "identity_id": str, "spiffe_id": str, "not_after_us": int},
        pk="serial",
        not_null={"serial", "identity_id", "spiffe_id", "not_after_us"},
        foreign_keys=[("identity_id", "identities", "id")],
        strict=True,
    )
    db.table("issued_x509").create_index(["identity_id"], index_name="issued_x509_by_identity")
    db.table("issued_x509").create_index(["not_after_us"], index_name="issued_x509_by_not_after")


def _migration_2(db: Database) -> None:
    """Attestor instances (the built-in join_token seeded) and single-use claims."""
    db.create_table(
        "attestors",
        {
            "name": str,
            "plugin": str,
            "config_json": str,
            "created_at_us": int,
            "updated_at_us": int,
        },
        pk="name",
        not_null={"name", "plugin", "config_json", "created_at_us", "updated_at_us"},
        strict=True,
    )
    now_us = _instant(dt.datetime.now(dt.UTC))
    db.execute(
        "INSERT INTO attestors (name, plugin, config_json, created_at_us, updated_at_us)"
        " VALUES ('join_token', 'join_token', '{}', ?, ?)",
        [now_us, now_us],
    )
    db.create_table(
        "claims",
        {"namespace": str, "key": str, "expires_at_us": int},
        pk=("namespace", "key"),
        not_null={"namespace", "key", "expires_at_us"},
        strict=True,
    )
    db.table("claims").create_index(["expires_at_us"], index_name="claims_by_expiry")


def _migration_3(db: Database) -> None:
    """The audit chain, its signed checkpoints, and the anchor left by archiving."""
    db.create_table(
        "audit",
        {
            "seq": int,
            "time_us": int,
            "kind": str,
            "actor": str,
            "subject": str,
            "task_id": str,
            "decision_id": str,
            "details": str,
            "prev_hash": str,
            "hash": str,
        },
        pk="seq",
        not_null={
            "seq",
            "time_us",
            "kind",
            "actor",
            "subject",
            "task_id",
            "decision_id",
            "details",
            "prev_hash",
            "hash",
        },
        strict=True,
    )
    db.table("audit").create_index(["task_id"], index_name="audit_by_task")
    db.table("audit").create_index(["time_us"], index_name="audit_by_time")
    db.create_table(
        "audit_checkpoints",
        {"seq": int, "hash": str, "jws": str},
        pk="seq",
        not_null={"seq", "hash", "jws"},
        strict=True,
    )
    db.create_table(
        "audit_anchor",
        {"id": int, "seq": int, "prev_hash": str},
        pk="id",
        not_null={"id", "seq", "prev_hash"},
        strict=True,
    )
    db.execute("INSERT INTO audit_anchor (id, seq, prev_hash) VALUES (1, 1, ?)", [GENESIS])


def _migration_4(db: Database) -> None:
    """Tasks, the task tokens issued for them (lineage, no token text) and approvals."""
    db.create_table(
        "tasks",
        {
            "task_id": str,
            "principal": str,
            "created_at_us": int,
            "ended_at_us": int,
            "end_reason": str,
        },
        pk="task_id",
        not_null={"task_id", "principal", "created_at_us", "end_reason"},
        strict=True,
    )
    db.create_table(
        "task_tokens",
        {
            "jti": str,
            "task_id": str,
            "subject": str,
            "holder": str,
            "audience": str,
            "scope": str,
            "resource": str,
            "parent_jti": str,
            "depth": int,
            "issued_at_us": int,
            "expires_at_us": int,
            "decision_id": str,
            "cnf_x5t": str,
        },
        pk="jti",
        not_null={
            "jti",
            "task_id",
            "subject",
            "holder",
            "audience",
            "scope",
            "resource",
            "parent_jti",
            "depth",
            "issued_at_us",
            "expires_at_us",
            "decision_id",
            "cnf_x5t",
        },
        foreign_keys=[("task_id", "tasks", "task_id")],
        strict=True,
    )
    db.table("task_tokens").create_index(["task_id"], index_name="task_tokens_by_task")
    db.table("task_tokens").create_index(["parent_jti"], index_name="task_tokens_by_parent")
    db.table("task_tokens").create_index(["expires_at_us"], index_name="task_tokens_by_expiry")
    db.create_table(
        "approvals",
        {
            "id": str,
            "principal": str,
            "task_id": str,
            "audience": str,
            "intent_json": str,
            "intent_fingerprint": str,
            "decision_id": str,
            "requested_at_us": int,
            "expires_at_us": int,
            "state": str,
            "decided_at_us": int,
            "decided_by": str,
            "note": str,
            "grant_expires_at_us": int,
        },
        pk="id",
        not_null={
            "id",
            "principal",
            "task_id",
            "audience",
            "intent_json",
            "intent_fingerprint",
            "decision_id",
            "requested_at_us",
            "expires_at_us",
            "state",
            "decided_by",
            "note",
        },
        strict=True,
    )
    db.table("approvals").create_index(["state"], index_name="approvals_by_state")


def _migration_5(db: Database) -> None:
    """Revocations: AUTOINCREMENT, so a sequence number is never reused after a prune."""
    db.execute(
        "CREATE TABLE revocations ("
        " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
        " kind TEXT NOT NULL, target TEXT NOT NULL, reason TEXT NOT NULL,"
        " actor TEXT NOT NULL, revoked_at_us INTEGER NOT NULL, expires_at_us INTEGER NOT NULL"
        ") STRICT"
    )
    db.table("revocations").create_index(["expires_at_us"], index_name="revocations_by_expiry")
    db.table("revocations").create_index(["kind", "target"], index_name="revocations_by_target")


def _migration_6(db: Database) -> None:
    """Entries may opt in to keeping full prompt text in the audit."""
    db.execute("ALTER TABLE entries ADD COLUMN record_prompts INTEGER NOT NULL DEFAULT 0")


def _migration_7(db: Database) -> None:
    """Node entries: a parent (the node agent that serves them), part of the entry's key, so
    two nodes may map the same selectors to the same SPIFFE ID; identities issued through an
    agent name it, so revoking the agent reaches them."""
    db.execute("ALTER TABLE entries ADD COLUMN parent_id TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE identities ADD COLUMN parent_id TEXT NOT NULL DEFAULT ''")
    db.execute("DROP INDEX entries_by_id_and_selectors")
    db.table("entries").create_index(
        ["spiffe_id", "selectors", "parent_id"],
        index_name="entries_by_id_selectors_parent",
        unique=True,
    )


_LIVE_SUBJECTS: Final = {
    "attestor": "SELECT DISTINCT i.spiffe_id FROM identities i JOIN issued_x509 x"
    " ON x.identity_id = i.id WHERE i.attestor = ? AND x.not_after_us > ? ORDER BY i.spiffe_id",
    "parent_id": "SELECT DISTINCT i.spiffe_id FROM identities i JOIN issued_x509 x"
    " ON x.identity_id = i.id WHERE i.parent_id = ? AND x.not_after_us > ? ORDER BY i.spiffe_id",
}


# Where a SPIFFE ID may be on record, cheapest first (identities and issued SVIDs have no index
# on it: an operator's revocation scans them, rarely).
_SPIFFE_ID_ON_RECORD: Final = (
    "SELECT 1 FROM entries WHERE spiffe_id = ? OR parent_id = ? LIMIT 1",
    "SELECT 1 FROM join_tokens WHERE spiffe_id = ? LIMIT 1",
    "SELECT 1 FROM identities WHERE spiffe_id = ? LIMIT 1",
    "SELECT 1 FROM issued_x509 WHERE spiffe_id = ? LIMIT 1",
    "SELECT 1 FROM task_tokens WHERE subject = ? OR holder = ? LIMIT 1",
)


# MIGRATIONS[n] takes the schema from version n to n + 1. Append only; never edit a shipped one.
MIGRATIONS: Final[tuple[Callable[[Database], None], ...]] = (
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
    _migration_7,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


def _user_version(db: Database) -> int:
    row = db.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def _refuse_newer(version: int, path: pathlib.Path) -> None:
    if version > SCHEMA_VERSION:
        raise FailedPrecondition(
            f"database {path} has schema version {version}, newer than this build knows "
            f"({SCHEMA_VERSION}); run a newer release of the authority",
            reason="STORE_SCHEMA_TOO_NEW",
        )


def _migrate(db: Database, path: pathlib.Path) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        version = _user_version(db)
        _refuse_newer(version, path)
        for step in MIGRATIONS[version:]:
            step(db)
        if version != SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
        db.execute("COMMIT")
    except BaseException:
        if db.conn.in_transaction:
            db.execute("ROLLBACK")
        raise


def _connect(path: pathlib.Path) -> Database:
    """Create the file 0600 if needed, open it, set the pragmas, migrate."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    try:
        db = Database(conn, execute_plugins=False)
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS:d}")
        db.execute("PRAGMA foreign_keys = ON")
        _refuse_newer(_user_version(db), path)
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise FailedPrecondition(
                f"database {path} cannot use WAL journaling (got {mode!r})",
                reason="STORE_NO_WAL",
            )
        db.execute("PRAGMA synchronous = FULL")
        _migrate(db, path)
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                os.chmod(side, FILE_MODE)
    except BaseException:
        conn.close()
        raise
    return db


# --- the writer thread -----------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Job:
    fn: Callable[[Database], object]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


_STOP: Final = object()

# (future, exception or None, result)
_Outcome: TypeAlias = tuple[asyncio.Future[Any], BaseException | None, object]


def _settle(outcomes: list[_Outcome]) -> None:
    """Runs on the event loop: deliver each job's result or exception."""
    for future, error, value in outcomes:
        if future.done():  # the caller was cancelled
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


def _storage_error(exc: sqlite3.Error) -> Unavailable:
    error = Unavailable(f"the store failed ({type(exc).__name__})", reason="STORE_ERROR")
    error.__cause__ = exc
    return error


def _batch_error(exc: Exception) -> AuthorityError:
    if isinstance(exc, sqlite3.Error):
        return _storage_error(exc)
    error = Internal("the store failed")
    error.__cause__ = exc
    return error


class _Writer:
    """Owns the connection; runs batches of jobs in one transaction each."""

    def __init__(self, path: pathlib.Path) -> None:
        self.queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        # Both futures are marked running at once so that a cancelled waiter cannot cancel them.
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.ready.set_running_or_notify_cancel()
        self.done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.done.set_running_or_notify_cancel()
        self.commits = 0
        self._path = path
        self.thread = threading.Thread(target=self._main, name=f"store:{path.name}", daemon=True)

    def _main(self) -> None:
        try:
            db = _connect(self._path)
        except BaseException as exc:
            self.ready.set_exception(exc)
            self.done.set_result(None)
            return
        self.ready.set_result(None)
        try:
            self._serve(db)
        finally:
            self._fail_leftovers()
            db.close()
            self.done.set_result(None)

    def _serve(self, db: Database) -> None:
        stop = False
        while not stop:
            batch: list[_Job] = []
            item = self.queue.get()
            # Linger a moment for more work: under load, one commit (one fsync, one BEGIN and
            # COMMIT) then serves many requests, and the writer holds the GIL far less.
            deadline = time.monotonic() + LINGER_SECONDS
            while True:
                if item is _STOP:
                    stop = True
                    break
                assert isinstance(item, _Job)
                batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        item = self.queue.get(timeout=remaining)
                    except queue.Empty:
                        break
            if batch:
                self._run_batch(db, batch)

    def _fail_leftovers(self) -> None:
        leftovers: list[_Job] = []
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Job):
                leftovers.append(item)
        closed = Unavailable("the store is closed", reason="STORE_CLOSED")
        self._deliver([(job, closed, None) for job in leftovers])

    def _run_batch(self, db: Database, batch: list[_Job]) -> None:
        results: list[tuple[_Job, BaseException | None, object]] = []
        in_flight: list[int] = []  # indexes in results of jobs whose writes are not yet committed
        try:
            for job in batch:
                if job.future.cancelled():
                    continue
                if not db.conn.in_transaction:
                    db.execute("BEGIN IMMEDIATE")
                db.execute("SAVEPOINT job")
                try:
                    value = job.fn(db)
                except Exception as exc:
                    error: BaseException = (
                        _storage_error(exc) if isinstance(exc, sqlite3.Error) else exc
                    )
                    results.append((job, error, None))
                    setattr(db, _HEAD_CACHE, None)
                    if db.conn.in_transaction:
                        db.execute("ROLLBACK TO job")
                        db.execute("RELEASE job")
                    else:
                        # SQLite rolled the whole transaction back (a full disk, say): the jobs
                        # before this one are lost too.
                        self._lose(results, in_flight)
                else:
                    db.execute("RELEASE job")
                    in_flight.append(len(results))
                    results.append((job, None, value))
            if db.conn.in_transaction:
                started = time.perf_counter()
                db.execute("COMMIT")
                _COMMIT.add(time.perf_counter() - started)
                _BATCH.add(len(batch))
                self.commits += 1
        except Exception as exc:  # the transaction itself failed: none of it is committed
            setattr(db, _HEAD_CACHE, None)
            with contextlib.suppress(sqlite3.Error):
                if db.conn.in_transaction:
                    db.execute("ROLLBACK")
            self._lose(results, in_flight, exc)
            done = {id(job) for job, _, _ in results}
            results.extend((job, _batch_error(exc), None) for job in batch if id(job) not in done)
        self._deliver(results)

    @staticmethod
    def _lose(
        results: list[tuple[_Job, BaseException | None, object]],
        in_flight: list[int],
        cause: Exception | None = None,
    ) -> None:
        for index in in_flight:
            job = results[index][0]
            error = Unavailable("the write was rolled back", reason="STORE_ERROR")
            error.__cause__ = cause
            results[index] = (job, error, None)
        in_flight.clear()

    @staticmethod
    def _deliver(results: Iterable[tuple[_Job, BaseException | None, object]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for job, error, value in results:
            by_loop.setdefault(job.loop, []).append((job.future, error, value))
        for loop, outcomes in by_loop.items():
            # RuntimeError: that loop is closed, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, outcomes)


# --- row mapping -----------------------------------------------------------------------------


def _entry_row(entry: RegistrationEntry) -> list[object]:
    """The columns of ``entries``, in the order create_entry inserts them."""
    return [
        entry.id,
        entry.spiffe_id.uri,
        _selectors(entry.selectors),
        _duration(entry.x509_ttl),
        _duration(entry.jwt_ttl),
        _names(entry.dns_names),
        int(entry.admin),
        _instant(entry.created_at),
        int(entry.record_prompts),
        entry.parent_id.uri if entry.parent_id else "",
    ]


def _entry_from_row(row: Mapping[str, Any]) -> RegistrationEntry:
    return RegistrationEntry(
        id=row["id"],
        spiffe_id=SpiffeId.parse(row["spiffe_id"]),
        selectors=_from_selectors(row["selectors"]),
        x509_ttl=_from_duration(row["x509_ttl_us"]),
        jwt_ttl=_from_duration(row["jwt_ttl_us"]),
        dns_names=_from_names(row["dns_names"]),
        admin=bool(row["admin"]),
        created_at=_from_instant(row["created_at_us"]),
        record_prompts=bool(row["record_prompts"]),
        parent_id=SpiffeId.parse(row["parent_id"]) if row["parent_id"] else None,
    )


def _key_from_row(row: Mapping[str, Any]) -> AuthorityKeyInfo:
    return AuthorityKeyInfo(
        kind=KeyKind(row["kind"]),
        key_id=row["key_id"],
        state=KeyState(row["state"]),
        not_before=_from_instant(row["not_before_us"]),
        not_after=_from_instant(row["not_after_us"]),
        certificate=bytes(row["certificate"]),
        upstream_chain=_from_chain(row["upstream_chain"]),
        tainted=bool(row["tainted"]),
    )


def _token_from_row(row: Mapping[str, Any]) -> JoinToken:
    used = row["used_at_us"]
    return JoinToken(
        token_id=row["token_id"],
        spiffe_id=SpiffeId.parse(row["spiffe_id"]),
        expires_at=_from_instant(row["expires_at_us"]),
        created_at=_from_instant(row["created_at_us"]),
        used_at=None if used is None else _from_instant(used),
    )


def _identity_from_row(row: Mapping[str, Any], prefix: str = "") -> Identity:
    return Identity(
        id=row[prefix + "id"],
        spiffe_id=SpiffeId.parse(row[prefix + "spiffe_id"]),
        entry_id=row[prefix + "entry_id"],
        attestor=row[prefix + "attestor"],
        selectors=_from_selectors(row[prefix + "selectors"]),
        attested_at=_from_instant(row[prefix + "attested_at_us"]),
        x509_ttl=_from_duration(row[prefix + "x509_ttl_us"]),
        jwt_ttl=_from_duration(row[prefix + "jwt_ttl_us"]),
        dns_names=_from_names(row[prefix + "dns_names"]),
        admin=bool(row[prefix + "admin"]),
        parent_id=SpiffeId.parse(row[prefix + "parent_id"]) if row[prefix + "parent_id"] else None,
    )


def _one(db: Database, sql: str, params: Iterable[object]) -> dict[str, Any] | None:
    rows = list(db.query(sql, list(params)))
    return rows[0] if rows else None


def _sequence(db: Database) -> int:
    row = _one(db, "SELECT value FROM meta WHERE key = ?", [_SEQUENCE_KEY])
    assert row is not None
    return int(row["value"])


def _bump_sequence(db: Database) -> int:
    db.execute("UPDATE meta SET value = value + 1 WHERE key = ?", [_SEQUENCE_KEY])
    return _sequence(db)


# --- the store -------------------------------------------------------------------------------


class SqliteStore:
    """``Store`` on one SQLite file. Open with ``await SqliteStore.open(path)``."""

    def __init__(self, writer: _Writer) -> None:
        self._writer = writer
        self._closing = False

    @classmethod
    async def open(cls, path: pathlib.Path) -> SqliteStore:
        """Open (creating, mode 0600, and migrating as needed) the database at ``path``."""
        writer = _Writer(path)
        writer.thread.start()
        try:
            await asyncio.wrap_future(writer.ready)
        except BaseException:
            writer.queue.put(_STOP)  # in case it opened and we were cancelled
            await asyncio.wrap_future(writer.done)
            writer.thread.join()
            raise
        return cls(writer)

    @property
    def commit_count(self) -> int:
        """How many transactions the store has committed since it was opened."""
        return self._writer.commits

    async def close(self) -> None:
        """Finish the queued work, stop the thread and close the connection. Idempotent."""
        if not self._closing:
            self._closing = True
            self._writer.queue.put(_STOP)
        await asyncio.wrap_future(self._writer.done)
        self._writer.thread.join()

    async def _run(self, fn: Callable[[Database], T], audit: Sequence[AuditEvent] = ()) -> T:
        if audit:
            fn = _with_audit(fn, audit)
        if self._closing:
            raise Unavailable("the store is closed", reason="STORE_CLOSED")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._writer.queue.put(_Job(fn, loop, future))
        return await future

    # --- signing keys and the bundle sequence ---

    async def list_authority_keys(self) -> list[AuthorityKeyInfo]:
        def job(db: Database) -> list[AuthorityKeyInfo]:
            rows = db.query("SELECT * FROM authority_keys ORDER BY kind, not_before_us, key_id")
            return [_key_from_row(row) for row in rows]

        return await self._run(job)

    async def put_authority_keys(
        self,
        keys: list[AuthorityKeyInfo],
        *,
        bump_sequence: bool,
        audit: Sequence[AuditEvent] = (),
    ) -> int:
        params = [
            [
                key.kind.value,
                key.key_id,
                key.state.value,
                _instant(key.not_before),
                _instant(key.not_after),
                key.certificate,
                _chain(key.upstream_chain),
                int(key.tainted),
            ]
            for key in keys
        ]

        def job(db: Database) -> int:
            for row in params:
                db.execute(
                    "INSERT OR REPLACE INTO authority_keys (kind, key_id, state, not_before_us,"
                    " not_after_us, certificate, upstream_chain, tainted)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
            return _bump_sequence(db) if bump_sequence else _sequence(db)

        return await self._run(job, audit)

    async def delete_authority_key(
        self, kind: KeyKind, key_id: str, *, audit: Sequence[AuditEvent] = ()
    ) -> int:
        def job(db: Database) -> int:
            cursor = db.execute(
                "DELETE FROM authority_keys WHERE kind = ? AND key_id = ?", [kind.value, key_id]
            )
            if cursor.rowcount == 0:
                raise NotFound(f"no {kind.value} key {key_id!r}", reason="KEY_NOT_FOUND")
            return _bump_sequence(db)

        return await self._run(job, audit)

    async def bundle_sequence(self) -> int:
        return await self._run(_sequence)

    # --- registration entries ---

    async def create_entry(
        self, entry: RegistrationEntry, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        row = _entry_row(entry)

        def job(db: Database) -> None:
            if _one(db, "SELECT 1 FROM entries WHERE id = ?", [entry.id]) is not None:
                raise AlreadyExists(f"entry {entry.id!r} already exists", reason="ENTRY_EXISTS")
            same = _one(
                db,
                "SELECT id FROM entries WHERE spiffe_id = ? AND selectors = ? AND parent_id = ?",
                [row[1], row[2], row[9]],
            )
            if same is not None:
                raise AlreadyExists(
                    f"entry {same['id']!r} already maps these selectors to {entry.spiffe_id}",
                    reason="ENTRY_EXISTS",
                )
            db.execute(
                "INSERT INTO entries (id, spiffe_id, selectors, x509_ttl_us, jwt_ttl_us,"
                " dns_names, admin, created_at_us, record_prompts, parent_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )

        await self._run(job, audit)

    async def get_entry(self, entry_id: str) -> RegistrationEntry | None:
        def job(db: Database) -> RegistrationEntry | None:
            row = _one(db, "SELECT * FROM entries WHERE id = ?", [entry_id])
            return None if row is None else _entry_from_row(row)

        return await self._run(job)

    async def list_entries(self) -> list[RegistrationEntry]:
        def job(db: Database) -> list[RegistrationEntry]:
            rows = db.query("SELECT * FROM entries ORDER BY created_at_us, id")
            return [_entry_from_row(row) for row in rows]

        return await self._run(job)

    async def update_entry(
        self, entry: RegistrationEntry, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        row = _entry_row(entry)

        def job(db: Database) -> None:
            if _one(db, "SELECT 1 FROM entries WHERE id = ?", [entry.id]) is None:
                raise NotFound(f"no entry {entry.id!r}", reason="ENTRY_NOT_FOUND")
            same = _one(
                db,
                "SELECT id FROM entries WHERE spiffe_id = ? AND selectors = ? AND parent_id = ?"
                " AND id != ?",
                [row[1], row[2], row[9], entry.id],
            )
            if same is not None:
                raise AlreadyExists(
                    f"entry {same['id']!r} already maps these selectors to {entry.spiffe_id}",
                    reason="ENTRY_EXISTS",
                )
            db.execute(
                "UPDATE entries SET spiffe_id = ?, selectors = ?, x509_ttl_us = ?,"
                " jwt_ttl_us = ?, dns_names = ?, admin = ?, created_at_us = ?,"
                " record_prompts = ?, parent_id = ? WHERE id = ?",
                [*row[1:], entry.id],
            )

        await self._run(job, audit)

    async def delete_entry(self, entry_id: str, *, audit: Sequence[AuditEvent] = ()) -> bool:
        def job(db: Database) -> bool:
            return db.execute("DELETE FROM entries WHERE id = ?", [entry_id]).rowcount > 0

        return await self._run(job, audit)

    # --- join tokens ---

    async def create_join_token(
        self, token: JoinToken, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        row = [
            token.token_id,
            token.spiffe_id.uri,
            _instant(token.expires_at),
            _instant(token.created_at),
            None if token.used_at is None else _instant(token.used_at),
        ]

        def job(db: Database) -> None:
            if (
                _one(db, "SELECT 1 FROM join_tokens WHERE token_id = ?", [token.token_id])
                is not None
            ):
                raise AlreadyExists(
                    f"join token {_short(token.token_id)}… already exists",
                    reason="JOIN_TOKEN_EXISTS",
                )
            db.execute(
                "INSERT INTO join_tokens (token_id, spiffe_id, expires_at_us, created_at_us,"
                " used_at_us) VALUES (?, ?, ?, ?, ?)",
                row,
            )

        await self._run(job, audit)

    async def consume_join_token(
        self, token_id: str, now: dt.datetime, *, audit: Sequence[AuditEvent] = ()
    ) -> JoinToken:
        now_us = _instant(now)

        def job(db: Database) -> JoinToken:
            row = _one(db, "SELECT * FROM join_tokens WHERE token_id = ?", [token_id])
            if row is None:
                raise Unauthenticated(
                    f"join token {_short(token_id)}… is unknown", reason="JOIN_TOKEN_UNKNOWN"
                )
            if row["used_at_us"] is not None:
                raise Unauthenticated(
                    f"join token {_short(token_id)}… was already used", reason="JOIN_TOKEN_USED"
                )
            if row["expires_at_us"] <= now_us:
                raise Unauthenticated(
                    f"join token {_short(token_id)}… has expired", reason="JOIN_TOKEN_EXPIRED"
                )
            db.execute(
                "UPDATE join_tokens SET used_at_us = ? WHERE token_id = ?", [now_us, token_id]
            )
            return _token_from_row(row)

        return await self._run(job, audit)

    # --- identities and issued X.509-SVIDs ---

    async def record_issuance(
        self,
        identity: Identity | None,
        issued: list[IssuedX509],
        *,
        audit: Sequence[AuditEvent] = (),
    ) -> None:
        _check_issuance(identity, issued)
        identity_row = None
        if identity is not None:
            identity_row = [
                identity.id,
                identity.spiffe_id.uri,
                identity.entry_id,
                identity.attestor,
                _selectors(identity.selectors),
                _instant(identity.attested_at),
                _duration(identity.x509_ttl),
                _duration(identity.jwt_ttl),
                _names(identity.dns_names),
                int(identity.admin),
                identity.parent_id.uri if identity.parent_id else "",
            ]
        svid_rows = [
            [svid.serial, svid.identity_id, svid.spiffe_id.uri, _instant(svid.not_after)]
            for svid in issued
        ]

        def job(db: Database) -> None:
            # The constraints (primary keys, the identity foreign key) catch duplicates and
            # unknown identities: one statement a row on this hot path, no look-ups first.
            if identity_row is not None:
                try:
                    db.execute(
                        "INSERT INTO identities (id, spiffe_id, entry_id, attestor, selectors,"
                        " attested_at_us, x509_ttl_us, jwt_ttl_us, dns_names, admin, parent_id)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        identity_row,
                    )
                except sqlite3.IntegrityError:
                    raise AlreadyExists(
                        f"identity {identity_row[0]!r} already exists", reason="IDENTITY_EXISTS"
                    ) from None
            for row in svid_rows:
                try:
                    db.execute(
                        "INSERT INTO issued_x509 (serial, identity_id, spiffe_id, not_after_us)"
                        " VALUES (?, ?, ?, ?)",
                        row,
                    )
                except sqlite3.IntegrityError as exc:
                    if "FOREIGN KEY" in str(exc):
                        raise FailedPrecondition(
                            f"identity {row[1]!r} is unknown", reason="IDENTITY_UNKNOWN"
                        ) from None
                    raise AlreadyExists(
                        f"an X.509-SVID with serial {row[0]} was already recorded",
                        reason="SERIAL_EXISTS",
                    ) from None

        await self._run(job, audit)

    async def find_issued_x509(self, serial: str) -> tuple[IssuedX509, Identity] | None:
        def job(db: Database) -> tuple[IssuedX509, Identity] | None:
            row = _one(
                db,
                "SELECT x.serial AS x_serial, x.identity_id AS x_identity_id,"
                " x.spiffe_id AS x_spiffe_id, x.not_after_us AS x_not_after_us,"
                " i.id AS i_id, i.spiffe_id AS i_spiffe_id, i.entry_id AS i_entry_id,"
                " i.attestor AS i_attestor, i.selectors AS i_selectors,"
                " i.attested_at_us AS i_attested_at_us, i.x509_ttl_us AS i_x509_ttl_us,"
                " i.jwt_ttl_us AS i_jwt_ttl_us, i.dns_names AS i_dns_names, i.admin AS i_admin,"
                " i.parent_id AS i_parent_id"
                " FROM issued_x509 AS x JOIN identities AS i ON i.id = x.identity_id"
                " WHERE x.serial = ?",
                [serial],
            )
            if row is None:
                return None
            svid = IssuedX509(
                serial=row["x_serial"],
                identity_id=row["x_identity_id"],
                spiffe_id=SpiffeId.parse(row["x_spiffe_id"]),
                not_after=_from_instant(row["x_not_after_us"]),
            )
            return svid, _identity_from_row(row, "i_")

        return await self._run(job)

    # --- attestor instances ---

    async def create_attestor(
        self, instance: AttestorInstance, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        row = _attestor_row(instance)

        def job(db: Database) -> None:
            if _one(db, "SELECT 1 FROM attestors WHERE name = ?", [instance.name]) is not None:
                raise AlreadyExists(
                    f"an attestor named {instance.name!r} exists", reason="ATTESTOR_EXISTS"
                )
            db.execute(
                "INSERT INTO attestors (name, plugin, config_json, created_at_us, updated_at_us)"
                " VALUES (?, ?, ?, ?, ?)",
                row,
            )

        await self._run(job, audit)

    async def update_attestor(
        self, instance: AttestorInstance, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        row = _attestor_row(instance)

        def job(db: Database) -> None:
            changed = db.execute(
                "UPDATE attestors SET plugin = ?, config_json = ?, updated_at_us = ?"
                " WHERE name = ?",
                [row[1], row[2], row[4], row[0]],
            ).rowcount
            if not changed:
                raise NotFound(f"no attestor named {instance.name!r}", reason="ATTESTOR_NOT_FOUND")

        await self._run(job, audit)

    async def list_attestors(self) -> list[AttestorInstance]:
        def job(db: Database) -> list[AttestorInstance]:
            return [
                AttestorInstance(
                    row["name"],
                    row["plugin"],
                    row["config_json"],
                    _from_instant(row["created_at_us"]),
                    _from_instant(row["updated_at_us"]),
                )
                for row in db.query("SELECT * FROM attestors ORDER BY name")
            ]

        return await self._run(job)

    async def delete_attestor(self, name: str, *, audit: Sequence[AuditEvent] = ()) -> bool:
        def job(db: Database) -> bool:
            return db.execute("DELETE FROM attestors WHERE name = ?", [name]).rowcount > 0

        return await self._run(job, audit)

    # --- audit ---

    async def append_audit(self, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        return await self._run(lambda db: _append(db, events))

    async def audit_records(
        self,
        *,
        after_seq: int = 0,
        limit: int = 10_000,
        task_ids: Sequence[str] = (),
        max_bytes: int | None = None,
    ) -> list[AuditRecord]:
        def job(db: Database) -> list[AuditRecord]:
            if task_ids:
                marks = ",".join("?" * len(task_ids))
                rows = db.query(
                    f"SELECT * FROM audit WHERE seq > ? AND task_id IN ({marks})"  # noqa: S608
                    " ORDER BY seq LIMIT ?",
                    [after_seq, *task_ids, limit],
                )
            else:
                rows = db.query(
                    "SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", [after_seq, limit]
                )
            return audit_page((_audit_from_row(row) for row in rows), limit, max_bytes)

        return await self._run(job)

    async def audit_anchor(self) -> tuple[int, str]:
        def job(db: Database) -> tuple[int, str]:
            row = _one(db, "SELECT seq, prev_hash FROM audit_anchor WHERE id = 1", [])
            assert row is not None
            return int(row["seq"]), str(row["prev_hash"])

        return await self._run(job)

    async def audit_head(self) -> tuple[int, str]:
        def job(db: Database) -> tuple[int, str]:
            seq, prev = _audit_head(db)
            return seq - 1, prev

        return await self._run(job)

    async def put_checkpoint(self, checkpoint: Checkpoint) -> None:
        def job(db: Database) -> None:
            db.execute(
                "INSERT OR REPLACE INTO audit_checkpoints (seq, hash, jws) VALUES (?, ?, ?)",
                [checkpoint.seq, checkpoint.hash, checkpoint.jws],
            )

        await self._run(job)

    async def list_checkpoints(self) -> list[Checkpoint]:
        def job(db: Database) -> list[Checkpoint]:
            rows = db.query("SELECT seq, hash, jws FROM audit_checkpoints ORDER BY seq")
            return [Checkpoint(r["seq"], r["hash"], r["jws"]) for r in rows]

        return await self._run(job)

    async def prune_audit(self, through_seq: int, *, audit: Sequence[AuditEvent] = ()) -> int:
        def job(db: Database) -> int:
            row = _one(db, "SELECT hash FROM audit WHERE seq = ?", [through_seq])
            if row is None:
                raise NotFound(f"no audit record {through_seq}", reason="AUDIT_RECORD_NOT_FOUND")
            removed = db.execute("DELETE FROM audit WHERE seq <= ?", [through_seq]).rowcount
            db.execute(
                "UPDATE audit_anchor SET seq = ?, prev_hash = ? WHERE id = 1",
                [through_seq + 1, row["hash"]],
            )
            return int(removed)

        return await self._run(job, audit)

    # --- tasks, task tokens and approvals ---

    async def record_task_token(
        self,
        record: TaskTokenRecord,
        *,
        consume_approval: str = "",
        audit: Sequence[AuditEvent] = (),
    ) -> None:
        def job(db: Database) -> None:
            if consume_approval:
                used = db.execute(
                    "UPDATE approvals SET state = ? WHERE id = ? AND state = ?",
                    [ApprovalState.USED.value, consume_approval, ApprovalState.APPROVED.value],
                ).rowcount
                if not used:
                    raise FailedPrecondition(
                        f"approval {consume_approval} is not approved or was used",
                        reason="APPROVAL_USED",
                    )
            task = _one(db, "SELECT * FROM tasks WHERE task_id = ?", [record.task_id])
            if task is None:
                db.execute(
                    "INSERT INTO tasks (task_id, principal, created_at_us, ended_at_us, end_reason)"
                    " VALUES (?, ?, ?, NULL, '')",
                    [record.task_id, record.subject, _instant(record.issued_at)],
                )
            else:
                _check_task_open(_task_from_row(task), record.subject)
            db.execute(
                "INSERT INTO task_tokens (jti, task_id, subject, holder, audience, scope, resource,"
                " parent_jti, depth, issued_at_us, expires_at_us, decision_id, cnf_x5t)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    record.jti,
                    record.task_id,
                    record.subject,
                    record.holder,
                    record.audience,
                    record.scope,
                    record.resource,
                    record.parent_jti,
                    record.depth,
                    _instant(record.issued_at),
                    _instant(record.expires_at),
                    record.decision_id,
                    record.cnf_x5t,
                ],
            )

        await self._run(job, audit)

    async def get_task(self, task_id: str) -> TaskRecord | None:
        def job(db: Database) -> TaskRecord | None:
            row = _one(db, "SELECT * FROM tasks WHERE task_id = ?", [task_id])
            return None if row is None else _task_from_row(row)

        return await self._run(job)

    async def end_task(
        self, task_id: str, now: dt.datetime, reason: str, *, audit: Sequence[AuditEvent] = ()
    ) -> list[str]:
        now_us = _instant(now)

        def job(db: Database) -> list[str]:
            task = _one(db, "SELECT * FROM tasks WHERE task_id = ?", [task_id])
            if task is None:
                raise NotFound(f"no task {task_id!r}", reason="TASK_NOT_FOUND")
            if task["ended_at_us"] is not None:
                raise FailedPrecondition(f"task {task_id!r} has ended", reason="TASK_ENDED")
            db.execute(
                "UPDATE tasks SET ended_at_us = ?, end_reason = ? WHERE task_id = ?",
                [now_us, reason, task_id],
            )
            rows = db.query("SELECT jti FROM task_tokens WHERE task_id = ? ORDER BY jti", [task_id])
            return [row["jti"] for row in rows]

        return await self._run(job, audit)

    async def get_task_token(self, jti: str) -> TaskTokenRecord | None:
        def job(db: Database) -> TaskTokenRecord | None:
            row = _one(db, "SELECT * FROM task_tokens WHERE jti = ?", [jti])
            return None if row is None else _task_token_from_row(row)

        return await self._run(job)

    async def descendants(self, jti: str) -> list[str]:
        def job(db: Database) -> list[str]:
            rows = db.query(
                "WITH RECURSIVE d(jti) AS ("
                " SELECT jti FROM task_tokens WHERE parent_jti = ?"
                " UNION SELECT t.jti FROM task_tokens t JOIN d ON t.parent_jti = d.jti)"
                " SELECT jti FROM d ORDER BY jti",
                [jti],
            )
            return [row["jti"] for row in rows]

        return await self._run(job)

    async def create_approval(
        self, approval: Approval, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        def job(db: Database) -> None:
            db.execute(
                "INSERT INTO approvals (id, principal, task_id, audience, intent_json,"
                " intent_fingerprint, decision_id, requested_at_us, expires_at_us, state,"
                " decided_at_us, decided_by, note, grant_expires_at_us)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _approval_row(approval),
            )

        await self._run(job, audit)

    async def get_approval(self, approval_id: str) -> Approval | None:
        def job(db: Database) -> Approval | None:
            row = _one(db, "SELECT * FROM approvals WHERE id = ?", [approval_id])
            return None if row is None else _approval_from_row(row)

        return await self._run(job)

    async def list_approvals(self) -> list[Approval]:
        def job(db: Database) -> list[Approval]:
            rows = db.query("SELECT * FROM approvals ORDER BY requested_at_us, id")
            return [_approval_from_row(row) for row in rows]

        return await self._run(job)

    async def decide_approval(
        self, decided: Approval, now: dt.datetime, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        now_us = _instant(now)

        def job(db: Database) -> None:
            row = _one(db, "SELECT * FROM approvals WHERE id = ?", [decided.id])
            if row is None:
                raise NotFound(f"no approval {decided.id!r}", reason="APPROVAL_NOT_FOUND")
            if row["state"] != ApprovalState.PENDING.value:
                raise FailedPrecondition(
                    f"approval {decided.id} was already {row['state']}", reason="APPROVAL_DECIDED"
                )
            if row["expires_at_us"] <= now_us:
                raise FailedPrecondition(
                    f"approval {decided.id} expired before it was answered",
                    reason="APPROVAL_EXPIRED",
                )
            db.execute(
                "UPDATE approvals SET state = ?, decided_at_us = ?, decided_by = ?, note = ?,"
                " grant_expires_at_us = ? WHERE id = ?",
                [
                    decided.state.value,
                    None if decided.decided_at is None else _instant(decided.decided_at),
                    decided.decided_by,
                    decided.note,
                    None
                    if decided.grant_expires_at is None
                    else _instant(decided.grant_expires_at),
                    decided.id,
                ],
            )

        await self._run(job, audit)

    # --- revocations ---

    async def revoke(
        self, revocations: Sequence[Revocation], *, audit: Sequence[AuditEvent] = ()
    ) -> list[Revocation]:
        def job(db: Database) -> list[Revocation]:
            out = []
            for r in revocations:
                cursor = db.execute(
                    "INSERT INTO revocations (kind, target, reason, actor, revoked_at_us,"
                    " expires_at_us) VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        r.kind.value,
                        r.target,
                        r.reason,
                        r.actor,
                        _instant(r.revoked_at),
                        _instant(r.expires_at),
                    ],
                )
                out.append(dataclasses.replace(r, seq=int(cursor.lastrowid or 0)))
            return out

        return await self._run(job, audit)

    async def revocations_since(self, seq: int, limit: int = 10_000) -> list[Revocation]:
        def job(db: Database) -> list[Revocation]:
            rows = db.query(
                "SELECT * FROM revocations WHERE seq > ? ORDER BY seq LIMIT ?", [seq, limit]
            )
            return [_revocation_from_row(row) for row in rows]

        return await self._run(job)

    async def active_revocations(self, now: dt.datetime) -> list[Revocation]:
        now_us = _instant(now)

        def job(db: Database) -> list[Revocation]:
            rows = db.query(
                "SELECT * FROM revocations WHERE expires_at_us > ? ORDER BY seq", [now_us]
            )
            return [_revocation_from_row(row) for row in rows]

        return await self._run(job)

    async def revocation_bounds(self) -> tuple[int, int]:
        def job(db: Database) -> tuple[int, int]:
            row = _one(db, "SELECT MIN(seq) AS lo, MAX(seq) AS hi FROM revocations", [])
            seq_row = _one(db, "SELECT seq FROM sqlite_sequence WHERE name = 'revocations'", [])
            head = int(seq_row["seq"]) if seq_row else 0
            lo = int(row["lo"]) if row and row["lo"] is not None else head + 1
            return lo, head

        return await self._run(job)

    async def subjects_attested_by(self, attestor: str, now: dt.datetime) -> list[str]:
        return await self._live_subjects("attestor", attestor, now)

    async def subjects_issued_through(self, agent: str, now: dt.datetime) -> list[str]:
        return await self._live_subjects("parent_id", agent, now)

    async def _live_subjects(
        self, column: Literal["attestor", "parent_id"], value: str, now: dt.datetime
    ) -> list[str]:
        """SPIFFE IDs with a live X.509-SVID whose identity has ``column`` = ``value``."""
        now_us = _instant(now)

        def job(db: Database) -> list[str]:
            rows = db.query(_LIVE_SUBJECTS[column], [value, now_us])
            return [row["spiffe_id"] for row in rows]

        return await self._run(job)

    async def spiffe_id_on_record(self, spiffe_id: str) -> bool:
        def job(db: Database) -> bool:
            return any(
                _one(db, sql, [spiffe_id] * sql.count("?")) is not None
                for sql in _SPIFFE_ID_ON_RECORD
            )

        return await self._run(job)

    async def task_tokens_of_subject(self, subject: str, now: dt.datetime) -> list[str]:
        """Live task tokens a SPIFFE ID holds or delegated (its own tasks'), by jti."""
        now_us = _instant(now)

        def job(db: Database) -> list[str]:
            rows = db.query(
                "SELECT jti FROM task_tokens WHERE (subject = ? OR holder = ?)"
                " AND expires_at_us > ? ORDER BY jti",
                [subject, subject, now_us],
            )
            return [row["jti"] for row in rows]

        return await self._run(job)

    # --- single-use claims ---

    async def claim_once(
        self, namespace: str, key: str, expires_at: dt.datetime, now: dt.datetime
    ) -> bool:
        expires_us, now_us = _instant(expires_at), _instant(now)

        def job(db: Database) -> bool:
            row = _one(
                db,
                "SELECT expires_at_us FROM claims WHERE namespace = ? AND key = ?",
                [namespace, key],
            )
            if row is not None and row["expires_at_us"] > now_us:
                return False
            db.execute(
                "INSERT OR REPLACE INTO claims (namespace, key, expires_at_us) VALUES (?, ?, ?)",
                [namespace, key, expires_us],
            )
            return True

        return await self._run(job)

    async def prune(self, now: dt.datetime) -> int:
        now_us = _instant(now)
        grace_us = now_us - _duration(PRUNE_GRACE)

        def job(db: Database) -> int:
            removed = db.execute("DELETE FROM issued_x509 WHERE not_after_us < ?", [now_us])
            count = removed.rowcount
            removed = db.execute(
                "DELETE FROM identities WHERE attested_at_us < ? AND NOT EXISTS"
                " (SELECT 1 FROM issued_x509 WHERE identity_id = identities.id)",
                [grace_us],
            )
            count += removed.rowcount
            removed = db.execute("DELETE FROM join_tokens WHERE expires_at_us < ?", [grace_us])
            count += removed.rowcount
            removed = db.execute("DELETE FROM claims WHERE expires_at_us <= ?", [now_us])
            count += removed.rowcount
            # A revocation is forgotten once everything it covers has expired (and a grace).
            removed = db.execute("DELETE FROM revocations WHERE expires_at_us < ?", [grace_us])
            count += removed.rowcount
            removed = db.execute("DELETE FROM task_tokens WHERE expires_at_us < ?", [grace_us])
            return int(count + removed.rowcount)

        return await self._run(job)


def _audit_head(db: Database) -> tuple[int, str]:
    """(next seq, hash of the last record), counting archived records. Cached on the writer's
    connection; the writer drops the cache whenever anything is rolled back."""
    cached: tuple[int, str] | None = getattr(db, _HEAD_CACHE, None)
    if cached is not None:
        return cached
    row = _one(db, "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", [])
    if row is not None:
        return int(row["seq"]) + 1, str(row["hash"])
    anchor = _one(db, "SELECT seq, prev_hash FROM audit_anchor WHERE id = 1", [])
    assert anchor is not None
    return int(anchor["seq"]), str(anchor["prev_hash"])


def _append(db: Database, events: Sequence[AuditEvent]) -> list[AuditRecord]:
    seq, prev = _audit_head(db)
    out: list[AuditRecord] = []
    for event in events:
        record = chain(event, seq, prev)
        db.execute(
            "INSERT INTO audit (seq, time_us, kind, actor, subject, task_id, decision_id,"
            " details, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                record.seq,
                record.time_us,
                record.kind,
                record.actor,
                record.subject,
                record.task_id,
                record.decision_id,
                record.details_json,
                record.prev_hash,
                record.hash,
            ],
        )
        out.append(record)
        seq, prev = seq + 1, record.hash
    setattr(db, _HEAD_CACHE, (seq, prev))
    return out


def _with_audit(
    fn: Callable[[Database], T], events: Sequence[AuditEvent]
) -> Callable[[Database], T]:
    """The action, then its audit records: one savepoint, so both commit or neither does."""

    def job(db: Database) -> T:
        result = fn(db)
        if result is not False:  # a delete that found nothing happened not: no record
            # The writer thread's CPU time: what the record costs, not time spent waiting for
            # the GIL while the event loop runs.
            started = time.thread_time()
            _append(db, events)
            _AUDIT_APPEND.add(time.thread_time() - started)
        return result

    return job


def _audit_from_row(row: Mapping[str, Any]) -> AuditRecord:
    return AuditRecord(
        seq=row["seq"],
        time_us=row["time_us"],
        kind=row["kind"],
        actor=row["actor"],
        subject=row["subject"],
        task_id=row["task_id"],
        decision_id=row["decision_id"],
        details_json=row["details"],
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


def _revocation_from_row(row: Mapping[str, Any]) -> Revocation:
    return Revocation(
        kind=RevocationKind(row["kind"]),
        target=row["target"],
        reason=row["reason"],
        revoked_at=_from_instant(row["revoked_at_us"]),
        expires_at=_from_instant(row["expires_at_us"]),
        actor=row["actor"],
        seq=row["seq"],
    )


def _task_from_row(row: Mapping[str, Any]) -> TaskRecord:
    ended = row["ended_at_us"]
    return TaskRecord(
        row["task_id"],
        row["principal"],
        _from_instant(row["created_at_us"]),
        None if ended is None else _from_instant(ended),
        row["end_reason"],
    )


def _check_task_open(task: TaskRecord, subject: str) -> None:
    if task.ended_at is not None:
        raise FailedPrecondition(f"task {task.task_id!r} has ended", reason="TASK_ENDED")
    if task.principal != subject:
        raise PermissionDenied(
            f"task {task.task_id!r} belongs to another principal", reason="TASK_NOT_YOURS"
        )


def _task_token_from_row(row: Mapping[str, Any]) -> TaskTokenRecord:
    return TaskTokenRecord(
        jti=row["jti"],
        task_id=row["task_id"],
        subject=row["subject"],
        holder=row["holder"],
        audience=row["audience"],
        scope=row["scope"],
        resource=row["resource"],
        parent_jti=row["parent_jti"],
        depth=row["depth"],
        issued_at=_from_instant(row["issued_at_us"]),
        expires_at=_from_instant(row["expires_at_us"]),
        decision_id=row["decision_id"],
        cnf_x5t=row["cnf_x5t"],
    )


def _approval_row(a: Approval) -> list[object]:
    return [
        a.id,
        a.principal,
        a.task_id,
        a.audience,
        a.intent_json,
        a.intent_fingerprint,
        a.decision_id,
        _instant(a.requested_at),
        _instant(a.expires_at),
        a.state.value,
        None if a.decided_at is None else _instant(a.decided_at),
        a.decided_by,
        a.note,
        None if a.grant_expires_at is None else _instant(a.grant_expires_at),
    ]


def _approval_from_row(row: Mapping[str, Any]) -> Approval:
    def maybe(value: int | None) -> dt.datetime | None:
        return None if value is None else _from_instant(value)

    return Approval(
        id=row["id"],
        principal=row["principal"],
        task_id=row["task_id"],
        audience=row["audience"],
        intent_json=row["intent_json"],
        intent_fingerprint=row["intent_fingerprint"],
        decision_id=row["decision_id"],
        requested_at=_from_instant(row["requested_at_us"]),
        expires_at=_from_instant(row["expires_at_us"]),
        state=ApprovalState(row["state"]),
        decided_at=maybe(row["decided_at_us"]),
        decided_by=row["decided_by"],
        note=row["note"],
        grant_expires_at=maybe(row["grant_expires_at_us"]),
    )


def _attestor_row(instance: AttestorInstance) -> list[object]:
    return [
        instance.name,
        instance.plugin,
        instance.config_json,
        _instant(instance.created_at),
        _instant(instance.updated_at),
    ]


def _check_issuance(identity: Identity | None, issued: list[IssuedX509]) -> None:
    if identity is None:
        return
    for svid in issued:
        if svid.identity_id != identity.id:
            raise InvalidArgument(
                f"SVID {svid.serial} names identity {svid.identity_id!r}, not {identity.id!r}"
            )
