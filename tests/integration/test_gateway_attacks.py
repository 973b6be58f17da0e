"""Attacks on ``authority gateway``, one test each, against real processes: ``authority serve``,
the gateway (its SVID from the authority's Workload API) and an MCP server built with the
official SDK. Each refusal is checked for its HTTP status, its ``WWW-Authenticate`` challenge,
its JSON-RPC error, and for the MCP server never having received the call.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from authority import toolcall
from authority._pb import authority_v1_authority_pb2 as pb
from authority.client import WorkloadClient
from tests.gateway_stack import AUDIENCE, SERVER, PerCallToken, Stack, stack
from tests.helpers import wait_until

PROTOCOL = "2026-07-28"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("gateway")) as running:
        yield running


def _message(tool: str, arguments: dict[str, Any], request_id: int = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {
            "name": tool,
            "arguments": arguments,
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": PROTOCOL,
                "io.modelcontextprotocol/clientInfo": {"name": "attacker", "version": "1"},
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        },
    }


def _list_message(request_id: int = 2) -> dict[str, Any]:
    message = _message("", {}, request_id)
    message["method"] = "tools/list"
    message["params"] = {"_meta": message["params"]["_meta"]}
    return message


def _headers(
    token: str | None = None, method: str = "tools/call", name: str = "", **extra: str
) -> dict[str, str]:
    headers = {
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "mcp-protocol-version": PROTOCOL,
        "mcp-method": method,
        **({"mcp-name": name} if name else {}),
        **extra,
    }
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return headers


async def _call(
    http: httpx2.AsyncClient,
    gw: Stack,
    tool: str,
    arguments: dict[str, Any],
    token: str | None = None,
) -> httpx2.Response:
    return await http.post(
        gw.url, json=_message(tool, arguments), headers=_headers(token, name=tool)
    )


def _unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


def _never_called(gw: Stack, arguments: dict[str, Any]) -> None:
    assert all(c["arguments"] != arguments for c in gw.tool_calls()), "the upstream got the call"


def _challenge(response: httpx2.Response) -> dict[str, str]:
    value = response.headers["www-authenticate"]
    scheme, _, rest = value.partition(" ")
    assert scheme == "Bearer"
    params: dict[str, str] = {}
    for part in rest.split('", '):
        key, _, quoted = part.partition("=")
        params[key.strip()] = quoted.strip().strip('"')
    return params


def _refused_401(gw: Stack, response: httpx2.Response, reason: str) -> None:
    assert response.status_code == 401, response.text
    challenge = _challenge(response)
    assert challenge["error"] == "invalid_token"
    assert challenge["resource_metadata"] == (
        f"{gw.base}/.well-known/oauth-protected-resource/mcp/{SERVER}"
    )
    error = response.json()["error"]
    assert error["data"]["reason"] == reason, error


def _refused_403(response: httpx2.Response, reason: str, tool: str, args: dict[str, Any]) -> None:
    assert response.status_code == 403, response.text
    challenge = _challenge(response)
    assert challenge["error"] == "insufficient_scope"
    assert challenge["audience"] == AUDIENCE
    assert challenge["action"] == toolcall.ACTION
    assert challenge["tool_resource"] == toolcall.resource(SERVER, tool)
    assert challenge["arguments_sha256"] == toolcall.arguments_digest(args)
    error = response.json()["error"]
    assert error["data"]["reason"] == reason
    assert error["data"]["required"]["resource"] == toolcall.resource(SERVER, tool)


async def test_an_exact_token_passes_and_the_upstream_gets_the_call(gw: Stack) -> None:
    """The control for every refusal below: the same request with the right token passes."""
    folder = await gw.agent("control")
    args = {"text": _unique("control")}
    token = await gw.token(folder, "echo", args)
    async with gw.http(folder) as http:
        response = await _call(http, gw, "echo", args, token)
    assert response.status_code == 200, response.text
    assert response.json()["result"]["structuredContent"] == {"result": args["text"]}
    assert {"tool": "echo", "arguments": args} in gw.tool_calls()


async def test_the_sdk_client_lists_only_callable_tools_and_calls_through(gw: Stack) -> None:
    folder = await gw.agent("sdk")
    auth = PerCallToken(gw, folder)
    text = _unique("sdk")
    async with (
        gw.http(folder, auth=auth) as http,
        Client(streamable_http_client(gw.url, http_client=http)) as client,
    ):
        listed = await client.list_tools()
        result = await client.call_tool("echo", {"text": text})
    names = {t.name for t in listed.tools}
    assert names == {"echo", "refund", "deploy", "get_invoice", "stream_report"}  # no delete_*
    assert result.structured_content == {"result": text}
    assert auth.minted == 1


async def test_a_token_collected_with_an_approval_admits_one_call(gw: Stack) -> None:
    """An operator approved one call with these arguments: the token collected with that
    approval (its ``apr`` claim) passes once; replayed within its life, it is refused."""
    folder = await gw.agent("approved")
    args = {"service": _unique("web"), "environment": "production"}
    request = pb.ExchangeRequest(
        intent=pb.Intent(purpose="ship fix 42"),
        audience=AUDIENCE,
        ttl_seconds=300,
        tool_call=pb.ToolCall(server=SERVER, tool="deploy", arguments_json=json.dumps(args)),
    )
    async with WorkloadClient.from_svid_dir(gw.served.address, folder, gw.bundle_path) as client:
        pending = await client.exchange(request)
        assert pending.WhichOneof("result") == "pending"
        gw.served.cli("approve", pending.pending.id, "--for", "10m", "--note", "one deploy")
        request.approval_id = pending.pending.id
        reply = await client.exchange(request)
    assert reply.WhichOneof("result") == "token"
    async with gw.http(folder) as http:
        first = await _call(http, gw, "deploy", args, reply.token.token)
        again = await _call(http, gw, "deploy", args, reply.token.token)
    assert first.status_code == 200, first.text
    _refused_401(gw, again, "APPROVAL_SPENT")
    assert [c for c in gw.tool_calls() if c["arguments"] == args] == [
        {"tool": "deploy", "arguments": args}
    ]


async def test_no_client_certificate_is_401(gw: Stack) -> None:
    folder = await gw.agent("nocert")
    args = {"text": _unique("nocert")}
    token = await gw.token(folder, "echo", args)
    async with gw.http(None) as http:  # TLS, but no certificate
        response = await _call(http, gw, "echo", args, token)
        listing = await http.post(
            gw.url,
            json=_list_message(),
            headers=_headers(method="tools/list"),
        )
        stream = await http.get(gw.url, headers=_headers())
    _refused_401(gw, response, "CLIENT_CERTIFICATE_REQUIRED")
    for other in (listing, stream):
        _refused_401(gw, other, "CLIENT_CERTIFICATE_REQUIRED")
    _never_called(gw, args)


async def test_no_token_is_401(gw: Stack) -> None:
    folder = await gw.agent("notoken")
    args = {"text": _unique("notoken")}
    async with gw.http(folder) as http:
        response = await _call(http, gw, "echo", args)
    _refused_401(gw, response, "TOKEN_MISSING")
    _never_called(gw, args)


async def test_a_token_for_another_tool_is_403(gw: Stack) -> None:
    folder = await gw.agent("othertool")
    args = {"invoice": _unique("inv")}
    token = await gw.token(folder, "get_invoice", args)
    async with gw.http(folder) as http:
        response = await _call(http, gw, "refund", args, token)
    _refused_403(response, "TOKEN_RESOURCE", "refund", args)
    _never_called(gw, args)


async def test_a_token_for_another_server_is_403(gw: Stack) -> None:
    folder = await gw.agent("otherserver")
    args = {"text": _unique("otherserver")}
    token = await gw.token(folder, "echo", args, server="billing")
    async with gw.http(folder) as http:
        response = await _call(http, gw, "echo", args, token)
    _refused_403(response, "TOKEN_RESOURCE", "echo", args)
    _never_called(gw, args)


async def test_a_token_for_other_arguments_is_403(gw: Stack) -> None:
    folder = await gw.agent("otherargs")
    invoice = _unique("inv")
    token = await gw.token(folder, "refund", {"invoice": invoice, "amount": 10})
    args = {"invoice": invoice, "amount": 10000}
    async with gw.http(folder) as http:
        response = await _call(http, gw, "refund", args, token)
    _refused_403(response, "TOKEN_ARGUMENTS", "refund", args)
    _never_called(gw, args)


async def test_a_token_over_another_clients_connection_is_401(gw: Stack) -> None:
    alice, mallory = await gw.agent("alice"), await gw.agent("mallory")
    args = {"text": _unique("stolen")}
    token = await gw.token(alice, "echo", args)
    async with gw.http(mallory) as http:
        response = await _call(http, gw, "echo", args, token)
    _refused_401(gw, response, "TOKEN_CNF_MISMATCH")
    _never_called(gw, args)


async def test_an_expired_token_is_401(gw: Stack) -> None:
    folder = await gw.agent("expired")
    args = {"text": _unique("expired")}
    issued = await gw.exchange(folder, "echo", args, ttl=2)
    leeway = 5  # authority.tokens.DEFAULT_LEEWAY
    await asyncio.to_thread(
        wait_until, lambda: time.time() > issued.expires_at + leeway + 0.5, "the token's expiry"
    )
    async with gw.http(folder) as http:
        response = await _call(http, gw, "echo", args, issued.token)
    _refused_401(gw, response, "TOKEN_EXPIRED")
    _never_called(gw, args)


async def test_a_revoked_token_is_refused_within_a_second(gw: Stack) -> None:
    folder = await gw.agent("revoked")
    args = {"text": _unique("revoked")}
    issued = await gw.exchange(folder, "echo", args)
    async with gw.http(folder) as http:
        first = await _call(http, gw, "echo", args, issued.token)
        assert first.status_code == 200  # and now cached: revocation must still apply
        await asyncio.to_thread(
            gw.served.cli, "revoke", "--jti", issued.jti, "--reason", "attack test"
        )
        revoked_at = time.monotonic()
        while True:
            response = await _call(http, gw, "echo", args, issued.token)
            if response.status_code != 200:
                break
            assert time.monotonic() - revoked_at < 1.0, "still admitted a second after revoke"
            await asyncio.sleep(0.02)
    _refused_401(gw, response, "TOKEN_REVOKED")
    admitted = [c for c in gw.tool_calls() if c["arguments"] == args]
    assert 1 <= len(admitted) <= 1 + int((time.monotonic() - revoked_at) / 0.02) + 1


async def test_a_revocation_cuts_a_streaming_call(gw: Stack) -> None:
    folder = await gw.agent("streamer")
    args = {"steps": 40}  # 20 s of progress, unless cut
    issued = await gw.exchange(folder, "stream_report", args)
    message = _message("stream_report", args, request_id=7)
    message["params"]["_meta"]["progressToken"] = "p7"
    events: list[dict[str, Any]] = []
    async with (
        gw.http(folder) as http,
        http.stream(
            "POST", gw.url, json=message, headers=_headers(issued.token, name="stream_report")
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        started = time.monotonic()
        revoked_at = 0.0
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            events.append(json.loads(line[5:]))
            if len(events) == 1:  # one progress event relayed as it came: revoke the task
                await asyncio.to_thread(
                    gw.served.cli, "revoke", "--task", issued.task_id, "--reason", "attack"
                )
                revoked_at = time.monotonic()
    ended = time.monotonic()
    assert events[0]["method"] == "notifications/progress"
    assert events[-1]["error"]["data"]["reason"] == "TOKEN_REVOKED"
    assert events[-1]["id"] == 7
    assert not any("result" in e for e in events)
    assert ended - revoked_at < 1.5, "the stream outlived its revocation"
    assert ended - started < 10
    # The upstream's request was closed: its tool was cancelled, never finished.
    await asyncio.to_thread(
        wait_until,
        lambda: {"cancelled": "stream_report"} in gw.calls(),
        "the upstream to see the cancellation",
        5,
    )
    assert {"finished": "stream_report"} not in gw.calls()


async def test_a_token_for_another_audience_is_401(gw: Stack) -> None:
    folder = await gw.agent("audience")
    args = {"text": _unique("audience")}
    token = await gw.token(folder, "echo", args, audience="some-other-service")
    async with gw.http(folder) as http:
        response = await _call(http, gw, "echo", args, token)
    _refused_401(gw, response, "TOKEN_AUDIENCE")
    _never_called(gw, args)


async def test_a_jwt_svid_is_not_a_task_token(gw: Stack) -> None:
    folder = await gw.agent("jwtsvid")
    args = {"text": _unique("jwtsvid")}
    async with WorkloadClient.from_svid_dir(gw.served.address, folder, gw.bundle_path) as client:
        jwt_svid = (await client.fetch_jwt([AUDIENCE])).token
    async with gw.http(folder) as http:
        response = await _call(http, gw, "echo", args, jwt_svid)
    assert response.status_code == 401
    assert response.json()["error"]["data"]["reason"] in ("TOKEN_TYPE", "TOKEN_UNKNOWN_KEY")
    _refused_401(gw, response, response.json()["error"]["data"]["reason"])
    _never_called(gw, args)


async def test_methods_batches_bodies_and_headers_that_are_refused(gw: Stack) -> None:
    folder = await gw.agent("shapes")
    args = {"text": _unique("shapes")}
    token = await gw.token(folder, "echo", args)
    async with gw.http(folder) as http:
        other_method = await http.post(
            gw.url,
            json={"jsonrpc": "2.0", "id": 3, "method": "resources/list", "params": {}},
            headers=_headers(method="resources/list"),
        )
        batch = await http.post(gw.url, json=[_message("echo", args)], headers=_headers(token))
        too_large = await http.post(
            gw.url, content=b" " * (1024 * 1024 + 1), headers=_headers(token)
        )
        duplicate = await http.post(
            gw.url,
            content=json.dumps(_message("echo", args))[:-1].encode() + b', "params": {}}',
            headers=_headers(token),
        )
        renamed = await http.post(
            gw.url, json=_message("echo", args), headers=_headers(token, name="deploy")
        )
    assert other_method.status_code == 403
    assert other_method.json()["error"]["code"] == -32601
    assert batch.status_code == 400
    assert batch.json()["error"]["data"]["reason"] == "BATCH_REFUSED"
    assert too_large.status_code == 413
    assert duplicate.status_code == 400
    assert duplicate.json()["error"]["data"]["reason"] == "PARSE_ERROR"
    assert renamed.status_code == 400
    assert renamed.json()["error"]["data"]["reason"] == "HEADER_MISMATCH"
    _never_called(gw, args)


async def test_the_protected_resource_metadata(gw: Stack) -> None:
    async with gw.http(None) as http:
        response = await http.get(f"{gw.base}/.well-known/oauth-protected-resource/mcp/{SERVER}")
        unknown = await http.get(f"{gw.base}/.well-known/oauth-protected-resource/mcp/nope")
    assert response.status_code == 200
    document = response.json()
    assert document["resource"] == gw.url
    assert document["bearer_methods_supported"] == ["header"]
    assert document["tls_client_certificate_bound_access_tokens"] is True
    assert document["authority_token_exchange"]["audience"] == AUDIENCE
    assert "authorization_servers" not in document  # tokens come from Exchange, not OAuth
    assert unknown.status_code == 404


async def test_the_upstream_credential_never_reaches_the_agent_the_log_or_the_audit(
    gw: Stack, tmp_path: Path
) -> None:
    folder = await gw.agent("credential")
    args = {"text": _unique("credential")}
    issued = await gw.exchange(folder, "echo", args)
    token = issued.token
    seen: list[str] = []
    async with gw.http(folder) as http:
        for response in (
            await _call(http, gw, "echo", args, token),
            await _call(http, gw, "echo", {"text": "refused"}, token),
            await http.post(
                gw.url,
                json=_list_message(9),
                headers=_headers(method="tools/list"),
            ),
            await http.get(gw.url, headers=_headers()),
            await http.delete(gw.url, headers=_headers()),
        ):
            seen.append(str(response.status_code) + repr(response.headers.multi_items()))
            seen.append(response.text)
    statuses = [int(text[:3]) for text in seen[::2]]
    assert statuses[:3] == [200, 403, 200]  # the call, a call with its token, the list
    # The records reach the authority's audit (batched): wait for this call's, then export.
    export = tmp_path / "audit.jsonl"

    def exported() -> bool:
        result = gw.served.cli("audit", "export", check=False)
        export.write_text(result.stdout + result.stderr)
        return args["text"] not in result.stdout and token_jti(result.stdout)

    def token_jti(text: str) -> bool:
        records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        return any(
            r.get("kind") == "tool.call" and r.get("details", {}).get("jti") == issued.jti
            for r in records
        )

    await asyncio.to_thread(wait_until, exported, "this call's tool.call record in the audit", 10)
    refused = "refused tools/call: reason=TOKEN_ARGUMENTS caller=spiffe://example.org/agent/"
    assert f"{refused}credential tool=mcp/{SERVER}/echo jti={issued.jti}" in gw.log()
    texts = [*seen, gw.log(), export.read_text(), gw.served.log()]
    for text in texts:
        assert gw.credential not in text
        assert token not in text


async def test_a_handshake_era_session_passes_initialize_its_get_stream_and_delete(
    gw: Stack,
) -> None:
    """mode="legacy": initialize (Mcp-Session-Id), the server-to-client GET stream, tools, and
    DELETE at the end, all through the gateway; the session id comes back to the client."""
    folder = await gw.agent("legacy")
    auth = PerCallToken(gw, folder)
    text = _unique("legacy")
    steps: list[float] = []
    exchanges: list[tuple[str, int, bool]] = []  # method, status, session id sent back

    async def seen(response: httpx2.Response) -> None:
        exchanges.append(
            (response.request.method, response.status_code, "mcp-session-id" in response.headers)
        )

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        steps.append(progress)

    async with (
        gw.http(folder, auth=auth, event_hooks={"response": [seen]}) as http,
        Client(streamable_http_client(gw.url, http_client=http), mode="legacy") as client,
    ):
        assert client.protocol_version != PROTOCOL
        names = {t.name for t in (await client.list_tools()).tools}
        echoed = await client.call_tool("echo", {"text": text})
        report = await client.call_tool(
            "stream_report", {"steps": 2}, progress_callback=on_progress
        )
    assert "delete_invoice" not in names
    assert echoed.structured_content == {"result": text}
    assert report.structured_content == {"result": "report of 2 steps"}
    assert steps == [1.0, 2.0]
    assert auth.minted == 2
    assert exchanges[0] == ("POST", 200, True)  # initialize: the session id comes back
    assert ("GET", 200, False) in exchanges or ("GET", 200, True) in exchanges
    assert exchanges[-1][:2] == ("DELETE", 200)


async def test_another_agents_session_id_is_404(gw: Stack) -> None:
    """A session belongs to the SPIFFE ID that opened it: another agent naming its id (to read
    its server-to-client stream, or act within it) is answered 404 and nothing is forwarded."""
    owner, intruder = await gw.agent("session-owner"), await gw.agent("session-intruder")
    sessions: list[str] = []

    async def seen(response: httpx2.Response) -> None:
        if "mcp-session-id" in response.headers:
            sessions.append(response.headers["mcp-session-id"])

    async with (
        gw.http(owner, auth=PerCallToken(gw, owner), event_hooks={"response": [seen]}) as http,
        Client(streamable_http_client(gw.url, http_client=http), mode="legacy") as client,
    ):
        await client.list_tools()
        session = sessions[0]
        async with gw.http(intruder) as other:
            stream = await other.get(gw.url, headers=_headers(**{"mcp-session-id": session}))
            listing = await other.post(
                gw.url,
                json=_list_message(),
                headers=_headers(method="tools/list", **{"mcp-session-id": session}),
            )
            ended = await other.delete(gw.url, headers=_headers(**{"mcp-session-id": session}))
        for response in (stream, listing, ended):
            assert response.status_code == 404, response.text
            assert response.json()["error"]["data"]["reason"] == "SESSION_NOT_FOUND"
        assert len((await client.list_tools()).tools) == 5  # the owner's session lives on


async def test_a_revoked_agent_is_refused_everything_within_a_second(gw: Stack) -> None:
    folder = await gw.agent("revoked-agent")
    args = {"text": _unique("revoked-agent")}
    token = await gw.token(folder, "echo", args)
    async with gw.http(folder) as http:
        listing = await http.post(
            gw.url, json=_list_message(), headers=_headers(method="tools/list")
        )
        assert listing.status_code == 200
        await asyncio.to_thread(
            gw.served.cli,
            "revoke", "--spiffe-id", "spiffe://example.org/agent/revoked-agent",
            "--reason", "attack test",
        )  # fmt: skip
        revoked_at = time.monotonic()
        while True:
            listing = await http.post(
                gw.url, json=_list_message(), headers=_headers(method="tools/list")
            )
            if listing.status_code != 200:
                break
            assert time.monotonic() - revoked_at < 1.0, "still served a second after revoke"
            await asyncio.sleep(0.02)
        call = await _call(http, gw, "echo", args, token)
    _refused_401(gw, listing, "CALLER_REVOKED")
    _refused_401(gw, call, "CALLER_REVOKED")
    _never_called(gw, args)
