"""The attestor host: registration persisted through the Store, plugin failures, time and round
limits, selector namespacing, identities bound by the host, and per-instance claims.

The plugin is a real class implementing the ``attestors.api.Attestor`` Protocol, driven by its
configuration, not a mock; the store is the in-memory one (or a real SQLite file).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self, cast

import pytest

from attestors.api import (
    MAX_SELECTOR_VALUE_CHARS,
    AttestationRefused,
    AttestContext,
    Attested,
    Attestor,
    ConfigError,
    HostServices,
    require_keys,
)
from attestors.join_token import JoinTokenAttestor
from attestors.testing import ScriptedContext
from authority.attestation import AttestorHost, discover_plugins
from authority.clock import FakeClock
from authority.config import Limits
from authority.errors import (
    AlreadyExists,
    AttestationFailed,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from authority.ids import SpiffeId
from authority.models import MAX_SELECTOR_VALUE, JoinToken, Selector, token_digest
from authority.store import Store
from authority.store.memory import MemoryStore
from authority.store.sqlite import SqliteStore

MODES = {
    "selectors",
    "refuse",
    "raise",
    "hang",
    "not-attested",
    "bad-selector",
    "bad-id",
    "rounds",
    "name-identity",
    "bind-other",
    "claim",
    "explode",
}
NODE = SpiffeId.parse("spiffe://example.org/node")
OTHER = "spiffe://example.org/admin"
SECRET = "join-token-secret"


class FakeAttestor:
    """Does what its configuration says; counts its calls."""

    plugin_name: ClassVar[str] = "fake"
    built: ClassVar[list[FakeAttestor]] = []  # every instance configure made, newest last

    def __init__(self, mode: str, rounds: int, host: HostServices) -> None:
        self.mode = mode
        self.rounds = rounds
        self.host = host
        self.calls = 0
        self.responses: list[bytes] = []

    @classmethod
    def configure(cls, config: Mapping[str, Any], host: HostServices) -> Self:
        require_keys(config, allowed={"mode", "rounds"}, required={"mode"})
        mode = config["mode"]
        if mode not in MODES:
            raise ConfigError(f"mode: must be one of {sorted(MODES)}")
        if mode == "explode":
            raise RuntimeError("secret configure detail")
        rounds = config.get("rounds", 0)
        if not isinstance(rounds, int) or rounds < 0:
            raise ConfigError("rounds: must be a non-negative integer")
        instance = cls(mode, rounds, host)
        cls.built.append(instance)
        return instance

    async def attest(self, evidence: bytes, ctx: AttestContext) -> Attested:
        self.calls += 1
        match self.mode:
            case "refuse":
                raise AttestationRefused("FAKE_REFUSED", "the evidence proves nothing")
            case "raise":
                raise RuntimeError("secret internal detail")
            case "hang":
                await asyncio.sleep(3600)
            case "not-attested":
                return cast(Attested, {"selectors": [("k", "v")]})
            case "bad-selector":
                return Attested(selectors=(("path", "/bin/*"),))
            case "bad-id":
                return Attested(selectors=(("k", "v"),), bound_spiffe_id="spiffe://Bad/")
            case "name-identity":
                # A plugin naming an identity of its own accord.
                return Attested(selectors=(("k", "v"),), bound_spiffe_id=OTHER)
            case "bind-other":
                # Consumes a real join token, then names another identity than the token's.
                await self.host.consume_join_token(token_digest(evidence.decode()))
                return Attested(selectors=(("k", "v"),), bound_spiffe_id=OTHER)
            case "claim":
                until = self.host.now() + dt.timedelta(minutes=5)
                if not await self.host.claim_once(evidence.decode(), until):
                    raise AttestationRefused("FAKE_REPLAYED", "this evidence was used")
            case "rounds":
                for i in range(self.rounds):
                    self.responses.append(await ctx.challenge(b"nonce-%d" % i))
        return Attested(
            selectors=(("evidence", evidence.decode()), ("group", "ops")),
            can_reattest=self.mode != "rounds",
        )


def signer(payload: bytes) -> bytes:
    """The workload's side of the challenge rounds."""
    return b"signed:" + payload


