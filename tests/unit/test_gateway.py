"""The gateway's pieces with no network: its configuration, the audit batcher, and the ASGI
application driven directly (the verified client certificate in the scope, as ``httpserve``
puts it), with a real ``TaskTokenVerifier`` on the test's own key, an in-memory revocation
view and authority, and the upstream an in-memory HTTP transport.

The refusals that need a misbehaving authority (a stale revocation feed, an audit backlog the
authority does not drain, ListCallableTools failing) are tested here; the attacks on a real
gateway are in ``tests/integration/test_gateway_attacks.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from authority import toolcall
from authority._pb import authority_v1_authority_pb2 as pb
from authority.errors import AuthorityError
from authority.gateway.app import CallableTools, GatewayApp, TokenCheck
from authority.gateway.audit import AuditBacklogFull, AuditBatcher
from authority.gateway.config import GatewayConfig, GatewayConfigError, Upstream, load, parse
from authority.gateway.upstream import UpstreamError
from authority.ids import TrustDomain
from authority.relying import StaticKeys, TaskTokenVerifier
from authority.tokens import Intent, mint, x5t_s256
from tests.helpers import authority_command
from tests.unit._pki import der, ec_key, make_ca, make_leaf

TD = "example.org"
AUDIENCE = "mcp-gateway"
CALLER = f"spiffe://{TD}/agent/a"
CREDENTIAL = "Bearer upstream-secret-" + secrets.token_hex(8)

# --- configuration -------------------------------------------------------------------------------


def _doc(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("roots")
    doc: dict[str, Any] = {
        "listen": "127.0.0.1:8443",
        "audience": AUDIENCE,
        "trust_domain": TD,
        "authority": ["127.0.0.1:8081"],
        "trust_bundle": str(bundle),
        "workload_api_socket": "/run/agent.sock",
        "servers": [{"name": "billing", "url": "http://127.0.0.1:9000/mcp"}],
    }
    doc.update(overrides)
    return doc


def test_a_good_configuration(tmp_path: Path) -> None:
    secret = tmp_path / "credential"
    secret.write_text(CREDENTIAL + "\n")
    config = parse(
        _doc(
            tmp_path,
            servers=[
                {
                    "name": "billing",
                    "url": "http://127.0.0.1:9000/mcp",
                    "credential_file": str(secret),
                },
                {"name": "deploy", "url": "https://d.example/mcp", "credential_env": "DEPLOY"},
            ],
            methods=["resources/list"],
        ),
        base=tmp_path,
        env={"DEPLOY": "Bearer d"},
    )
    assert config.servers["billing"].credential == CREDENTIAL
    assert config.servers["deploy"].credential_header == "Authorization"
    assert {"resources/list", "tools/call"} <= config.methods
    assert config.public_url == "https://127.0.0.1:8443"
    assert CREDENTIAL not in repr(config)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"listen": None}, "listen"),
        ({"listen": "nowhere"}, "listen"),
        ({"audience": "two words"}, "audience"),
        ({"trust_domain": "Not A Domain"}, "trust_domain"),
        ({"authority": []}, "authority"),
        ({"trust_bundle": "/no/such/file"}, "trust_bundle"),
        ({"servers": []}, "servers"),
        ({"servers": [{"name": "Billing", "url": "http://x/mcp"}]}, "servers[0].name"),
        ({"servers": [{"name": "b", "url": "ftp://x/mcp"}]}, "servers[0].url"),
        ({"servers": [{"name": "b", "url": "http://u:p@x/mcp"}]}, "servers[0].url"),
        ({"servers": [{"name": "b", "url": "http://x", "credential_env": "NOPE"}]},
         "servers[0].credential_env"),
        ({"servers": [{"name": "b", "url": "http://x", "credential_header": "Host"}]},
         "servers[0].credential_header"),
        ({"servers": [{"name": "b", "url": "http://x", "colour": "red"}]}, "servers[0].colour"),
        ({"servers": [{"name": "b", "url": "http://x"}, {"name": "b", "url": "http://y"}]},
         "servers[1].name"),
        ({"methods": "tools/call"}, "methods"),
        ({"max_body_bytes": 1}, "max_body_bytes"),
        ({"public_url": "http://gw"}, "public_url"),
        ({"spiffe_id": "spiffe://other.org/gateway"}, "spiffe_id"),
        ({"spiffe_id": 7}, "spiffe_id"),
        ({"colour": "red"}, "colour"),
    ],
)  # fmt: skip
def test_a_bad_configuration_names_its_key(
    tmp_path: Path, overrides: dict[str, Any], key: str
) -> None:
    doc = {k: v for k, v in _doc(tmp_path, **overrides).items() if v is not None}
    with pytest.raises(GatewayConfigError) as caught:
        parse(doc, base=tmp_path, env={})
    assert caught.value.message.startswith(f"{key}: "), caught.value.message


def test_the_command_refuses_a_bad_file_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('listen = "127.0.0.1:1"\naudience = "a"\n')
    result = subprocess.run(
        [*authority_command(), "gateway", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "error: trust_domain: is required"
    with pytest.raises(GatewayConfigError, match="cannot read"):
        load(tmp_path / "absent.toml", {})


# --- the audit batcher ---------------------------------------------------------------------------


def _record(n: int = 0) -> pb.ToolCallRecord:
    return pb.ToolCallRecord(server="billing", tool="echo", decision="refused", request_id=str(n))


class _RpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), code.name, None)


@dataclass
class FakeAuthority:
    """The authority's gateway RPCs, in memory."""

    callable: set[str] = field(default_factory=lambda: {"echo", "refund"})
    failing: grpc.StatusCode | None = None
    batches: list[list[str]] = field(default_factory=list)
    asked: int = 0

    async def list_callable_tools(
        self, caller_svid: bytes, server: str, audience: str, tools: Sequence[str]
    ) -> list[str]:
        self.asked += 1
        if self.failing is not None:
            raise _RpcError(self.failing)
        return [t for t in tools if t in self.callable]

    async def record_tool_calls(self, records: Sequence[pb.ToolCallRecord]) -> int:
        if self.failing is not None:
            raise _RpcError(self.failing)
        if any(r.request_id == "bad" for r in records):
            raise _RpcError(grpc.StatusCode.INVALID_ARGUMENT)
        self.batches.append([r.request_id for r in records])
        return len(records)


