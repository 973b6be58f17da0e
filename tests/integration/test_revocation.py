"""Revocation end to end: a real authority, real sockets, real SQLite.

A relying service here is what the product ships for one: a ``grpc.aio`` server on mutual TLS (its
own X.509-SVID) guarded by ``TaskTokenInterceptor``, whose ``TaskTokenVerifier`` consults a
``RevocationWatcher`` subscribed to the authority with that same SVID.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from authority._pb import authority_v1_authority_pb2 as pb
from authority.api.status import REASON_KEY
from authority.client import SvidFiles, WorkloadClient
from authority.clock import FakeClock
from authority.errors import AuthorityError
from authority.relying import (
    TaskKeySource,
    TaskTokenInterceptor,
    TaskTokenVerifier,
    current_task_token,
    parse_task_jwks,
)
from authority.revocation import CREDENTIAL_CHANGE, SESSION_REVOKED, SET_TYP
from authority.server import AuthorityServer
from authority.watch import RevocationWatcher, StreamFactory, stub_stream
from tests.helpers import (
    Running,
    ServeProcess,
    authority_command,
    free_port,
)
from tests.helpers import (
    test_config as config_for,
)

POLICY_DIR = Path(__file__).resolve().parents[2] / "examples" / "policies"
TRUST_DOMAIN = "example.org"
AUDIENCE = "metrics-api"
RELYING_ID = "spiffe://example.org/service/metrics"
RELYING_DNS = "metrics.example.org"
READ_METHOD = "/demo.Metrics/Read"
# A revocation must reach a subscribed relying service within this bound (the design promises
# milliseconds; the bound leaves room for a loaded CI machine).
DELIVERY_BOUND = 1.0


# --- plumbing ----------------------------------------------------------------------------------


def reason_of(exc: grpc.aio.AioRpcError) -> str:
    metadata: dict[str, object] = dict(exc.trailing_metadata() or ())  # type: ignore[arg-type]
    return str(metadata.get(REASON_KEY, ""))


async def eventually(predicate: Callable[[], bool], what: str, within: float = 10.0) -> float:
    """Seconds until ``predicate()`` held; fails after ``within`` seconds."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.002)
    return time.monotonic() - start


async def load_policy(running: Running) -> None:
    files = [
        pb.PolicyFile(name=p.name, content=p.read_text())
        for p in (POLICY_DIR / "agents.cedar", POLICY_DIR / "agents.tests.json")
    ]
    info = await running.admin().stub.LoadPolicy(pb.LoadPolicyRequest(files=files))
    assert (info.policy_id, info.backend) == ("agents", "cedar")


async def exchange_read(
    agent: WorkloadClient, *, task_id: str = "", resource: str = "metrics/prod"
) -> pb.TaskTokenIssued:
    stub = await agent.mtls_stub()
    reply = await stub.Exchange(
        pb.ExchangeRequest(
            intent=pb.Intent(action="read", resource=resource, purpose="weekly report"),
            audience=AUDIENCE,
            ttl_seconds=300,
            task_id=task_id,
        )
    )
    assert reply.WhichOneof("result") == "token", reply
    return reply.token


def leaf_der(folder: Path) -> bytes:
    chain = x509.load_pem_x509_certificates(SvidFiles(folder).cert_path.read_bytes())
    return chain[0].public_bytes(Encoding.DER)


@dataclass
class Recorder:
    """Wraps a stream factory: the ``since`` of every (re)connect, every message body kind."""

    inner: StreamFactory
    since: list[int] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)
    events: list[pb.RevocationEvent] = field(default_factory=list)

    def __call__(self, since: int) -> AsyncIterator[pb.RevocationMessage]:
        self.since.append(since)
        return self._stream(since)

    async def _stream(self, since: int) -> AsyncIterator[pb.RevocationMessage]:
        async for message in self.inner(since):
            body = message.WhichOneof("body")
            self.bodies.append(str(body))
            if body == "event":
                self.events.append(message.event)
            yield message

    def kinds_targets(self) -> list[tuple[str, str]]:
        return [(e.kind, e.target) for e in self.events]


