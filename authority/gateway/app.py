"""The gateway's ASGI application: one MCP endpoint per upstream, every tools/call admitted only
with a task token for that exact call.

``/mcp/<server>``: POST (JSON-RPC), GET (the server-to-client SSE stream) and DELETE (end a
session) are relayed to the upstream's URL; every request needs the verified client
certificate (mutual TLS). ``/.well-known/oauth-protected-resource/mcp/<server>``: the RFC 9728
metadata that a 401 points to.

A POST body is one JSON-RPC message (batches are refused: the MCP revision of 2025-06-18
removed them, and checking each member would let one refused call spoil the rest). Its
method must be allowed (``GatewayConfig.methods``); a response or notification from the client
passes. ``tools/call`` needs ``Authorization: Bearer <task token>`` for audience
``GatewayConfig.audience``, action ``tools.call``, resource exactly ``mcp/<server>/<tool>``,
parameter ``mcp.arguments_sha256`` equal to the RFC 8785 digest of this request's
``params.arguments``, bound (``cnf``) to the connection's client certificate. ``tools/list``
results are cut to the tools the authority says the caller may ever call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from cryptography import x509

from authority import toolcall
from authority._pb import authority_v1_authority_pb2 as pb
from authority.errors import (
    AuthorityError,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from authority.gateway.audit import AuditBatcher
from authority.gateway.config import GatewayConfig, Upstream
from authority.gateway.upstream import (
    Headers,
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
)
from authority.httpserve import Receive, Scope, Send, peer_certificate_der
from authority.logs import RateLimitedLog
from authority.relying import MAX_TOKEN_CHARS, RevocationView, TaskTokenVerifier
from authority.tokens import TaskToken, x5t_s256

log = logging.getLogger(__name__)

METADATA_PREFIX = "/.well-known/oauth-protected-resource"
# Request headers an agent's request may carry upstream (lower case); never Authorization.
FORWARD_REQUEST = frozenset(
    {
        b"accept",
        b"content-type",
        b"last-event-id",
        b"mcp-session-id",
        b"mcp-protocol-version",
        b"mcp-method",
        b"mcp-name",
        b"user-agent",
    }
)
FORWARD_REQUEST_PREFIX = b"mcp-param-"
# Response headers the upstream's answer may carry back (never its challenges or cookies).
FORWARD_RESPONSE = frozenset(
    {
        b"content-type",
        b"mcp-session-id",
        b"mcp-protocol-version",
        b"cache-control",
        b"retry-after",
        b"allow",
    }
)
UNAUTHORIZED_CODE = -32001  # JSON-RPC error code of a refused token (server-defined range)
TOKEN_CACHE_SIZE = 10_000
MAX_SESSIONS = 100_000
SSE = b"text/event-stream"


class AuthorityPort(Protocol):
    """What the gateway asks the authority on the request path (besides keys and revocations,
    which the verifier holds)."""

    async def list_callable_tools(
        self, caller_svid: bytes, server: str, audience: str, tools: Sequence[str]
    ) -> list[str]: ...


# --- refusals ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Refusal(Exception):
    """An answer that is not the upstream's: status, a JSON-RPC error, maybe a challenge."""

    status: int
    reason: str
    message: str
    challenge: str | None = None  # the WWW-Authenticate value
    data: dict[str, Any] = field(default_factory=dict)
    code: int = UNAUTHORIZED_CODE
    retry_after: int | None = None
    request_id: str | int | None = None  # the JSON-RPC id of the request refused


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', "'") + '"'


def _challenge(metadata_url: str, error: str, description: str, **extra: str) -> str:
    params = [f"resource_metadata={_quote(metadata_url)}", f"error={_quote(error)}"]
    params.append(f"error_description={_quote(description)}")
    params.extend(f"{key}={_quote(value)}" for key, value in extra.items())
    return "Bearer " + ", ".join(params)


# --- the caller ----------------------------------------------------------------------------------


class _Peers:
    """SPIFFE ID and cnf thumbprint of each client certificate seen (bounded)."""

    def __init__(self, size: int = 4096) -> None:
        self._seen: OrderedDict[bytes, tuple[str, str]] = OrderedDict()
        self._size = size

    def of(self, der: bytes) -> tuple[str, str]:
        known = self._seen.get(der)
        if known is not None:
            return known
        cert = x509.load_der_x509_certificate(der)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        known = (uris[0] if len(uris) == 1 else "", x5t_s256(der))
        self._seen[der] = known
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return known


