"""The agent library's parts without I/O: the token cache, the request reader that picks a
call's token, the refusal parser, and the bearer hook over httpx2's mock transport."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator

import httpx2
import pytest

from authority import toolcall
from authority.client import FetchedX509Svid
from authority.errors import InvalidArgument
from authority.toolclient import (
    BearerForToolCalls,
    CallKey,
    GatewayRefused,
    IssuedToken,
    TokenCache,
    _Armed,
    parse_refusal,
    tool_call_of,
)

NOW = dt.datetime(2026, 12, 7, 10, 0, tzinfo=dt.UTC)


def key(**changes: str) -> CallKey:
    fields = {
        "server": "billing",
        "tool": "refund",
        "arguments_sha256": toolcall.arguments_digest({"amount": 10}),
        "purpose": "refund a duplicate",
        "audience": "mcp-gateway",
    }
    fields.update(changes)
    return CallKey(**fields)


def token(seconds: int = 60, jti: str = "j1") -> IssuedToken:
    return IssuedToken("header.payload.sig", jti, "t1", NOW + dt.timedelta(seconds=seconds))


def test_a_cached_token_serves_only_the_identical_call_until_its_margin() -> None:
    cache = TokenCache(dt.timedelta(seconds=15))
    cache.put(key(), token(60))
    assert cache.get(key(), NOW) == token(60)
    for other in (
        key(server="deploy"),
        key(tool="get_invoice"),
        key(arguments_sha256=toolcall.arguments_digest({"amount": 11})),
        key(purpose="another purpose"),
        key(audience="another-gateway"),
    ):
        assert cache.get(other, NOW) is None
    assert cache.get(key(), NOW + dt.timedelta(seconds=44)) is not None
    assert cache.get(key(), NOW + dt.timedelta(seconds=45)) is None  # 60 s life, 15 s margin
    assert len(cache) == 0  # and it was dropped


def test_the_token_value_never_shows_in_its_repr() -> None:
    assert "header.payload.sig" not in repr(token())
    assert "j1" in repr(token())


def test_the_cache_drops_and_clears() -> None:
    cache = TokenCache()
    cache.put(key(), token())
    cache.put(key(tool="echo"), token(jti="j2"))
    cache.drop(key())
    assert cache.get(key(), NOW) is None
    assert cache.get(key(tool="echo"), NOW) is not None
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError, match="margin"):
        TokenCache(dt.timedelta(seconds=-1))


def test_a_tools_call_body_names_its_tool_and_digest_and_nothing_else_does() -> None:
    call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call"}
    body = {**call, "params": {"name": "refund", "arguments": {"b": 1.0, "a": "x"}}}
    assert tool_call_of(json.dumps(body).encode()) == (
        "refund",
        toolcall.arguments_digest({"a": "x", "b": 1}),  # RFC 8785: key order and 1.0 == 1
    )
    no_arguments = {**call, "params": {"name": "echo"}}
    assert tool_call_of(json.dumps(no_arguments).encode()) == (
        "echo",
        toolcall.arguments_digest({}),
    )
    for other in (
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 1, "result": {}},
        [body],  # a batch: no token is chosen for it
        {**call, "params": {"name": 5}},
        {**call, "params": {"name": "x", "arguments": [1]}},
        {**call, "params": {"name": "x", "arguments": {"n": 2**60}}},
    ):
        assert tool_call_of(json.dumps(other).encode()) is None, other
    assert tool_call_of(b"\xff not json") is None


def test_a_gateway_refusal_is_read_from_its_challenge_and_its_json_rpc_body() -> None:
    challenge = (
        'Bearer resource_metadata="https://gw/.well-known/x", error="invalid_token", '
        'error_description="the token \\"t\\" expired"'
    )
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "error": {"code": -32001, "message": "expired", "data": {"reason": "TOKEN_EXPIRED"}},
        }
    ).encode()
    refused = parse_refusal(401, challenge, body)
    assert (refused.status, refused.error, refused.reason) == (
        401,
        "invalid_token",
        "TOKEN_EXPIRED",
    )
    assert refused.description == 'the token "t" expired'
    plain = parse_refusal(
        403,
        'Bearer realm="api", error="insufficient_scope"',
        json.dumps(
            {"error": "insufficient_scope", "reason": "TOKEN_SCOPE", "message": "m"}
        ).encode(),
    )
    assert (plain.error, plain.reason, plain.description) == (
        "insufficient_scope",
        "TOKEN_SCOPE",
        "m",
    )
    bare = parse_refusal(503, "", b"<html>")
    assert (bare.status, bare.error, bare.reason) == (503, "", "")
    assert isinstance(bare, GatewayRefused)


async def test_the_bearer_goes_on_exactly_the_armed_call() -> None:
    seen: list[tuple[str, str | None]] = []

    def upstream(request: httpx2.Request) -> httpx2.Response:
        message = json.loads(request.content)
        seen.append((message.get("method", ""), request.headers.get("authorization")))
        if message.get("params", {}).get("name") == "refused":
            return httpx2.Response(
                401,
                headers={"www-authenticate": 'Bearer error="invalid_token"'},
                json={"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "no"}},
            )
        return httpx2.Response(200, json={"jsonrpc": "2.0", "id": 1, "result": {}})

    armed = _Armed()
    auth = BearerForToolCalls(armed)
    args = {"amount": 10}
    digest = toolcall.arguments_digest(args)

    def call(name: str, arguments: object) -> dict[str, object]:
        params = {"name": name, "arguments": arguments}
        return {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}

    transport = httpx2.MockTransport(upstream)
    async with httpx2.AsyncClient(transport=transport, auth=auth, base_url="https://gw") as http:
        with armed.holding("refund", digest, "TOKEN-A"):
            await http.post("/mcp", json=call("refund", args))
            await http.post("/mcp", json=call("refund", {"amount": 11}))  # other arguments
            await http.post("/mcp", json=call("echo", args))  # another tool
            await http.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        await http.post("/mcp", json=call("refund", args))  # the call is over: disarmed
        with armed.holding("refused", toolcall.arguments_digest({}), "TOKEN-B"):
            await http.post("/mcp", json=call("refused", {}))
    assert seen == [
        ("tools/call", "Bearer TOKEN-A"),
        ("tools/call", None),
        ("tools/call", None),
        ("tools/list", None),
        ("tools/call", None),
        ("tools/call", "Bearer TOKEN-B"),
    ]
    refusal = auth.refusals[("refused", toolcall.arguments_digest({}))]
    assert (refusal.status, refusal.error) == (401, "invalid_token")


async def test_a_call_is_checked_before_anything_is_dialled() -> None:
    from authority.toolclient import Gateway, StaticSvids, ToolClient

    with pytest.raises(ValueError, match="https"):
        Gateway("http://gw/mcp/tools")
    tools = ToolClient(
        StaticSvids([]),
        authority="127.0.0.1:1",
        authority_bundle=b"-",
        gateways={"tools": "https://127.0.0.1:1/mcp/tools"},
    )
    with pytest.raises(ValueError, match="no gateway"):
        await tools.call_tool("billing", "refund", {}, purpose="p")
    with pytest.raises(ValueError, match="purpose"):
        await tools.call_tool("tools", "echo", {}, purpose="")
    with pytest.raises(ValueError, match="prompt_sha256"):
        await tools.call_tool("tools", "echo", {}, purpose="p", prompt_sha256="not hex")
    with pytest.raises(InvalidArgument, match="name"):
        await tools.call_tool("tools", "no spaces allowed", {}, purpose="p")
    with pytest.raises(InvalidArgument):
        await tools.call_tool("tools", "echo", {"n": float("nan")}, purpose="p")
    assert tools.exchanges == 0
    await tools.close()


async def test_no_svid_is_a_clear_error_not_a_hang() -> None:
    from authority.toolclient import StaticSvids, ToolClient

    tools = ToolClient(
        StaticSvids([]),
        authority="127.0.0.1:1",
        authority_bundle=b"-",
        gateways={"tools": "https://127.0.0.1:1/mcp/tools"},
        svid_timeout=0.2,
    )
    with pytest.raises(TimeoutError, match="no X"):
        await tools.list_tools("tools")
    await tools.close()

    class Broken:
        async def watch_x509_svids(self) -> AsyncIterator[list[FetchedX509Svid]]:
            raise ConnectionError("the Workload API said no")
            yield []

    tools = ToolClient(
        Broken(),
        authority="127.0.0.1:1",
        authority_bundle=b"-",
        gateways={"tools": "https://127.0.0.1:1/mcp/tools"},
    )
    with pytest.raises(ConnectionError, match="said no"):
        await tools.call_tool("tools", "echo", {}, purpose="p")
    await tools.close()