async def test_the_batcher_sends_in_batches_and_refuses_past_its_backlog() -> None:
    authority = FakeAuthority()
    batcher = AuditBatcher(authority.record_tool_calls, backlog=3, batch=2, flush_interval=0.01)
    batcher.start()
    for _ in range(3):
        batcher.reserve()
    with pytest.raises(AuditBacklogFull):
        batcher.reserve()
    for n in range(3):
        batcher.submit(_record(n))
    await batcher.flushed()
    assert sorted(r for b in authority.batches for r in b) == ["0", "1", "2"]
    assert all(len(b) <= 2 for b in authority.batches)
    batcher.reserve()  # room again
    await batcher.close()


async def test_records_wait_while_the_authority_is_unavailable_and_a_bad_one_is_dropped() -> None:
    authority = FakeAuthority(failing=grpc.StatusCode.UNAVAILABLE)
    batcher = AuditBatcher(authority.record_tool_calls, backlog=2, batch=10, flush_interval=0.01)
    batcher.start()
    batcher.reserve()
    batcher.submit(_record(1))
    batcher.reserve()
    batcher.submit(pb.ToolCallRecord(server="billing", decision="refused", request_id="bad"))
    with pytest.raises(AuditBacklogFull):  # nothing leaves while the authority is away
        batcher.reserve()
    authority.failing = None
    await batcher.flushed()
    assert [r for b in authority.batches for r in b] == ["1"]
    assert batcher.dropped == 1
    await batcher.close()


# --- the application -----------------------------------------------------------------------------


@dataclass
class Revocations:
    revoked: set[str] = field(default_factory=set)
    is_fresh: bool = True

    def is_revoked(
        self,
        jti: str,
        task_id: str,
        subject: str,
        holder: str,
        *,
        actors: Iterable[str] = (),
        key_id: str = "",
    ) -> bool:
        return bool(self.revoked & {jti, task_id, subject, holder, *actors})

    def fresh(self) -> bool:
        return self.is_fresh


