"""The attestor host: plugin failures, time and round limits, and selector namespacing.

The plugin is a real class implementing the ``attestors.api.Attestor`` Protocol, driven by its
configuration, not a mock.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Self, cast

import pytest

from attestors.api import (
    MAX_SELECTOR_VALUE_CHARS,
    AttestationRefused,
    Attested,
    Attestor,
    Challenger,
    ConfigError,
    HostServices,
    require_keys,
)
from attestors.join_token import JoinTokenAttestor
from authority.attestation import AttestorHost, discover_plugins
from authority.clock import FakeClock
from authority.config import Limits
from authority.errors import (
    AttestationFailed,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from authority.ids import SpiffeId
from authority.models import MAX_SELECTOR_VALUE, Selector
from authority.store.memory import MemoryStore

MODES = {"selectors", "refuse", "raise", "hang", "not-attested", "bad-selector", "bad-id", "rounds"}


class FakeAttestor:
    """Does what its configuration says; counts its calls."""

    plugin_name: ClassVar[str] = "fake"
    built: ClassVar[list[FakeAttestor]] = []  # every instance configure made, newest last

    def __init__(self, mode: str, rounds: int) -> None:
        self.mode = mode
        self.rounds = rounds
        self.calls = 0
        self.responses: list[bytes] = []

    @classmethod
    def configure(cls, config: Mapping[str, Any], host: HostServices) -> Self:
        require_keys(config, allowed={"mode", "rounds"}, required={"mode"})
        mode = config["mode"]
        if mode not in MODES:
            raise ConfigError(f"mode: must be one of {sorted(MODES)}")
        rounds = config.get("rounds", 0)
        if not isinstance(rounds, int) or rounds < 0:
            raise ConfigError("rounds: must be a non-negative integer")
        instance = cls(mode, rounds)
        cls.built.append(instance)
        return instance

    async def attest(self, evidence: bytes, challenger: Challenger) -> Attested:
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
            case "rounds":
                for i in range(self.rounds):
                    self.responses.append(await challenger.challenge(b"nonce-%d" % i))
        return Attested(
            selectors=(("evidence", evidence.decode()), ("group", "ops")),
            bound_spiffe_id="spiffe://example.org/bound" if self.mode == "rounds" else None,
            can_reattest=self.mode != "rounds",
        )


class ScriptedChallenger:
    """The workload's side of the challenge rounds: answers each payload."""

    def __init__(self, answer: bytes = b"signed") -> None:
        self.answer = answer
        self.payloads: list[bytes] = []

    async def challenge(self, payload: bytes) -> bytes:
        self.payloads.append(payload)
        return self.answer + b":" + payload


LIMITS = Limits(
    attest_timeout=dt.timedelta(milliseconds=100), max_attest_rounds=3, max_evidence_bytes=64
)


def make_host(limits: Limits = LIMITS) -> AttestorHost:
    plugins: dict[str, type[Attestor]] = {"fake": FakeAttestor, "join_token": JoinTokenAttestor}
    return AttestorHost(store=MemoryStore(), clock=FakeClock(), limits=limits, plugins=plugins)


def last_built() -> FakeAttestor:
    """The plugin instance the host configured most recently (to see what it was asked)."""
    return FakeAttestor.built[-1]


# --- registration ----------------------------------------------------------------------------


def test_plugins_and_instances_are_listed() -> None:
    host = make_host()
    assert host.plugins == ["fake", "join_token"]
    assert host.instances() == []
    host.register("ci", "fake", {"mode": "selectors"})
    host.register("nodes", "join_token", {})
    assert host.instances() == ["ci", "nodes"]


