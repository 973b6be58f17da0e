"""The agent library's parts without I/O: the token cache, the request reader that picks a
call's token, the refusal parser, the bearer hook over httpx2's mock transport, and the check
of the gateway's SPIFFE ID (over TLS handshakes in memory and on a socket pair)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Sequence

import httpx2
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from authority import toolcall
from authority.client import FetchedX509Svid
from authority.errors import InvalidArgument
from authority.httpserve import client_context, load_chain_and_key
from authority.keyvault import private_key_pem
from authority.toolclient import (
    BearerForToolCalls,
    CallKey,
    Gateway,
    GatewayIdentityMismatch,
    GatewayRefused,
    IssuedToken,
    StaticSvids,
    TokenCache,
    ToolClient,
    _Armed,
    certificate_spiffe_id,
    check_gateway_identity,
    parse_refusal,
    pin_server_spiffe_id,
    tool_call_of,
)
from tests.unit._pki import ec_key, make_ca, make_leaf

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


# --- the gateway's SPIFFE ID -----------------------------------------------------------------

GATEWAY_ID = "spiffe://example.org/gateway"
REAL_NOW = dt.datetime.now(dt.UTC)  # for real TLS handshakes
CA = make_ca(not_before=REAL_NOW - dt.timedelta(hours=1), not_after=REAL_NOW + dt.timedelta(days=1))


def der(uris: Sequence[str]) -> bytes:
    return make_leaf(CA, ec_key().public_key(), uris=uris).public_bytes(Encoding.DER)


def test_the_gateway_is_the_certificate_whose_only_uri_san_is_its_spiffe_id() -> None:
    check_gateway_identity(der([GATEWAY_ID]), GATEWAY_ID)
    for uris, presented in (
        (["spiffe://example.org/agent/impostor"], "spiffe://example.org/agent/impostor"),
        (["spiffe://example.org/gateway/"], "spiffe://example.org/gateway/"),
        (["spiffe://EXAMPLE.org/gateway"], "spiffe://EXAMPLE.org/gateway"),
        (["spiffe://other.org/gateway"], "spiffe://other.org/gateway"),
        ([], ""),
        ([GATEWAY_ID, "spiffe://example.org/x"], f"{GATEWAY_ID}, spiffe://example.org/x"),
    ):
        with pytest.raises(GatewayIdentityMismatch) as refused:
            check_gateway_identity(der(uris), GATEWAY_ID)
        assert (refused.value.expected, refused.value.presented) == (GATEWAY_ID, presented)
        assert certificate_spiffe_id(der(uris)) == presented
    with pytest.raises(GatewayIdentityMismatch, match="no SPIFFE ID"):
        check_gateway_identity(None, GATEWAY_ID)
    with pytest.raises(GatewayIdentityMismatch):
        check_gateway_identity(b"not a certificate", GATEWAY_ID)


def _pems(uri: str) -> tuple[bytes, bytes]:
    key = ec_key()
    leaf = make_leaf(
        CA,
        key.public_key(),
        uris=[uri],
        not_before=REAL_NOW - dt.timedelta(minutes=1),
        not_after=REAL_NOW + dt.timedelta(hours=1),
    )
    return leaf.public_bytes(Encoding.PEM), private_key_pem(key)


def _contexts(server_id: str, expected: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    bundle = CA[0].public_bytes(Encoding.PEM)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_chain_and_key(server, *_pems(server_id))
    client = pin_server_spiffe_id(
        client_context(*_pems("spiffe://example.org/agent/a"), bundle), expected
    )
    return client, server


def _handshake_in_memory(
    client_context_: ssl.SSLContext, server_context: ssl.SSLContext
) -> tuple[ssl.SSLObject, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A TLS handshake over memory BIOs (as anyio drives one); raises what the client's
    ``do_handshake`` raises. The client's outgoing BIO and the server's incoming one are
    returned, to carry application data."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context_.wrap_bio(c_in, c_out)
    server = server_context.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    for _ in range(10):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
            s_in.write(c_out.read())
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            c_in.write(s_out.read())
        if client_done and server_done:
            return client, server, c_out, s_in
    raise AssertionError("the handshake did not finish")


def test_a_pinned_context_refuses_another_server_inside_its_handshake() -> None:
    client_ctx, server_ctx = _contexts(GATEWAY_ID, GATEWAY_ID)
    assert type(client_ctx) is ssl.SSLContext  # anyio wraps it without a thread
    client, server, client_out, server_in = _handshake_in_memory(client_ctx, server_ctx)
    client.write(b"POST /mcp")
    server_in.write(client_out.read())
    assert server.read(64) == b"POST /mcp"

    client_ctx, server_ctx = _contexts("spiffe://example.org/agent/impostor", GATEWAY_ID)
    with pytest.raises(GatewayIdentityMismatch) as refused:
        _handshake_in_memory(client_ctx, server_ctx)
    assert refused.value.presented == "spiffe://example.org/agent/impostor"
    # The same check on a blocking socket (wrap_socket): refused, the socket closed, and the
    # server never reads a byte of application data.
    client_ctx, server_ctx = _contexts("spiffe://example.org/agent/impostor", GATEWAY_ID)
    near, far = socket.socketpair()
    received: list[bytes] = []

    def serve() -> None:
        with server_ctx.wrap_socket(far, server_side=True) as tls:
            try:
                while chunk := tls.recv(1024):
                    received.append(chunk)
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with pytest.raises(GatewayIdentityMismatch):
            client_ctx.wrap_socket(near)
        assert near.fileno() == -1
    finally:
        near.close()
        thread.join(5)
    assert received == []


def test_an_unchecked_gateway_is_warned_about_once_and_a_spiffe_id_is_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(ValueError, match="spiffe://"):
        Gateway("https://gw/mcp/tools", spiffe_id="gateway")
    with caplog.at_level(logging.WARNING, logger="authority.toolclient"):
        ToolClient(
            StaticSvids([]),
            authority="127.0.0.1:1",
            authority_bundle=b"-",
            gateways={
                "tools": "https://127.0.0.1:1/mcp/tools",
                "billing": Gateway("https://127.0.0.1:1/mcp/billing", spiffe_id=GATEWAY_ID),
            },
        )
        ToolClient(
            StaticSvids([]),
            authority="127.0.0.1:1",
            authority_bundle=b"-",
            gateways={"billing": Gateway("https://127.0.0.1:1/mcp/billing", spiffe_id=GATEWAY_ID)},
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "not checked for tools " in warnings[0] + " "
    assert "billing" not in warnings[0]
