"""``entry update`` (Admin UpdateEntry) against a real authority: what was issued through the
entry follows it. Renewals over mutual TLS take the entry's new TTLs and DNS names; a workload
the entry's new selectors no longer match is refused, and nothing is issued to it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from authority import audit_cli
from authority._pb import authority_v1_authority_pb2 as pb
from authority.api.status import status_reason
from authority.client import new_key
from tests.helpers import Running

WORKLOAD = "spiffe://example.org/upd/workload"


async def renewed_records(running: Running) -> int:
    admin = running.admin()
    return len([r async for r in audit_cli.stream_records(admin) if r.kind == "x509.renewed"])


def lifetime(svid: pb.X509SVID) -> dt.timedelta:
    """What is left of it (notBefore is backdated a little for clock skew)."""
    return dt.datetime.fromtimestamp(svid.expires_at, dt.UTC) - dt.datetime.now(dt.UTC)


async def test_renewals_follow_the_updated_entry(authority: Running, tmp_path: Path) -> None:
    admin = authority.admin().stub
    created = await admin.CreateEntry(
        pb.CreateEntryRequest(
            spiffe_id=WORKLOAD,
            selectors=[pb.Selector(type="join_token", value=f"spiffe_id:{WORKLOAD}")],
            x509_ttl_seconds=300,
        )
    )
    holder = await authority.attested(WORKLOAD, tmp_path / "svid")
    assert lifetime(await holder.renew(new_key())) <= dt.timedelta(minutes=5)

    request = pb.UpdateEntryRequest(
        id=created.id, x509_ttl_seconds=900, replace_dns_names=True, dns_names=["w.example.org"]
    )
    updated = await admin.UpdateEntry(request)
    assert (updated.x509_ttl_seconds, list(updated.dns_names)) == (900, ["w.example.org"])
    renewed = await holder.renew(new_key())
    assert lifetime(renewed) > dt.timedelta(minutes=14)
    leaf = x509.load_der_x509_certificate(renewed.cert_chain[0])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["w.example.org"]


async def test_a_workload_the_entry_no_longer_matches_is_refused(
    authority: Running, tmp_path: Path
) -> None:
    admin = authority.admin().stub
    created = await admin.CreateEntry(
        pb.CreateEntryRequest(
            spiffe_id=WORKLOAD,
            selectors=[pb.Selector(type="join_token", value=f"spiffe_id:{WORKLOAD}")],
        )
    )
    holder = await authority.attested(WORKLOAD, tmp_path / "svid")
    await holder.renew(new_key())
    other = "spiffe://example.org/upd/someone-else"
    await admin.UpdateEntry(
        pb.UpdateEntryRequest(
            id=created.id,
            replace_selectors=True,
            selectors=[pb.Selector(type="join_token", value=f"spiffe_id:{other}")],
        )
    )
    before = await renewed_records(authority)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await holder.renew(new_key())
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert status_reason(refused.value) == "ENTRY_CHANGED"
    with pytest.raises(grpc.aio.AioRpcError) as jwt_refused:
        await holder.fetch_jwt(["aud"])
    assert status_reason(jwt_refused.value) == "ENTRY_CHANGED"
    assert await renewed_records(authority) == before


async def test_an_update_refused_changes_nothing(authority: Running) -> None:
    admin = authority.admin().stub
    created = await admin.CreateEntry(
        pb.CreateEntryRequest(
            spiffe_id=WORKLOAD,
            selectors=[pb.Selector(type="join_token", value=f"spiffe_id:{WORKLOAD}")],
        )
    )
    for request, reason in (
        (
            pb.UpdateEntryRequest(
                id=created.id,
                replace_selectors=True,
                selectors=[pb.Selector(type="nowhere", value="k:v")],
            ),
            "SELECTOR_UNKNOWN_ATTESTOR",
        ),
        (pb.UpdateEntryRequest(id=created.id, replace_selectors=True), ""),  # no selector left
        (pb.UpdateEntryRequest(id=created.id, x509_ttl_seconds=10 * 86400), ""),
        (pb.UpdateEntryRequest(id="no-such-entry", x509_ttl_seconds=600), ""),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.UpdateEntry(request)
        assert refused.value.code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
        ), refused.value
        if reason:
            assert status_reason(refused.value) == reason
    assert await admin.GetEntry(pb.GetEntryRequest(id=created.id)) == created
    admin_client = authority.admin()
    kinds = [r.kind async for r in audit_cli.stream_records(admin_client)]
    assert "entry.updated" not in kinds