LIMITS = Limits(
    attest_timeout=dt.timedelta(milliseconds=100), max_attest_rounds=3, max_evidence_bytes=64
)
PLUGINS: dict[str, type[Attestor]] = {"fake": FakeAttestor, "join_token": JoinTokenAttestor}


async def make_host(
    store: Store | None = None,
    *,
    limits: Limits = LIMITS,
    plugins: Mapping[str, type[Attestor]] = PLUGINS,
    clock: FakeClock | None = None,
) -> AttestorHost:
    host = AttestorHost(
        store=store or MemoryStore(), clock=clock or FakeClock(), limits=limits, plugins=plugins
    )
    await host.load()
    return host


def names(host: AttestorHost) -> list[str]:
    return [record.name for record in host.instances()]


def last_built() -> FakeAttestor:
    """The plugin instance the host configured most recently (to see what it was asked)."""
    return FakeAttestor.built[-1]


# --- registration ----------------------------------------------------------------------------


async def test_plugins_and_instances_are_listed() -> None:
    host = await make_host()
    assert host.plugins() == ["fake", "join_token"]
    assert names(host) == ["join_token"]  # the store comes seeded with it
    record = await host.register("ci", "fake", {"mode": "selectors"})
    assert (record.name, record.plugin, record.config) == ("ci", "fake", {"mode": "selectors"})
    await host.register("nodes", "join_token", {})
    assert names(host) == ["ci", "join_token", "nodes"]
    assert host.get("ci") == record
    assert host.is_registered("ci")


async def test_a_new_host_serves_the_seeded_join_token_instance() -> None:
    host = await make_host()
    assert host.is_registered("join_token")
    assert host.get("join_token").plugin == "join_token"


async def test_a_fresh_sqlite_store_is_seeded_with_join_token(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "authority.db")
    try:
        host = await make_host(store)
        assert names(host) == ["join_token"]
        assert host.get("join_token").config == {}
    finally:
        await store.close()


async def test_register_persists_for_the_next_host() -> None:
    store = MemoryStore()
    first = await make_host(store)
    await first.register("ci", "fake", {"mode": "selectors"})
    second = await make_host(store)
    assert second.is_registered("ci")
    assert second.get("ci") == first.get("ci")
    outcome = await second.attest("ci", b"b-1", ScriptedContext())
    assert Selector("ci", "evidence:b-1") in outcome.selectors


async def test_register_persists_across_a_sqlite_reopen(tmp_path: Path) -> None:
    path = tmp_path / "authority.db"
    store = await SqliteStore.open(path)
    try:
        host = await make_host(store)
        await host.register("ci", "fake", {"mode": "selectors", "rounds": 0})
    finally:
        await store.close()
    store = await SqliteStore.open(path)
    try:
        host = await make_host(store)
        assert names(host) == ["ci", "join_token"]
        assert host.get("ci").config == {"mode": "selectors", "rounds": 0}
        outcome = await host.attest("ci", b"b-2", ScriptedContext())
        assert Selector("ci", "group:ops") in outcome.selectors
    finally:
        await store.close()


async def test_a_duplicate_name_is_refused_and_the_first_keeps_serving() -> None:
    store = MemoryStore()
    host = await make_host(store)
    await host.register("ci", "fake", {"mode": "selectors"})
    with pytest.raises(AlreadyExists) as info:
        await host.register("ci", "fake", {"mode": "refuse"})
    assert info.value.reason == "ATTESTOR_EXISTS"
    assert host.get("ci").config == {"mode": "selectors"}
    assert [a.config for a in await store.list_attestors() if a.name == "ci"] == [
        {"mode": "selectors"}
    ]
    await host.attest("ci", b"x", ScriptedContext())  # not replaced by the refused one


async def test_update_replaces_the_instance_and_persists() -> None:
    clock = FakeClock()
    store = MemoryStore()
    host = await make_host(store, clock=clock)
    created = await host.register("ci", "fake", {"mode": "selectors"})
    clock.advance(dt.timedelta(minutes=1))
    updated = await host.update("ci", {"mode": "refuse"})
    assert updated.config == {"mode": "refuse"}
    assert updated.created_at == created.created_at
    assert updated.updated_at == created.updated_at + dt.timedelta(minutes=1)
    with pytest.raises(AttestationFailed) as info:
        await host.attest("ci", b"x", ScriptedContext())
    assert info.value.reason == "FAKE_REFUSED"
    assert (await make_host(store)).get("ci").config == {"mode": "refuse"}


