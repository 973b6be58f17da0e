"""The Store contract, run against both backends, and the SQLite store's own guarantees."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import pathlib
import signal
import sqlite3
import stat
import sys
import threading
from collections.abc import AsyncIterator

import pytest
from sqlite_utils import Database

from authority.audit import AuditEvent
from authority.errors import (
    AlreadyExists,
    AuthorityError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from authority.ids import SpiffeId
from authority.models import (
    AuthorityKeyInfo,
    Identity,
    IssuedX509,
    JoinToken,
    KeyKind,
    KeyState,
    RegistrationEntry,
    Selector,
    token_digest,
)
from authority.store import Store
from authority.store.memory import MemoryStore
from authority.store.postgres import PostgresStore
from authority.store.sqlite import SqliteStore
from authority.store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION

ROOT = pathlib.Path(__file__).resolve().parents[3]
NOW = dt.datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)
APP = SpiffeId.parse("spiffe://example.org/app")


def make_entry(
    entry_id: str = "entry-1",
    spiffe_id: SpiffeId = APP,
    selectors: tuple[str, ...] = ("unix:uid:1000",),
    created_at: dt.datetime = NOW,
    dns_names: tuple[str, ...] = (),
    admin: bool = False,
) -> RegistrationEntry:
    return RegistrationEntry(
        id=entry_id,
        spiffe_id=spiffe_id,
        selectors=frozenset(Selector.parse(s) for s in selectors),
        x509_ttl=5 * MINUTE,
        jwt_ttl=dt.timedelta(seconds=90),
        created_at=created_at,
        dns_names=dns_names,
        admin=admin,
    )


def make_token(
    seed: str = "token-1", expires_at: dt.datetime = NOW + HOUR, created_at: dt.datetime = NOW
) -> JoinToken:
    return JoinToken(
        token_id=token_digest(seed),
        spiffe_id=SpiffeId.parse("spiffe://example.org/node"),
        expires_at=expires_at,
        created_at=created_at,
    )


def make_identity(identity_id: str = "ident-1", attested_at: dt.datetime = NOW) -> Identity:
    return Identity(
        id=identity_id,
        spiffe_id=APP,
        entry_id="entry-1",
        attestor="unix",
        selectors=frozenset({Selector("unix", "uid:1000"), Selector("unix", "gid:10")}),
        attested_at=attested_at,
        x509_ttl=5 * MINUTE,
        jwt_ttl=5 * MINUTE,
        dns_names=("app.example.org",),
        admin=True,
    )


def make_svid(
    serial: str, identity_id: str = "ident-1", not_after: dt.datetime = NOW + HOUR
) -> IssuedX509:
    return IssuedX509(serial=serial, identity_id=identity_id, spiffe_id=APP, not_after=not_after)


def jwt_key(key_id: str = "jwt-1", not_before: dt.datetime = NOW) -> AuthorityKeyInfo:
    return AuthorityKeyInfo(
        kind=KeyKind.JWT,
        key_id=key_id,
        state=KeyState.ACTIVE,
        not_before=not_before,
        not_after=not_before + DAY,
    )


def x509_key(key_id: str = "ca-1", not_before: dt.datetime = NOW) -> AuthorityKeyInfo:
    return AuthorityKeyInfo(
        kind=KeyKind.X509,
        key_id=key_id,
        state=KeyState.PREPARED,
        not_before=not_before,
        not_after=not_before + DAY,
        certificate=b"\x30\x82\x00\x00 der",
        upstream_chain=(b"\x00upstream-1\xff", b"upstream-2"),
        tainted=True,
    )


def reason_of(info: pytest.ExceptionInfo[AuthorityError]) -> str:
    return info.value.reason


@pytest.fixture(params=["sqlite", "memory", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Store]:
    """The contract runs unchanged on every backend."""
    backend: Store
    if request.param == "sqlite":
        backend = await SqliteStore.open(tmp_path / "authority.db")
    elif request.param == "postgresql":
        backend = await PostgresStore.open(request.getfixturevalue("pg_url"), "replica-a")
    else:
        backend = MemoryStore()
    try:
        yield backend
    finally:
        await backend.close()


# --- contract: signing keys and the bundle sequence ----------------------------------------------


async def test_keys_start_empty_at_sequence_zero(store: Store) -> None:
    assert await store.list_authority_keys() == []
    assert await store.bundle_sequence() == 0


async def test_put_keys_round_trips_and_bumps_on_request(store: Store) -> None:
    keys = [jwt_key("jwt-b", NOW + HOUR), x509_key("ca-1"), jwt_key("jwt-a", NOW)]
    assert await store.put_authority_keys(keys, bump_sequence=True) == 1
    assert await store.list_authority_keys() == [keys[2], keys[0], keys[1]]
    assert await store.bundle_sequence() == 1

    retired = AuthorityKeyInfo(
        kind=KeyKind.JWT,
        key_id="jwt-a",
        state=KeyState.OLD,
        not_before=NOW,
        not_after=NOW + DAY,
        tainted=True,
    )
    assert await store.put_authority_keys([retired], bump_sequence=False) == 1
    assert await store.list_authority_keys() == [retired, keys[0], keys[1]]
    assert await store.put_authority_keys([], bump_sequence=True) == 2


async def test_x509_key_keeps_certificate_and_chain(store: Store) -> None:
    key = x509_key()
    await store.put_authority_keys([key], bump_sequence=False)
    (stored,) = await store.list_authority_keys()
    assert stored.certificate == key.certificate
    assert stored.upstream_chain == key.upstream_chain
    assert stored.tainted is True
    assert stored.not_before.tzinfo == dt.UTC


async def test_same_key_id_in_both_kinds_is_two_keys(store: Store) -> None:
    await store.put_authority_keys([jwt_key("k"), x509_key("k")], bump_sequence=True)
    assert {k.kind for k in await store.list_authority_keys()} == {KeyKind.JWT, KeyKind.X509}


async def test_delete_key_bumps_sequence(store: Store) -> None:
    await store.put_authority_keys([jwt_key("jwt-1"), x509_key("ca-1")], bump_sequence=True)
    assert await store.delete_authority_key(KeyKind.JWT, "jwt-1") == 2
    assert [k.key_id for k in await store.list_authority_keys()] == ["ca-1"]
    assert await store.bundle_sequence() == 2


async def test_delete_unknown_key_is_not_found_and_keeps_sequence(store: Store) -> None:
    await store.put_authority_keys([jwt_key("jwt-1")], bump_sequence=True)
    with pytest.raises(NotFound) as info:
        await store.delete_authority_key(KeyKind.X509, "jwt-1")
    assert reason_of(info) == "KEY_NOT_FOUND"
    assert await store.bundle_sequence() == 1


# --- contract: registration entries ------------------------------------------------------------


async def test_entry_round_trip(store: Store) -> None:
    entry = make_entry(
        selectors=("unix:uid:1000", "k8s:ns:prod", "k8s:sa:agent"),
        dns_names=("app.example.org", "a.example.org"),
        admin=True,
    )
    await store.create_entry(entry)
    assert await store.get_entry(entry.id) == entry
    assert await store.list_entries() == [entry]
    stored = await store.get_entry(entry.id)
    assert stored is not None
    assert stored.dns_names == ("app.example.org", "a.example.org")
    assert stored.created_at.tzinfo == dt.UTC


async def test_entry_times_come_back_in_utc(store: Store) -> None:
    paris = dt.timezone(dt.timedelta(hours=1))
    await store.create_entry(make_entry(created_at=NOW.astimezone(paris)))
    stored = await store.get_entry("entry-1")
    assert stored is not None
    assert stored.created_at == NOW
    assert stored.created_at.utcoffset() == dt.timedelta(0)


async def test_get_and_delete_unknown_entry(store: Store) -> None:
    assert await store.get_entry("nope") is None
    assert await store.delete_entry("nope") is False


async def test_list_entries_in_creation_order(store: Store) -> None:
    second = make_entry("b", selectors=("unix:uid:2",), created_at=NOW + MINUTE)
    first = make_entry("z", selectors=("unix:uid:1",), created_at=NOW)
    tie = make_entry("c", selectors=("unix:uid:3",), created_at=NOW + MINUTE)
    for entry in (second, first, tie):
        await store.create_entry(entry)
    assert [e.id for e in await store.list_entries()] == ["z", "b", "c"]


async def test_duplicate_entry_id_is_refused(store: Store) -> None:
    await store.create_entry(make_entry("e"))
    with pytest.raises(AlreadyExists) as info:
        await store.create_entry(make_entry("e", selectors=("unix:uid:2",)))
    assert reason_of(info) == "ENTRY_EXISTS"


async def test_same_spiffe_id_and_selectors_is_refused(store: Store) -> None:
    await store.create_entry(make_entry("e1", selectors=("unix:uid:1", "unix:gid:2")))
    with pytest.raises(AlreadyExists) as info:
        await store.create_entry(make_entry("e2", selectors=("unix:gid:2", "unix:uid:1")))
    assert reason_of(info) == "ENTRY_EXISTS"
    assert [e.id for e in await store.list_entries()] == ["e1"]


async def test_entries_may_share_spiffe_id_or_selectors(store: Store) -> None:
    await store.create_entry(make_entry("e1", selectors=("unix:uid:1",)))
    await store.create_entry(make_entry("e2", selectors=("unix:uid:1", "unix:gid:1")))
    other = SpiffeId.parse("spiffe://example.org/other")
    await store.create_entry(make_entry("e3", spiffe_id=other, selectors=("unix:uid:1",)))
    assert len(await store.list_entries()) == 3


async def test_node_entries_of_different_parents_may_share_id_and_selectors(store: Store) -> None:
    node1 = SpiffeId.parse("spiffe://example.org/agent/node1")
    node2 = SpiffeId.parse("spiffe://example.org/agent/node2")
    await store.create_entry(make_entry("local"))
    first = dataclasses.replace(make_entry("n1"), parent_id=node1)
    await store.create_entry(first)
    await store.create_entry(dataclasses.replace(make_entry("n2"), parent_id=node2))
    with pytest.raises(AlreadyExists) as info:
        await store.create_entry(dataclasses.replace(make_entry("n1-again"), parent_id=node1))
    assert reason_of(info) == "ENTRY_EXISTS"
    assert await store.get_entry("n1") == first
    assert [e.id for e in await store.list_entries()] == ["local", "n1", "n2"]
    assert await store.delete_entry("n1") is True
    await store.create_entry(dataclasses.replace(make_entry("n1-again"), parent_id=node1))


async def test_version_6_file_gains_entry_parents(tmp_path: pathlib.Path) -> None:
    """An entry written before node entries existed comes back with no parent, and its
    uniqueness rule now includes the parent."""
    path = tmp_path / "authority.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        database = Database(conn)
        for step in MIGRATIONS[:6]:
            step(database)
        conn.execute("PRAGMA user_version = 6")
        conn.execute(
            "INSERT INTO entries (id, spiffe_id, selectors, x509_ttl_us, jwt_ttl_us, dns_names,"
            " admin, created_at_us, record_prompts) VALUES ('old', 'spiffe://example.org/w',"
            " '[\"unix:uid:1\"]', 300000000, 300000000, '[]', 0, 0, 0)"
        )
        conn.commit()
    store = await SqliteStore.open(path)
    try:
        old = await store.get_entry("old")
        assert old is not None
        assert old.parent_id is None
        node = SpiffeId.parse("spiffe://example.org/agent/n")
        await store.create_entry(
            dataclasses.replace(old, id="node", parent_id=node, created_at=NOW)
        )
        with pytest.raises(AlreadyExists):
            await store.create_entry(dataclasses.replace(old, id="dup", created_at=NOW))
    finally:
        await store.close()
    assert user_version(path) == SCHEMA_VERSION


async def test_deleted_entry_frees_its_id_and_key(store: Store) -> None:
    await store.create_entry(make_entry("e1"))
    assert await store.delete_entry("e1") is True
    assert await store.get_entry("e1") is None
    await store.create_entry(make_entry("e1"))
    assert [e.id for e in await store.list_entries()] == ["e1"]


async def test_update_entry_replaces_it_in_place(store: Store) -> None:
    await store.create_entry(make_entry("e1"))
    changed = dataclasses.replace(
        make_entry("e1", selectors=("unix:uid:2", "unix:gid:3"), dns_names=("b.example.org",)),
        x509_ttl=HOUR,
        record_prompts=True,
    )
    await store.update_entry(changed)
    assert await store.get_entry("e1") == changed
    assert await store.list_entries() == [changed]
    # The old key is free again, the new one taken.
    await store.create_entry(make_entry("e2"))
    with pytest.raises(AlreadyExists):
        await store.create_entry(make_entry("e3", selectors=("unix:gid:3", "unix:uid:2")))


async def test_update_entry_refuses_unknown_ids_and_collisions(store: Store) -> None:
    with pytest.raises(NotFound) as missing:
        await store.update_entry(make_entry("nope"))
    assert reason_of(missing) == "ENTRY_NOT_FOUND"
    await store.create_entry(make_entry("e1", selectors=("unix:uid:1",)))
    await store.create_entry(make_entry("e2", selectors=("unix:uid:2",)))
    with pytest.raises(AlreadyExists) as taken:
        await store.update_entry(make_entry("e2", selectors=("unix:uid:1",)))
    assert reason_of(taken) == "ENTRY_EXISTS"
    assert [e.selectors for e in await store.list_entries()] == [
        make_entry(selectors=("unix:uid:1",)).selectors,
        make_entry(selectors=("unix:uid:2",)).selectors,
    ]
    # Its own key is not a collision.
    await store.update_entry(make_entry("e2", selectors=("unix:uid:2",), dns_names=("a.b",)))


async def test_spiffe_id_on_record(store: Store) -> None:
    def sid(path: str) -> SpiffeId:
        return SpiffeId.parse(f"spiffe://example.org/{path}")

    assert not await store.spiffe_id_on_record(APP.uri)
    await store.record_issuance(make_identity(), [make_svid("0a")])
    assert await store.spiffe_id_on_record(APP.uri)
    node = sid("agent/node1")
    await store.create_entry(
        dataclasses.replace(make_entry("n1", spiffe_id=sid("w/served")), parent_id=node)
    )
    assert await store.spiffe_id_on_record(sid("w/served").uri)
    assert await store.spiffe_id_on_record(node.uri)
    await store.create_join_token(make_token())
    assert await store.spiffe_id_on_record("spiffe://example.org/node")
    assert not await store.spiffe_id_on_record(sid("nobody").uri)
    assert not await store.spiffe_id_on_record("spiffe://example.org/ap")  # exact, not prefix


async def test_node_identities_round_trip_and_are_found_by_their_agent(store: Store) -> None:
    agent = SpiffeId.parse("spiffe://example.org/agent/node1")
    node = dataclasses.replace(make_identity("node-ident"), parent_id=agent)
    await store.record_issuance(node, [make_svid("0b", "node-ident")])
    await store.record_issuance(make_identity(), [make_svid("0c")])
    found = await store.find_issued_x509("0b")
    assert found is not None
    assert found[1] == node
    assert await store.subjects_issued_through(agent.uri, NOW) == [APP.uri]
    assert await store.subjects_issued_through("spiffe://example.org/agent/other", NOW) == []
    # Only live SVIDs count.
    assert await store.subjects_issued_through(agent.uri, NOW + 2 * HOUR) == []


# --- contract: join tokens ---------------------------------------------------------------------


async def test_consume_returns_token_as_it_was(store: Store) -> None:
    token = make_token()
    await store.create_join_token(token)
    consumed = await store.consume_join_token(token.token_id, NOW + MINUTE)
    assert consumed == token
    assert consumed.used_at is None


async def test_token_is_single_use(store: Store) -> None:
    token = make_token()
    await store.create_join_token(token)
    await store.consume_join_token(token.token_id, NOW)
    for when in (NOW, NOW + MINUTE, NOW + 2 * HOUR):
        with pytest.raises(Unauthenticated) as info:
            await store.consume_join_token(token.token_id, when)
        assert reason_of(info) == "JOIN_TOKEN_USED"


async def test_unknown_token(store: Store) -> None:
    token_id = token_digest("never-created")
    with pytest.raises(Unauthenticated) as info:
        await store.consume_join_token(token_id, NOW)
    assert reason_of(info) == "JOIN_TOKEN_UNKNOWN"
    assert token_id not in str(info.value)


async def test_expired_token(store: Store) -> None:
    token = make_token(expires_at=NOW + MINUTE)
    await store.create_join_token(token)
    with pytest.raises(Unauthenticated) as info:
        await store.consume_join_token(token.token_id, NOW + MINUTE)
    assert reason_of(info) == "JOIN_TOKEN_EXPIRED"
    assert token.token_id not in str(info.value)
    # An expired attempt does not use the token up; it stays expired.
    with pytest.raises(Unauthenticated) as info:
        await store.consume_join_token(token.token_id, NOW + HOUR)
    assert reason_of(info) == "JOIN_TOKEN_EXPIRED"


async def test_token_created_used_cannot_be_consumed(store: Store) -> None:
    token = JoinToken(
        token_id=token_digest("s"),
        spiffe_id=APP,
        expires_at=NOW + HOUR,
        created_at=NOW,
        used_at=NOW,
    )
    await store.create_join_token(token)
    with pytest.raises(Unauthenticated) as info:
        await store.consume_join_token(token.token_id, NOW)
    assert reason_of(info) == "JOIN_TOKEN_USED"


async def test_duplicate_token_is_refused(store: Store) -> None:
    token = make_token()
    await store.create_join_token(token)
    with pytest.raises(AlreadyExists) as info:
        await store.create_join_token(token)
    assert reason_of(info) == "JOIN_TOKEN_EXISTS"
    assert token.token_id not in str(info.value)


async def test_concurrent_consumers_only_one_wins(store: Store) -> None:
    token = make_token()
    await store.create_join_token(token)
    results = await asyncio.gather(
        *(store.consume_join_token(token.token_id, NOW) for _ in range(20)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, JoinToken) for r in results) == 1
    failures = [r for r in results if not isinstance(r, JoinToken)]
    assert all(isinstance(r, Unauthenticated) and r.reason == "JOIN_TOKEN_USED" for r in failures)


# --- contract: identities and issued X.509-SVIDs -----------------------------------------------


async def test_record_and_find_issuance(store: Store) -> None:
    identity = make_identity()
    svids = [make_svid("0a"), make_svid("0b", not_after=NOW + 2 * HOUR)]
    await store.record_issuance(identity, svids)
    assert await store.find_issued_x509("0a") == (svids[0], identity)
    found = await store.find_issued_x509("0b")
    assert found is not None
    assert found == (svids[1], identity)
    assert found[1].selectors == identity.selectors
    assert found[0].not_after.tzinfo == dt.UTC
    assert await store.find_issued_x509("ff") is None


async def test_renewal_adds_svid_to_known_identity(store: Store) -> None:
    identity = make_identity()
    await store.record_issuance(identity, [make_svid("01")])
    await store.record_issuance(None, [make_svid("02")])
    assert await store.find_issued_x509("02") == (make_svid("02"), identity)
    await store.record_issuance(None, [])


async def test_identity_without_svids(store: Store) -> None:
    await store.record_issuance(make_identity(), [])
    await store.record_issuance(None, [make_svid("01")])


async def test_unknown_identity_is_refused(store: Store) -> None:
    with pytest.raises(FailedPrecondition) as info:
        await store.record_issuance(None, [make_svid("01", identity_id="ghost")])
    assert reason_of(info) == "IDENTITY_UNKNOWN"


async def test_duplicate_identity_is_refused(store: Store) -> None:
    await store.record_issuance(make_identity(), [make_svid("01")])
    with pytest.raises(AlreadyExists) as info:
        await store.record_issuance(make_identity(), [make_svid("02")])
    assert reason_of(info) == "IDENTITY_EXISTS"
    assert await store.find_issued_x509("02") is None


async def test_duplicate_serial_is_refused(store: Store) -> None:
    await store.record_issuance(make_identity(), [make_svid("01")])
    with pytest.raises(AlreadyExists) as info:
        await store.record_issuance(None, [make_svid("01")])
    assert reason_of(info) == "SERIAL_EXISTS"


async def test_failed_issuance_stores_nothing(store: Store) -> None:
    await store.record_issuance(make_identity("ident-1"), [make_svid("01")])
    with pytest.raises(AlreadyExists) as info:
        await store.record_issuance(
            make_identity("ident-2"),
            [make_svid("02", identity_id="ident-2"), make_svid("01", identity_id="ident-2")],
        )
    assert reason_of(info) == "SERIAL_EXISTS"
    assert await store.find_issued_x509("02") is None
    with pytest.raises(FailedPrecondition):
        await store.record_issuance(None, [make_svid("03", identity_id="ident-2")])
    # The same serial twice in one call is refused too.
    with pytest.raises(AlreadyExists):
        await store.record_issuance(None, [make_svid("04"), make_svid("04")])
    assert await store.find_issued_x509("04") is None


async def test_svid_for_another_identity_is_invalid(store: Store) -> None:
    with pytest.raises(InvalidArgument):
        await store.record_issuance(make_identity(), [make_svid("01", identity_id="other")])


# --- contract: prune ---------------------------------------------------------------------------


async def test_prune(store: Store) -> None:
    old = NOW - 2 * DAY
    await store.record_issuance(make_identity("gone", old), [make_svid("01", "gone", NOW - HOUR)])
    await store.record_issuance(make_identity("live", old), [make_svid("02", "live", NOW + HOUR)])
    await store.record_issuance(make_identity("young", NOW - HOUR), [])
    await store.record_issuance(make_identity("idle", old), [])
    await store.create_join_token(make_token("long-expired", NOW - 2 * DAY, old))
    await store.create_join_token(make_token("just-expired", NOW - HOUR, NOW - 2 * HOUR))
    await store.create_join_token(make_token("used", NOW + HOUR))
    await store.consume_join_token(token_digest("used"), NOW)

    # One SVID, two identities ("gone", "idle"), one token.
    assert await store.prune(NOW) == 4
    assert await store.prune(NOW) == 0

    assert await store.find_issued_x509("01") is None
    assert await store.find_issued_x509("02") is not None
    await store.record_issuance(None, [make_svid("03", "young")])
    for pruned in ("gone", "idle"):
        with pytest.raises(FailedPrecondition):
            await store.record_issuance(None, [make_svid("04", pruned)])
    expected = {"long-expired": "JOIN_TOKEN_UNKNOWN", "just-expired": "JOIN_TOKEN_EXPIRED"}
    expected["used"] = "JOIN_TOKEN_USED"
    for secret, reason in expected.items():
        with pytest.raises(Unauthenticated) as info:
            await store.consume_join_token(token_digest(secret), NOW)
        assert reason_of(info) == reason


# --- contract: inputs and lifecycle ------------------------------------------------------------


async def test_naive_datetimes_are_refused(store: Store) -> None:
    naive = dt.datetime(2026, 3, 1, 12, 0)
    with pytest.raises(InvalidArgument):
        await store.consume_join_token(token_digest("x"), naive)
    with pytest.raises(InvalidArgument):
        await store.prune(naive)
    with pytest.raises(InvalidArgument):
        await store.create_entry(make_entry(created_at=naive))
    assert await store.list_entries() == []


async def test_closed_store_is_unavailable(store: Store) -> None:
    await store.close()
    await store.close()
    with pytest.raises(Unavailable) as info:
        await store.list_entries()
    assert reason_of(info) == "STORE_CLOSED"


# --- SQLite: files, schema, persistence --------------------------------------------------------


def user_version(path: pathlib.Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def file_mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_database_files_are_private(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "authority.db"
    store = await SqliteStore.open(path)
    try:
        await store.create_entry(make_entry())
        assert file_mode(path) == 0o600
        for suffix in ("-wal", "-shm"):
            side = tmp_path / f"authority.db{suffix}"
            assert side.exists()
            assert file_mode(side) == 0o600
    finally:
        await store.close()


async def test_existing_open_file_is_tightened(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "authority.db"
    path.touch()
    path.chmod(0o644)
    store = await SqliteStore.open(path)
    await store.close()
    assert file_mode(path) == 0o600


async def test_empty_file_is_migrated(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "authority.db"
    path.touch()
    store = await SqliteStore.open(path)
    await store.close()
    assert SCHEMA_VERSION >= 1
    assert user_version(path) == SCHEMA_VERSION
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert {"meta", "authority_keys", "entries", "join_tokens", "identities"} <= tables
    assert "issued_x509" in tables
    assert journal == "wal"


async def test_newer_schema_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "authority.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(FailedPrecondition) as info:
        await SqliteStore.open(path)
    assert reason_of(info) == "STORE_SCHEMA_TOO_NEW"
    assert "newer" in str(info.value)
    assert user_version(path) == SCHEMA_VERSION + 1


async def test_data_survives_reopen(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "authority.db"
    entry = make_entry(dns_names=("app.example.org",), admin=True)
    keys = [x509_key(), jwt_key()]
    identity = make_identity()
    store = await SqliteStore.open(path)
    try:
        await store.create_entry(entry)
        await store.create_join_token(make_token("fresh"))
        await store.create_join_token(make_token("spent"))
        await store.consume_join_token(token_digest("spent"), NOW)
        await store.put_authority_keys(keys, bump_sequence=True)
        await store.put_authority_keys(keys, bump_sequence=True)
        await store.record_issuance(identity, [make_svid("0a")])
    finally:
        await store.close()

    store = await SqliteStore.open(path)
    try:
        assert await store.list_entries() == [entry]
        assert await store.list_authority_keys() == sorted(
            keys, key=lambda k: (k.kind.value, k.not_before, k.key_id)
        )
        assert await store.bundle_sequence() == 2
        assert await store.find_issued_x509("0a") == (make_svid("0a"), identity)
        with pytest.raises(Unauthenticated) as info:
            await store.consume_join_token(token_digest("spent"), NOW)
        assert reason_of(info) == "JOIN_TOKEN_USED"
        assert (await store.consume_join_token(token_digest("fresh"), NOW)).used_at is None
    finally:
        await store.close()
    assert user_version(path) == SCHEMA_VERSION


# --- SQLite: group commit ----------------------------------------------------------------------


def numbered_entry(i: int) -> RegistrationEntry:
    return make_entry(f"entry-{i:04d}", selectors=(f"unix:uid:{i}",))


async def test_concurrent_writes_are_group_committed(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "authority.db"
    store = await SqliteStore.open(path)
    try:
        before = store.commit_count
        await asyncio.gather(*(store.create_entry(numbered_entry(i)) for i in range(200)))
        assert store.commit_count - before < 200
    finally:
        await store.close()
    store = await SqliteStore.open(path)
    try:
        assert {e.id for e in await store.list_entries()} == {
            numbered_entry(i).id for i in range(200)
        }
    finally:
        await store.close()


async def test_failing_job_does_not_roll_back_its_batch(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "authority.db"
    store = await SqliteStore.open(path)
    try:
        await store.create_entry(numbered_entry(0))
        # Hold the writer thread so that every call below is queued, then runs in one batch.
        started, release = threading.Event(), threading.Event()

        def hold(_db: object) -> None:
            started.set()
            release.wait(timeout=30)

        gate = asyncio.create_task(store._run(hold))
        assert await asyncio.to_thread(started.wait, 30)
        before = store.commit_count
        duplicates = {5, 17, 33}
        calls = [
            asyncio.create_task(store.create_entry(numbered_entry(0 if i in duplicates else i)))
            for i in range(1, 50)
        ]
        await asyncio.sleep(0)
        release.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        await gate
        assert store.commit_count - before == 2  # the gate's batch, then all 49 calls in one
        for i, result in enumerate(results, start=1):
            if i in duplicates:
                assert isinstance(result, AlreadyExists)
                assert result.reason == "ENTRY_EXISTS"
            else:
                assert result is None
    finally:
        await store.close()
    store = await SqliteStore.open(path)
    try:
        ids = {e.id for e in await store.list_entries()}
        assert ids == {numbered_entry(i).id for i in range(50) if i not in duplicates}
    finally:
        await store.close()


async def test_cancelled_caller_leaves_store_usable(tmp_path: pathlib.Path) -> None:
    store = await SqliteStore.open(tmp_path / "authority.db")
    try:
        tasks = [asyncio.create_task(store.create_entry(numbered_entry(i))) for i in range(20)]
        await asyncio.sleep(0)
        for task in tasks[::2]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.create_entry(numbered_entry(100))
        assert await store.get_entry(numbered_entry(100).id) is not None
    finally:
        await store.close()


# --- SQLite: durability across a hard kill -----------------------------------------------------

WRITER = """
import asyncio, datetime as dt, pathlib, sys
sys.path.insert(0, sys.argv[1])
from authority.ids import SpiffeId
from authority.models import RegistrationEntry, Selector
from authority.store.sqlite import SqliteStore

