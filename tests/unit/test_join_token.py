"""The ``join_token`` attestor, run by the real host over the in-memory store."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from attestors.api import AttestationRefused, Attestor, ConfigError
from attestors.join_token import MAX_TOKEN_CHARS, JoinTokenAttestor
from attestors.testing import FakeHost, ScriptedContext
from authority.attestation import AttestorHost
from authority.clock import FakeClock
from authority.config import Limits
from authority.errors import AttestationFailed, InvalidArgument
from authority.ids import MAX_ID_BYTES, SpiffeId
from authority.models import JoinToken, Selector, token_digest
from authority.store.memory import MemoryStore

NODE = SpiffeId.parse("spiffe://example.org/node")
SECRET = "s3cr3t-Token_value"
START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
TTL = dt.timedelta(minutes=10)


def no_challenges() -> ScriptedContext:
    """A join token is one message: the attestor must never ask for a round (a challenge on
    this context fails the test)."""
    return ScriptedContext()


class Setup:
    def __init__(self, instance: str = "join_token") -> None:
        self.clock = FakeClock(START)
        self.store = MemoryStore()
        plugins: dict[str, type[Attestor]] = {"join_token": JoinTokenAttestor}
        self.host = AttestorHost(
            store=self.store, clock=self.clock, limits=Limits(), plugins=plugins
        )
        self.instance = instance

    async def start(self) -> Setup:
        await self.host.load()
        if not self.host.is_registered(self.instance):
            await self.host.register(self.instance, "join_token", {})
        return self

    async def token(self, secret: str = SECRET, spiffe_id: SpiffeId = NODE) -> None:
        now = self.clock.now()
        await self.store.create_join_token(
            JoinToken(token_digest(secret), spiffe_id, now + TTL, now)
        )

    async def refused(self, evidence: bytes) -> AttestationFailed:
        with pytest.raises(AttestationFailed) as info:
            await self.host.attest(self.instance, evidence, no_challenges())
        return info.value


async def test_a_token_attests_the_identity_it_was_made_for() -> None:
    setup = await Setup().start()
    await setup.token()
    ctx = no_challenges()
    outcome = await setup.host.attest("join_token", SECRET.encode(), ctx)
    assert outcome.bound_spiffe_id == NODE
    assert outcome.selectors == frozenset({Selector("join_token", f"spiffe_id:{NODE.uri}")})
    assert outcome.can_reattest is False  # the credential is spent
    assert ctx.rounds == 0


async def test_selectors_are_namespaced_by_the_instance_name() -> None:
    setup = await Setup("nodes").start()
    await setup.token()
    outcome = await setup.host.attest("nodes", SECRET.encode(), no_challenges())
    assert {str(s) for s in outcome.selectors} == {f"nodes:spiffe_id:{NODE.uri}"}


async def test_a_token_works_once() -> None:
    setup = await Setup().start()
    await setup.token()
    await setup.host.attest("join_token", SECRET.encode(), no_challenges())
    error = await setup.refused(SECRET.encode())
    assert error.reason == "JOIN_TOKEN_USED"
    assert SECRET not in error.message
    assert token_digest(SECRET) not in error.message


async def test_concurrent_uses_of_one_token_let_exactly_one_through() -> None:
    setup = await Setup().start()
    await setup.token()
    results = await asyncio.gather(
        *(setup.host.attest("join_token", SECRET.encode(), no_challenges()) for _ in range(10)),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 9
    assert all(isinstance(f, AttestationFailed) and f.reason == "JOIN_TOKEN_USED" for f in failures)


async def test_an_unknown_token_is_refused() -> None:
    setup = await Setup().start()
    await setup.token()
    assert (await setup.refused(b"not-the-token")).reason == "JOIN_TOKEN_UNKNOWN"
    # The real token is untouched by the failed attempt.
    await setup.host.attest("join_token", SECRET.encode(), no_challenges())


async def test_an_expired_token_is_refused_and_stays_unused() -> None:
    setup = await Setup().start()
    await setup.token()
    setup.clock.advance(TTL)
    assert (await setup.refused(SECRET.encode())).reason == "JOIN_TOKEN_EXPIRED"
    assert (await setup.refused(SECRET.encode())).reason == "JOIN_TOKEN_EXPIRED"


async def test_a_token_just_before_expiry_works() -> None:
    setup = await Setup().start()
    await setup.token()
    setup.clock.advance(TTL - dt.timedelta(seconds=1))
    outcome = await setup.host.attest("join_token", SECRET.encode(), no_challenges())
    assert outcome.bound_spiffe_id == NODE


async def test_the_token_is_compared_exactly() -> None:
    setup = await Setup().start()
    await setup.token()
    for near in (SECRET + "\n", " " + SECRET, SECRET.upper(), SECRET[:-1]):
        assert (await setup.refused(near.encode())).reason == "JOIN_TOKEN_UNKNOWN"


@pytest.mark.parametrize(
    "evidence",
    [b"", b"x" * (MAX_TOKEN_CHARS + 1), "caf\u00e9".encode(), b"\xff\xfe"],
    ids=["empty", "too-long", "non-ascii", "not-utf8"],
)
async def test_malformed_tokens_are_refused(evidence: bytes) -> None:
    setup = await Setup().start()
    assert (await setup.refused(evidence)).reason == "JOIN_TOKEN_MALFORMED"


async def test_a_token_of_the_maximum_length_is_looked_up() -> None:
    setup = await Setup().start()
    longest = "t" * MAX_TOKEN_CHARS
    await setup.token(longest)
    outcome = await setup.host.attest("join_token", longest.encode(), no_challenges())
    assert outcome.bound_spiffe_id == NODE


async def test_a_token_for_the_longest_valid_id_attests() -> None:
    setup = await Setup().start()
    prefix = "spiffe://example.org/"
    longest = SpiffeId.parse(prefix + "a" * (MAX_ID_BYTES - len(prefix)))
    await setup.token(spiffe_id=longest)
    outcome = await setup.host.attest("join_token", SECRET.encode(), no_challenges())
    assert outcome.bound_spiffe_id == longest
    # The documented selector an operator writes in an entry for it is representable.
    assert outcome.selectors == frozenset({Selector.parse(f"join_token:spiffe_id:{longest}")})


async def test_join_token_takes_no_configuration() -> None:
    setup = await Setup().start()
    with pytest.raises(InvalidArgument, match="unknown configuration keys: ttl") as info:
        await setup.host.register("other", "join_token", {"ttl": "5m"})
    assert info.value.reason == "ATTESTOR_CONFIG"
    assert not setup.host.is_registered("other")
    with pytest.raises(ConfigError):
        JoinTokenAttestor.configure({"x": 1}, FakeHost())
    assert isinstance(JoinTokenAttestor.configure({}, FakeHost()), JoinTokenAttestor)


def test_plugin_name() -> None:
    assert JoinTokenAttestor.plugin_name == "join_token"


# --- the plugin alone, on the SDK's FakeHost -------------------------------------------------


def plugin_on(host: FakeHost) -> JoinTokenAttestor:
    return JoinTokenAttestor.configure({}, host)


async def test_the_plugin_consumes_the_token_it_is_given() -> None:
    host = FakeHost(START)
    host.add_join_token(SECRET, NODE.uri, START + TTL)
    attested = await plugin_on(host).attest(SECRET.encode(), no_challenges())
    assert attested.selectors == (("spiffe_id", NODE.uri),)
    assert attested.bound_spiffe_id == NODE.uri
    assert attested.can_reattest is False
    assert host.join_token_used(SECRET)


async def test_the_plugin_passes_the_hosts_refusals_through() -> None:
    host = FakeHost(START)
    host.add_join_token(SECRET, NODE.uri, START + TTL)
    plugin = plugin_on(host)
    with pytest.raises(AttestationRefused) as unknown:
        await plugin.attest(b"other", no_challenges())
    assert unknown.value.reason == "JOIN_TOKEN_UNKNOWN"
    host.advance(TTL)
    with pytest.raises(AttestationRefused) as expired:
        await plugin.attest(SECRET.encode(), no_challenges())
    assert expired.value.reason == "JOIN_TOKEN_EXPIRED"
    assert not host.join_token_used(SECRET)
