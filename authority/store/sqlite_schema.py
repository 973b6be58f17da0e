"""The SQLite store's schema: versioned migrations, applied in one transaction on open.

The schema version is ``PRAGMA user_version``. ``MIGRATIONS[n]`` takes the schema from version n
to n + 1; a later schema change appends a function, never edits a shipped one. A database whose
version is newer than ``SCHEMA_VERSION`` is refused (``STORE_SCHEMA_TOO_NEW``).
"""

from __future__ import annotations

import datetime as dt
import pathlib
from collections.abc import Callable
from typing import Final

from sqlite_utils import Database

from authority.audit import GENESIS
from authority.errors import FailedPrecondition
from authority.store.queries import BUNDLE_SEQUENCE, REVOCATION_SEQUENCE
from authority.store.rows import instant


def _migration_1(db: Database) -> None:
    """Keys, the bundle sequence, entries, join tokens, identities and issued X.509-SVIDs."""
    db.create_table(
        "meta", {"key": str, "value": int}, pk="key", not_null={"key", "value"}, strict=True
    )
    db.execute("INSERT INTO meta (key, value) VALUES (?, 0)", [BUNDLE_SEQUENCE])
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
    now_us = instant(dt.datetime.now(dt.UTC))
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


def _migration_8(db: Database) -> None:
    """Replicas: each signing key names the replica holding it (and a JWT key carries its public
    half, for the others' bundles); revocation numbers come from a
    counter row (so that they are handed out in commit order on every backend)."""
    db.execute("ALTER TABLE authority_keys ADD COLUMN replica TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE authority_keys ADD COLUMN public_key BLOB NOT NULL DEFAULT x''")
    db.execute(
        "INSERT INTO meta (key, value) VALUES (?, COALESCE("
        "(SELECT seq FROM sqlite_sequence WHERE name = 'revocations'), 0))",
        [REVOCATION_SEQUENCE],
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
    _migration_8,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


def user_version(db: Database) -> int:
    row = db.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def refuse_newer(version: int, path: pathlib.Path) -> None:
    if version > SCHEMA_VERSION:
        raise FailedPrecondition(
            f"database {path} has schema version {version}, newer than this build knows "
            f"({SCHEMA_VERSION}); run a newer release of the authority",
            reason="STORE_SCHEMA_TOO_NEW",
        )


def migrate(db: Database, path: pathlib.Path) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        version = user_version(db)
        refuse_newer(version, path)
        for step in MIGRATIONS[version:]:
            step(db)
        if version != SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
        db.execute("COMMIT")
    except BaseException:
        if db.conn.in_transaction:
            db.execute("ROLLBACK")
        raise