@contextlib.asynccontextmanager
async def watching(open_stream: StreamFactory, **options: Any) -> AsyncIterator[RevocationWatcher]:
    watcher = RevocationWatcher(open_stream, **options)
    watcher.start()
    try:
        await watcher.wait_synced()
        yield watcher
    finally:
        await watcher.close()


@dataclass
class RelyingService:
    """A relying service: mutual TLS with its own SVID, task tokens checked by the interceptor."""

    server: grpc.aio.Server
    port: int
    watcher: RevocationWatcher
    verifier: TaskTokenVerifier
    recorder: Recorder
    bundle_pem: bytes
    client: WorkloadClient

    async def close(self) -> None:
        await self.server.stop(None)
        await self.watcher.close()
        await self.client.close()


async def _read(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return b"ok " + current_task_token().jti.encode()


async def start_relying_service(
    authority: Running,
    folder: Path,
    *,
    stale_after: dt.timedelta = dt.timedelta(seconds=3),
    backoff_max: float = 5.0,
) -> RelyingService:
    """Register and attest the relying service (its SVID carries a DNS name for its own TLS
    listener), subscribe to revocations with that SVID, and serve ``Read``."""
    admin = authority.admin().stub
    await admin.CreateEntry(
        pb.CreateEntryRequest(
            spiffe_id=RELYING_ID,
            selectors=[pb.Selector(type="join_token", value=f"spiffe_id:{RELYING_ID}")],
            dns_names=[RELYING_DNS],
        )
    )
    token = await authority.join_token(RELYING_ID)
    attesting = await authority.workload()
    await attesting.attest_to_folder("join_token", token.encode(), folder)
    chain, key, bundle = SvidFiles(folder).read()
    # Reconnect quickly once the authority is back (the channel's own backoff, not the watcher's).
    client = WorkloadClient(
        authority.address,
        bundle,
        svid_chain_pem=chain,
        svid_key_pem=key,
        options=[
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 300),
        ],
    )
    recorder = Recorder(stub_stream(await client.mtls_stub()))
    watcher = RevocationWatcher(recorder, stale_after=stale_after, backoff_max=backoff_max)
    watcher.start()
    await watcher.wait_synced()
    verifier = TaskTokenVerifier(
        issuer=TRUST_DOMAIN,
        audience=AUDIENCE,
        keys=TaskKeySource(client.tls_stub, issuer=TRUST_DOMAIN),
        revocations=watcher,
    )
    interceptor = TaskTokenInterceptor(
        verifier, {READ_METHOD: ("read", lambda request: bytes(request).decode())}
    )
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "demo.Metrics", {"Read": grpc.unary_unary_rpc_method_handler(_read)}
            ),
        )
    )
    credentials = grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=bundle, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return RelyingService(server, port, watcher, verifier, recorder, bundle, client)


@contextlib.asynccontextmanager
async def agent_channel(
    service: RelyingService, svid_folder: Path
) -> AsyncIterator[grpc.aio.Channel]:
    chain, key, _ = SvidFiles(svid_folder).read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=service.bundle_pem, private_key=key, certificate_chain=chain
    )
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{service.port}",
        credentials,
        options=[("grpc.ssl_target_name_override", RELYING_DNS)],
    )
    try:
        yield channel
    finally:
        await channel.close(None)


async def call_read(channel: grpc.aio.Channel, token: str, resource: str = "metrics/prod") -> bytes:
    method = channel.unary_unary(READ_METHOD, request_serializer=None, response_deserializer=None)
    reply = await method(resource.encode(), metadata=(("authorization", f"Bearer {token}"),))
    assert isinstance(reply, bytes)
    return reply