def test_unknown_plugin_is_refused() -> None:
    host = make_host()
    with pytest.raises(NotFound, match="no attestor plugin 'nope'"):
        host.register("x", "nope", {})
    assert host.instances() == []


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ({}, "missing configuration keys: mode"),
        ({"mode": "selectors", "extra": 1}, "unknown configuration keys: extra"),
        ({"mode": "dance"}, "mode: must be one of"),
        ({"mode": "rounds", "rounds": -1}, "rounds"),
    ],
)
def test_bad_config_is_refused(config: dict[str, Any], why: str) -> None:
    host = make_host()
    with pytest.raises(InvalidArgument, match=why) as info:
        host.register("ci", "fake", config)
    assert info.value.reason == "ATTESTOR_CONFIG"
    assert "ci" in info.value.message
    assert host.instances() == []


@pytest.mark.parametrize("name", ["", "CI", "-ci", "c i", "ci:x", "a" * 65])
def test_instance_names_follow_selector_type_rules(name: str) -> None:
    host = make_host()
    with pytest.raises(InvalidArgument):
        host.register(name, "fake", {"mode": "selectors"})
    assert host.instances() == []


def test_builtins_are_discovered_through_entry_points() -> None:
    found = discover_plugins()
    assert found["join_token"] is JoinTokenAttestor
    host = AttestorHost(store=MemoryStore(), clock=FakeClock(), limits=LIMITS)
    assert "join_token" in host.plugins


# --- attest: success and namespacing ---------------------------------------------------------


async def test_selectors_are_namespaced_by_instance() -> None:
    host = make_host()
    host.register("ci", "fake", {"mode": "selectors"})
    host.register("cd", "fake", {"mode": "selectors"})
    outcome = await host.attest("ci", b"build-7", ScriptedChallenger())
    assert outcome.attestor == "ci"
    assert outcome.selectors == frozenset(
        {Selector("ci", "evidence:build-7"), Selector("ci", "group:ops")}
    )
    assert {str(s) for s in outcome.selectors} == {"ci:evidence:build-7", "ci:group:ops"}
    assert outcome.bound_spiffe_id is None
    assert outcome.can_reattest is True
    # The same plugin under another name cannot mint the first instance's selectors.
    other = await host.attest("cd", b"build-7", ScriptedChallenger())
    assert not outcome.selectors & other.selectors
    assert {s.type for s in other.selectors} == {"cd"}


async def test_unknown_instance_is_refused() -> None:
    host = make_host()
    host.register("ci", "fake", {"mode": "selectors"})
    with pytest.raises(InvalidArgument) as info:
        await host.attest("cd", b"x", ScriptedChallenger())
    assert info.value.reason == "UNKNOWN_ATTESTOR"


async def test_oversized_evidence_never_reaches_the_plugin() -> None:
    host = make_host()
    host.register("ci", "fake", {"mode": "selectors"})
    await host.attest("ci", b"x" * LIMITS.max_evidence_bytes, ScriptedChallenger())
    with pytest.raises(ResourceExhausted) as info:
        await host.attest("ci", b"x" * (LIMITS.max_evidence_bytes + 1), ScriptedChallenger())
    assert info.value.reason == "EVIDENCE_TOO_LARGE"
    assert last_built().calls == 1


# --- attest: plugin failures -----------------------------------------------------------------


async def test_a_refusal_keeps_its_reason() -> None:
    host = make_host()
    host.register("ci", "fake", {"mode": "refuse"})
    with pytest.raises(AttestationFailed) as info:
        await host.attest("ci", b"x", ScriptedChallenger())
    assert info.value.reason == "FAKE_REFUSED"
    assert isinstance(info.value, PermissionDenied)
    assert info.value.message == "ci: the evidence proves nothing"


async def test_a_plugin_that_raises_is_an_internal_error_without_details() -> None:
    host = make_host()
    host.register("ci", "fake", {"mode": "raise"})
    with pytest.raises(Internal) as info:
        await host.attest("ci", b"x", ScriptedChallenger())
    assert info.value.reason == "INTERNAL"
    assert "secret internal detail" not in info.value.message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