@dataclass
class _Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    data: bytes
    closed: bool = False

    endless: bool = False  # a GET stream: an event, then keep-alives until closed
    relaying: asyncio.Event = field(default_factory=asyncio.Event)

    async def body(self) -> AsyncIterator[bytes]:
        self.relaying.set()
        yield self.data
        while self.endless:
            await asyncio.sleep(0.01)
            yield b": keep-alive\n\n"

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class MemoryUpstream:
    """The MCP server, in memory (an ``UpstreamClient``): answers tools/call with JSON and
    tools/list with SSE."""

    seen: list[tuple[str, list[tuple[bytes, bytes]], bytes]] = field(default_factory=list)
    mode: str = "ok"  # "down": no connection; "refusing": 401 to the gateway's credential
    streams: list[_Answer] = field(default_factory=list)
    opened: asyncio.Event = field(default_factory=asyncio.Event)  # a GET stream was opened

    async def open(
        self, method: str, url: str, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> _Answer:
        if self.mode == "down":
            raise UpstreamError("ConnectError")
        self.seen.append((method, list(headers), body))
        if method == "GET":
            self.streams.append(
                _Answer(200, [(b"content-type", b"text/event-stream")], b": open\n\n", endless=True)
            )
            self.opened.set()
            return self.streams[-1]
        if self.mode == "refusing":
            return _Answer(401, [(b"www-authenticate", b'Bearer realm="upstream"')], b"")
        message = json.loads(body)
        if "method" not in message:  # the client's answer to a request of the server
            return _Answer(202, [], b"")
        if message["method"] == "tools/list":
            tools = [{"name": n} for n in ("echo", "refund", "delete_invoice")]
            result = {"tools": tools, "ttlMs": 60_000, "cacheScope": "public"}
            event = {"jsonrpc": "2.0", "id": message["id"], "result": result}
            data = b"event: message\ndata: " + json.dumps(event).encode() + b"\n\n"
            return _Answer(200, [(b"content-type", b"text/event-stream")], data)
        result = {"jsonrpc": "2.0", "id": message["id"], "result": {"content": []}}
        return _Answer(
            200,
            [(b"content-type", b"application/json"), (b"set-cookie", b"s=1")],
            json.dumps(result).encode(),
        )

    async def aclose(self) -> None:
        pass


@dataclass
class Rig:
    app: GatewayApp
    upstream: MemoryUpstream
    revocations: Revocations
    authority: FakeAuthority
    key: ec.EllipticCurvePrivateKey
    cert_der: bytes
    clock: list[float]  # the tools/list cache's monotonic clock

    def token(
        self, tool: str, arguments: dict[str, Any], *, server: str = "billing", ttl: int = 300
    ) -> str:
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        call = toolcall.ToolCall(server, tool, arguments)
        return mint(
            key=self.key,
            key_id="kid-1",
            algorithm="ES256",
            issuer=f"spiffe://{TD}",
            subject=CALLER,
            audience=AUDIENCE,
            now=now,
            expires_at=now + dt.timedelta(seconds=ttl),
            jti=secrets.token_urlsafe(12),
            task_id="task-1",
            intent=Intent("tools.call", call.resource, "test", "", call.parameters()),
            cnf_x5t=x5t_s256(self.cert_der),
            actors=(),
            decision_id="dec-1",
            may_delegate=0,
        ).token

    async def post(
        self,
        message: Any,
        token: str | None = None,
        *,
        cert: bool = True,
        method: str = "POST",
        path: str = "/mcp/billing",
    ) -> tuple[int, dict[str, str], bytes]:
        headers = [(b"content-type", b"application/json")]
        if token is not None:
            headers.append((b"authorization", f"Bearer {token}".encode()))
        scope: dict[str, Any] = {
            "type": "http",
            "method": method,
            "path": path,
            "headers": headers,
            "extensions": {"tls": {"client_cert_der": self.cert_der if cert else None}},
        }
        body = json.dumps(message).encode()
        sent: list[dict[str, Any]] = []
        events = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if events:
                return events.pop(0)
            await asyncio.Event().wait()  # the client stays connected
            raise AssertionError("unreachable")

        async def send(event: Any) -> None:
            sent.append(dict(event))

        await self.app(scope, receive, send)
        start = sent[0]
        out = {k.decode(): v.decode() for k, v in start["headers"]}
        return start["status"], out, b"".join(e.get("body", b"") for e in sent[1:])


def _call(tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments},
    }