async def refused(channel: grpc.aio.Channel, token: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_read(channel, token)
    return caught.value.code(), reason_of(caught.value)


def fixed_ports(config: Any) -> Any:
    """The same config on fixed ports, so a restarted authority answers where it was."""
    return dataclasses.replace(
        config, listen=f"127.0.0.1:{free_port()}", listen_mtls=f"127.0.0.1:{free_port()}"
    )


# --- 1. end to end -----------------------------------------------------------------------------


async def test_revoking_a_task_refuses_the_next_call_without_waiting_for_expiry(
    authority: Running, tmp_path: Path
) -> None:
    await load_policy(authority)
    service = await start_relying_service(authority, tmp_path / "relying")
    try:
        agent = await authority.attested("spiffe://example.org/agent/reporter", tmp_path / "agent")
        issued = await exchange_read(agent)
        assert issued.scopes == ["read"]
        assert issued.expires_at > time.time() + 60  # expiry is not what stops it below

        async with agent_channel(service, tmp_path / "agent") as channel:
            assert await call_read(channel, issued.token) == b"ok " + issued.jti.encode()

            reply = await authority.admin().stub.Revoke(
                pb.RevokeRequest(kind="task", target=issued.task_id, reason="behaviour drift")
            )
            revoked_at = time.monotonic()
            assert [(e.kind, e.target) for e in reply.revocations] == [("task", issued.task_id)]
            seq = reply.revocations[0].seq

            watcher = service.watcher
            await eventually(lambda: watcher.seq >= seq, "the revocation at the relying service")
            delivered = time.monotonic() - revoked_at
            assert delivered < DELIVERY_BOUND, f"delivered after {delivered:.3f}s"
            assert watcher.fresh()
            assert watcher.is_revoked(issued.jti, issued.task_id, "", "")

            code, reason = await refused(channel, issued.token)
            assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")

        # The authority refuses the task too: nothing more is issued for it.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await exchange_read(agent, task_id=issued.task_id)
        assert reason_of(caught.value) in {"TASK_REVOKED", "TASK_ENDED"}
    finally:
        await service.close()


# --- 2. cascades and the authority refusing what is revoked -----------------------------------


async def test_revoking_a_parent_token_revokes_its_delegated_descendants(
    authority: Running, tmp_path: Path
) -> None:
    await load_policy(authority)
    recorder = Recorder(stub_stream(authority.admin().stub))
    async with watching(recorder) as watcher:
        lead = await authority.attested("spiffe://example.org/agent/lead", tmp_path / "lead")
        helper_dir = tmp_path / "helper"
        await authority.attested("spiffe://example.org/agent/helper", helper_dir)
        parent = await exchange_read(lead)
        lead_stub = await lead.mtls_stub()
        child = await lead_stub.Delegate(
            pb.DelegateRequest(parent_token=parent.token, delegate_svid=leaf_der(helper_dir))
        )
        assert child.token.task_id == parent.task_id

        reply = await authority.admin().stub.Revoke(
            pb.RevokeRequest(kind="jti", target=parent.jti, reason="leaked")
        )
        expected = [("jti", parent.jti), ("jti", child.token.jti)]
        assert [(e.kind, e.target) for e in reply.revocations] == expected
        await eventually(lambda: watcher.seq >= reply.revocations[-1].seq, "the cascade")
        assert recorder.kinds_targets()[-2:] == expected
        assert all(e.reason == "leaked" for e in recorder.events[-2:])
        assert watcher.is_revoked(child.token.jti, child.token.task_id, "", "")

        # The authority refuses to delegate from the revoked parent.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await lead_stub.Delegate(
                pb.DelegateRequest(parent_token=parent.token, delegate_svid=leaf_der(helper_dir))
            )
        assert reason_of(caught.value) == "TOKEN_REVOKED"