async def test_a_plugin_that_hangs_times_out() -> None:
    host = make_host()
    host.register("ci", "fake", {"mode": "hang"})
    started = time.monotonic()
    with pytest.raises(AttestationFailed) as info:
        await host.attest("ci", b"x", ScriptedChallenger())
    elapsed = time.monotonic() - started
    assert info.value.reason == "ATTESTATION_TIMEOUT"
    assert 0.09 <= elapsed < 2


async def test_a_plugin_that_returns_something_else_is_an_internal_error() -> None:
    host = make_host()
    host.register("ci", "fake", {"mode": "not-attested"})
    with pytest.raises(Internal, match="inside the attestor"):
        await host.attest("ci", b"x", ScriptedChallenger())


@pytest.mark.parametrize("mode", ["bad-selector", "bad-id"])
async def test_a_plugin_that_returns_invalid_values_is_an_internal_error(mode: str) -> None:
    host = make_host()
    host.register("ci", "fake", {"mode": mode})
    with pytest.raises(Internal, match="inside the attestor"):
        await host.attest("ci", b"x", ScriptedChallenger())


# --- attest: challenge rounds ----------------------------------------------------------------


async def test_challenge_rounds_up_to_the_limit() -> None:
    host = make_host()
    host.register("ci", "fake", {"mode": "rounds", "rounds": LIMITS.max_attest_rounds})
    challenger = ScriptedChallenger()
    outcome = await host.attest("ci", b"x", challenger)
    assert challenger.payloads == [b"nonce-0", b"nonce-1", b"nonce-2"]
    assert last_built().responses == [b"signed:nonce-0", b"signed:nonce-1", b"signed:nonce-2"]
    assert outcome.bound_spiffe_id == SpiffeId.parse("spiffe://example.org/bound")
    assert outcome.can_reattest is False


async def test_challenges_beyond_the_limit_are_refused() -> None:
    host = make_host()
    host.register("ci", "fake", {"mode": "rounds", "rounds": LIMITS.max_attest_rounds + 1})
    challenger = ScriptedChallenger()
    with pytest.raises(ResourceExhausted, match="3 challenge rounds"):
        await host.attest("ci", b"x", challenger)
    assert len(challenger.payloads) == LIMITS.max_attest_rounds  # the 4th never went out


async def test_an_oversized_challenge_response_is_refused() -> None:
    host = make_host()
    host.register("ci", "fake", {"mode": "rounds", "rounds": 1})
    challenger = ScriptedChallenger(answer=b"x" * LIMITS.max_evidence_bytes)
    with pytest.raises(ResourceExhausted, match="evidence size limit"):
        await host.attest("ci", b"x", challenger)


async def test_each_attestation_gets_its_own_round_budget() -> None:
    host = make_host()
    host.register("ci", "fake", {"mode": "rounds", "rounds": LIMITS.max_attest_rounds})
    for _ in range(3):
        await host.attest("ci", b"x", ScriptedChallenger())


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
    host = make_host()
    instance = "i" * 64
    host.register(instance, "fake", {"mode": "selectors"})
    evidence = b"e" * LIMITS.max_evidence_bytes
    outcome = await host.attest(instance, evidence, ScriptedChallenger())
    assert Selector(instance, "evidence:" + evidence.decode()) in outcome.selectors
    longest = Selector(instance, "k" * 64 + ":" + "v" * MAX_SELECTOR_VALUE_CHARS)
    assert len(longest.value) == MAX_SELECTOR_VALUE


def test_require_keys() -> None:
    require_keys({"a": 1}, allowed={"a", "b"}, required={"a"})
    with pytest.raises(ConfigError, match="unknown configuration keys: c, d"):
        require_keys({"a": 1, "d": 2, "c": 3}, allowed={"a"}, required=set())
    with pytest.raises(ConfigError, match="missing configuration keys: a, b"):
        require_keys({}, allowed={"a", "b"}, required={"a", "b"})
