"""The store's rules, once, for every backend: ``SqlStore`` runs them on SQLite (a file, or in
memory) and on PostgreSQL.

Each public method builds a job (a function of the open transaction) and hands it to the
store's writer thread (``writer.Writer``). The rules use only the atomic statements described in
``sql``, so they hold with several replicas writing one PostgreSQL database as they do with one
SQLite writer: a join token or an approval is used once, a task's owner is checked against the
row it locks, revocation and audit numbers are handed out in commit order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from typing import Final, Literal, TypeVar

from authority.audit import AuditEvent, AuditRecord, Checkpoint, chain
from authority.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from authority.ids import SpiffeId
from authority.models import (
    Approval,
    ApprovalState,
    AttestorInstance,
    AuthorityKeyInfo,
    HeldSvid,
    Identity,
    IssuedX509,
    JoinToken,
    KeyKind,
    RegistrationEntry,
    Revocation,
    TaskRecord,
    TaskTokenRecord,
)
from authority.store import audit_page, sql
from authority.store.rows import (
    approval_from_row,
    approval_row,
    attestor_row,
    audit_from_row,
    chain_text,
    check_issuance,
    check_task_open,
    duration,
    entry_from_row,
    entry_row,
    from_instant,
    identity_from_row,
    instant,
    key_from_row,
    names_text,
    revocation_from_row,
    selectors_text,
    short,
    task_from_row,
    task_token_from_row,
    token_from_row,
)
from authority.store.sql import Duplicate, MissingReference, Tx
from authority.store.writer import Backend, Job, Writer

T = TypeVar("T")

PRUNE_GRACE: Final = dt.timedelta(days=1)
BUNDLE_SEQUENCE: Final = "bundle_sequence"
REVOCATION_SEQUENCE: Final = "revocation_sequence"
_HEAD: Final = "audit_head"

Listener = Callable[[set[str]], None]


class SqlStore:
    """``Store`` on a SQL database. Backends open it: ``SqliteStore.open``, ``MemoryStore()``,
    ``PostgresStore.open``."""

    def __init__(self, backend: Backend, *, replica: str = "") -> None:
        self.replica = replica
        self._writer = Writer(backend, append_records, self._committed)
        self._closing = False
        self._listeners: list[tuple[asyncio.AbstractEventLoop, Listener, bool]] = []
        self._writer.thread.start()

    async def _ready(self) -> None:
        try:
            await asyncio.wrap_future(self._writer.ready)
        except BaseException:
            self._writer.stop()  # in case it opened and we were cancelled
            await asyncio.wrap_future(self._writer.done)
            self._writer.thread.join()
            raise

    def observe_commits(self, observer: Callable[[float, Sequence[AuditEvent]], None]) -> None:
        """Call ``observer`` in the writer's thread after each commit, with the commit's wall
        time and the audit events it committed (metrics)."""
        self._writer.observers.append(observer)

    @property
    def commit_count(self) -> int:
        """How many transactions the store has committed since it was opened."""
        return self._writer.commits

    @property
    def available(self) -> bool:
        """Whether the writer holds a connection to the database."""
        return self._writer.connected and not self._closing

    async def close(self) -> None:
        """Finish the queued work, stop the thread and close the connection. Idempotent."""
        if not self._closing:
            self._closing = True
            self._writer.stop()
        await asyncio.wrap_future(self._writer.done)
        self._writer.thread.join()

    # --- announcements of committed changes ---

    def add_listener(self, listener: Listener, *, remote_only: bool = False) -> None:
        """Call ``listener`` (on this event loop) with the topics (``sql.TOPICS``) of every
        committed change: this store's own (unless ``remote_only``), and other replicas' where
        the backend hears of them."""
        self._listeners.append((asyncio.get_running_loop(), listener, remote_only))

    def remove_listener(self, listener: Listener) -> None:
        self._listeners = [entry for entry in self._listeners if entry[1] is not listener]

    def _committed(self, topics: set[str], *, remote: bool = False) -> None:
        """From any thread: hand ``topics`` to every listener on its own loop."""
        for loop, listener, remote_only in list(self._listeners):
            if remote_only and not remote:
                continue
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(listener, set(topics))

    async def _run(
        self,
        fn: Callable[[Tx], T],
        audit: Sequence[AuditEvent] = (),
        *,
        returns_records: bool = False,
    ) -> T:
        if self._closing:
            raise Unavailable("the store is closed", reason="STORE_CLOSED")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._writer.queue.put(Job(fn, loop, future, audit, returns_records))
        return await future

    async def ping(self) -> None:
        """A round trip to the database (Unavailable when it cannot be reached)."""
        await self._run(lambda tx: tx.one("SELECT 1 AS one"))

    # --- signing keys and the bundle sequence ---

    async def list_authority_keys(self) -> list[AuthorityKeyInfo]:
        def job(tx: Tx) -> list[AuthorityKeyInfo]:
            rows = tx.all("SELECT * FROM authority_keys ORDER BY kind, not_before_us, key_id")
            return [key_from_row(row) for row in rows]

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
                instant(key.not_before),
                instant(key.not_after),
                key.certificate,
                chain_text(key.upstream_chain),
                int(key.tainted),
                key.replica,
                key.public_key,
            ]
            for key in keys
        ]

        def job(tx: Tx) -> int:
            for row in params:
                tx.run(
                    "INSERT INTO authority_keys (kind, key_id, state, not_before_us,"
                    " not_after_us, certificate, upstream_chain, tainted, replica, public_key)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kind, key_id) DO UPDATE"
                    " SET state = excluded.state, not_before_us = excluded.not_before_us,"
                    " not_after_us = excluded.not_after_us, certificate = excluded.certificate,"
                    " upstream_chain = excluded.upstream_chain, tainted = excluded.tainted,"
                    " replica = excluded.replica, public_key = excluded.public_key",
                    row,
                )
            if params or bump_sequence:
                tx.notify(sql.KEYS)
            return _bump(tx, BUNDLE_SEQUENCE) if bump_sequence else _counter(tx, BUNDLE_SEQUENCE)

        return await self._run(job, audit)

    async def delete_authority_key(
        self, kind: KeyKind, key_id: str, *, audit: Sequence[AuditEvent] = ()
    ) -> int:
        def job(tx: Tx) -> int:
            removed = tx.run(
                "DELETE FROM authority_keys WHERE kind = ? AND key_id = ?", [kind.value, key_id]
            )
            if removed == 0:
                raise NotFound(f"no {kind.value} key {key_id!r}", reason="KEY_NOT_FOUND")
            tx.notify(sql.KEYS)
            return _bump(tx, BUNDLE_SEQUENCE)

        return await self._run(job, audit)

    async def bundle_sequence(self) -> int:
        return await self._run(lambda tx: _counter(tx, BUNDLE_SEQUENCE))

    # --- registration entries ---

    async def create_entry(
        self, entry: RegistrationEntry, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        row = entry_row(entry)

        def job(tx: Tx) -> None:
            added = tx.run(
                "INSERT INTO entries (id, spiffe_id, selectors, x509_ttl_us, jwt_ttl_us,"
                " dns_names, admin, created_at_us, record_prompts, parent_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                row,
            )
            if not added:
                if tx.one("SELECT 1 AS one FROM entries WHERE id = ?", [entry.id]) is not None:
                    raise AlreadyExists(f"entry {entry.id!r} already exists", reason="ENTRY_EXISTS")
                _refuse_same_key(tx, row, entry)
                raise AlreadyExists("the entry collides with another", reason="ENTRY_EXISTS")
            tx.notify(sql.ENTRIES)

        await self._run(job, audit)

    async def get_entry(self, entry_id: str) -> RegistrationEntry | None:
        def job(tx: Tx) -> RegistrationEntry | None:
            row = tx.one("SELECT * FROM entries WHERE id = ?", [entry_id])
            return None if row is None else entry_from_row(row)

        return await self._run(job)

    async def list_entries(self) -> list[RegistrationEntry]:
        def job(tx: Tx) -> list[RegistrationEntry]:
            rows = tx.all("SELECT * FROM entries ORDER BY created_at_us, id")
            return [entry_from_row(row) for row in rows]

        return await self._run(job)

    async def update_entry(
        self, entry: RegistrationEntry, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        row = entry_row(entry)

        def job(tx: Tx) -> None:
            if tx.one("SELECT 1 AS one FROM entries WHERE id = ?", [entry.id]) is None:
                raise NotFound(f"no entry {entry.id!r}", reason="ENTRY_NOT_FOUND")
            _refuse_same_key(tx, row, entry)
            try:
                changed = tx.run(
                    "UPDATE entries SET spiffe_id = ?, selectors = ?, x509_ttl_us = ?,"
                    " jwt_ttl_us = ?, dns_names = ?, admin = ?, created_at_us = ?,"
                    " record_prompts = ?, parent_id = ? WHERE id = ?",
                    [*row[1:], entry.id],
                )
            except Duplicate:  # another replica took the key since the check
                raise AlreadyExists(
                    f"another entry maps these selectors to {entry.spiffe_id}",
                    reason="ENTRY_EXISTS",
                ) from None
            if not changed:  # deleted since the check
                raise NotFound(f"no entry {entry.id!r}", reason="ENTRY_NOT_FOUND")
            tx.notify(sql.ENTRIES)

        await self._run(job, audit)

    async def delete_entry(self, entry_id: str, *, audit: Sequence[AuditEvent] = ()) -> bool:
        def job(tx: Tx) -> bool:
            removed = tx.run("DELETE FROM entries WHERE id = ?", [entry_id]) > 0
            if removed:
                tx.notify(sql.ENTRIES)
            return removed

        return await self._run(job, audit)

    # --- join tokens ---

    async def create_join_token(
        self, token: JoinToken, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        row = [
            token.token_id,
            token.spiffe_id.uri,
            instant(token.expires_at),
            instant(token.created_at),
            None if token.used_at is None else instant(token.used_at),
        ]

        def job(tx: Tx) -> None:
            added = tx.run(
                "INSERT INTO join_tokens (token_id, spiffe_id, expires_at_us, created_at_us,"
                " used_at_us) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                row,
            )
            if not added:
                raise AlreadyExists(
                    f"join token {short(token.token_id)}… already exists",
                    reason="JOIN_TOKEN_EXISTS",
                )

        await self._run(job, audit)

    async def consume_join_token(
        self, token_id: str, now: dt.datetime, *, audit: Sequence[AuditEvent] = ()
    ) -> JoinToken:
        now_us = instant(now)

        def job(tx: Tx) -> JoinToken:
            # Compare-and-set: of concurrent consumers, on any replica, one changes the row.
            used = tx.run(
                "UPDATE join_tokens SET used_at_us = ? WHERE token_id = ?"
                " AND used_at_us IS NULL AND expires_at_us > ?",
                [now_us, token_id, now_us],
            )
            row = tx.one("SELECT * FROM join_tokens WHERE token_id = ?", [token_id])
            if row is None:
                raise Unauthenticated(
                    f"join token {short(token_id)}… is unknown", reason="JOIN_TOKEN_UNKNOWN"
                )
            if used:
                return dataclasses.replace(token_from_row(row), used_at=None)
            if row["used_at_us"] is not None:
                raise Unauthenticated(
                    f"join token {short(token_id)}… was already used", reason="JOIN_TOKEN_USED"
                )
            raise Unauthenticated(
                f"join token {short(token_id)}… has expired", reason="JOIN_TOKEN_EXPIRED"
            )

        return await self._run(job, audit)

    # --- identities and issued X.509-SVIDs ---

    async def record_issuance(
        self,
        identity: Identity | None,
        issued: list[IssuedX509],
        *,
        audit: Sequence[AuditEvent] = (),
    ) -> None:
        check_issuance(identity, issued)
        identity_row = None
        if identity is not None:
            identity_row = [
                identity.id,
                identity.spiffe_id.uri,
                identity.entry_id,
                identity.attestor,
                selectors_text(identity.selectors),
                instant(identity.attested_at),
                duration(identity.x509_ttl),
                duration(identity.jwt_ttl),
                names_text(identity.dns_names),
                int(identity.admin),
                identity.parent_id.uri if identity.parent_id else "",
            ]
        svid_rows = [
            [svid.serial, svid.identity_id, svid.spiffe_id.uri, instant(svid.not_after)]
            for svid in issued
        ]

        def job(tx: Tx) -> None:
            # The constraints (primary keys, the identity foreign key) catch duplicates and
            # unknown identities: one statement a row on this hot path, no look-ups first.
            if identity_row is not None:
                try:
                    tx.run(
                        "INSERT INTO identities (id, spiffe_id, entry_id, attestor, selectors,"
                        " attested_at_us, x509_ttl_us, jwt_ttl_us, dns_names, admin, parent_id)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        identity_row,
                    )
                except Duplicate:
                    raise AlreadyExists(
                        f"identity {identity_row[0]!r} already exists", reason="IDENTITY_EXISTS"
                    ) from None
            for row in svid_rows:
                try:
                    tx.run(
                        "INSERT INTO issued_x509 (serial, identity_id, spiffe_id, not_after_us)"
                        " VALUES (?, ?, ?, ?)",
                        row,
                    )
                except MissingReference:
                    raise FailedPrecondition(
                        f"identity {row[1]!r} is unknown", reason="IDENTITY_UNKNOWN"
                    ) from None
                except Duplicate:
                    raise AlreadyExists(
                        f"an X.509-SVID with serial {row[0]} was already recorded",
                        reason="SERIAL_EXISTS",
                    ) from None

        await self._run(job, audit)

    async def find_issued_x509(self, serial: str) -> tuple[IssuedX509, Identity] | None:
        def job(tx: Tx) -> tuple[IssuedX509, Identity] | None:
            row = tx.one(
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
                not_after=from_instant(row["x_not_after_us"]),
            )
            return svid, identity_from_row(row, "i_")

        return await self._run(job)

    # --- attestor instances ---

    async def create_attestor(
        self, instance: AttestorInstance, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        row = attestor_row(instance)

        def job(tx: Tx) -> None:
            added = tx.run(
                "INSERT INTO attestors (name, plugin, config_json, created_at_us, updated_at_us)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                row,
            )
            if not added:
                raise AlreadyExists(
                    f"an attestor named {instance.name!r} exists", reason="ATTESTOR_EXISTS"
                )
            tx.notify(sql.ATTESTORS)

        await self._run(job, audit)

    async def update_attestor(
        self, instance: AttestorInstance, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        row = attestor_row(instance)

        def job(tx: Tx) -> None:
            changed = tx.run(
                "UPDATE attestors SET plugin = ?, config_json = ?, updated_at_us = ?"
                " WHERE name = ?",
                [row[1], row[2], row[4], row[0]],
            )
            if not changed:
                raise NotFound(f"no attestor named {instance.name!r}", reason="ATTESTOR_NOT_FOUND")
            tx.notify(sql.ATTESTORS)

        await self._run(job, audit)

    async def list_attestors(self) -> list[AttestorInstance]:
        def job(tx: Tx) -> list[AttestorInstance]:
            return [
                AttestorInstance(
                    row["name"],
                    row["plugin"],
                    row["config_json"],
                    from_instant(row["created_at_us"]),
                    from_instant(row["updated_at_us"]),
                )
                for row in tx.all("SELECT * FROM attestors ORDER BY name")
            ]

        return await self._run(job)

    async def delete_attestor(self, name: str, *, audit: Sequence[AuditEvent] = ()) -> bool:
        def job(tx: Tx) -> bool:
            removed = tx.run("DELETE FROM attestors WHERE name = ?", [name]) > 0
            if removed:
                tx.notify(sql.ATTESTORS)
            return removed

        return await self._run(job, audit)

    # --- audit ---

    async def append_audit(self, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        def job(tx: Tx) -> list[AuditRecord]:
            return []  # the writer appends ``events`` and returns their records instead

        return await self._run(job, events, returns_records=True)

    async def audit_records(
        self,
        *,
        after_seq: int = 0,
        limit: int = 10_000,
        task_ids: Sequence[str] = (),
        max_bytes: int | None = None,
    ) -> list[AuditRecord]:
        def job(tx: Tx) -> list[AuditRecord]:
            if task_ids:
                marks = ",".join("?" * len(task_ids))
                rows = tx.all(
                    f"SELECT * FROM audit WHERE seq > ? AND task_id IN ({marks})"  # noqa: S608
                    " ORDER BY seq LIMIT ?",
                    [after_seq, *task_ids, limit],
                )
            else:
                rows = tx.all(
                    "SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", [after_seq, limit]
                )
            return audit_page((audit_from_row(row) for row in rows), limit, max_bytes)

        return await self._run(job)

    async def audit_anchor(self) -> tuple[int, str]:
        def job(tx: Tx) -> tuple[int, str]:
            row = tx.one("SELECT seq, prev_hash FROM audit_anchor WHERE id = 1")
            assert row is not None
            return int(row["seq"]), str(row["prev_hash"])

        return await self._run(job)

    async def audit_head(self) -> tuple[int, str]:
        def job(tx: Tx) -> tuple[int, str]:
            seq, prev = _audit_head(tx, lock=False)
            return seq - 1, prev

        return await self._run(job)

    async def put_checkpoint(self, checkpoint: Checkpoint) -> None:
        def job(tx: Tx) -> None:
            tx.run(
                "INSERT INTO audit_checkpoints (seq, hash, jws) VALUES (?, ?, ?)"
                " ON CONFLICT (seq) DO UPDATE SET hash = excluded.hash, jws = excluded.jws",
                [checkpoint.seq, checkpoint.hash, checkpoint.jws],
            )

        await self._run(job)

    async def list_checkpoints(self) -> list[Checkpoint]:
        def job(tx: Tx) -> list[Checkpoint]:
            rows = tx.all("SELECT seq, hash, jws FROM audit_checkpoints ORDER BY seq")
            return [Checkpoint(r["seq"], r["hash"], r["jws"]) for r in rows]

        return await self._run(job)

    async def prune_audit(self, through_seq: int, *, audit: Sequence[AuditEvent] = ()) -> int:
        def job(tx: Tx) -> int:
            anchor = tx.one("SELECT seq FROM audit_anchor WHERE id = 1" + tx.for_update)  # noqa: S608
            assert anchor is not None
            row = tx.one("SELECT hash FROM audit WHERE seq = ?", [through_seq])
            if row is None:
                raise NotFound(f"no audit record {through_seq}", reason="AUDIT_RECORD_NOT_FOUND")
            removed = tx.run("DELETE FROM audit WHERE seq <= ?", [through_seq])
            tx.run(
                "UPDATE audit_anchor SET seq = ?, prev_hash = ? WHERE id = 1",
                [through_seq + 1, row["hash"]],
            )
            return removed

        return await self._run(job, audit)

    # --- tasks, task tokens and approvals ---

    async def record_task_token(
        self,
        record: TaskTokenRecord,
        *,
        consume_approval: str = "",
        audit: Sequence[AuditEvent] = (),
    ) -> None:
        token_row = [
            record.jti,
            record.task_id,
            record.subject,
            record.holder,
            record.audience,
            record.scope,
            record.resource,
            record.parent_jti,
            record.depth,
            instant(record.issued_at),
            instant(record.expires_at),
            record.decision_id,
            record.cnf_x5t,
        ]

        def job(tx: Tx) -> None:
            if consume_approval:
                used = tx.run(
                    "UPDATE approvals SET state = ? WHERE id = ? AND state = ?",
                    [ApprovalState.USED.value, consume_approval, ApprovalState.APPROVED.value],
                )
                if not used:
                    raise FailedPrecondition(
                        f"approval {consume_approval} is not approved or was used",
                        reason="APPROVAL_USED",
                    )
                tx.notify(sql.APPROVALS)
            opened = tx.run(
                "INSERT INTO tasks (task_id, principal, created_at_us, ended_at_us, end_reason)"
                " VALUES (?, ?, ?, NULL, '') ON CONFLICT (task_id) DO NOTHING",
                [record.task_id, record.subject, instant(record.issued_at)],
            )
            if not opened:
                # Lock the task's row while checking it: an EndTask on another replica either
                # committed before (then this refuses) or waits and then sees this token.
                held = tx.run(
                    "UPDATE tasks SET principal = principal WHERE task_id = ?"
                    " AND principal = ? AND ended_at_us IS NULL",
                    [record.task_id, record.subject],
                )
                if not held:
                    task = tx.one("SELECT * FROM tasks WHERE task_id = ?", [record.task_id])
                    assert task is not None
                    check_task_open(task_from_row(task), record.subject)
            tx.run(
                "INSERT INTO task_tokens (jti, task_id, subject, holder, audience, scope, resource,"
                " parent_jti, depth, issued_at_us, expires_at_us, decision_id, cnf_x5t)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                token_row,
            )

        await self._run(job, audit)

    async def get_task(self, task_id: str) -> TaskRecord | None:
        def job(tx: Tx) -> TaskRecord | None:
            row = tx.one("SELECT * FROM tasks WHERE task_id = ?", [task_id])
            return None if row is None else task_from_row(row)

        return await self._run(job)

    async def end_task(
        self, task_id: str, now: dt.datetime, reason: str, *, audit: Sequence[AuditEvent] = ()
    ) -> list[str]:
        now_us = instant(now)

        def job(tx: Tx) -> list[str]:
            ended = tx.run(
                "UPDATE tasks SET ended_at_us = ?, end_reason = ? WHERE task_id = ?"
                " AND ended_at_us IS NULL",
                [now_us, reason, task_id],
            )
            if not ended:
                if tx.one("SELECT 1 AS one FROM tasks WHERE task_id = ?", [task_id]) is None:
                    raise NotFound(f"no task {task_id!r}", reason="TASK_NOT_FOUND")
                raise FailedPrecondition(f"task {task_id!r} has ended", reason="TASK_ENDED")
            rows = tx.all("SELECT jti FROM task_tokens WHERE task_id = ? ORDER BY jti", [task_id])
            return [row["jti"] for row in rows]

        return await self._run(job, audit)

    async def get_task_token(self, jti: str) -> TaskTokenRecord | None:
        def job(tx: Tx) -> TaskTokenRecord | None:
            row = tx.one("SELECT * FROM task_tokens WHERE jti = ?", [jti])
            return None if row is None else task_token_from_row(row)

        return await self._run(job)

    async def descendants(self, jti: str) -> list[str]:
        def job(tx: Tx) -> list[str]:
            rows = tx.all(
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
        row = approval_row(approval)

        def job(tx: Tx) -> None:
            try:
                tx.run(
                    "INSERT INTO approvals (id, principal, task_id, audience, intent_json,"
                    " intent_fingerprint, decision_id, requested_at_us, expires_at_us, state,"
                    " decided_at_us, decided_by, note, grant_expires_at_us)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
            except Duplicate:
                raise AlreadyExists(
                    f"approval {approval.id} exists", reason="APPROVAL_EXISTS"
                ) from None
            tx.notify(sql.APPROVALS)

        await self._run(job, audit)

    async def get_approval(self, approval_id: str) -> Approval | None:
        def job(tx: Tx) -> Approval | None:
            row = tx.one("SELECT * FROM approvals WHERE id = ?", [approval_id])
            return None if row is None else approval_from_row(row)

        return await self._run(job)

    async def list_approvals(self) -> list[Approval]:
        def job(tx: Tx) -> list[Approval]:
            rows = tx.all("SELECT * FROM approvals ORDER BY requested_at_us, id")
            return [approval_from_row(row) for row in rows]

        return await self._run(job)

    async def pending_approvals(self, now: dt.datetime) -> tuple[int, dt.datetime | None]:
        """How many approvals wait for an answer at ``now``, and when the oldest was asked
        (metrics: one indexed aggregate, not the list)."""

        def job(tx: Tx) -> tuple[int, dt.datetime | None]:
            row = tx.one(
                "SELECT COUNT(*) AS n, MIN(requested_at_us) AS oldest FROM approvals"
                " WHERE state = ? AND expires_at_us > ?",
                [str(ApprovalState.PENDING), instant(now)],
            )
            if row is None or not row["n"]:
                return 0, None
            return int(row["n"]), from_instant(int(row["oldest"]))

        return await self._run(job)

    async def decide_approval(
        self, decided: Approval, now: dt.datetime, *, audit: Sequence[AuditEvent] = ()
    ) -> None:
        now_us = instant(now)
        params = [
            decided.state.value,
            None if decided.decided_at is None else instant(decided.decided_at),
            decided.decided_by,
            decided.note,
            None if decided.grant_expires_at is None else instant(decided.grant_expires_at),
            decided.id,
            ApprovalState.PENDING.value,
            now_us,
        ]

        def job(tx: Tx) -> None:
            answered = tx.run(
                "UPDATE approvals SET state = ?, decided_at_us = ?, decided_by = ?, note = ?,"
                " grant_expires_at_us = ? WHERE id = ? AND state = ? AND expires_at_us > ?",
                params,
            )
            if answered:
                tx.notify(sql.APPROVALS)
                return
            row = tx.one("SELECT state FROM approvals WHERE id = ?", [decided.id])
            if row is None:
                raise NotFound(f"no approval {decided.id!r}", reason="APPROVAL_NOT_FOUND")
            if row["state"] != ApprovalState.PENDING.value:
                raise FailedPrecondition(
                    f"approval {decided.id} was already {row['state']}", reason="APPROVAL_DECIDED"
                )
            raise FailedPrecondition(
                f"approval {decided.id} expired before it was answered",
                reason="APPROVAL_EXPIRED",
            )

        await self._run(job, audit)

    # --- revocations ---

    async def revoke(
        self, revocations: Sequence[Revocation], *, audit: Sequence[AuditEvent] = ()
    ) -> list[Revocation]:
        def job(tx: Tx) -> list[Revocation]:
            if not revocations:
                return []
            # Numbers from a counter row, locked until the commit: every replica's
            # revocations commit in the order of their numbers, so a reader that has seen
            # number n has seen everything below it.
            head = _bump(tx, REVOCATION_SEQUENCE, len(revocations))
            out = []
            for offset, r in enumerate(revocations):
                seq = head - len(revocations) + 1 + offset
                tx.run(
                    "INSERT INTO revocations (seq, kind, target, reason, actor, revoked_at_us,"
                    " expires_at_us) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        seq,
                        r.kind.value,
                        r.target,
                        r.reason,
                        r.actor,
                        instant(r.revoked_at),
                        instant(r.expires_at),
                    ],
                )
                out.append(dataclasses.replace(r, seq=seq))
            tx.notify(sql.REVOCATIONS)
            return out

        return await self._run(job, audit)

    async def revocations_since(self, seq: int, limit: int = 10_000) -> list[Revocation]:
        def job(tx: Tx) -> list[Revocation]:
            rows = tx.all(
                "SELECT * FROM revocations WHERE seq > ? ORDER BY seq LIMIT ?", [seq, limit]
            )
            return [revocation_from_row(row) for row in rows]

        return await self._run(job)

    async def active_revocations(self, now: dt.datetime) -> list[Revocation]:
        now_us = instant(now)

        def job(tx: Tx) -> list[Revocation]:
            rows = tx.all(
                "SELECT * FROM revocations WHERE expires_at_us > ? ORDER BY seq", [now_us]
            )
            return [revocation_from_row(row) for row in rows]

        return await self._run(job)

    async def revocation_bounds(self) -> tuple[int, int]:
        def job(tx: Tx) -> tuple[int, int]:
            row = tx.one("SELECT MIN(seq) AS lo FROM revocations")
            head = _counter(tx, REVOCATION_SEQUENCE)
            lo = int(row["lo"]) if row and row["lo"] is not None else head + 1
            return lo, head

        return await self._run(job)

    async def subjects_attested_by(self, attestor: str, now: dt.datetime) -> list[str]:
        return await self._live_subjects("attestor", attestor, now)

    async def subjects_issued_through(self, agent: str, now: dt.datetime) -> list[str]:
        return await self._live_subjects("parent_id", agent, now)

    async def node_svids(self, now: dt.datetime) -> list[HeldSvid]:
        now_us = instant(now)

        def job(tx: Tx) -> list[HeldSvid]:
            rows = tx.all(
                "SELECT i.parent_id, x.spiffe_id, x.serial, x.not_after_us, i.x509_ttl_us"
                " FROM issued_x509 AS x JOIN identities AS i ON i.id = x.identity_id"
                " WHERE i.parent_id != '' AND x.not_after_us > ?"
                " ORDER BY i.parent_id, x.spiffe_id, x.not_after_us",
                [now_us],
            )
            return [
                HeldSvid(
                    agent=row["parent_id"],
                    spiffe_id=row["spiffe_id"],
                    serial=row["serial"],
                    signed_at=from_instant(int(row["not_after_us"]) - int(row["x509_ttl_us"])),
                    not_after=from_instant(int(row["not_after_us"])),
                )
                for row in rows
            ]

        return await self._run(job)

    async def _live_subjects(
        self, column: Literal["attestor", "parent_id"], value: str, now: dt.datetime
    ) -> list[str]:
        """SPIFFE IDs with a live X.509-SVID whose identity has ``column`` = ``value``."""
        now_us = instant(now)

        def job(tx: Tx) -> list[str]:
            rows = tx.all(_LIVE_SUBJECTS[column], [value, now_us])
            return [row["spiffe_id"] for row in rows]

        return await self._run(job)

    async def spiffe_id_on_record(self, spiffe_id: str) -> bool:
        def job(tx: Tx) -> bool:
            return any(
                tx.one(query, [spiffe_id] * query.count("?")) is not None
                for query in _SPIFFE_ID_ON_RECORD
            )

        return await self._run(job)

    async def task_tokens_of_subject(self, subject: str, now: dt.datetime) -> list[str]:
        """Live task tokens a SPIFFE ID holds or delegated (its own tasks'), by jti."""
        now_us = instant(now)

        def job(tx: Tx) -> list[str]:
            rows = tx.all(
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
        expires_us, now_us = instant(expires_at), instant(now)

        def job(tx: Tx) -> bool:
            # Insert-if-absent, or take over a claim that has expired: one statement.
            return (
                tx.run(
                    "INSERT INTO claims (namespace, key, expires_at_us) VALUES (?, ?, ?)"
                    " ON CONFLICT (namespace, key) DO UPDATE"
                    " SET expires_at_us = excluded.expires_at_us"
                    " WHERE claims.expires_at_us <= ?",
                    [namespace, key, expires_us, now_us],
                )
                > 0
            )

        return await self._run(job)

    async def prune(self, now: dt.datetime) -> int:
        now_us = instant(now)
        grace_us = now_us - duration(PRUNE_GRACE)

        def job(tx: Tx) -> int:
            count = tx.run("DELETE FROM issued_x509 WHERE not_after_us < ?", [now_us])
            count += tx.run(
                "DELETE FROM identities WHERE attested_at_us < ? AND NOT EXISTS"
                " (SELECT 1 FROM issued_x509 WHERE identity_id = identities.id)",
                [grace_us],
            )
            count += tx.run("DELETE FROM join_tokens WHERE expires_at_us < ?", [grace_us])
            count += tx.run("DELETE FROM claims WHERE expires_at_us <= ?", [now_us])
            # A revocation is forgotten once everything it covers has expired (and a grace).
            count += tx.run("DELETE FROM revocations WHERE expires_at_us < ?", [grace_us])
            count += tx.run("DELETE FROM task_tokens WHERE expires_at_us < ?", [grace_us])
            return count

        return await self._run(job)


# --- rules shared by the jobs ----------------------------------------------------------------


_LIVE_SUBJECTS: Final = {
    "attestor": "SELECT DISTINCT i.spiffe_id FROM identities i JOIN issued_x509 x"
    " ON x.identity_id = i.id WHERE i.attestor = ? AND x.not_after_us > ? ORDER BY i.spiffe_id",
    "parent_id": "SELECT DISTINCT i.spiffe_id FROM identities i JOIN issued_x509 x"
    " ON x.identity_id = i.id WHERE i.parent_id = ? AND x.not_after_us > ? ORDER BY i.spiffe_id",
}


# Where a SPIFFE ID may be on record, cheapest first (identities and issued SVIDs have no index
# on it: an operator's revocation scans them, rarely).
_SPIFFE_ID_ON_RECORD: Final = (
    "SELECT 1 AS one FROM entries WHERE spiffe_id = ? OR parent_id = ? LIMIT 1",
    "SELECT 1 AS one FROM join_tokens WHERE spiffe_id = ? LIMIT 1",
    "SELECT 1 AS one FROM identities WHERE spiffe_id = ? LIMIT 1",
    "SELECT 1 AS one FROM issued_x509 WHERE spiffe_id = ? LIMIT 1",
    "SELECT 1 AS one FROM task_tokens WHERE subject = ? OR holder = ? LIMIT 1",
)


def _counter(tx: Tx, name: str) -> int:
    row = tx.one("SELECT value FROM meta WHERE key = ?", [name])
    assert row is not None, name
    return int(row["value"])


def _bump(tx: Tx, name: str, by: int = 1) -> int:
    """Add ``by`` to a counter (locking its row until the commit); its new value."""
    tx.run("UPDATE meta SET value = value + ? WHERE key = ?", [by, name])
    return _counter(tx, name)


def _refuse_same_key(tx: Tx, row: list[object], entry: RegistrationEntry) -> None:
    same = tx.one(
        "SELECT id FROM entries WHERE spiffe_id = ? AND selectors = ? AND parent_id = ?"
        " AND id != ?",
        [row[1], row[2], row[9], entry.id],
    )
    if same is not None:
        raise AlreadyExists(
            f"entry {same['id']!r} already maps these selectors to {entry.spiffe_id}",
            reason="ENTRY_EXISTS",
        )


def _audit_head(tx: Tx, *, lock: bool) -> tuple[int, str]:
    """(next seq, hash of the last record), counting archived records. With ``lock``, the
    anchor's row is locked until the commit: the appends of all replicas take turns there, one
    batch at a time."""
    cached: tuple[int, str] | None = tx.cache.get(_HEAD)
    if cached is not None:
        return cached
    anchor = tx.one(
        "SELECT seq, prev_hash FROM audit_anchor WHERE id = 1"  # noqa: S608
        + (tx.for_update if lock else "")
    )
    assert anchor is not None
    row = tx.one("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
    if row is not None:
        return int(row["seq"]) + 1, str(row["hash"])
    return int(anchor["seq"]), str(anchor["prev_hash"])


def append_records(tx: Tx, events: Sequence[AuditEvent]) -> list[AuditRecord]:
    """Chain ``events`` after the head (the writer calls this once a batch, last)."""
    seq, prev = _audit_head(tx, lock=True)
    out: list[AuditRecord] = []
    for event in events:
        record = chain(event, seq, prev)
        tx.run(
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
    tx.cache[_HEAD] = (seq, prev)
    return out