async def test_a_revoked_subject_is_refused_everything_and_what_it_delegated_dies(
    authority: Running, tmp_path: Path
) -> None:
    await load_policy(authority)
    rogue_id = "spiffe://example.org/agent/rogue"
    helper_dir = tmp_path / "helper"
    rogue = await authority.attested(rogue_id, tmp_path / "rogue")
    helper = await authority.attested("spiffe://example.org/agent/helper", helper_dir)
    parent = await exchange_read(rogue)
    rogue_stub = await rogue.mtls_stub()
    child = (
        await rogue_stub.Delegate(
            pb.DelegateRequest(parent_token=parent.token, delegate_svid=leaf_der(helper_dir))
        )
    ).token
    recorder = Recorder(stub_stream(authority.admin().stub))
    async with watching(recorder) as watcher:
        verifier = TaskTokenVerifier(
            issuer=TRUST_DOMAIN,
            audience=AUDIENCE,
            keys=TaskKeySource(helper.tls_stub, issuer=TRUST_DOMAIN),
            revocations=watcher,
        )
        accepted = await verifier.verify(
            child.token, action="read", resource="metrics/prod", peer_cert_der=leaf_der(helper_dir)
        )
        assert accepted.holder == "spiffe://example.org/agent/helper"

        reply = await authority.admin().stub.Revoke(
            pb.RevokeRequest(kind="subject", target=rogue_id, reason="compromised")
        )
        assert [(e.kind, e.target) for e in reply.revocations] == [("subject", rogue_id)]
        await eventually(lambda: watcher.seq >= reply.revocations[0].seq, "the subject event")

        # What the subject delegated dies at the relying service, though the helper is fine.
        with pytest.raises(AuthorityError) as denied:
            await verifier.verify(
                child.token,
                action="read",
                resource="metrics/prod",
                peer_cert_der=leaf_der(helper_dir),
            )
        assert denied.value.reason == "TOKEN_REVOKED"

    # The authority refuses the subject: renewal, JWT-SVIDs, exchange...
    from authority.client import new_key

    calls: list[tuple[str, Callable[[], Any]]] = [
        ("renew", lambda: rogue.renew(new_key())),
        ("jwt", lambda: rogue.fetch_jwt(["svc"])),
        ("exchange", lambda: exchange_read(rogue)),
    ]
    for name, call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
        assert reason_of(caught.value) == "SUBJECT_REVOKED", name
    # ...and attestation, even with a fresh join token for it.
    fresh_token = await authority.join_token(rogue_id)
    attesting = await authority.workload()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await attesting.attest_to_folder("join_token", fresh_token.encode(), tmp_path / "again")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(caught.value) == "REVOKED"
    # The helper itself is not revoked.
    assert (await helper.fetch_jwt(["svc"])).spiffe_id == "spiffe://example.org/agent/helper"


async def _delete_registered_entry(
    authority: Running, tmp_path: Path, spiffe_id: str
) -> tuple[str, Recorder, RevocationWatcher]:
    """Create an entry, attest through it, delete it while a watcher listens: (entry id, what
    the watcher got, the watcher, closed)."""
    admin = authority.admin().stub
    entry = await admin.CreateEntry(
        pb.CreateEntryRequest(
            spiffe_id=spiffe_id,
            selectors=[pb.Selector(type="join_token", value=f"spiffe_id:{spiffe_id}")],
        )
    )
    workload = await authority.attested(spiffe_id, tmp_path / "svid")
    recorder = Recorder(stub_stream(admin))
    async with watching(recorder) as watcher:
        await admin.DeleteEntry(pb.DeleteEntryRequest(id=entry.id))
        await eventually(lambda: len(recorder.events) >= 1, "the entry's revocation")
        # Let a cascade, if any, arrive too (it is published with the entry's, in one batch).
        await asyncio.sleep(0.3)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await workload.fetch_jwt(["svc"])
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    return entry.id, recorder, watcher


async def test_deleting_an_entry_revokes_the_entry(authority: Running, tmp_path: Path) -> None:
    spiffe_id = "spiffe://example.org/agent/registered"
    entry_id, recorder, _ = await _delete_registered_entry(authority, tmp_path, spiffe_id)
    assert recorder.kinds_targets()[0] == ("entry", entry_id)
    assert recorder.events[0].reason == "registration entry deleted"