async def test_update_validates_before_replacing() -> None:
    store = MemoryStore()
    host = await make_host(store)
    await host.register("ci", "fake", {"mode": "selectors"})
    with pytest.raises(InvalidArgument) as info:
        await host.update("ci", {"mode": "dance"})
    assert info.value.reason == "ATTESTOR_CONFIG"
    assert host.get("ci").config == {"mode": "selectors"}
    assert (await make_host(store)).get("ci").config == {"mode": "selectors"}
    outcome = await host.attest("ci", b"still", ScriptedContext())  # the old one still works
    assert Selector("ci", "evidence:still") in outcome.selectors


async def test_update_of_an_unknown_instance_is_not_found() -> None:
    host = await make_host()
    with pytest.raises(NotFound) as info:
        await host.update("ci", {"mode": "selectors"})
    assert info.value.reason == "ATTESTOR_NOT_FOUND"
    assert not host.is_registered("ci")


async def test_unregister_removes_the_instance() -> None:
    store = MemoryStore()
    host = await make_host(store)
    await host.register("ci", "fake", {"mode": "selectors"})
    await host.unregister("ci")
    assert host.is_registered("ci") is False
    assert names(host) == ["join_token"]
    with pytest.raises(InvalidArgument) as info:
        await host.attest("ci", b"x", ScriptedContext())
    assert info.value.reason == "UNKNOWN_ATTESTOR"
    assert [a.name for a in await store.list_attestors()] == ["join_token"]
    assert not (await make_host(store)).is_registered("ci")


async def test_unregister_of_an_unknown_instance_is_not_found() -> None:
    host = await make_host()
    with pytest.raises(NotFound) as info:
        await host.unregister("ci")
    assert info.value.reason == "ATTESTOR_NOT_FOUND"


async def test_unknown_plugin_is_refused() -> None:
    store = MemoryStore()
    host = await make_host(store)
    with pytest.raises(NotFound, match="no attestor plugin 'nope'") as info:
        await host.register("x", "nope", {})
    assert info.value.reason == "PLUGIN_NOT_FOUND"
    assert names(host) == ["join_token"]
    assert [a.name for a in await store.list_attestors()] == ["join_token"]


async def test_a_stored_instance_whose_plugin_is_gone_is_left_out() -> None:
    store = MemoryStore()
    await (await make_host(store)).register("ci", "fake", {"mode": "selectors"})
    host = await make_host(store, plugins={"join_token": JoinTokenAttestor})
    assert not host.is_registered("ci")
    assert host.is_registered("join_token")  # the rest still load
    assert [a.name for a in await store.list_attestors()] == ["ci", "join_token"]


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ({}, "missing configuration keys: mode"),
        ({"mode": "selectors", "extra": 1}, "unknown configuration keys: extra"),
        ({"mode": "dance"}, "mode: must be one of"),
        ({"mode": "rounds", "rounds": -1}, "rounds"),
    ],
)
async def test_bad_config_is_refused(config: dict[str, Any], why: str) -> None:
    store = MemoryStore()
    host = await make_host(store)
    with pytest.raises(InvalidArgument, match=why) as info:
        await host.register("ci", "fake", config)
    assert info.value.reason == "ATTESTOR_CONFIG"
    assert "ci" in info.value.message
    assert not host.is_registered("ci")
    assert [a.name for a in await store.list_attestors()] == ["join_token"]


async def test_a_plugin_whose_configure_raises_is_a_config_error() -> None:
    store = MemoryStore()
    host = await make_host(store)
    with pytest.raises(InvalidArgument) as info:
        await host.register("ci", "fake", {"mode": "explode"})
    assert info.value.reason == "ATTESTOR_CONFIG"
    assert "secret configure detail" not in info.value.message
    assert not host.is_registered("ci")
    assert [a.name for a in await store.list_attestors()] == ["join_token"]


