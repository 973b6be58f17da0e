"""The SDK's fakes behave as the host does, so a plugin tested on them behaves the same served."""

from __future__ import annotations

import datetime as dt
import hashlib
import subprocess
import sys

import pytest

from attestors.api import AttestationRefused, PeerCredentials
from attestors.testing import DEFAULT_NOW, FakeHost, ScriptedContext

T0 = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)
ID = "spiffe://example.org/node"


def test_the_clock_moves_only_when_told() -> None:
    host = FakeHost(T0)
    assert host.now() == T0
    host.advance(dt.timedelta(seconds=5))
    assert host.now() == T0 + dt.timedelta(seconds=5)
    host.set_now(T0 - dt.timedelta(days=1))
    assert host.now() == T0 - dt.timedelta(days=1)
    assert FakeHost().now() == DEFAULT_NOW


def test_the_clock_refuses_naive_times() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        FakeHost(dt.datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        FakeHost().set_now(dt.datetime(2026, 1, 1))


async def test_a_join_token_is_consumed_once() -> None:
    host = FakeHost(T0)
    digest = host.add_join_token("s3cret", ID, T0 + dt.timedelta(minutes=1))
    assert digest == hashlib.sha256(b"s3cret").hexdigest()
    assert not host.join_token_used("s3cret")
    assert await host.consume_join_token(digest) == ID
    assert host.join_token_used("s3cret")
    with pytest.raises(AttestationRefused) as info:
        await host.consume_join_token(digest)
    assert info.value.reason == "JOIN_TOKEN_USED"


async def test_an_unknown_join_token_is_refused() -> None:
    host = FakeHost(T0)
    with pytest.raises(AttestationRefused) as info:
        await host.consume_join_token(hashlib.sha256(b"nope").hexdigest())
    assert info.value.reason == "JOIN_TOKEN_UNKNOWN"


async def test_a_join_token_expires_at_its_deadline_and_stays_unused() -> None:
    host = FakeHost(T0)
    digest = host.add_join_token("s3cret", ID, T0 + dt.timedelta(minutes=1))
    host.advance(dt.timedelta(minutes=1))
    with pytest.raises(AttestationRefused) as info:
        await host.consume_join_token(digest)
    assert info.value.reason == "JOIN_TOKEN_EXPIRED"
    assert not host.join_token_used("s3cret")


def test_a_join_token_cannot_be_added_twice() -> None:
    host = FakeHost(T0)
    host.add_join_token("s3cret", ID, T0 + dt.timedelta(minutes=1))
    with pytest.raises(ValueError, match="already"):
        host.add_join_token("s3cret", ID, T0 + dt.timedelta(minutes=1))


async def test_a_claim_holds_until_it_expires() -> None:
    host = FakeHost(T0)
    until = T0 + dt.timedelta(minutes=1)
    assert await host.claim_once("jti:1", until)
    assert host.claimed("jti:1")
    assert not await host.claim_once("jti:1", until + dt.timedelta(hours=1))
    assert await host.claim_once("jti:2", until)  # keys are independent
    host.set_now(until)
    assert not host.claimed("jti:1")
    assert await host.claim_once("jti:1", until + dt.timedelta(minutes=1))


async def test_a_claim_needs_an_aware_expiry() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await FakeHost(T0).claim_once("k", dt.datetime(2026, 1, 1))


async def test_a_context_records_and_answers_with_fixed_bytes() -> None:
    ctx = ScriptedContext(b"pong")
    assert await ctx.challenge(b"ping-1") == b"pong"
    assert await ctx.challenge(b"ping-2") == b"pong"
    assert ctx.payloads == [b"ping-1", b"ping-2"]
    assert ctx.responses == [b"pong", b"pong"]
    assert ctx.rounds == 2
    assert ctx.peer is None


async def test_a_context_answers_with_a_function() -> None:
    ctx = ScriptedContext(lambda payload: payload[::-1])
    assert await ctx.challenge(b"abc") == b"cba"


async def test_a_context_answers_with_a_coroutine_function() -> None:
    async def answer(payload: bytes) -> bytes:
        return b"signed:" + payload

    ctx = ScriptedContext(answer)
    assert await ctx.challenge(b"n") == b"signed:n"
    assert ctx.responses == [b"signed:n"]


async def test_a_context_without_an_answer_fails_a_challenge() -> None:
    ctx = ScriptedContext()
    with pytest.raises(AssertionError, match="expects none"):
        await ctx.challenge(b"unexpected")
    assert ctx.payloads == [b"unexpected"]


def test_a_context_carries_the_peer() -> None:
    peer = PeerCredentials(pid=1, uid=2, gid=3, pidfd=None, connected_at=4.0)
    assert ScriptedContext(peer=peer).peer is peer


def test_the_sdk_and_the_builtins_import_nothing_of_the_server() -> None:
    # A plugin author installs attestors.api and attestors.testing; the server stays out.
    code = (
        "import sys, attestors.api, attestors.testing, attestors.join_token, "
        "attestors.x509pop, attestors.jwt_attestor, attestors.unix; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'authority', 'grpc'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