async def test_deleting_an_entry_revokes_its_subject(authority: Running, tmp_path: Path) -> None:
    spiffe_id = "spiffe://example.org/agent/registered"
    entry_id, recorder, watcher = await _delete_registered_entry(authority, tmp_path, spiffe_id)
    assert recorder.kinds_targets() == [("entry", entry_id), ("subject", spiffe_id)]
    assert watcher.is_revoked("", "", spiffe_id, "")


async def test_unregistering_an_attestor_revokes_the_subjects_it_attested(
    authority: Running, tmp_path: Path
) -> None:
    admin = authority.admin().stub
    await admin.RegisterAttestor(
        pb.RegisterAttestorRequest(name="onboarding", plugin="join_token", config_json="{}")
    )
    via_onboarding = "spiffe://example.org/agent/onboarded"
    token = await authority.join_token(via_onboarding)
    attesting = await authority.workload()
    await attesting.attest_to_folder("onboarding", token.encode(), tmp_path / "svid")
    bystander = await authority.attested("spiffe://example.org/agent/bystander", tmp_path / "b")

    recorder = Recorder(stub_stream(admin))
    async with watching(recorder) as watcher:
        await admin.UnregisterAttestor(pb.UnregisterAttestorRequest(name="onboarding"))
        await eventually(lambda: len(recorder.events) >= 2, "the attestor's revocations")
        assert recorder.kinds_targets() == [("attestor", "onboarding"), ("subject", via_onboarding)]
        assert watcher.is_revoked("", "", via_onboarding, "")
        assert not watcher.is_revoked("", "", "spiffe://example.org/agent/bystander", "")
    assert (await bystander.fetch_jwt(["svc"])).spiffe_id.endswith("/bystander")


async def test_revoking_the_task_key_refuses_what_it_signed_at_once(
    authority: Running, tmp_path: Path
) -> None:
    await load_policy(authority)
    agent = await authority.attested("spiffe://example.org/agent/keyed", tmp_path / "agent")
    issued = await exchange_read(agent)
    kid = jwt.get_unverified_header(issued.token)["kid"]
    recorder = Recorder(stub_stream(authority.admin().stub))
    async with watching(recorder) as watcher:
        keys = TaskKeySource(agent.tls_stub, issuer=TRUST_DOMAIN)
        verifier = TaskTokenVerifier(
            issuer=TRUST_DOMAIN, audience=AUDIENCE, keys=keys, revocations=watcher
        )
        peer = leaf_der(tmp_path / "agent")
        await verifier.verify(
            issued.token, action="read", resource="metrics/prod", peer_cert_der=peer
        )

        reply = await authority.admin().stub.Revoke(
            pb.RevokeRequest(kind="key", target=kid, reason="key leaked")
        )
        assert [(e.kind, e.target) for e in reply.revocations] == [("key", kid)]
        await eventually(lambda: watcher.seq >= reply.revocations[0].seq, "the key revocation")
        # The relying service still holds the key (its cache is minutes old): the feed, not the
        # key set, is what stops the token now.
        assert kid in await keys.keys()
        with pytest.raises(AuthorityError) as denied:
            await verifier.verify(
                issued.token, action="read", resource="metrics/prod", peer_cert_der=peer
            )
        assert denied.value.reason == "TOKEN_REVOKED"

    # The authority signs with another key from now on.
    fresh = await exchange_read(agent)
    assert jwt.get_unverified_header(fresh.token)["kid"] != kid


async def test_end_task_emits_a_task_revocation(authority: Running, tmp_path: Path) -> None:
    await load_policy(authority)
    agent_id = "spiffe://example.org/agent/finisher"
    agent = await authority.attested(agent_id, tmp_path / "agent")
    issued = await exchange_read(agent)
    recorder = Recorder(stub_stream(authority.admin().stub))
    async with watching(recorder) as watcher:
        stub = await agent.mtls_stub()
        ended = await stub.EndTask(pb.EndTaskRequest(task_id=issued.task_id, reason="done"))
        assert list(ended.revoked_jtis) == [issued.jti]
        await eventually(lambda: len(recorder.events) >= 1, "the task revocation")
        [event] = recorder.events
        assert (event.kind, event.target, event.reason, event.actor) == (
            "task",
            issued.task_id,
            "done",
            agent_id,
        )
        assert watcher.is_revoked(issued.jti, issued.task_id, agent_id, agent_id)


