"""The agent library (``authority.toolclient.ToolClient``) end to end: its SVID from the real
SPIFFE Workload API of a real ``authority serve``, tokens from a real Exchange over mutual TLS,
and a real MCP server (the SDK's ``MCPServer``, tests/mcp_tools.py) under uvicorn over TLS.

Between the two sits ``CheckingGateway``: the gateway's admission rule for ``tools/call`` (a
task token for exactly that call, bound to the connection's certificate, verified with the
relying library), written small, so that these tests say what the library sends on the wire
(which token, on which request, over which connection). The real gateway's tests drive the
library through ``authority/gateway`` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from authority import toolcall
from authority._pb import authority_v1_authority_pb2 as pb
from authority.asgi import refusal
from authority.audit_cli import stream_records
from authority.client import (
    AdminClient,
    FetchedX509Svid,
    RevocationWatcher,
    TaskKeySource,
    TaskTokenVerifier,
    WorkloadApiClient,
    WorkloadClient,
    der_chain_to_pem,
    new_key,
)
from authority.errors import AuthorityError, PermissionDenied
from authority.httpserve import Receive, Scope, Send, TlsIdentity, peer_certificate_der, serve
from authority.keyvault import private_key_pem
from authority.relying import bearer_token
from authority.tokens import x5t_s256
from authority.toolclient import (
    ApprovalPending,
    ApprovalRefused,
    AuthorityRefused,
    Gateway,
    GatewayIdentityMismatch,
    GatewayRefused,
    StaticSvids,
    ToolClient,
    describe,
)
from tests import gateway_stack
from tests.helpers import ServeProcess, serve_process, short_socket_dir
from tests.mcp_tools import CallLog, build

TD = "example.org"
ISSUER = f"spiffe://{TD}"
AGENT = f"{ISSUER}/agent/toolbot"
AUDIENCE = "mcp-gateway"
SERVER = "tools"
PURPOSE = "answer the ticket"

# Decided on the resource name alone, so the same policy holds whether or not the authority
# reads the call's arguments.
POLICY = """
@id("tools-echo") @ttl("120")
permit (principal, action == Action::"tools.call", resource == Resource::"mcp/tools/echo")
when { principal.trust_domain == "example.org" && principal.path like "/agent/*" };

@id("tools-refund-approved") @ttl("60") @approval("required")
permit (principal, action == Action::"tools.call", resource == Resource::"mcp/tools/refund")
when { principal.trust_domain == "example.org" && principal.path like "/agent/*" };

@id("tools-never-delete")
forbid (
  principal, action == Action::"tools.call", resource == Resource::"mcp/tools/delete_invoice"
);
"""


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - state of another component, polled
            await asyncio.sleep(0.02)
    assert predicate(), what


@dataclass
class Seen:
    """One request the gateway received."""

    method: str
    authorized: bool
    jti: str = ""
    cnf: str = ""
    peer: str = ""  # x5t#S256 of the connection's client certificate


@dataclass
class CheckingGateway:
    """The gateway's rule for tools/call in front of the MCP server (see the module's
    docstring); every other request passes as it came. Refusals are the middleware's."""

    app: Any
    verifier: TaskTokenVerifier
    server: str
    seen: list[Seen] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        rpc = json.loads(body)
        headers = [(k.decode("latin-1"), v) for k, v in scope["headers"]]
        authorized = any(k.lower() == "authorization" for k, _ in headers)
        peer = peer_certificate_der(scope)
        seen = Seen(rpc.get("method", ""), authorized, peer=x5t_s256(peer) if peer else "")
        self.seen.append(seen)
        if rpc.get("method") == "tools/call":
            params = rpc["params"]
            try:
                token = await self.verifier.verify(
                    bearer_token(headers),
                    action=toolcall.ACTION,
                    resource=toolcall.resource(self.server, params["name"]),
                    peer_cert_der=peer,
                )
                seen.jti, seen.cnf = token.jti, token.cnf_x5t
                wanted = token.intent.parameters.get(toolcall.ARGUMENTS_PARAMETER)
                digest = toolcall.arguments_digest(
                    toolcall.check_arguments(params.get("arguments"))
                )
                if wanted != digest:
                    raise PermissionDenied(
                        "the token is for other arguments", reason="TOKEN_ARGUMENTS"
                    )
            except AuthorityError as exc:
                status, answer_headers, answer = refusal(exc, AUDIENCE)
                await send(
                    {"type": "http.response.start", "status": status, "headers": answer_headers}
                )
                await send({"type": "http.response.body", "body": answer})
                return

        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if replayed:  # after the body: what the connection says next (a disconnect)
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def calls(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "tools/call"]


