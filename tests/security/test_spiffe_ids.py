"""Invalid SPIFFE IDs through the operator API: INVALID_ARGUMENT, and nothing stored.

The rules are the SPIFFE ID standard's; an ID outside this trust domain, the trust domain's own ID
(no path: never a leaf SVID) and the authority's own ID are refused as well.
"""

from __future__ import annotations

import grpc
import pytest

from authority._pb import authority_v1_authority_pb2 as pb
from tests.helpers import Running
from tests.security._attack import (
    CALL_TIMEOUT,
    assert_status,
    attest_with_token,
    count_rows,
    issued_svids,
    rpc_error,
)

PREFIX = "spiffe://example.org/"

# id -> the reason the server gives
INVALID_IDS: dict[str, tuple[str, str]] = {
    "uppercase-trust-domain": ("spiffe://Example.org/agent", "INVALID_SPIFFE_ID"),
    "dotdot-segment": ("spiffe://example.org/agent/../admin", "INVALID_SPIFFE_ID"),
    "dot-segment": ("spiffe://example.org/agent/./one", "INVALID_SPIFFE_ID"),
    "empty-segment": ("spiffe://example.org/agent//one", "INVALID_SPIFFE_ID"),
    "trailing-slash": ("spiffe://example.org/agent/", "INVALID_SPIFFE_ID"),
    "root-trailing-slash": ("spiffe://example.org/", "INVALID_SPIFFE_ID"),
    "query": ("spiffe://example.org/agent?admin=1", "INVALID_SPIFFE_ID"),
    "fragment": ("spiffe://example.org/agent#admin", "INVALID_SPIFFE_ID"),
    "port": ("spiffe://example.org:8443/agent", "INVALID_SPIFFE_ID"),
    "userinfo": ("spiffe://admin@example.org/agent", "INVALID_SPIFFE_ID"),
    "userinfo-password": ("spiffe://admin:pw@example.org/agent", "INVALID_SPIFFE_ID"),
    "over-2048-bytes": (PREFIX + "a" * (2049 - len(PREFIX)), "INVALID_SPIFFE_ID"),
    "over-2048-bytes-multibyte": (PREFIX + "é" * 1100, "INVALID_SPIFFE_ID"),
    "wrong-scheme": ("https://example.org/agent", "INVALID_SPIFFE_ID"),
    "uppercase-scheme": ("SPIFFE://example.org/agent", "INVALID_SPIFFE_ID"),
    "no-authority-slashes": ("spiffe:example.org/agent", "INVALID_SPIFFE_ID"),
    "empty-trust-domain": ("spiffe:///agent", "INVALID_SPIFFE_ID"),
    "empty": ("", "INVALID_SPIFFE_ID"),
    "percent-encoded": ("spiffe://example.org/agent%2Fadmin", "INVALID_SPIFFE_ID"),
    "space": ("spiffe://example.org/agent one", "INVALID_SPIFFE_ID"),
    "non-ascii-segment": ("spiffe://example.org/agént", "INVALID_SPIFFE_ID"),
    "other-trust-domain": ("spiffe://evil.example/agent", "INVALID_ARGUMENT"),
    "trust-domain-suffix": ("spiffe://example.org.evil/agent", "INVALID_ARGUMENT"),
    "authority-own-id": ("spiffe://example.org/authority", "INVALID_ARGUMENT"),
    "trust-domain-id-no-path": ("spiffe://example.org", "INVALID_ARGUMENT"),
}


def _selector(spiffe_id: str = "spiffe://example.org/agent") -> pb.Selector:
    return pb.Selector(type="join_token", value=f"spiffe_id:{spiffe_id}")


@pytest.mark.parametrize("case", sorted(INVALID_IDS))
async def test_create_entry_refuses_invalid_spiffe_id(authority: Running, case: str) -> None:
    spiffe_id, reason = INVALID_IDS[case]
    admin = authority.admin()

    err = await rpc_error(
        admin.stub.CreateEntry(
            pb.CreateEntryRequest(spiffe_id=spiffe_id, selectors=[_selector()]),
            timeout=CALL_TIMEOUT,
        )
    )

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, reason)
    listed = await admin.stub.ListEntries(pb.ListEntriesRequest(), timeout=CALL_TIMEOUT)
    assert list(listed.entries) == []
    assert count_rows(authority.data_dir, "entries") == 0


@pytest.mark.parametrize("case", sorted(INVALID_IDS))
async def test_create_join_token_refuses_invalid_spiffe_id(authority: Running, case: str) -> None:
    spiffe_id, reason = INVALID_IDS[case]
    admin = authority.admin()

    err = await rpc_error(
        admin.stub.CreateJoinToken(
            pb.CreateJoinTokenRequest(spiffe_id=spiffe_id, ttl_seconds=600), timeout=CALL_TIMEOUT
        )
    )

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert count_rows(authority.data_dir, "join_tokens") == 0


async def test_longest_valid_spiffe_id_is_accepted(authority: Running) -> None:
    """The control for the length attacks: exactly 2048 bytes is legal."""
    spiffe_id = PREFIX + "a" * (2048 - len(PREFIX))
    assert len(spiffe_id.encode()) == 2048
    admin = authority.admin()

    entry = await admin.stub.CreateEntry(
        pb.CreateEntryRequest(spiffe_id=spiffe_id, selectors=[_selector()]), timeout=CALL_TIMEOUT
    )
    created = await admin.stub.CreateJoinToken(
        pb.CreateJoinTokenRequest(spiffe_id=spiffe_id, ttl_seconds=600), timeout=CALL_TIMEOUT
    )

    assert entry.spiffe_id == spiffe_id
    assert created.token
    assert count_rows(authority.data_dir, "entries") == 1
    assert count_rows(authority.data_dir, "join_tokens") == 1


async def test_join_token_for_longest_valid_spiffe_id_attests(authority: Running) -> None:
    """A token the operator API hands out must work: no ID it accepts may break attestation."""
    spiffe_id = PREFIX + "a" * (2048 - len(PREFIX))
    token = await authority.join_token(spiffe_id)
    client = await authority.workload()

    result = await attest_with_token(client.tls_stub, token)

    assert result.svids[0].spiffe_id == spiffe_id
    assert issued_svids(authority.data_dir) == 1