async def test_security_event_tokens_verify_with_the_published_task_keys(
    authority: Running, tmp_path: Path
) -> None:
    await load_policy(authority)
    agent = await authority.attested("spiffe://example.org/agent/set", tmp_path / "agent")
    issued = await exchange_read(agent)
    keys_reply = await agent.tls_stub.GetTaskKeys(pb.GetTaskKeysRequest())
    keys = parse_task_jwks(keys_reply.jwks_json)
    admin = authority.admin().stub
    replies = [
        await admin.Revoke(pb.RevokeRequest(kind="jti", target=issued.jti, reason="r1")),
        await admin.Revoke(
            pb.RevokeRequest(
                kind="subject", target="spiffe://example.org/x", reason="r2", preemptive=True
            )
        ),
        await admin.Revoke(
            pb.RevokeRequest(kind="attestor", target="nobody", reason="r3", preemptive=True)
        ),
    ]
    expected_types = [SESSION_REVOKED, SESSION_REVOKED, CREDENTIAL_CHANGE]
    for reply, event_type in zip(replies, expected_types, strict=True):
        [event] = reply.revocations
        token = event.security_event_token
        header = jwt.get_unverified_header(token)
        assert header["typ"] == SET_TYP
        claims = jwt.decode(
            token,
            keys[header["kid"]],
            algorithms=[header["alg"]],
            issuer=keys_reply.issuer,
            options={"require": ["iss", "iat", "jti", "events"]},
        )
        assert claims["txn"] == str(event.seq)
        assert list(claims["events"]) == [event_type]
        assert claims["events"][event_type]["reason_admin"] == {"en": event.reason}
    # The feed carries the same events: the same SET id, so a receiver sees one event, not two.
    recorder = Recorder(stub_stream(admin))
    async with watching(recorder):
        assert len(recorder.events) == len(replies)

    def claims_of(token: str) -> dict[str, Any]:
        kid = jwt.get_unverified_header(token)["kid"]
        claims: dict[str, Any] = jwt.decode(
            token, keys[kid], algorithms=["ES256", "ES384"], issuer=keys_reply.issuer
        )
        claims.pop("iat")
        return claims

    assert [claims_of(e.security_event_token) for e in recorder.events] == [
        claims_of(r.revocations[0].security_event_token) for r in replies
    ]


# --- 4. a subscriber behind the retention window gets a snapshot ---------------------------------