# --- tokens --------------------------------------------------------------------------------------


class TokenCheck:
    """``TaskTokenVerifier`` behind a cache of verified tokens per (token, certificate), kept
    until the token's expiry; revocation and the feed's freshness are asked on every call."""

    def __init__(
        self,
        verifier: TaskTokenVerifier,
        revocations: RevocationView,
        *,
        wall: Any = time.time,
        size: int = TOKEN_CACHE_SIZE,
    ) -> None:
        self.verifier = verifier
        self._revocations = revocations
        self._wall = wall
        self._size = size
        self._cache: OrderedDict[tuple[str, str], tuple[TaskToken, float]] = OrderedDict()
        # approvals whose one call was admitted -> when their token expires (then forgotten)
        self._spent: dict[str, float] = {}
        self.hits = 0

    def caller_revoked(self, caller: str) -> bool:
        """The caller's SPIFFE ID (its certificate's) is revoked: its requests are refused
        and its streams cut, whatever they carry."""
        return bool(caller) and self._revocations.is_revoked("", "", caller, caller)

    async def check(
        self, token: str, peer_der: bytes, peer_x5t: str, resource: str, digest: str
    ) -> TaskToken:
        """The token, verified for this peer and exactly this call."""
        parsed = await self.verified(token, peer_der, peer_x5t)
        self.check_call(parsed, resource, digest)
        self.spend(parsed)
        return parsed

    def spend(self, parsed: TaskToken) -> None:
        """A token collected with an operator's approval admits one call: the approval was
        given for one call with these arguments, not for as many as fit in the token's life.
        (Kept in this gateway's memory: each gateway replica admits it once.) Other tokens
        pass as often as their life allows."""
        if not parsed.approval_id:
            return
        now = self._wall()
        if len(self._spent) > self._size:
            self._spent = {k: until for k, until in self._spent.items() if until > now}
        if parsed.approval_id in self._spent:
            raise Unauthenticated(
                "the token's approval admitted its one call already; ask for another approval",
                reason="APPROVAL_SPENT",
            )
        self._spent[parsed.approval_id] = parsed.expires_at.timestamp() + 60

    async def verified(self, token: str, peer_der: bytes, peer_x5t: str) -> TaskToken:
        """The token, verified (signature, issuer, audience, time, cnf against this peer,
        action tools.call), not revoked, the feed fresh: from the cache when held."""
        key = (hashlib.sha256(token.encode()).hexdigest(), peer_x5t)
        held = self._cache.get(key)
        if held is not None and self._wall() < held[1]:
            parsed = held[0]
            self.hits += 1
            if not self._revocations.fresh():
                raise Unavailable(
                    "the revocation feed is stale; refusing until it catches up",
                    reason="REVOCATION_FEED_STALE",
                )
            if self.verifier.is_revoked(parsed):
                raise Unauthenticated("the token was revoked", reason="TOKEN_REVOKED")
        else:
            if held is not None:
                del self._cache[key]
            parsed = await self.verifier.verify(
                token, action=toolcall.ACTION, resource=None, peer_cert_der=peer_der
            )
            self._cache[key] = (parsed, parsed.expires_at.timestamp())
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return parsed

    @staticmethod
    def check_call(parsed: TaskToken, resource: str, digest: str) -> None:
        """The token is for exactly this tool and these arguments."""
        if parsed.intent.resource != resource:
            raise PermissionDenied("the token is for another tool", reason="TOKEN_RESOURCE")
        if parsed.intent.parameters.get(toolcall.ARGUMENTS_PARAMETER) != digest:
            raise PermissionDenied("the token is for other arguments", reason="TOKEN_ARGUMENTS")


# --- tools/list ----------------------------------------------------------------------------------