async def worker(store, n):
    for i in range(100_000):
        entry = RegistrationEntry(
            id=f"w{n}-{i}",
            spiffe_id=SpiffeId.parse("spiffe://example.org/crash"),
            selectors=frozenset({Selector("unix", f"uid:{n}-{i}")}),
            x509_ttl=dt.timedelta(minutes=5),
            jwt_ttl=dt.timedelta(minutes=5),
        )
        await store.create_entry(entry)
        print(entry.id, flush=True)

async def main():
    store = await SqliteStore.open(pathlib.Path(sys.argv[2]))
    await asyncio.gather(*(worker(store, n) for n in range(8)))

asyncio.run(main())
"""


@pytest.mark.slow
async def test_acknowledged_writes_survive_sigkill(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "authority.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WRITER,
        str(ROOT),
        str(path),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    acknowledged: list[str] = []
    try:
        while len(acknowledged) < 300:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
            assert line.endswith(b"\n"), "the writer stopped early"
            acknowledged.append(line.decode().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        rest = await proc.stdout.read()
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # Lines printed before the kill were acknowledged too; a torn last line is ignored.
    acknowledged += [line for line in rest.decode().split("\n")[:-1] if line]

    store = await SqliteStore.open(path)
    try:
        stored = {e.id for e in await store.list_entries()}
    finally:
        await store.close()
    missing = set(acknowledged) - stored
    assert len(acknowledged) >= 300
    assert not missing, f"{len(missing)} acknowledged writes lost"


async def test_pending_approvals_counts_the_unanswered_unexpired_and_dates_the_oldest(
    store: Store,
) -> None:
    from authority.models import Approval

    def approval(approval_id: str, asked: dt.datetime, expires: dt.datetime) -> Approval:
        return Approval(
            id=approval_id,
            principal="spiffe://example.org/agent",
            task_id="task-1",
            audience="db",
            intent_json="{}",
            intent_fingerprint="f" * 64,
            decision_id=f"d-{approval_id}",
            requested_at=asked,
            expires_at=expires,
        )

    assert await store.pending_approvals(NOW) == (0, None)
    await store.create_approval(approval("expired", NOW - 2 * HOUR, NOW - HOUR))
    await store.create_approval(approval("older", NOW - 10 * MINUTE, NOW + HOUR))
    await store.create_approval(approval("newer", NOW - MINUTE, NOW + HOUR))
    assert await store.pending_approvals(NOW) == (2, NOW - 10 * MINUTE)


def _audit(kind: str) -> AuditEvent:
    return AuditEvent(kind, NOW)


async def test_commit_observers_see_the_audit_events_committed_and_no_others() -> None:
    """What the metrics count issuance from: a job that failed (rolled back to its savepoint)
    brings none of its events."""
    store = MemoryStore()
    seen: list[tuple[float, list[str]]] = []
    store.observe_commits(lambda seconds, events: seen.append((seconds, [e.kind for e in events])))
    try:
        token = make_token("observed")
        await store.create_join_token(token, audit=[_audit("join_token.created")])
        with pytest.raises(AlreadyExists):
            await store.create_join_token(token, audit=[_audit("join_token.twice")])
        await store.append_audit([_audit("jwt.issued")])
    finally:
        await store.close()
    kinds = [kind for _, batch in seen for kind in batch]
    assert kinds == ["join_token.created", "jwt.issued"]
    assert all(seconds >= 0 for seconds, _ in seen)