async def test_a_subscriber_behind_the_retention_window_gets_a_snapshot_and_converges(
    tmp_path: Path, socket_dir: Path
) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    server = AuthorityServer(config_for(tmp_path / "data", socket_dir), clock=clock)
    await server.start()
    running = Running(server, tmp_path / "data", server.admin_socket, server.port, server.mtls_port)
    try:
        admin = running.admin().stub
        first = "spiffe://example.org/victim/early"
        # The watcher judges expiry by the authority's (fake) time, as a relying service would
        # by a clock in step with the authority's.
        recorder = Recorder(stub_stream(admin))
        options: dict[str, Any] = {"wall_clock": lambda: clock.now().timestamp()}
        async with watching(recorder, **options) as watcher:
            await admin.Revoke(
                pb.RevokeRequest(kind="subject", target=first, reason="a", preemptive=True)
            )
            await eventually(lambda: watcher.seq == 1, "the first revocation")
        assert recorder.bodies.count("snapshot") == 0
        last_seen = watcher.seq

        # While the subscriber is away: a revocation it never sees, a day passes, the store
        # forgets both, and a new one is made.
        await admin.Revoke(
            pb.RevokeRequest(
                kind="subject",
                target="spiffe://example.org/victim/missed",
                reason="b",
                preemptive=True,
            )
        )
        clock.advance(dt.timedelta(days=1, hours=3))
        late = "spiffe://example.org/victim/late"
        kept = await admin.Revoke(
            pb.RevokeRequest(kind="subject", target=late, reason="c", preemptive=True)
        )
        assert server._store is not None
        assert await server._store.prune(clock.now()) >= 2
        low, head = await server._store.revocation_bounds()
        assert (low, head) == (kept.revocations[0].seq, kept.revocations[0].seq)
        assert last_seen + 1 < low  # the replay from last_seen is gone

        # The raw feed: a snapshot of what is active, as of the head.
        call = admin.WatchRevocations(pb.WatchRevocationsRequest(since=last_seen))
        first_message = await call.read()
        call.cancel()
        assert isinstance(first_message, pb.RevocationMessage)
        assert first_message.WhichOneof("body") == "snapshot"
        assert first_message.snapshot.seq == head
        assert [(e.kind, e.target) for e in first_message.snapshot.revocations] == [
            ("subject", late)
        ]

        # A watcher resuming from where it was converges on exactly the active set.
        assert watcher.revoked.targets["subject"].keys() == {first}
        watcher.revoked.seq = last_seen
        resumed = Recorder(stub_stream(admin))
        rewatcher = RevocationWatcher(resumed, **options)
        rewatcher.revoked = watcher.revoked
        rewatcher.start()
        try:
            await rewatcher.wait_synced()
            assert resumed.since == [last_seen]
            assert resumed.bodies[0] == "snapshot"
            active = await server._store.active_revocations(clock.now())
            assert {k: set(v) for k, v in rewatcher.revoked.targets.items() if v} == {
                str(r.kind): {r.target} for r in active
            }
            assert rewatcher.seq == head
            assert rewatcher.is_revoked("", "", late, "")
            assert not rewatcher.is_revoked("", "", first, "")
        finally:
            await rewatcher.close()
    finally:
        await running.close_clients()
        await server.stop(grace=0.5)


# --- 5. a cut feed fails closed, and recovers --------------------------------------------------


async def test_a_cut_feed_fails_closed_after_the_bound_and_recovers(
    tmp_path: Path, socket_dir: Path
) -> None:
    heartbeat = dt.timedelta(milliseconds=200)
    stale_after = dt.timedelta(milliseconds=800)
    config = dataclasses.replace(
        fixed_ports(config_for(tmp_path / "data", socket_dir)), revocation_heartbeat=heartbeat
    )
    server = AuthorityServer(config)
    await server.start()
    running = Running(server, config.data_dir, server.admin_socket, server.port, server.mtls_port)
    service: RelyingService | None = None
    try:
        await load_policy(running)
        service = await start_relying_service(
            running, tmp_path / "relying", stale_after=stale_after, backoff_max=0.5
        )
        agent = await running.attested("spiffe://example.org/agent/steady", tmp_path / "agent")
        issued = await exchange_read(agent)
        before = await running.admin().stub.Revoke(
            pb.RevokeRequest(
                kind="subject", target="spiffe://example.org/victim/0", reason="x", preemptive=True
            )
        )
        watcher = service.watcher
        await eventually(lambda: watcher.seq == before.revocations[0].seq, "the first event")
        seq_before_cut = watcher.seq
        async with agent_channel(service, tmp_path / "agent") as channel:
            assert await call_read(channel, issued.token)
            await agent.close()
            await running.close_clients()

            # Cut the feed: the authority goes away.
            await server.stop(grace=0.1)
            cut = time.monotonic()
            stale = await eventually(lambda: not watcher.fresh(), "the watcher to go stale", 5)
            bound = (stale_after + heartbeat).total_seconds()
            assert time.monotonic() - cut <= bound + 0.2, f"stale only after {stale:.2f}s"
            code, reason = await refused(channel, issued.token)
            assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "REVOCATION_FEED_STALE")

            # The feed returns on the same ports and data.
            server = AuthorityServer(config)
            await server.start()
            running = Running(
                server, config.data_dir, server.admin_socket, server.port, server.mtls_port
            )
            await eventually(watcher.fresh, "the watcher to reconnect", 15)
            assert watcher.connects >= 2
            assert service.recorder.since[-1] == seq_before_cut  # resumed, not restarted
            assert "snapshot" not in service.recorder.bodies
            assert await call_read(channel, issued.token)

            after = await running.admin().stub.Revoke(
                pb.RevokeRequest(kind="task", target=issued.task_id, reason="after the cut")
            )
            await eventually(lambda: watcher.seq == after.revocations[0].seq, "the next event")
            assert [e.seq for e in service.recorder.events] == [
                before.revocations[0].seq,
                after.revocations[0].seq,
            ]
            code, reason = await refused(channel, issued.token)
            assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
    finally:
        if service is not None:
            await service.close()
        await running.close_clients()
        await server.stop(grace=0.5)


