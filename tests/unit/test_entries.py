"""Registration entries as the use case holds them (``Authority.create_entry`` and
``update_entry``), over the in-memory store and a fake clock: selectors no workload could
present are refused, and an update is audited and announced like a creation."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import pytest

from attestors.api import AttestContext, Attested, Attestor, HostServices
from attestors.join_token import JoinTokenAttestor
from attestors.unix import UnixAttestor
from authority.attestation import AttestorHost
from authority.ca import CertificateAuthority
from authority.clock import FakeClock
from authority.config import CaConfig, Limits
from authority.errors import AlreadyExists, InvalidArgument, NotFound
from authority.ids import TrustDomain
from authority.keyvault import MemoryKeyVault
from authority.revocation import RevocationHub, RevocationService
from authority.service import Authority
from authority.store.memory import MemoryStore

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
TD = "spiffe://example.org"
NODE = f"{TD}/agent/node1"


class Undeclared:
    """A third-party plugin that declares no selector kinds: any key is accepted."""

    plugin_name: ClassVar[str] = "undeclared"

    @classmethod
    def configure(cls, config: Mapping[str, Any], host: HostServices) -> Self:
        return cls()

    async def attest(self, evidence: bytes, ctx: AttestContext) -> Attested:
        return Attested(selectors=(("anything", "x"),))


class Malformed(Undeclared):
    """Declares something that is not a collection of names: treated as undeclared."""

    plugin_name: ClassVar[str] = "malformed"
    selector_kinds = "uid"


@dataclass
class World:
    authority: Authority
    store: MemoryStore
    changes: list[str] = field(default_factory=list)

    async def audit(self, kind: str) -> list[dict[str, Any]]:
        return [
            json.loads(r.details_json) for r in await self.store.audit_records() if r.kind == kind
        ]


@pytest.fixture
async def world() -> World:
    clock, store, limits = FakeClock(START), MemoryStore(), Limits()
    ca = CertificateAuthority(
        trust_domain=TrustDomain("example.org"),
        config=CaConfig(),
        limits=limits,
        clock=clock,
        store=store,
        vault=MemoryKeyVault(),
    )
    await ca.start()
    plugins: dict[str, type[Attestor]] = {
        "join_token": JoinTokenAttestor,
        "unix": UnixAttestor,
        "undeclared": Undeclared,
        "malformed": Malformed,
    }
    host = AttestorHost(store=store, clock=clock, limits=limits, plugins=plugins)
    await host.load()
    revocations = RevocationService(
        store=store, ca=ca, hub=RevocationHub(store), clock=clock, limits=limits
    )
    await revocations.start()
    authority = Authority(
        ca=ca,
        store=store,
        attestors=host,
        clock=clock,
        limits=limits,
        revocations=revocations,
        workload_api_attestor="local-api",
    )
    await authority.start()
    world = World(authority, store)
    authority.add_entry_listener(lambda: world.changes.append("changed"))
    return world


async def refused(world: World, *selectors: str, parent: str = "") -> InvalidArgument:
    before, changes = await world.store.list_entries(), list(world.changes)
    with pytest.raises(InvalidArgument) as info:
        await world.authority.create_entry(
            spiffe_id=f"{TD}/refused", selectors=list(selectors), parent_id=parent
        )
    assert await world.store.list_entries() == before
    assert world.changes == changes
    return info.value


async def test_a_selector_of_no_registered_attestor_is_refused(world: World) -> None:
    error = await refused(world, f"join_token:spiffe_id:{TD}/w", "k8s:namespace:prod")
    assert error.reason == "SELECTOR_UNKNOWN_ATTESTOR"
    assert "'k8s'" in error.message
    assert "registered: join_token" in error.message
    assert "--force" in error.message


async def test_force_accepts_it_and_the_audit_names_what_was_unchecked(world: World) -> None:
    entry = await world.authority.create_entry(
        spiffe_id=f"{TD}/w", selectors=["k8s:namespace:prod", "unix:uid:1"], force=True
    )
    assert entry.id in {e.id for e in await world.store.list_entries()}
    [details] = await world.audit("entry.created")
    assert details["forced_selectors"] == ["k8s:namespace:prod", "unix:uid:1"]
    assert world.changes == ["changed"]


@pytest.mark.parametrize(
    ("selector", "named"),
    [
        ("join_token:sub:x", "spiffe_id"),  # not a key the plugin produces
        ("join_token:spiffe_id", "join_token:KEY:VALUE"),  # no value
        ("join_token:spiffe_id:", "join_token:KEY:VALUE"),
    ],
)
async def test_a_form_the_plugin_cannot_produce_is_refused(
    world: World, selector: str, named: str
) -> None:
    error = await refused(world, selector)
    assert error.reason == "SELECTOR_KIND"
    assert named in error.message


async def test_a_registered_instance_is_checked_against_its_plugins_keys(world: World) -> None:
    await world.authority.attestors.register("local", "unix", {})
    error = await refused(world, "local:pod:web")
    assert error.reason == "SELECTOR_KIND"
    assert "uid, user" in error.message
    await world.authority.create_entry(spiffe_id=f"{TD}/w", selectors=["local:uid:1000"])


async def test_a_plugin_that_declares_no_keys_accepts_any(world: World) -> None:
    await world.authority.attestors.register("third", "undeclared", {})
    await world.authority.attestors.register("odd", "malformed", {})
    await world.authority.create_entry(spiffe_id=f"{TD}/a", selectors=["third:whatever:1"])
    await world.authority.create_entry(spiffe_id=f"{TD}/b", selectors=["odd:whatever:1"])


async def test_the_workload_apis_attestor_takes_unix_keys(world: World) -> None:
    """The authority's own Workload API identifies callers with the built-in unix plugin under
    its configured name, registered or not."""
    await world.authority.create_entry(spiffe_id=f"{TD}/w", selectors=["local-api:uid:1000"])
    error = await refused(world, "local-api:namespace:prod")
    assert error.reason == "SELECTOR_KIND"
    assert "Workload API" in error.message
    unregistered = await refused(world, "unix:uid:1000")  # not this authority's name for it
    assert unregistered.reason == "SELECTOR_UNKNOWN_ATTESTOR"


async def test_node_entries_take_the_agents_unix_keys_under_any_type(world: World) -> None:
    for kind in ("unix", "node-local"):
        await world.authority.create_entry(
            spiffe_id=f"{TD}/{kind}", selectors=[f"{kind}:uid:1000"], parent_id=NODE
        )
    error = await refused(world, "unix:namespace:prod", parent=NODE)
    assert error.reason == "SELECTOR_KIND"
    assert "node agent" in error.message


async def test_an_update_is_audited_and_announced(world: World) -> None:
    entry = await world.authority.create_entry(
        spiffe_id=f"{TD}/w", selectors=[f"join_token:spiffe_id:{TD}/w"]
    )
    world.changes.clear()
    updated = await world.authority.update_entry(
        entry.id,
        x509_ttl=dt.timedelta(minutes=10),
        dns_names=["w.example.org"],
        record_prompts=True,
    )
    assert updated.x509_ttl == dt.timedelta(minutes=10)
    assert updated.jwt_ttl == entry.jwt_ttl
    assert updated.selectors == entry.selectors
    assert updated.created_at == entry.created_at
    assert await world.store.get_entry(entry.id) == updated
    assert world.authority.get_entry(entry.id) == updated
    assert world.changes == ["changed"]
    [details] = await world.audit("entry.updated")
    assert details["changed"] == ["dns_names", "record_prompts", "x509_ttl_s"]
    assert details["before"] == {"dns_names": [], "record_prompts": False, "x509_ttl_s": 300}
    assert details["after"] == {
        "dns_names": ["w.example.org"],
        "record_prompts": True,
        "x509_ttl_s": 600,
    }
    # A zero TTL is the configured default again; an update that changes nothing records
    # nothing and wakes no one.
    again = await world.authority.update_entry(entry.id, x509_ttl=dt.timedelta(0))
    assert again.x509_ttl == Limits().default_x509_ttl
    world.changes.clear()
    same = await world.authority.update_entry(entry.id, x509_ttl=dt.timedelta(0))
    assert same == again
    assert world.changes == []
    assert len(await world.audit("entry.updated")) == 2


async def test_an_update_is_checked_like_a_creation(world: World) -> None:
    entry = await world.authority.create_entry(
        spiffe_id=f"{TD}/w", selectors=[f"join_token:spiffe_id:{TD}/w"]
    )
    other = await world.authority.create_entry(
        spiffe_id=f"{TD}/w", selectors=[f"join_token:spiffe_id:{TD}/other"]
    )
    world.changes.clear()
    with pytest.raises(InvalidArgument) as kind:
        await world.authority.update_entry(entry.id, selectors=["join_token:sub:x"])
    assert kind.value.reason == "SELECTOR_KIND"
    with pytest.raises(InvalidArgument):
        await world.authority.update_entry(entry.id, selectors=[])
    with pytest.raises(InvalidArgument) as ttl:
        await world.authority.update_entry(entry.id, jwt_ttl=dt.timedelta(days=1))
    assert ttl.value.message == "JWT-SVID TTL must be between 30s and 1h"
    with pytest.raises(AlreadyExists):
        await world.authority.update_entry(entry.id, selectors=list(map(str, other.selectors)))
    with pytest.raises(NotFound):
        await world.authority.update_entry("no-such-entry", record_prompts=True)
    assert world.authority.get_entry(entry.id) == entry
    assert await world.store.get_entry(entry.id) == entry
    assert world.changes == []
    assert await world.audit("entry.updated") == []