@pytest.fixture
async def rig(tmp_path: Path) -> Any:
    ca = make_ca()
    cert_der = der(make_leaf(ca, ec_key().public_key(), uris=[CALLER]))
    key = ec.generate_private_key(ec.SECP256R1())
    revocations = Revocations()
    authority = FakeAuthority()
    verifier = TaskTokenVerifier(
        issuer=TrustDomain.parse(TD),
        audience=AUDIENCE,
        keys=StaticKeys({"kid-1": key.public_key()}),
        revocations=revocations,
    )
    config = GatewayConfig(
        listen="127.0.0.1:8443",
        audience=AUDIENCE,
        trust_domain=TrustDomain.parse(TD),
        authority=("127.0.0.1:1",),
        trust_bundle=tmp_path,
        workload_api_socket="/nowhere",
        servers={"billing": Upstream("billing", "http://upstream/mcp", credential=CREDENTIAL)},
        public_url="https://gw.example",
    )
    upstream = MemoryUpstream()
    clock = [0.0]
    audit = AuditBatcher(authority.record_tool_calls, backlog=2, flush_interval=0.01)
    app = GatewayApp(
        config,
        TokenCheck(verifier, revocations),
        CallableTools(authority, AUDIENCE, ttl=10, monotonic=lambda: clock[0]),
        audit,
        upstream,
    )
    audit.start()
    yield Rig(app, upstream, revocations, authority, key, cert_der, clock)
    await audit.close(timeout=0.1)


async def test_an_exact_token_is_forwarded_with_the_credential_not_the_token(rig: Rig) -> None:
    token = rig.token("echo", {"text": "hi"})
    status, headers, _ = await rig.post(_call("echo", {"text": "hi"}), token)
    assert status == 200
    ((_, headers_up, _),) = rig.upstream.seen
    assert [v for k, v in headers_up if k.lower() == b"authorization"] == [CREDENTIAL.encode()]
    assert token.encode() not in b"".join(k + v for k, v in headers_up)
    assert "set-cookie" not in headers  # only the safe response headers come back
    assert rig.app.tokens.hits == 0
    status, _, _ = await rig.post(_call("echo", {"text": "hi"}), token)
    assert status == 200
    assert rig.app.tokens.hits == 1  # verified once, then cached


async def test_a_cached_token_is_refused_once_revoked_or_when_the_feed_is_stale(rig: Rig) -> None:
    token = rig.token("echo", {"text": "hi"})
    assert (await rig.post(_call("echo", {"text": "hi"}), token))[0] == 200
    rig.revocations.is_fresh = False
    status, headers, body = await rig.post(_call("echo", {"text": "hi"}), token)
    assert status == 503
    assert headers["retry-after"] == "1"
    assert json.loads(body)["error"]["data"]["reason"] == "REVOCATION_FEED_STALE"
    rig.revocations.is_fresh = True
    await rig.app.audit.flushed()  # the backlog holds two records
    rig.revocations.revoked.add("task-1")
    status, headers, body = await rig.post(_call("echo", {"text": "hi"}), token)
    assert status == 401
    assert 'error="invalid_token"' in headers["www-authenticate"]
    assert json.loads(body)["error"]["data"]["reason"] == "TOKEN_REVOKED"
    assert len(rig.upstream.seen) == 1


async def test_a_full_audit_backlog_refuses_calls_before_they_are_forwarded(rig: Rig) -> None:
    rig.authority.failing = grpc.StatusCode.UNAVAILABLE  # records pile up: nothing flushes
    token = rig.token("echo", {"text": "hi"})
    for _ in range(2):
        assert (await rig.post(_call("echo", {"text": "hi"}), token))[0] == 200
    status, _, body = await rig.post(_call("echo", {"text": "hi"}), token)
    assert status == 503
    assert json.loads(body)["error"]["data"]["reason"] == "AUDIT_BACKLOG_FULL"
    assert len(rig.upstream.seen) == 2