# --- 7. the CLI -------------------------------------------------------------------------------


def test_cli_revoke_and_watch_json(served: ServeProcess, tmp_path: Path) -> None:
    # Exactly one target flag.
    none_given = served.cli("revoke", "--reason", "y", check=False)
    assert none_given.returncode != 0
    assert "exactly one of" in none_given.stderr
    two_given = served.cli("revoke", "--jti", "a", "--task", "b", "--reason", "y", check=False)
    assert two_given.returncode != 0
    assert "exactly one of" in two_given.stderr
    no_reason = served.cli("revoke", "--spiffe-id", "spiffe://example.org/a", check=False)
    assert no_reason.returncode != 0

    # A task, made through the CLI as an agent would.
    served.cli(
        "policy", "load", str(POLICY_DIR / "agents.cedar"), str(POLICY_DIR / "agents.tests.json")
    )
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(served.cli("bundle", "show").stdout)
    token = served.cli(
        "token", "create", "--spiffe-id", "spiffe://example.org/agent/cli"
    ).stdout.strip()
    svid = tmp_path / "svid"
    served.cli(
        "workload", "attest", "--server", served.address, "--trust-bundle", str(bundle),
        "--join-token", token, "--out", str(svid),
    )  # fmt: skip
    exchanged = served.cli(
        "workload", "exchange", "--server", served.address, "--svid-dir", str(svid),
        "--action", "read", "--resource", "metrics/prod", "--audience", AUDIENCE,
        "--purpose", "weekly report",
    )  # fmt: skip
    task_id = exchanged.stderr.split()[1].rstrip(":")
    assert exchanged.stdout.strip().count(".") == 2

    watch = subprocess.Popen(
        [*authority_command(), "watch", "--format", "json"],
        env=served.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        revoked_task = served.cli("revoke", "--task", task_id, "--reason", "y")
        assert f"revoked task {task_id}" in revoked_task.stdout
        revoked_subject = served.cli(
            "revoke", "--spiffe-id", "spiffe://example.org/victim/cli", "--reason", "gone",
            "--preemptive", "--format", "json",
        )  # fmt: skip
        assert json.loads(revoked_subject.stdout)["kind"] == "subject"
        assert watch.stdout is not None
        lines = [watch.stdout.readline(), watch.stdout.readline()]
    finally:
        watch.send_signal(signal.SIGINT)
        try:
            watch.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            watch.kill()
            watch.communicate()
    events = [json.loads(line) for line in lines]
    for event in events:
        assert {"seq", "kind", "target", "reason", "revoked_at"} <= event.keys()
        dt.datetime.fromisoformat(event["revoked_at"])
    assert [(e["kind"], e["target"], e["reason"]) for e in events] == [
        ("task", task_id, "y"),
        ("subject", "spiffe://example.org/victim/cli", "gone"),
    ]
    assert events[0]["seq"] < events[1]["seq"]