@contextlib.asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """The MCP app's lifespan (its session manager), entered and left in a task of its own:
    anyio's task groups are left by the task that entered them, and a fixture's teardown runs
    in another task than its setup."""
    started, stop = asyncio.Event(), asyncio.Event()

    async def run() -> None:
        async with app.router.lifespan_context(app):
            started.set()
            await stop.wait()

    task = asyncio.create_task(run())
    await asyncio.wait([task, asyncio.create_task(started.wait())], return_when="FIRST_COMPLETED")
    if task.done():
        task.result()
    try:
        yield
    finally:
        stop.set()
        await task


@dataclass
class World:
    served: ServeProcess
    admin: AdminClient
    bundle: bytes
    socket: Path
    gateway: CheckingGateway
    url: str
    calls: Path  # the MCP server's log of the calls it ran
    watcher: RevocationWatcher

    def client(self, **kwargs: Any) -> ToolClient:
        return ToolClient(
            kwargs.pop("svids", None) or WorkloadApiClient(self.socket),
            authority=self.served.address,
            authority_bundle=self.bundle,
            gateways={SERVER: Gateway(self.url, AUDIENCE)},
            model="test-model",
            **kwargs,
        )

    def ran(self) -> list[dict[str, Any]]:
        if not self.calls.exists():
            return []
        return [json.loads(line) for line in self.calls.read_text().splitlines()]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    sockets = short_socket_dir()
    socket = sockets / "api.sock"
    try:
        with serve_process(tmp_path / "data", "--workload-api-socket", str(socket)) as served:
            async with (
                AdminClient(served.admin_socket) as admin,
                contextlib.AsyncExitStack() as stack,
            ):
                yield await _world(served, admin, socket, tmp_path, stack)
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


async def _world(
    served: ServeProcess,
    admin: AdminClient,
    socket: Path,
    tmp_path: Path,
    stack: contextlib.AsyncExitStack,
) -> World:
    await admin.stub.LoadPolicy(
        pb.LoadPolicyRequest(
            files=[pb.PolicyFile(name="tools.cedar", content=POLICY)], allow_untested=True
        )
    )
    bundle = der_chain_to_pem(
        list((await admin.stub.GetBundle(pb.GetBundleRequest())).x509_authorities)
    )
    # This test process is the agent: the kernel names it to the Workload API by its uid.
    await admin.stub.RegisterAttestor(pb.RegisterAttestorRequest(name="unix", plugin="unix"))
    await admin.stub.CreateEntry(
        pb.CreateEntryRequest(
            spiffe_id=AGENT, selectors=[pb.Selector(type="unix", value=f"uid:{os.getuid()}")]
        )
    )
    # The gateway's own SVID (a join token), for its TLS listener and the revocation feed.
    gateway_id = f"{ISSUER}/svc/gateway"
    joined = await admin.stub.CreateJoinToken(pb.CreateJoinTokenRequest(spiffe_id=gateway_id))
    key = new_key()
    anonymous = await stack.enter_async_context(WorkloadClient(served.address, bundle))
    attested = await anonymous.attest("join_token", joined.token.encode(), key)
    chain = der_chain_to_pem(list(attested.svids[0].cert_chain))
    own = await stack.enter_async_context(
        WorkloadClient(
            served.address, bundle, svid_chain_pem=chain, svid_key_pem=private_key_pem(key)
        )
    )
    watcher = RevocationWatcher(own.watch_revocations)
    watcher.start()
    stack.push_async_callback(watcher.close)
    await watcher.wait_synced()
    verifier = TaskTokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, keys=TaskKeySource(own, issuer=TD), revocations=watcher
    )
    calls = tmp_path / "calls.jsonl"
    mcp_app = build(CallLog(calls)).streamable_http_app()
    await stack.enter_async_context(lifespan(mcp_app))
    gateway = CheckingGateway(mcp_app, verifier, SERVER)
    server = await stack.enter_async_context(
        serve(gateway, TlsIdentity(chain, private_key_pem(key), bundle))
    )
    return World(served, admin, bundle, socket, gateway, f"{server.url}/mcp", calls, watcher)