class CallableTools:
    """The authority's ``ListCallableTools`` answers, per (caller, server, tool names), for
    ``ttl`` seconds. When the authority cannot answer, ``Unavailable``: the list is not shown."""

    def __init__(
        self, port: AuthorityPort, audience: str, ttl: float, *, monotonic: Any = time.monotonic
    ) -> None:
        self._port = port
        self._audience = audience
        self._ttl = ttl
        self._now = monotonic
        self._cache: OrderedDict[tuple[str, str, frozenset[str]], tuple[float, frozenset[str]]] = (
            OrderedDict()
        )
        self.asked = 0

    async def allowed(
        self, caller: str, caller_der: bytes, server: str, names: Sequence[str]
    ) -> frozenset[str]:
        key = (caller, server, frozenset(names))
        held = self._cache.get(key)
        now = self._now()
        if held is not None and now < held[0]:
            return held[1]
        try:
            self.asked += 1
            answer = await self._port.list_callable_tools(
                caller_der, server, self._audience, list(names)
            )
        except Exception as exc:  # any failure: fail closed
            log.warning("ListCallableTools failed for %s on %s: %s", caller, server, _describe(exc))
            raise Unavailable(
                "the authority cannot say which tools you may call; try again",
                reason="TOOLS_LIST_UNAVAILABLE",
            ) from None
        allowed = frozenset(answer) & frozenset(names)
        self._cache[key] = (now + self._ttl, allowed)
        if len(self._cache) > 4096:
            self._cache.popitem(last=False)
        return allowed