async def test_a_malformed_call_is_400_and_never_forwarded(rig: Rig) -> None:
    token = rig.token("echo", {"text": "hi"})
    for message in (
        _call("bad/name", {}),
        _call("echo", {"n": 2**60}),
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"arguments": {}}},
        _call("echo", ["not", "an", "object"]),  # type: ignore[arg-type]
    ):
        status, _, body = await rig.post(message, token)
        assert status == 400, body
    assert rig.upstream.seen == []


async def test_tools_list_keeps_only_callable_tools_and_fails_closed(rig: Rig) -> None:
    listing = {"jsonrpc": "2.0", "id": 5, "method": "tools/list", "params": {}}
    status, headers, body = await rig.post(listing)
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    data = json.loads(body.split(b"data: ", 1)[1])
    assert [t["name"] for t in data["result"]["tools"]] == ["echo", "refund"]
    assert data["result"]["cacheScope"] == "private"  # this caller's list, for no one else
    assert data["result"]["ttlMs"] == 10_000  # the gateway's own cache bounds the client's
    assert int(headers["content-length"]) == len(body)
    await rig.post(listing)
    assert rig.authority.asked == 1  # cached per (caller, server, tool names)
    rig.clock[0] += 11  # past the cache's 10 s: asked again
    rig.authority.failing = grpc.StatusCode.UNAVAILABLE
    status, _, body = await rig.post(listing)
    assert status == 503
    assert json.loads(body)["error"]["data"]["reason"] == "TOOLS_LIST_UNAVAILABLE"


def test_refusals_are_authority_errors() -> None:
    assert issubclass(AuditBacklogFull, AuthorityError)


async def test_unknown_servers_other_verbs_and_a_failing_upstream(rig: Rig) -> None:
    token = rig.token("echo", {"text": "hi"})
    assert (await rig.post(_call("echo", {"text": "hi"}), token, path="/mcp/other"))[0] == 404
    assert (await rig.post(_call("echo", {"text": "hi"}), token, method="PUT"))[0] == 405
    rig.upstream.mode = "down"
    status, _, body = await rig.post(_call("echo", {"text": "hi"}), token)
    assert status == 502
    assert json.loads(body)["error"]["data"]["reason"] == "UPSTREAM_UNREACHABLE"
    rig.upstream.mode = "refusing"
    status, headers, body = await rig.post(_call("echo", {"text": "hi"}), token)
    assert status == 502
    assert "www-authenticate" not in headers  # the upstream's challenge is not the agent's
    error = json.loads(body)["error"]
    assert error["data"]["reason"] == "UPSTREAM_REFUSED_GATEWAY"
    assert json.loads(body)["id"] == 1  # refusals answer the request's JSON-RPC id
    await rig.app.audit.flushed()
    outcomes = [r for b in rig.authority.batches for r in b]
    assert len(outcomes) == 2  # both forwarded calls were recorded


async def test_a_response_from_the_client_passes_without_a_token(rig: Rig) -> None:
    answer = {"jsonrpc": "2.0", "id": 9, "result": {"action": "accept"}}
    status, _, _ = await rig.post(answer)
    assert status == 202
    assert len(rig.upstream.seen) == 1
    status, _, _ = await rig.post(answer, cert=False)
    assert status == 401


async def test_a_revoked_caller_is_refused_and_its_open_stream_cut(rig: Rig) -> None:
    opened = asyncio.create_task(rig.post(None, method="GET"))
    await asyncio.wait_for(rig.upstream.opened.wait(), 5)
    await asyncio.wait_for(rig.upstream.streams[0].relaying.wait(), 5)
    rig.revocations.revoked.add(CALLER)
    rig.app.revocations_changed()  # what the watcher calls on the event
    status, _, _ = await asyncio.wait_for(opened, 5)
    assert status == 200  # it had begun; now it has ended
    assert rig.upstream.streams[0].closed  # and the upstream's stream is closed
    assert rig.app.cuts == 1
    listing = {"jsonrpc": "2.0", "id": 5, "method": "tools/list", "params": {}}
    status, headers, body = await rig.post(listing)
    assert status == 401
    assert 'error="invalid_token"' in headers["www-authenticate"]
    assert json.loads(body)["error"]["data"]["reason"] == "CALLER_REVOKED"
    assert len(rig.upstream.seen) == 1  # the GET only