@pytest.mark.parametrize("name", ["", "CI", "-ci", "c i", "ci:x", "a" * 65])
async def test_instance_names_follow_selector_type_rules(name: str) -> None:
    host = await make_host()
    with pytest.raises(InvalidArgument):
        await host.register(name, "fake", {"mode": "selectors"})
    assert names(host) == ["join_token"]


def test_builtins_are_discovered_through_entry_points() -> None:
    found = discover_plugins()
    assert found["join_token"] is JoinTokenAttestor
    assert {"join_token", "x509pop", "jwt", "unix"} <= set(found)


async def test_a_host_without_a_fixed_plugin_table_discovers_the_builtins() -> None:
    host = AttestorHost(store=MemoryStore(), clock=FakeClock(), limits=LIMITS)
    await host.load()
    assert {"join_token", "x509pop", "jwt", "unix"} <= set(host.plugins())
    assert host.is_registered("join_token")


# --- attest: success and namespacing ---------------------------------------------------------


async def test_selectors_are_namespaced_by_instance() -> None:
    host = await make_host()
    await host.register("ci", "fake", {"mode": "selectors"})
    await host.register("cd", "fake", {"mode": "selectors"})
    outcome = await host.attest("ci", b"build-7", ScriptedContext())
    assert outcome.attestor == "ci"
    assert outcome.selectors == frozenset(
        {Selector("ci", "evidence:build-7"), Selector("ci", "group:ops")}
    )
    assert {str(s) for s in outcome.selectors} == {"ci:evidence:build-7", "ci:group:ops"}
    assert outcome.bound_spiffe_id is None
    assert outcome.can_reattest is True
    # The same plugin under another name cannot mint the first instance's selectors.
    other = await host.attest("cd", b"build-7", ScriptedContext())
    assert not outcome.selectors & other.selectors
    assert {s.type for s in other.selectors} == {"cd"}


async def test_unknown_instance_is_refused() -> None:
    host = await make_host()
    await host.register("ci", "fake", {"mode": "selectors"})
    with pytest.raises(InvalidArgument) as info:
        await host.attest("cd", b"x", ScriptedContext())
    assert info.value.reason == "UNKNOWN_ATTESTOR"


async def test_oversized_evidence_never_reaches_the_plugin() -> None:
    host = await make_host()
    await host.register("ci", "fake", {"mode": "selectors"})
    await host.attest("ci", b"x" * LIMITS.max_evidence_bytes, ScriptedContext())
    with pytest.raises(ResourceExhausted) as info:
        await host.attest("ci", b"x" * (LIMITS.max_evidence_bytes + 1), ScriptedContext())
    assert info.value.reason == "EVIDENCE_TOO_LARGE"
    assert last_built().calls == 1


# --- attest: plugin failures -----------------------------------------------------------------


async def test_a_refusal_keeps_its_reason() -> None:
    host = await make_host()
    await host.register("ci", "fake", {"mode": "refuse"})
    with pytest.raises(AttestationFailed) as info:
        await host.attest("ci", b"x", ScriptedContext())
    assert info.value.reason == "FAKE_REFUSED"
    assert isinstance(info.value, PermissionDenied)
    assert info.value.message == "ci: the evidence proves nothing"


async def test_a_plugin_that_raises_is_an_internal_error_without_details() -> None:
    host = await make_host()
    await host.register("ci", "fake", {"mode": "raise"})
    with pytest.raises(Internal) as info:
        await host.attest("ci", b"x", ScriptedContext())
    assert info.value.reason == "INTERNAL"
    assert "secret internal detail" not in info.value.message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


async def test_a_plugin_that_hangs_times_out() -> None:
    host = await make_host()
    await host.register("ci", "fake", {"mode": "hang"})
    started = time.monotonic()
    with pytest.raises(AttestationFailed) as info:
        await host.attest("ci", b"x", ScriptedContext())
    elapsed = time.monotonic() - started
    assert info.value.reason == "ATTESTATION_TIMEOUT"
    assert 0.09 <= elapsed < 2