def _describe(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if callable(code):
        return f"{code().name}: {exc.details()}"  # type: ignore[attr-defined]
    return f"{type(exc).__name__}: {exc}"


def filter_tools_message(
    message: Any, allowed: frozenset[str], *, max_ttl_ms: int | None = None
) -> bool:
    """Drop from a tools/list result the tools not in ``allowed``; True when it was one.

    The list is now this caller's: a 2026-07-28 result's cache hints become ``cacheScope``
    "private" (no shared cache may hand it to another caller) and a ``ttlMs`` of at most
    ``max_ttl_ms`` (the gateway's own cache: a policy change shows within it)."""
    if not isinstance(message, dict):
        return False
    result = message.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
        return False
    result["tools"] = [
        t for t in result["tools"] if isinstance(t, dict) and t.get("name") in allowed
    ]
    if "cacheScope" in result:
        result["cacheScope"] = "private"
    ttl = result.get("ttlMs")
    if max_ttl_ms is not None and isinstance(ttl, int) and not isinstance(ttl, bool):
        result["ttlMs"] = max(0, min(ttl, max_ttl_ms))
    return True


def tool_names(message: Any) -> list[str]:
    if not isinstance(message, dict) or not isinstance(message.get("result"), dict):
        return []
    tools = message["result"].get("tools")
    if not isinstance(tools, list):
        return []
    return [t["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]


def sse_events(body: bytes) -> list[list[bytes]]:
    """An SSE body as its events, each a list of lines (without line ends)."""
    events: list[list[bytes]] = []
    current: list[bytes] = []
    for line in body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"):
        if line == b"":
            if current:
                events.append(current)
                current = []
        else:
            current.append(line)
    if current:
        events.append(current)
    return events


def sse_data(event: list[bytes]) -> bytes | None:
    data = [line[5:].removeprefix(b" ") for line in event if line.startswith(b"data:")]
    return b"\n".join(data) if data else None


# --- the JSON-RPC message ------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"member {key[:64]!r} appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_message(body: bytes) -> Any:
    return json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def _rpc_error(request_id: Any, code: int, message: str, data: Mapping[str, Any]) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if data:
        error["data"] = dict(data)
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "error": error}).encode()


# --- live streams --------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Live:
    """A response being relayed as a stream: a tools/call's (with the token it was admitted
    with) or a session's GET stream (``token`` None), and whose it is."""

    token: TaskToken | None
    caller: str
    relay: asyncio.Task[None]
    cut: bool = False


# --- the application -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Call:
    """What is known of one tools/call, for its audit record."""

    caller: str
    server: str
    tool: str = ""
    digest: str = ""
    request_id: str = ""
    token: TaskToken | None = None
    at_us: int = 0
    started: float = 0.0


class GatewayApp:
    def __init__(
        self,
        config: GatewayConfig,
        tokens: TokenCheck,
        callable_tools: CallableTools,
        audit: AuditBatcher,
        upstream: UpstreamClient,
    ) -> None:
        self.config = config
        self.tokens = tokens
        self.callable_tools = callable_tools
        self.audit = audit
        self.upstream = upstream
        self._own_headers = {name: _own_headers(u) for name, u in config.servers.items()}
        # (server, Mcp-Session-Id) -> the SPIFFE ID it was opened for, oldest first
        self._sessions: OrderedDict[tuple[str, bytes], str] = OrderedDict()
        self._peers = _Peers()
        self._refusals = RateLimitedLog(log)
        self._list_ttl_ms = int(config.tools_list_cache_seconds * 1000)
        self._live: set[_Live] = set()
        self.cuts = 0

    # --- revocation ----------------------------------------------------------------------

    def revocations_changed(self, *_: object) -> None:
        """The feed brought a revocation (or a snapshot): cut each stream whose token it
        covers. Called from the watcher, on the loop."""
        for live in list(self._live):
            if live.cut:
                continue
            if (
                live.token is not None and self.tokens.verifier.is_revoked(live.token)
            ) or self.tokens.caller_revoked(live.caller):
                live.cut = True
                self.cuts += 1
                log.info(
                    "revoked while streaming: cutting the stream of %s (jti=%s)",
                    live.caller,
                    live.token.jti if live.token else "-",
                )
                live.relay.cancel()

    # --- ASGI ----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if path.startswith(METADATA_PREFIX + "/mcp/"):
            await self._metadata(scope, send, path[len(METADATA_PREFIX) + len("/mcp/") :])
            return
        name = path.removeprefix("/mcp/") if path.startswith("/mcp/") else None
        upstream = self.config.servers.get(name.rstrip("/")) if name else None
        if upstream is None:
            await _respond(send, 404, b'{"error":"no such MCP server"}', "application/json")
            return
        try:
            await self._endpoint(scope, receive, send, upstream)
        except Refusal as refusal:
            await self._refuse(send, refusal)

    def metadata_url(self, server: str) -> str:
        return f"{self.config.public_url}{METADATA_PREFIX}/mcp/{server}"

    def resource_url(self, server: str) -> str:
        return f"{self.config.public_url}/mcp/{server}"

    async def _metadata(self, scope: Scope, send: Send, server: str) -> None:
        if server not in self.config.servers or scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 404, b'{"error":"no such MCP server"}', "application/json")
            return
        document = {
            "resource": self.resource_url(server),
            "resource_name": f"MCP server {server!r} behind the agent-authority gateway",
            "bearer_methods_supported": ["header"],
            "tls_client_certificate_bound_access_tokens": True,
            "scopes_supported": [toolcall.ACTION],
            "authority_token_exchange": {
                "how": "Exchange on the authority's Workload API over mutual TLS with your "
                "X.509-SVID (ExchangeRequest.tool_call), one token per call",
                "trust_domain": str(self.config.trust_domain),
                "audience": self.config.audience,
                "action": toolcall.ACTION,
                "resource": f"{toolcall.RESOURCE_KIND}/{server}/<tool>",
                "parameters": {toolcall.ARGUMENTS_PARAMETER: "<sha256 of RFC 8785 arguments>"},
            },
        }
        await _respond(send, 200, json.dumps(document).encode(), "application/json")

    async def _endpoint(
        self, scope: Scope, receive: Receive, send: Send, upstream: Upstream
    ) -> None:
        der = peer_certificate_der(scope)
        if der is None:
            raise Refusal(
                401,
                "CLIENT_CERTIFICATE_REQUIRED",
                "present your X.509-SVID (mutual TLS): task tokens are bound to it",
                _challenge(
                    self.metadata_url(upstream.name),
                    "invalid_token",
                    "mutual TLS with your X.509-SVID is required",
                ),
            )
        caller, x5t = self._peers.of(der)
        if self.tokens.caller_revoked(caller):
            raise Refusal(
                401,
                "CALLER_REVOKED",
                "your SPIFFE ID is revoked",
                _challenge(
                    self.metadata_url(upstream.name), "invalid_token", "the caller is revoked"
                ),
            )
        self._check_session(scope, upstream, caller)
        method = scope["method"]
        if method in ("GET", "DELETE"):
            await self._forward(scope, receive, send, upstream, b"", None, caller)
            return
        if method != "POST":
            raise Refusal(405, "METHOD_NOT_ALLOWED", f"{method} is not served", code=-32600)
        body = await self._body(scope, receive)
        try:
            message = parse_message(body)
        except (ValueError, RecursionError) as exc:
            raise Refusal(400, "PARSE_ERROR", f"not JSON: {exc}", code=-32700) from None
        if isinstance(message, list):
            raise Refusal(
                400,
                "BATCH_REFUSED",
                "JSON-RPC batches are not accepted: send one message per request",
                code=-32600,
            )
        if not isinstance(message, dict):
            raise Refusal(400, "INVALID_REQUEST", "a JSON-RPC message is an object", code=-32600)
        try:
            await self._message(scope, receive, send, upstream, body, message, der, caller, x5t)
        except Refusal as refusal:
            request_id = message.get("id")
            if refusal.request_id is None and isinstance(request_id, str | int):
                refusal.request_id = request_id
            raise

    async def _message(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        upstream: Upstream,
        body: bytes,
        message: dict[str, Any],
        der: bytes,
        caller: str,
        x5t: str,
    ) -> None:
        rpc_method = message.get("method")
        if rpc_method is None:  # a response to the server's request: passes
            await self._forward(scope, receive, send, upstream, body, None, caller)
            return
        if not isinstance(rpc_method, str):
            raise Refusal(400, "INVALID_REQUEST", "method is a string", code=-32600)
        if rpc_method == "tools/call":
            await self._tools_call(scope, receive, send, upstream, body, message, caller, der, x5t)
            return
        if not rpc_method.startswith("notifications/") and rpc_method not in self.config.methods:
            raise Refusal(
                403,
                "METHOD_NOT_ALLOWED",
                f"{rpc_method[:64]!r} is not allowed through this gateway",
                code=-32601,
            )
        if rpc_method == "tools/list":
            await self._tools_list(scope, receive, send, upstream, body, caller, der)
            return
        await self._forward(scope, receive, send, upstream, body, None, caller)

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.config.max_body_bytes
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                raise Refusal(413, "BODY_TOO_LARGE", f"a request body is at most {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                raise Refusal(400, "DISCONNECTED", "the client went away")
            chunk = event.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise Refusal(413, "BODY_TOO_LARGE", f"a request body is at most {limit} bytes")
            chunks.append(chunk)
            if not event.get("more_body", False):
                return b"".join(chunks)

    # --- tools/call ----------------------------------------------------------------------

    def _bearer(self, scope: Scope) -> str | None:
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        if not values:
            return None
        if len(values) > 1:
            raise Unauthenticated("several Authorization headers", reason="TOKEN_MALFORMED")
        value: bytes = values[0]
        scheme, _, token = value.decode("latin-1").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated(
                "Authorization must be 'Bearer <task token>'", reason="TOKEN_MALFORMED"
            )
        return token

    async def _tools_call(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        upstream: Upstream,
        body: bytes,
        message: dict[str, Any],
        caller: str,
        der: bytes,
        x5t: str,
    ) -> None:
        call = _Call(
            caller=caller,
            server=upstream.name,
            request_id=_id_text(message.get("id")),
            at_us=time.time_ns() // 1000,
            started=time.perf_counter(),
        )
        params = message.get("params")
        try:
            if not isinstance(params, dict) or not isinstance(params.get("name"), str):
                raise InvalidArgument("tools/call needs params.name", reason="BAD_TOOL_CALL")
            resource = toolcall.resource(upstream.name, params["name"])
            call.tool = params["name"]
            call.digest = toolcall.arguments_digest(
                toolcall.check_arguments(params.get("arguments"))
            )
            _check_routing_headers(scope, params["name"])
        except InvalidArgument as exc:
            self._record(call, "refused", exc.reason, reserved=False)
            raise Refusal(400, exc.reason, exc.message, code=-32602) from None
        try:
            self.audit.reserve()
        except Unavailable as exc:
            self._refused(call, exc.reason)  # not recorded: the backlog has no room
            raise Refusal(503, exc.reason, exc.message, code=-32603, retry_after=1) from None
        try:
            token = self._bearer(scope)
            if token is None:
                raise Unauthenticated("a task token is required", reason="TOKEN_MISSING")
            call.token = await self.tokens.verified(token, der, x5t)
            self.tokens.check_call(call.token, resource, call.digest)
            self.tokens.spend(call.token)
        except AuthorityError as exc:
            self._record(call, "refused", exc.reason)
            raise self._token_refusal(exc, upstream.name, resource, call.digest) from None
        except BaseException:
            self._record(call, "refused", "INTERNAL")
            raise
        log.debug("tools/call admitted: %s jti=%s", resource, call.token.jti)
        await self._forward(scope, receive, send, upstream, body, call, caller)

    def _token_refusal(
        self, exc: AuthorityError, server: str, resource: str, digest: str
    ) -> Refusal:
        required = {
            "audience": self.config.audience,
            "action": toolcall.ACTION,
            "resource": resource,
            "parameters": {toolcall.ARGUMENTS_PARAMETER: digest},
        }
        metadata = self.metadata_url(server)
        if isinstance(exc, Unavailable):
            return Refusal(
                503,
                exc.reason,
                exc.message,
                code=-32603,
                retry_after=1,
                data={"reason": exc.reason},
            )
        if isinstance(exc, PermissionDenied) and exc.reason != "TOKEN_CNF_MISMATCH":
            return Refusal(
                403,
                exc.reason,
                exc.message,
                _challenge(
                    metadata,
                    "insufficient_scope",
                    f"{exc.message}: ask for a token for this call",
                    scope=toolcall.ACTION,
                    audience=self.config.audience,
                    action=toolcall.ACTION,
                    tool_resource=resource,
                    arguments_sha256=digest,
                ),
                data={"reason": exc.reason, "required": required},
            )
        return Refusal(
            401,
            exc.reason,
            exc.message,
            _challenge(metadata, "invalid_token", exc.message),
            data={"reason": exc.reason, "required": required},
        )

    def _refused(self, call: _Call, reason: str) -> None:
        """One WARNING line per refused call (at most 10 per reason per 10 s, then a count):
        the reason, the caller, the tool and the token's jti or digest, never the token."""
        self._refusals.log(
            reason,
            logging.WARNING,
            "refused tools/call: reason=%s caller=%s tool=mcp/%s/%s jti=%s",
            reason,
            call.caller or "-",
            call.server,
            call.tool or "-",
            call.token.jti if call.token else "-",
        )

    def _record(
        self,
        call: _Call,
        decision: str,
        reason: str = "",
        *,
        status: int = 0,
        outcome: str = "",
        reserved: bool = True,
    ) -> None:
        if decision == "refused":
            self._refused(call, reason)
        token = call.token
        self.audit.submit(
            pb.ToolCallRecord(
                caller=call.caller,
                task_id=token.task_id if token else "",
                jti=token.jti if token else "",
                server=call.server,
                tool=call.tool,
                arguments_sha256=call.digest,
                decision=decision,
                reason=reason,
                upstream_status=status,
                duration_us=int((time.perf_counter() - call.started) * 1_000_000),
                at_us=call.at_us,
                outcome=outcome,
                request_id=call.request_id[:128],
            ),
            reserved=reserved,
        )

    # --- tools/list ----------------------------------------------------------------------

    async def _tools_list(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        upstream: Upstream,
        body: bytes,
        caller: str,
        der: bytes,
    ) -> None:
        response = await self._open(scope, upstream, body)
        try:
            self._bind_session(scope, response, upstream, caller)
            data = b""
            async for chunk in response.body():
                data += chunk
                if len(data) > self.config.max_list_bytes:
                    raise Refusal(
                        502, "UPSTREAM_TOO_LARGE", "the upstream's tool list is too large"
                    )
        except UpstreamError as exc:
            raise Refusal(502, "UPSTREAM_BROKE_OFF", f"the upstream broke off: {exc}") from None
        finally:
            await response.aclose()
        if response.status != 200:
            await self._start(send, response, content_length=len(data))
            await send({"type": "http.response.body", "body": data})
            return
        if _content_type(response.headers).startswith(SSE):
            out = []
            for event in sse_events(data):
                payload = sse_data(event)
                if payload is not None:
                    event = await self._filtered_event(event, payload, caller, der, upstream)
                out.append(b"\n".join(event) + b"\n\n")
            data = b"".join(out)
        else:
            try:
                message = parse_message(data)
            except ValueError:
                raise Refusal(
                    502, "UPSTREAM_MALFORMED", "the upstream's answer is not JSON"
                ) from None
            names = tool_names(message)
            if names:
                allowed = await self._allowed(caller, der, upstream, names)
                filter_tools_message(message, allowed, max_ttl_ms=self._list_ttl_ms)
                data = json.dumps(message).encode()
        await self._start(send, response, content_length=len(data))
        await send({"type": "http.response.body", "body": data})

    async def _filtered_event(
        self, event: list[bytes], payload: bytes, caller: str, der: bytes, upstream: Upstream
    ) -> list[bytes]:
        try:
            message = parse_message(payload)
        except ValueError:
            return event
        names = tool_names(message)
        if not names and not filter_tools_message(message, frozenset()):
            return event
        allowed = await self._allowed(caller, der, upstream, names) if names else frozenset()
        filter_tools_message(message, allowed, max_ttl_ms=self._list_ttl_ms)
        kept = [line for line in event if not line.startswith(b"data:")]
        return [*kept, b"data: " + json.dumps(message).encode()]

    async def _allowed(
        self, caller: str, der: bytes, upstream: Upstream, names: list[str]
    ) -> frozenset[str]:
        try:
            return await self.callable_tools.allowed(caller, der, upstream.name, names)
        except Unavailable as exc:
            raise Refusal(503, exc.reason, exc.message, code=-32603, retry_after=1) from None

    # --- relaying ------------------------------------------------------------------------

    # --- sessions -------------------------------------------------------------------------

    def _check_session(self, scope: Scope, upstream: Upstream, caller: str) -> None:
        """A request naming a session must come from the caller the session was opened for
        (the same SPIFFE ID); an unknown session is 404, which tells an MCP client to open a
        new one. A session id alone must not let one agent read another's stream."""
        session = _header(scope["headers"], b"mcp-session-id")
        if session is None:
            return
        owner = self._sessions.get((upstream.name, session))
        if owner != caller:
            if owner is not None:
                log.warning("refused: %s named a session of %s on %s", caller, owner, upstream.name)
            raise Refusal(404, "SESSION_NOT_FOUND", "no such session", code=-32600)
        self._sessions.move_to_end((upstream.name, session))

    def _bind_session(
        self, scope: Scope, response: UpstreamResponse, upstream: Upstream, caller: str
    ) -> None:
        key_session = _header(response.headers, b"mcp-session-id")
        if scope["method"] == "DELETE" and response.status < 300:
            asked = _header(scope["headers"], b"mcp-session-id")
            if asked is not None:
                self._sessions.pop((upstream.name, asked), None)
            return
        if key_session is None or response.status >= 400:
            return
        key = (upstream.name, key_session)
        owner = self._sessions.setdefault(key, caller)
        if owner != caller:
            log.error("upstream %s gave %s a session of %s", upstream.name, caller, owner)
            raise Refusal(502, "UPSTREAM_SESSION_CLASH", "the upstream reused a session id")
        if len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)

    def _upstream_headers(self, scope: Scope, upstream: Upstream) -> list[tuple[bytes, bytes]]:
        """The agent's safe headers, then the gateway's own (Host, the credential)."""
        headers = [
            (k, v)
            for k, v in scope["headers"]
            if k in FORWARD_REQUEST or k.startswith(FORWARD_REQUEST_PREFIX)
        ]
        headers.extend(self._own_headers[upstream.name])
        return headers

    async def _open(self, scope: Scope, upstream: Upstream, body: bytes) -> UpstreamResponse:
        try:
            response = await self.upstream.open(
                scope["method"],
                upstream.url,
                self._upstream_headers(scope, upstream),
                body if scope["method"] == "POST" else b"",
            )
        except UpstreamError as exc:
            log.warning("upstream %s unreachable: %s", upstream.name, exc)
            raise Refusal(
                502,
                "UPSTREAM_UNREACHABLE",
                f"the MCP server {upstream.name!r} is unreachable",
                code=-32603,
            ) from None
        if response.status in (401, 403):
            await response.aclose()
            log.error(
                "upstream %s refused the gateway's credential (HTTP %d)",
                upstream.name,
                response.status,
            )
            raise Refusal(
                502,
                "UPSTREAM_REFUSED_GATEWAY",
                f"the MCP server {upstream.name!r} refused the gateway",
                code=-32603,
            )
        return response

    async def _start(
        self, send: Send, response: UpstreamResponse, *, content_length: int | None = None
    ) -> None:
        headers = [(k, v) for k, v in response.headers if k.lower() in FORWARD_RESPONSE]
        if content_length is not None:
            headers.append((b"content-length", str(content_length).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        upstream: Upstream,
        body: bytes,
        call: _Call | None,
        caller: str,
    ) -> None:
        try:
            response = await self._open(scope, upstream, body)
            self._bind_session(scope, response, upstream, caller)
        except Refusal as refusal:
            if call is not None:
                self._record(call, "forwarded", refusal.reason, outcome="unreachable")
            raise
        status = response.status
        streaming = _content_type(response.headers).startswith(SSE)
        outcome = "ok" if status < 400 else "error"
        try:
            if not streaming:
                try:
                    data = b"".join([chunk async for chunk in response.body()])
                except UpstreamError as exc:
                    if call is not None:
                        outcome = "error"
                    raise Refusal(
                        502, "UPSTREAM_BROKE_OFF", f"the upstream broke off: {exc}", code=-32603
                    ) from None
                await self._start(send, response, content_length=len(data))
                await send({"type": "http.response.body", "body": data})
                return
            await self._start(send, response)
            relay = asyncio.create_task(self._relay(response, send))
            live = _Live(call.token if call is not None else None, caller, relay)
            self._live.add(live)
            gone = asyncio.create_task(_disconnected(receive))
            try:
                await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not relay.done():
                    relay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relay
                self._live.discard(live)
            if live.cut and call is None:  # a GET stream: it just ends
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            elif live.cut:
                outcome = "cut"
                notice = _rpc_error(
                    _request_id(call),
                    UNAUTHORIZED_CODE,
                    "the task token was revoked; the call was cut",
                    {"reason": "TOKEN_REVOKED"},
                )
                with contextlib.suppress(Exception):
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b"event: message\ndata: " + notice + b"\n\n",
                            "more_body": False,
                        }
                    )
            elif relay.cancelled() or relay.exception() is not None:
                outcome = "error"
                if relay.done() and not relay.cancelled() and relay.exception() is not None:
                    log.warning(
                        "relay from %s failed: %s",
                        upstream.name,
                        type(relay.exception()).__name__,
                    )
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        except BaseException:
            outcome = "error"
            raise
        finally:
            await response.aclose()
            if call is not None:
                self._record(call, "forwarded", "", status=status, outcome=outcome)

    async def _relay(self, response: UpstreamResponse, send: Send) -> None:
        async for chunk in response.body():
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _refuse(self, send: Send, refusal: Refusal) -> None:
        data = dict(refusal.data)
        data.setdefault("reason", refusal.reason)
        body = _rpc_error(refusal.request_id, refusal.code, refusal.message, data)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if refusal.challenge is not None:
            headers.append((b"www-authenticate", refusal.challenge.encode()))
        if refusal.retry_after is not None:
            headers.append((b"retry-after", str(refusal.retry_after).encode()))
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _own_headers(upstream: Upstream) -> list[tuple[bytes, bytes]]:
    own = [
        (b"host", urlsplit(upstream.url).netloc.encode("idna")),
        (b"accept-encoding", b"identity"),
    ]
    if upstream.credential is not None:
        own.append((upstream.credential_header.lower().encode(), upstream.credential.encode()))
    return own


def _header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return bytes(value)
    return None


def _content_type(headers: Headers) -> bytes:
    for key, value in headers:
        if key.lower() == b"content-type":
            return bytes(value).lower()
    return b""


def _id_text(request_id: Any) -> str:
    return "" if request_id is None else json.dumps(request_id)


def _request_id(call: _Call | None) -> Any:
    if call is None or not call.request_id:
        return None
    return json.loads(call.request_id)


def _check_routing_headers(scope: Scope, tool: str) -> None:
    """Mcp-Method and Mcp-Name, when sent, must say what the body says (the upstream may route
    on them)."""
    for key, value in scope["headers"]:
        if key == b"mcp-method" and value != b"tools/call":
            raise InvalidArgument("Mcp-Method contradicts the body", reason="HEADER_MISMATCH")
        if key == b"mcp-name" and value.decode("latin-1") != tool:
            raise InvalidArgument("Mcp-Name contradicts the body", reason="HEADER_MISMATCH")


async def _disconnected(receive: Receive) -> None:
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            return


async def _respond(send: Send, status: int, body: bytes, content_type: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
