"""The store on PostgreSQL: any number of replicas share one database.

The rules are ``queries.SqlStore``'s and the thread ``writer.Writer``'s, as on SQLite: each
replica has one writer connection (psycopg 3, synchronous, in the writer's thread), batching
its jobs into one transaction (READ COMMITTED; the rules use only statements that are atomic
there, see ``sql``). A conflict PostgreSQL resolves by aborting a transaction (a deadlock, a
serialization failure) runs the batch again; a lost connection fails the batch UNAVAILABLE and
the next one reconnects.

Committed changes are announced with ``NOTIFY authority, '<topic>:<replica>'`` in the
transaction; a listener thread per replica (its own connection, ``LISTEN authority``) hands the
other replicas' topics to the store's listeners. Readers then read by sequence number or
reload, so a notification lost while the listener reconnects costs nothing: on reconnecting it
announces every topic, and it announces ``revocations`` every ``SWEEP_SECONDS`` regardless.

Migrations are applied on open under a session advisory lock, so replicas starting together
take turns; a database whose schema is newer than this build knows is refused.

Connection parameters come from the URL and libpq's environment (``PGPASSFILE``,
``PGPASSWORD``, ``PGSSLMODE`` ...). The URL is never logged with its password: ``redact``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import re
import threading
import time
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from authority.audit import GENESIS
from authority.errors import AuthorityError, FailedPrecondition, Unavailable
from authority.store import sql
from authority.store.queries import BUNDLE_SEQUENCE, REVOCATION_SEQUENCE, SqlStore
from authority.store.rows import instant
from authority.store.sql import Duplicate, MissingReference

log = logging.getLogger(__name__)

CHANNEL: Final = "authority"
CONNECT_TIMEOUT: Final = 3
SWEEP_SECONDS: Final = 2.0
# Session advisory lock keys (two int4s: a namespace and a key).
_LOCK_NAMESPACE: Final = 0x5350_4946  # "SPIF"
_MIGRATION_LOCK: Final = 1

_PLACEHOLDER = re.compile(r"\?")
_IN_TRANSACTION: Final = (TransactionStatus.INTRANS, TransactionStatus.INERROR)


def redact(url: str) -> str:
    """``url`` without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


@functools.cache
def _pg(sql_text: str) -> str:
    """``sql_text`` with psycopg's placeholders (each statement converted once)."""
    return _PLACEHOLDER.sub("%s", sql_text)


class PostgresConnection:
    """``writer.Connection`` on a psycopg connection in autocommit mode (explicit BEGIN)."""

    shared = True
    for_update = " FOR UPDATE"

    def __init__(self, conn: psycopg.Connection[dict[str, Any]], replica: str) -> None:
        self._conn = conn
        self._replica = replica
        self.cache: dict[str, Any] = {}
        self.topics: list[str] = []

    def one(self, sql_text: str, params: Sequence[object] = ()) -> dict[str, Any] | None:
        return self._conn.execute(_pg(sql_text), params).fetchone()

    def all(self, sql_text: str, params: Sequence[object] = ()) -> list[dict[str, Any]]:
        return self._conn.execute(_pg(sql_text), params).fetchall()

    def run(self, sql_text: str, params: Sequence[object] = ()) -> int:
        try:
            return self._conn.execute(_pg(sql_text), params).rowcount
        except pg_errors.UniqueViolation as exc:
            raise Duplicate(exc.diag.constraint_name or "unique") from None
        except pg_errors.ForeignKeyViolation as exc:
            raise MissingReference(exc.diag.constraint_name or "foreign key") from None

    def notify(self, topic: str) -> None:
        self.topics.append(topic)

    @property
    def in_transaction(self) -> bool:
        # INTRANS or INERROR (a failed statement); UNKNOWN once the connection is broken.
        return self._conn.info.transaction_status in _IN_TRANSACTION

    def begin(self) -> None:
        self.cache.clear()  # other replicas write between our transactions
        self._conn.execute("BEGIN")

    def savepoint(self) -> None:
        self._conn.execute("SAVEPOINT job")

    def release(self) -> None:
        self._conn.execute("RELEASE SAVEPOINT job")

    def rollback_to(self) -> None:
        self._conn.execute("ROLLBACK TO SAVEPOINT job")
        self._conn.execute("RELEASE SAVEPOINT job")

    def commit(self) -> None:
        for topic in sorted(set(self.topics)):
            self._conn.execute("SELECT pg_notify(%s, %s)", [CHANNEL, f"{topic}:{self._replica}"])
        self._conn.execute("COMMIT")

    def rollback(self) -> None:
        self._conn.execute("ROLLBACK")

    def close(self) -> None:
        self._conn.close()