async def test_a_plugin_that_returns_something_else_is_an_internal_error() -> None:
    host = await make_host()
    await host.register("ci", "fake", {"mode": "not-attested"})
    with pytest.raises(Internal, match="inside the attestor"):
        await host.attest("ci", b"x", ScriptedContext())


@pytest.mark.parametrize("mode", ["bad-selector", "bad-id"])
async def test_a_plugin_that_returns_invalid_values_is_an_internal_error(mode: str) -> None:
    host = await make_host()
    await host.register("ci", "fake", {"mode": mode})
    with pytest.raises(Internal, match="inside the attestor"):
        await host.attest("ci", b"x", ScriptedContext())


# --- identities bound by the host ------------------------------------------------------------


async def test_a_plugin_cannot_name_an_identity() -> None:
    host = await make_host()
    await host.register("ci", "fake", {"mode": "name-identity"})
    with pytest.raises(Internal, match="inside the attestor"):
        await host.attest("ci", b"x", ScriptedContext())


async def test_a_plugin_cannot_name_another_identity_than_the_token_it_consumed() -> None:
    store = MemoryStore()
    clock = FakeClock()
    host = await make_host(store, clock=clock)
    now = clock.now()
    await store.create_join_token(
        JoinToken(token_digest(SECRET), NODE, now + dt.timedelta(minutes=5), now)
    )
    await host.register("ci", "fake", {"mode": "bind-other"})
    with pytest.raises(Internal, match="inside the attestor"):
        await host.attest("ci", SECRET.encode(), ScriptedContext())


async def test_join_token_binds_the_identity_of_the_token() -> None:
    store = MemoryStore()
    clock = FakeClock()
    host = await make_host(store, clock=clock)
    now = clock.now()
    await store.create_join_token(
        JoinToken(token_digest(SECRET), NODE, now + dt.timedelta(minutes=5), now)
    )
    outcome = await host.attest("join_token", SECRET.encode(), ScriptedContext())
    assert outcome.bound_spiffe_id == NODE
    assert outcome.can_reattest is False


async def test_an_identity_bound_in_one_attestation_does_not_carry_to_the_next() -> None:
    store = MemoryStore()
    clock = FakeClock()
    host = await make_host(store, clock=clock)
    now = clock.now()
    await store.create_join_token(
        JoinToken(token_digest(SECRET), SpiffeId.parse(OTHER), now + dt.timedelta(minutes=5), now)
    )
    await host.attest("join_token", SECRET.encode(), ScriptedContext())
    await host.register("ci", "fake", {"mode": "name-identity"})
    with pytest.raises(Internal):
        await host.attest("ci", b"x", ScriptedContext())


# --- claims are private to an instance -------------------------------------------------------


async def test_claims_are_namespaced_per_instance() -> None:
    clock = FakeClock()
    host = await make_host(clock=clock)
    await host.register("ci", "fake", {"mode": "claim"})
    await host.register("cd", "fake", {"mode": "claim"})
    await host.attest("ci", b"jti-1", ScriptedContext())
    with pytest.raises(AttestationFailed) as info:
        await host.attest("ci", b"jti-1", ScriptedContext())
    assert info.value.reason == "FAKE_REPLAYED"
    # Another instance of the same plugin has its own key space.
    outcome = await host.attest("cd", b"jti-1", ScriptedContext())
    assert Selector("cd", "evidence:jti-1") in outcome.selectors
    # A claim lapses when it expires.
    clock.advance(dt.timedelta(minutes=5))
    await host.attest("ci", b"jti-1", ScriptedContext())


async def test_claims_survive_a_new_host_over_the_same_store() -> None:
    store = MemoryStore()
    clock = FakeClock()
    first = await make_host(store, clock=clock)
    await first.register("ci", "fake", {"mode": "claim"})
    await first.attest("ci", b"jti-2", ScriptedContext())
    second = await make_host(store, clock=clock)
    with pytest.raises(AttestationFailed) as info:
        await second.attest("ci", b"jti-2", ScriptedContext())
    assert info.value.reason == "FAKE_REPLAYED"


# --- attest: challenge rounds ----------------------------------------------------------------


