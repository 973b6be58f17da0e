"""Join-token attacks: each is refused with PERMISSION_DENIED and its stable reason, and no SVID is
recorded as issued."""

from __future__ import annotations

import datetime as dt
import secrets

import grpc

from authority.client import make_csr, new_key
from tests.helpers import Running
from tests.security._attack import (
    AGENT,
    assert_status,
    attest_raw,
    attest_with_token,
    identities,
    issued_svids,
    params,
    rpc_error,
)
from tests.security.conftest import Clocked


async def test_reused_join_token_is_refused(authority: Running) -> None:
    token = await authority.join_token(AGENT)
    client = await authority.workload()
    first = await attest_with_token(client.tls_stub, token)
    assert first.svids[0].spiffe_id == AGENT
    assert issued_svids(authority.data_dir) == 1

    err = await rpc_error(
        attest_raw(client.tls_stub, [params(token.encode(), make_csr(new_key()))])
    )

    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "JOIN_TOKEN_USED")
    assert issued_svids(authority.data_dir) == 1
    assert identities(authority.data_dir) == 1


async def test_expired_join_token_is_refused(clocked: Clocked) -> None:
    running = clocked.running
    token = await running.join_token(AGENT, ttl_seconds=30)
    clocked.clock.advance(dt.timedelta(seconds=31))
    client = await running.workload()

    err = await rpc_error(
        attest_raw(client.tls_stub, [params(token.encode(), make_csr(new_key()))])
    )

    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "JOIN_TOKEN_EXPIRED")
    assert issued_svids(running.data_dir) == 0
    # An expired token is not consumed as "used": it stays refused as expired.
    again = await rpc_error(
        attest_raw(client.tls_stub, [params(token.encode(), make_csr(new_key()))])
    )
    assert_status(again, grpc.StatusCode.PERMISSION_DENIED, "JOIN_TOKEN_EXPIRED")
    assert issued_svids(running.data_dir) == 0


async def test_join_token_at_exact_expiry_is_refused(clocked: Clocked) -> None:
    running = clocked.running
    token = await running.join_token(AGENT, ttl_seconds=30)
    # Token times are whole seconds; its expiry is at most 30 s from now, never later.
    clocked.clock.advance(dt.timedelta(seconds=30))
    client = await running.workload()

    err = await rpc_error(
        attest_raw(client.tls_stub, [params(token.encode(), make_csr(new_key()))])
    )

    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "JOIN_TOKEN_EXPIRED")
    assert issued_svids(running.data_dir) == 0


async def test_unknown_join_token_is_refused(authority: Running) -> None:
    await authority.join_token(AGENT)  # a real token exists; the attacker guesses another
    client = await authority.workload()

    err = await rpc_error(
        attest_raw(
            client.tls_stub, [params(secrets.token_urlsafe(32).encode(), make_csr(new_key()))]
        )
    )

    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "JOIN_TOKEN_UNKNOWN")
    assert issued_svids(authority.data_dir) == 0
    assert identities(authority.data_dir) == 0