def _connect(url: str, replica: str, role: str) -> psycopg.Connection[dict[str, Any]]:
    return psycopg.connect(
        url,
        autocommit=True,
        row_factory=dict_row,
        connect_timeout=CONNECT_TIMEOUT,
        application_name=f"authority {replica} {role}"[:63],
    )


# SQLSTATE classes meaning the connection is gone: 08 (connection exception), 57P (operator
# intervention: the server shutting down).
_LOST_STATES: Final = ("08", "57P")


class PostgresBackend:
    def __init__(self, url: str, replica: str) -> None:
        self._url = url
        self._replica = replica
        self.name = "postgresql"

    def connect(self) -> PostgresConnection:
        return PostgresConnection(_connect(self._url, self._replica, "writer"), self._replica)

    def error(self, exc: Exception) -> tuple[AuthorityError, bool, bool] | None:
        if not isinstance(exc, psycopg.Error):
            return None
        state = exc.sqlstate or ""
        if isinstance(exc, pg_errors.SerializationFailure | pg_errors.DeadlockDetected):
            error = Unavailable(
                "the write conflicted with another replica's", reason="STORE_CONFLICT"
            )
            return error, True, False
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) and (
            not state or state.startswith(_LOST_STATES)
        ):
            return (
                Unavailable("the database is unreachable", reason="STORE_UNREACHABLE"),
                False,
                True,
            )
        return (
            Unavailable(f"the store failed ({type(exc).__name__})", reason="STORE_ERROR"),
            False,
            False,
        )


# --- schema ----------------------------------------------------------------------------------

_SCHEMA_1: Final = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO meta (key, value) VALUES ('{BUNDLE_SEQUENCE}', 0), ('{REVOCATION_SEQUENCE}', 0);
CREATE TABLE authority_keys (
  kind TEXT NOT NULL, key_id TEXT NOT NULL, state TEXT NOT NULL,
  not_before_us BIGINT NOT NULL, not_after_us BIGINT NOT NULL, certificate BYTEA NOT NULL,
  upstream_chain TEXT NOT NULL, tainted INTEGER NOT NULL, replica TEXT NOT NULL DEFAULT '',
  public_key BYTEA NOT NULL DEFAULT '',
  PRIMARY KEY (kind, key_id));
CREATE TABLE entries (
  id TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, selectors TEXT NOT NULL,
  x509_ttl_us BIGINT NOT NULL, jwt_ttl_us BIGINT NOT NULL, dns_names TEXT NOT NULL,
  admin INTEGER NOT NULL, created_at_us BIGINT NOT NULL,
  record_prompts INTEGER NOT NULL DEFAULT 0, parent_id TEXT NOT NULL DEFAULT '');
CREATE UNIQUE INDEX entries_by_id_selectors_parent ON entries (spiffe_id, selectors, parent_id);
CREATE TABLE join_tokens (
  token_id TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, expires_at_us BIGINT NOT NULL,
  created_at_us BIGINT NOT NULL, used_at_us BIGINT);
CREATE INDEX join_tokens_by_expiry ON join_tokens (expires_at_us);
CREATE TABLE identities (
  id TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, entry_id TEXT, attestor TEXT NOT NULL,
  selectors TEXT NOT NULL, attested_at_us BIGINT NOT NULL, x509_ttl_us BIGINT NOT NULL,
  jwt_ttl_us BIGINT NOT NULL, dns_names TEXT NOT NULL, admin INTEGER NOT NULL,
  parent_id TEXT NOT NULL DEFAULT '');
CREATE INDEX identities_by_attested_at ON identities (attested_at_us);
CREATE TABLE issued_x509 (
  serial TEXT PRIMARY KEY, identity_id TEXT NOT NULL REFERENCES identities (id),
  spiffe_id TEXT NOT NULL, not_after_us BIGINT NOT NULL);
CREATE INDEX issued_x509_by_identity ON issued_x509 (identity_id);
CREATE INDEX issued_x509_by_not_after ON issued_x509 (not_after_us);
CREATE TABLE attestors (
  name TEXT PRIMARY KEY, plugin TEXT NOT NULL, config_json TEXT NOT NULL,
  created_at_us BIGINT NOT NULL, updated_at_us BIGINT NOT NULL);