async def test_challenge_rounds_up_to_the_limit() -> None:
    host = await make_host()
    await host.register("ci", "fake", {"mode": "rounds", "rounds": LIMITS.max_attest_rounds})
    ctx = ScriptedContext(signer)
    outcome = await host.attest("ci", b"x", ctx)
    assert ctx.payloads == [b"nonce-0", b"nonce-1", b"nonce-2"]
    assert last_built().responses == [b"signed:nonce-0", b"signed:nonce-1", b"signed:nonce-2"]
    assert outcome.can_reattest is False


async def test_challenges_beyond_the_limit_are_refused() -> None:
    host = await make_host()
    await host.register("ci", "fake", {"mode": "rounds", "rounds": LIMITS.max_attest_rounds + 1})
    ctx = ScriptedContext(signer)
    with pytest.raises(ResourceExhausted, match="3 challenge rounds"):
        await host.attest("ci", b"x", ctx)
    assert len(ctx.payloads) == LIMITS.max_attest_rounds  # the 4th never went out


async def test_an_oversized_challenge_response_is_refused() -> None:
    host = await make_host()
    await host.register("ci", "fake", {"mode": "rounds", "rounds": 1})
    ctx = ScriptedContext(b"x" * (LIMITS.max_evidence_bytes + 1))
    with pytest.raises(ResourceExhausted, match="evidence size limit"):
        await host.attest("ci", b"x", ctx)


async def test_each_attestation_gets_its_own_round_budget() -> None:
    host = await make_host()
    await host.register("ci", "fake", {"mode": "rounds", "rounds": LIMITS.max_attest_rounds})
    for _ in range(3):
        ctx = ScriptedContext(signer)
        await host.attest("ci", b"x", ctx)
        assert ctx.rounds == LIMITS.max_attest_rounds


# --- the SDK's own checks --------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["", "ok", "lower_case", "SPACE HERE", "X" * 65, "1ABC"])
def test_refusal_reasons_are_stable_codes(reason: str) -> None:
    with pytest.raises(ValueError, match="UPPER_SNAKE"):
        AttestationRefused(reason, "message")


def test_a_refusal_carries_reason_and_message() -> None:
    refusal = AttestationRefused("BAD_PROOF", "the signature does not verify")
    assert (refusal.reason, refusal.message, str(refusal)) == (
        "BAD_PROOF",
        "the signature does not verify",
        "the signature does not verify",
    )


@pytest.mark.parametrize(
    "selectors",
    [
        (("Key", "v"),),
        (("", "v"),),
        (("k", ""),),
        (("k", "v" * (MAX_SELECTOR_VALUE_CHARS + 1)),),
        (("k:x", "v"),),
    ],
)
def test_attested_selectors_are_checked(selectors: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(ValueError, match="selector"):
        Attested(selectors=selectors)


def test_attested_defaults() -> None:
    attested = Attested(selectors=(("k", "v" * MAX_SELECTOR_VALUE_CHARS),))
    assert attested.bound_spiffe_id is None
    assert attested.can_reattest is True


async def test_the_longest_values_a_plugin_may_return_fit_a_selector() -> None:
    # Whatever Attested accepts, the host must be able to namespace: a plugin's valid output
    # never turns into an internal error.
    host = await make_host()
    instance = "i" * 64
    await host.register(instance, "fake", {"mode": "selectors"})
    evidence = b"e" * LIMITS.max_evidence_bytes
    outcome = await host.attest(instance, evidence, ScriptedContext())
    assert Selector(instance, "evidence:" + evidence.decode()) in outcome.selectors
    longest = Selector(instance, "k" * 64 + ":" + "v" * MAX_SELECTOR_VALUE_CHARS)
    assert len(longest.value) == MAX_SELECTOR_VALUE


def test_require_keys() -> None:
    require_keys({"a": 1}, allowed={"a", "b"}, required={"a"})
    with pytest.raises(ConfigError, match="unknown configuration keys: c, d"):
        require_keys({"a": 1, "d": 2, "c": 3}, allowed={"a"}, required=set())
    with pytest.raises(ConfigError, match="missing configuration keys: a, b"):
        require_keys({}, allowed={"a", "b"}, required={"a", "b"})