async def test_a_call_gets_a_token_for_exactly_that_call_reused_only_for_the_identical_call(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    prompt = "refund the customer who was charged twice; their card is 4111..."
    async with world.client() as tools:
        listed = await tools.list_tools(SERVER)
        assert {"echo", "refund", "delete_invoice"} <= {t.name for t in listed}

        result = await tools.call_tool(
            SERVER, "echo", {"text": "hello"}, purpose=PURPOSE, prompt=prompt
        )
        assert describe(result) == "hello"
        assert tools.spiffe_id == AGENT
        assert tools.exchanges == 1
        first = world.gateway.calls()[-1]
        # The token is bound to the very certificate of the connection that carried it.
        assert first.cnf == first.peer != ""

        # The identical call (members in another order, 1.0 for 1 would be too): the same token.
        await tools.call_tool(SERVER, "echo", {"text": "hello"}, purpose=PURPOSE, prompt=prompt)
        assert tools.exchanges == 1
        assert world.gateway.calls()[-1].jti == first.jti

        # Other arguments: a new Exchange, a new token.
        result = await tools.call_tool(SERVER, "echo", {"text": "other"}, purpose=PURPOSE)
        assert describe(result) == "other"
        assert tools.exchanges == 2
        assert world.gateway.calls()[-1].jti != first.jti

        # Another purpose for the same call: a new token too.
        await tools.call_tool(SERVER, "echo", {"text": "hello"}, purpose="another purpose")
        assert tools.exchanges == 3
        assert len({c.jti for c in world.gateway.calls()}) == 3

        # Only tools/call requests carried a token.
        assert all(s.authorized == (s.method == "tools/call") for s in world.gateway.seen)
        assert [r for r in world.ran() if r.get("tool") == "echo"] == [
            {"tool": "echo", "arguments": {"text": t}} for t in ("hello", "hello", "other", "hello")
        ]
        task = tools.task_id
        assert task

    # Every token went under one task; the audit has the prompt's digest and never the prompt.
    digest = hashlib.sha256(prompt.encode()).hexdigest()
    records = [r async for r in stream_records(world.admin, task_ids=[task])]
    issued = [r for r in records if r.kind == "task_token.issued"]
    assert len(issued) == 3
    texts = "".join(r.details_json for r in records)
    assert digest in texts
    assert "4111" not in texts
    assert toolcall.arguments_digest({"text": "hello"}) in texts
    # Nothing this library logged holds a token or the prompt.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "4111" not in logged
    assert "eyJ" not in logged  # a JWT's header starts so


async def test_the_token_carries_the_arguments_digest(world: World) -> None:
    """The contract (authority/toolcall.py): Exchange with a ToolCall binds the token to the
    digest of the exact arguments. Needs the authority's handling of ToolCall in Exchange."""
    async with world.client() as tools:
        await tools.call_tool(SERVER, "echo", {"text": "bound"}, purpose=PURPOSE)
        jti = world.gateway.calls()[-1].jti
    records = [r async for r in stream_records(world.admin)]
    issued = [json.loads(r.details_json) for r in records if r.kind == "task_token.issued"]
    mine = [d for d in issued if jti in json.dumps(d)]
    assert mine, issued
    assert toolcall.arguments_digest({"text": "bound"}) in json.dumps(mine[0]["intent"])


async def test_concurrent_identical_calls_share_one_exchange(world: World) -> None:
    async with world.client() as tools:
        results = await asyncio.gather(
            *(tools.call_tool(SERVER, "echo", {"text": "same"}, purpose=PURPOSE) for _ in range(4)),
            tools.call_tool(SERVER, "echo", {"text": "other"}, purpose=PURPOSE),
        )
        assert [describe(r) for r in results] == ["same"] * 4 + ["other"]
        assert tools.exchanges == 2
        calls = world.gateway.calls()
        assert len({c.jti for c in calls}) == 2
        assert len(calls) == 5


async def test_approval_pending_raises_or_waits_and_a_denial_is_typed(world: World) -> None:
    async with world.client() as tools:
        with pytest.raises(ApprovalPending) as pending:
            await tools.call_tool(
                SERVER, "refund", {"invoice": "inv-1", "amount": 20}, purpose=PURPOSE
            )
        approval_id = pending.value.approval_id
        assert approval_id
        assert world.gateway.calls() == []  # nothing was sent to the gateway
        # Still pending: asking again with the id does not skip the operator.
        with pytest.raises(ApprovalPending):
            await tools.call_tool(
                SERVER,
                "refund",
                {"invoice": "inv-1", "amount": 20},
                purpose=PURPOSE,
                approval_id=approval_id,
            )
        await world.admin.stub.Approve(
            pb.ApproveRequest(id=approval_id, grant_seconds=120, note="ok")
        )
        result = await tools.call_tool(
            SERVER,
            "refund",
            {"invoice": "inv-1", "amount": 20},
            purpose=PURPOSE,
            approval_id=approval_id,
        )
        assert describe(result) == "refunded 20.0 on inv-1"

        # Waiting: the call returns once an operator approves.
        waiting = asyncio.create_task(
            tools.call_tool(
                SERVER,
                "refund",
                {"invoice": "inv-2", "amount": 30},
                purpose=PURPOSE,
                wait_for_approval=True,
                approval_deadline=30,
            )
        )
        second = await _pending_approval(world.admin, exclude={approval_id})
        assert not waiting.done()
        await world.admin.stub.Approve(pb.ApproveRequest(id=second, grant_seconds=120))
        assert describe(await asyncio.wait_for(waiting, 20)) == "refunded 30.0 on inv-2"

        # Denied while waiting: ApprovalRefused.
        waiting = asyncio.create_task(
            tools.call_tool(
                SERVER,
                "refund",
                {"invoice": "inv-3", "amount": 40},
                purpose=PURPOSE,
                wait_for_approval=True,
                approval_deadline=30,
            )
        )
        third = await _pending_approval(world.admin, exclude={approval_id, second})
        await world.admin.stub.Deny(pb.DenyRequest(id=third, reason="not this one"))
        with pytest.raises(ApprovalRefused) as refused:
            await asyncio.wait_for(waiting, 20)
        assert (refused.value.approval_id, refused.value.state) == (third, "denied")

        # A deadline that passes: ApprovalPending, with the id to come back with.
        with pytest.raises(ApprovalPending) as late:
            await tools.call_tool(
                SERVER,
                "refund",
                {"invoice": "inv-4", "amount": 50},
                purpose=PURPOSE,
                wait_for_approval=True,
                approval_deadline=0.5,
            )
        assert late.value.approval_id not in (approval_id, second, third)
    assert [r["arguments"]["invoice"] for r in world.ran() if r.get("tool") == "refund"] == [
        "inv-1",
        "inv-2",
    ]


async def _pending_approval(admin: AdminClient, exclude: set[str]) -> str:
    async with asyncio.timeout(10):
        while True:
            listed = await admin.stub.ListApprovals(pb.ListApprovalsRequest())
            fresh = [a.id for a in listed.approvals if a.state == "pending" and a.id not in exclude]
            if fresh:
                return fresh[0]
            await asyncio.sleep(0.05)


async def test_refusals_of_the_authority_and_of_the_gateway_are_typed(world: World) -> None:
    async with world.client() as tools:
        with pytest.raises(AuthorityRefused) as denied:
            await tools.call_tool(SERVER, "delete_invoice", {"invoice": "inv-1"}, purpose=PURPOSE)
        assert denied.value.reason == "POLICY_DENIED"
        assert denied.value.policy_reasons == ("tools-never-delete",)
        assert world.gateway.calls() == []

        # A revoked token: the gateway refuses it, the library says so and forgets the token.
        await tools.call_tool(SERVER, "echo", {"text": "x"}, purpose=PURPOSE)
        jti = world.gateway.calls()[-1].jti
        await world.admin.stub.Revoke(pb.RevokeRequest(kind="jti", target=jti, reason="test"))
        await wait_for(
            lambda: world.watcher.is_revoked(jti, "", "", ""), "the gateway to learn the revocation"
        )
        with pytest.raises(GatewayRefused) as refused:
            await tools.call_tool(SERVER, "echo", {"text": "x"}, purpose=PURPOSE)
        assert (refused.value.status, refused.value.error, refused.value.reason) == (
            401,
            "invalid_token",
            "TOKEN_REVOKED",
        )
        # The next identical call asks for a new token, which passes.
        before = tools.exchanges
        assert (
            describe(await tools.call_tool(SERVER, "echo", {"text": "x"}, purpose=PURPOSE)) == "x"
        )
        assert tools.exchanges == before + 1
        assert world.gateway.calls()[-1].jti != jti


async def test_end_task_revokes_the_tasks_tokens_and_the_next_call_opens_a_new_task(
    world: World,
) -> None:
    async with world.client() as tools:
        await tools.call_tool(SERVER, "echo", {"text": "a"}, purpose=PURPOSE)
        await tools.call_tool(SERVER, "echo", {"text": "b"}, purpose=PURPOSE)
        task = tools.task_id
        issued = {c.jti for c in world.gateway.calls()}
        revoked = await tools.end_task("ticket answered")
        assert set(revoked) == issued
        assert tools.task_id == ""
        await tools.call_tool(SERVER, "echo", {"text": "a"}, purpose=PURPOSE)  # not from the cache
        assert tools.exchanges == 3
        assert tools.task_id not in ("", task)
        assert await tools.end_task() != []
        assert await tools.end_task() == []  # no task open: nothing to do


async def test_a_renewed_svid_gets_new_sessions_and_tokens_bound_to_it(
    world: World, tmp_path: Path
) -> None:
    async with WorkloadApiClient(world.socket) as api:
        first = (await api.fetch_x509_svids())[0]
    svids = StaticSvids([first])
    async with world.client(svids=svids) as tools:
        await tools.call_tool(SERVER, "echo", {"text": "a"}, purpose=PURPOSE)
        before = world.gateway.calls()[-1]
        assert before.cnf == before.peer == x5t_s256(_der(first))

        # The agent's SVID is renewed (a new key, a new certificate): the Workload API pushes it.
        key = new_key()
        async with WorkloadClient(
            world.served.address,
            world.bundle,
            svid_chain_pem=first.chain_pem,
            svid_key_pem=private_key_pem(first.key),
        ) as holder:
            renewed = await holder.renew(key)
        second = FetchedX509Svid(
            first.spiffe_id, der_chain_to_pem(list(renewed.cert_chain)), key, first.bundle_pem
        )
        svids.push([second])
        await wait_for(lambda: tools._latest is second, "the library to see the new SVID")

        # The identical call: a new token (the cached one is bound to the old certificate),
        # carried over a new connection made with the new SVID.
        await tools.call_tool(SERVER, "echo", {"text": "a"}, purpose=PURPOSE)
        after = world.gateway.calls()[-1]
        assert tools.exchanges == 2
        assert tools.generations == 2
        assert after.cnf == after.peer == x5t_s256(_der(second))
        assert after.jti != before.jti
        assert tools.task_id  # the task goes on across the renewal


def _der(svid: FetchedX509Svid) -> bytes:
    from cryptography import x509

    return x509.load_pem_x509_certificates(svid.chain_pem)[0].public_bytes(
        serialization.Encoding.DER
    )


async def test_a_cached_token_near_its_end_is_not_used(world: World) -> None:
    class Late:
        offset = dt.timedelta(0)

        def now(self) -> dt.datetime:
            return dt.datetime.now(dt.UTC) + self.offset

    clock = Late()
    async with world.client(clock=clock, safety_margin=dt.timedelta(seconds=30)) as tools:
        await tools.call_tool(SERVER, "echo", {"text": "a"}, purpose=PURPOSE)
        clock.offset = dt.timedelta(seconds=89)  # 120 s token, 30 s margin: still 1 s to go
        await tools.call_tool(SERVER, "echo", {"text": "a"}, purpose=PURPOSE)
        assert tools.exchanges == 1
        clock.offset = dt.timedelta(seconds=91)
        await tools.call_tool(SERVER, "echo", {"text": "a"}, purpose=PURPOSE)
        assert tools.exchanges == 2


# --- through the real gateway (authority gateway, tests/gateway_stack.py) ------------------------


def _svid_of(folder: Path) -> FetchedX509Svid:
    from authority.client import SvidFiles

    chain, key_pem, bundle = SvidFiles(folder).read()
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    spiffe_id = (
        x509.load_pem_x509_certificates(chain)[0]
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value.get_values_for_type(x509.UniformResourceIdentifier)[0]
    )
    return FetchedX509Svid(spiffe_id, chain, key, bundle)


async def _until_refused(tools: ToolClient) -> None:
    """Call until the gateway refuses (its revocation feed has the revocation: within 1 s)."""
    async with asyncio.timeout(10):
        while True:
            await tools.call_tool(gateway_stack.SERVER, "echo", {"text": "hi"}, purpose=PURPOSE)
            await asyncio.sleep(0.05)


async def test_through_the_gateway(tmp_path: Path) -> None:
    with gateway_stack.stack(tmp_path / "stack") as running:
        # Expecting another SPIFFE ID than the gateway's (whose certificate chains to the
        # bundle all the same): refused at the handshake, before any Exchange or request.
        impostor_id = f"{gateway_stack.TD}/gateway-impostor"
        wary_agent = f"{gateway_stack.TD}/agent/wary"
        wary = ToolClient(
            StaticSvids([_svid_of(await running.agent("wary"))]),
            authority=running.served.address,
            authority_bundle=running.bundle_path.read_bytes(),
            gateways={
                gateway_stack.SERVER: Gateway(running.url, gateway_stack.AUDIENCE, impostor_id)
            },
        )
        async with wary:
            for _ in range(2):  # and again on a new connection
                with pytest.raises(GatewayIdentityMismatch) as mismatch:
                    await wary.call_tool(
                        gateway_stack.SERVER, "echo", {"text": "not for you"}, purpose=PURPOSE
                    )
                assert (mismatch.value.expected, mismatch.value.presented) == (
                    impostor_id,
                    gateway_stack.GATEWAY_ID,
                )
            with pytest.raises(GatewayIdentityMismatch):
                await wary.list_tools(gateway_stack.SERVER)
            assert wary.exchanges == 0  # no token was even asked for
        assert running.tool_calls() == []

        folder = await running.agent("toolbot")
        client = ToolClient(
            StaticSvids([_svid_of(folder)]),
            authority=running.served.address,
            authority_bundle=running.bundle_path.read_bytes(),
            gateways={
                gateway_stack.SERVER: Gateway(
                    running.url, gateway_stack.AUDIENCE, gateway_stack.GATEWAY_ID
                )
            },
        )
        async with client as tools:
            listed = {t.name for t in await tools.list_tools(gateway_stack.SERVER)}
            assert "echo" in listed
            assert "delete_invoice" not in listed  # the policy forbids it: the gateway hides it

            result = await tools.call_tool(
                gateway_stack.SERVER, "echo", {"text": "hi"}, purpose=PURPOSE
            )
            assert describe(result) == "hi"
            await tools.call_tool(gateway_stack.SERVER, "echo", {"text": "hi"}, purpose=PURPOSE)
            assert tools.exchanges == 1
            await tools.call_tool(gateway_stack.SERVER, "echo", {"text": "ho"}, purpose=PURPOSE)
            assert tools.exchanges == 2
            assert [c["arguments"]["text"] for c in running.tool_calls()] == ["hi", "hi", "ho"]

            with pytest.raises(AuthorityRefused) as denied:
                await tools.call_tool(
                    gateway_stack.SERVER, "delete_invoice", {"invoice": "i"}, purpose=PURPOSE
                )
            assert denied.value.policy_reasons == ("never-delete",)

            # The gateway's refusal, typed: the task's tokens revoked behind the library's back.
            running.served.cli("revoke", "--task", tools.task_id, "--reason", "test")
            with pytest.raises(GatewayRefused) as gone:
                await _until_refused(tools)
            assert (gone.value.status, gone.value.error, gone.value.reason) == (
                401,
                "invalid_token",
                "TOKEN_REVOKED",
            )

        # The gateway audits the calls it sees (batched): once the right client's are in, none
        # is the wary agent's, whose calls never reached it.
        def audited() -> list[dict[str, Any]]:
            out = running.served.cli("audit", "export").stdout
            return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

        await wait_for(
            lambda: any(r.get("kind") == "tool.call" for r in audited()), "the gateway's audit"
        )
        records = audited()
        assert not [r for r in records if r.get("actor") == wary_agent]
        assert wary_agent not in running.log()
        assert "not for you" not in json.dumps([*records, *running.calls()])


async def test_the_example_agent_calls_a_tool_through_the_gateway(tmp_path: Path) -> None:
    with gateway_stack.stack(tmp_path / "stack") as running:
        folder = await running.agent("example")
        command = [
            sys.executable,
            str(gateway_stack.REPO / "examples" / "mcp_agent.py"),
            "--authority",
            running.served.address,
            "--svid-dir",
            str(folder),
            "--tool",
            "echo",
            "--arguments",
            '{"text": "from the example"}',
            "--purpose",
            "show the example",
            "--prompt",
            "a prompt that stays here",
        ]
        env = {
            **os.environ,
            "AUTHORITY_BUNDLE": str(running.bundle_path),
            "MCP_GATEWAY_URL": running.url,
            "MCP_GATEWAY_SPIFFE_ID": gateway_stack.GATEWAY_ID,
            "MCP_SERVER": gateway_stack.SERVER,
        }

        def run(**changes: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                command,
                env={**env, **changes},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        impostor = f"{gateway_stack.TD}/gateway-impostor"
        refused = await asyncio.to_thread(run, MCP_GATEWAY_SPIFFE_ID=impostor)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert f"presented {gateway_stack.GATEWAY_ID}, not {impostor}" in refused.stderr
        assert running.tool_calls() == []

        done = await asyncio.to_thread(run)
        assert done.returncode == 0, done.stderr
        assert "tools: " in done.stdout
        assert "echo" in done.stdout.split("\n")[0]
        assert "result: from the example" in done.stdout
        assert "eyJ" not in done.stdout + done.stderr  # no token, ever
        assert "stays here" not in done.stdout + done.stderr
        assert running.tool_calls()[-1]["arguments"] == {"text": "from the example"}