INSERT INTO attestors (name, plugin, config_json, created_at_us, updated_at_us)
  VALUES ('join_token', 'join_token', '{{}}',
          (extract(epoch from now()) * 1000000)::bigint,
          (extract(epoch from now()) * 1000000)::bigint);
CREATE TABLE claims (
  namespace TEXT NOT NULL, key TEXT NOT NULL, expires_at_us BIGINT NOT NULL,
  PRIMARY KEY (namespace, key));
CREATE INDEX claims_by_expiry ON claims (expires_at_us);
CREATE TABLE audit (
  seq BIGINT PRIMARY KEY, time_us BIGINT NOT NULL, kind TEXT NOT NULL, actor TEXT NOT NULL,
  subject TEXT NOT NULL, task_id TEXT NOT NULL, decision_id TEXT NOT NULL,
  details TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE INDEX audit_by_task ON audit (task_id);
CREATE INDEX audit_by_time ON audit (time_us);
CREATE TABLE audit_checkpoints (seq BIGINT PRIMARY KEY, hash TEXT NOT NULL, jws TEXT NOT NULL);
CREATE TABLE audit_anchor (id INTEGER PRIMARY KEY, seq BIGINT NOT NULL, prev_hash TEXT NOT NULL);
INSERT INTO audit_anchor (id, seq, prev_hash) VALUES (1, 1, '{GENESIS}');
CREATE TABLE tasks (
  task_id TEXT PRIMARY KEY, principal TEXT NOT NULL, created_at_us BIGINT NOT NULL,
  ended_at_us BIGINT, end_reason TEXT NOT NULL);
CREATE TABLE task_tokens (
  jti TEXT PRIMARY KEY, task_id TEXT NOT NULL REFERENCES tasks (task_id),
  subject TEXT NOT NULL, holder TEXT NOT NULL, audience TEXT NOT NULL, scope TEXT NOT NULL,
  resource TEXT NOT NULL, parent_jti TEXT NOT NULL, depth INTEGER NOT NULL,
  issued_at_us BIGINT NOT NULL, expires_at_us BIGINT NOT NULL, decision_id TEXT NOT NULL,
  cnf_x5t TEXT NOT NULL);
CREATE INDEX task_tokens_by_task ON task_tokens (task_id);
CREATE INDEX task_tokens_by_parent ON task_tokens (parent_jti);
CREATE INDEX task_tokens_by_expiry ON task_tokens (expires_at_us);
CREATE TABLE approvals (
  id TEXT PRIMARY KEY, principal TEXT NOT NULL, task_id TEXT NOT NULL, audience TEXT NOT NULL,
  intent_json TEXT NOT NULL, intent_fingerprint TEXT NOT NULL, decision_id TEXT NOT NULL,
  requested_at_us BIGINT NOT NULL, expires_at_us BIGINT NOT NULL, state TEXT NOT NULL,
  decided_at_us BIGINT, decided_by TEXT NOT NULL, note TEXT NOT NULL,
  grant_expires_at_us BIGINT);
CREATE INDEX approvals_by_state ON approvals (state);
CREATE TABLE revocations (
  seq BIGINT PRIMARY KEY, kind TEXT NOT NULL, target TEXT NOT NULL, reason TEXT NOT NULL,
  actor TEXT NOT NULL, revoked_at_us BIGINT NOT NULL, expires_at_us BIGINT NOT NULL);
CREATE INDEX revocations_by_expiry ON revocations (expires_at_us);
CREATE INDEX revocations_by_target ON revocations (kind, target);
CREATE TABLE replicas (
  id TEXT PRIMARY KEY, started_at_us BIGINT NOT NULL, seen_at_us BIGINT NOT NULL,
  host TEXT NOT NULL);
"""  # noqa: S608 - constants only

# MIGRATIONS[n] takes the schema from version n to n + 1. Append only.
MIGRATIONS: Final[tuple[str, ...]] = (_SCHEMA_1,)
SCHEMA_VERSION: Final = len(MIGRATIONS)


def migrate(url: str, replica: str) -> int:
    """Bring the database's schema to ``SCHEMA_VERSION`` (or refuse a newer one); the version
    it was at."""
    with _connect(url, replica, "migrations") as conn:
        conn.execute("SELECT pg_advisory_lock(%s, %s)", [_LOCK_NAMESPACE, _MIGRATION_LOCK])
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS authority_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) AS version FROM authority_schema").fetchone()
            version = int(row["version"]) if row and row["version"] is not None else 0
            if version > SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"the database has schema version {version}, newer than this build knows "
                    f"({SCHEMA_VERSION}); run a newer release of the authority",
                    reason="STORE_SCHEMA_TOO_NEW",
                )
            for number in range(version, SCHEMA_VERSION):
                with conn.transaction():
                    conn.execute(MIGRATIONS[number].encode())
                    conn.execute("INSERT INTO authority_schema (version) VALUES (%s)", [number + 1])
                log.info("store: database schema migrated to version %d", number + 1)
            return version
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", [_LOCK_NAMESPACE, _MIGRATION_LOCK])


class _Listener:
    """A thread on its own connection: LISTEN, and hand other replicas' topics to the store."""

    def __init__(self, store: PostgresStore, url: str, replica: str) -> None:
        self._store = store
        self._url = url
        self._replica = replica
        self._stop = threading.Event()
        self.listening = threading.Event()  # LISTEN has been run once (open waits for it)
        self._conn: psycopg.Connection[dict[str, Any]] | None = None
        self.thread = threading.Thread(target=self._main, name="store:listen", daemon=True)

    def _main(self) -> None:
        delay = 0.2
        missed = False  # a connection was lost or refused: notifications may have gone unheard
        while not self._stop.is_set():
            try:
                self._conn = _connect(self._url, self._replica, "listener")
                self._conn.execute(f"LISTEN {CHANNEL}")
                self.listening.set()
                delay = 0.2
                if missed:  # anything may have changed while we were not listening
                    self._store._committed(set(sql.TOPICS), remote=True)
                    missed = False
                self._listen(self._conn)
            except psycopg.Error as exc:
                missed = True
                if self._stop.is_set():
                    break
                log.warning("store: the change listener lost the database: %s", exc)
                self._stop.wait(delay)
                delay = min(delay * 2, 1.0)
            finally:
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.close()

    def _listen(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        swept = time.monotonic()
        while not self._stop.is_set():
            topics: set[str] = set()
            # One notification ends the wait (psycopg's timeout bounds the whole call: waiting
            # for more would hold this one back for the rest of the window).
            for note in conn.notifies(timeout=0.5, stop_after=1):
                topic, _, origin = note.payload.partition(":")
                if origin != self._replica and topic in sql.TOPICS:
                    topics.add(topic)
            if time.monotonic() - swept >= SWEEP_SECONDS:
                swept = time.monotonic()
                topics.add(sql.REVOCATIONS)
            if topics:
                self._store._committed(topics, remote=True)

    def stop(self) -> None:
        self._stop.set()


class PostgresStore(SqlStore):
    """``Store`` on a PostgreSQL database shared by the trust domain's replicas. Open with
    ``await PostgresStore.open(url, replica)``."""

    def __init__(self, url: str, replica: str) -> None:
        super().__init__(PostgresBackend(url, replica), replica=replica)
        self._listener = _Listener(self, url, replica)

    @classmethod
    async def open(cls, url: str, replica: str) -> PostgresStore:
        try:
            await asyncio.to_thread(migrate, url, replica)
        except psycopg.Error as exc:
            raise Unavailable(
                f"cannot reach the database {redact(url)}: {_first_line(exc)}",
                reason="STORE_UNREACHABLE",
            ) from None
        store = cls(url, replica)
        try:
            await store._ready()
        except psycopg.Error as exc:
            raise Unavailable(
                f"cannot reach the database {redact(url)}: {_first_line(exc)}",
                reason="STORE_UNREACHABLE",
            ) from None
        store._listener.thread.start()
        # A change another replica commits before this one listens would go unheard: serve
        # only once listening (or, if the listener cannot connect yet, after its first try:
        # it announces every topic when it does).
        await asyncio.to_thread(store._listener.listening.wait, CONNECT_TIMEOUT + 1)
        return store

    async def close(self) -> None:
        self._listener.stop()
        await super().close()

    async def register_replica(self, host: str, now: dt.datetime) -> None:
        """Record (or refresh) this replica in ``replicas``."""
        now_us = instant(now)

        def job(tx: sql.Tx) -> None:
            tx.run(
                "INSERT INTO replicas (id, started_at_us, seen_at_us, host) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET seen_at_us = excluded.seen_at_us,"
                " host = excluded.host",
                [self.replica, now_us, now_us, host],
            )

        await self._run(job)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
