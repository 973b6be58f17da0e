"""The agent's side of tool calls through the MCP gateway: one task token per call.

``ToolClient`` calls MCP tools through the gateway with the official MCP client (``mcp``, the
``agent`` extra). For each ``call_tool(server, tool, arguments, purpose=...)`` it trades the
agent's X.509-SVID for a task token for exactly that call (an ``Exchange`` with a ``ToolCall``:
action ``tools.call`` on ``mcp/<server>/<tool>``, the arguments' RFC 8785 digest frozen in the
token, see ``authority.toolcall``), attaches it as ``Authorization: Bearer`` to exactly that
HTTP request, and returns the tool's result.

- **One SVID for both legs.** A token's ``cnf`` is the thumbprint of the SVID that asked for it,
  and the gateway compares it with the certificate of the TLS connection that carries it. So
  everything that depends on the SVID lives in one ``_Generation`` pinned to one SVID: the
  authority client (Exchange over mutual TLS), the TLS context and MCP sessions to the
  gateway, and the token cache. When the Workload API pushes a renewed SVID, the next call
  starts a new generation (new sessions, empty cache); calls in flight finish on the old one,
  which is closed when its last call returns. A token never travels on a connection made with
  another SVID.
- **A token per call, reused only for the identical call.** Cached by (server, tool, argument
  digest, purpose) until its expiry minus ``safety_margin``; any other arguments make a new
  Exchange; concurrent identical calls share one Exchange. A token the gateway refuses is
  dropped from the cache.
- **Approvals.** A call the policy sends to an operator raises ``ApprovalPending`` (its id in
  hand, to resume with ``call_tool(..., approval_id=...)``), or, with ``wait_for_approval``,
  polls ``GetApproval`` with backoff up to a deadline, then collects the token. A token
  collected with an approval is used for that one call and never cached: the gateway admits
  one call per approval (``APPROVAL_SPENT``).
- **Refusals are typed**: ``AuthorityRefused`` (the authority's code, stable reason and, for a
  policy denial, the policy's reasons), ``ApprovalRefused``, ``GatewayRefused`` (HTTP status and
  the RFC 6750 ``error`` of ``WWW-Authenticate``, with the gateway's reason when it gives one).
- **The gateway is authenticated by its SPIFFE ID** (``Gateway.spiffe_id``). The server's
  chain is verified against the trust bundle, which any workload of the trust domain passes;
  so with ``spiffe_id`` set, the TLS context of that gateway's connections is one whose
  ``sslobject_class`` (and ``sslsocket_class``) checks, the moment ``do_handshake`` completes,
  that the server certificate's URI SAN is exactly that ID. It raises
  ``GatewayIdentityMismatch`` from inside the handshake, before the TLS stack (anyio's, under
  httpcore2) writes anything more: no HTTP request, token, argument or prompt digest ever goes
  on that connection, and every connection (a reconnect too) is checked. ``call_tool`` opens
  the session before it asks for a token, so a mismatch costs no Exchange either. The context
  stays a plain ``ssl.SSLContext`` (anyio calls its ``wrap_bio`` directly, not in a worker
  thread), and none of httpx2's or httpcore2's internals are touched. Without ``spiffe_id``
  only the chain is checked, as before, and the ``ToolClient`` logs a warning once.
- **Nothing secret is logged.** Tokens appear as their jti, prompts and arguments as digests.
  The prompt itself is sent only when ``send_prompt=True`` (and kept only where the entry
  records prompts); otherwise only its SHA-256.
- The SVID source (a ``WorkloadApiClient``) is the caller's to close; the client follows it
  while open (``async with``).
- ``end_task()`` ends the task every token of this client was issued under (``EndTask``): they
  are revoked, and the next call opens a new task.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import re
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Protocol, Self

import grpc
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, Tool

from authority import toolcall
from authority._pb import authority_v1_authority_pb2 as pb
from authority.backoff import Backoff
from authority.client import FetchedX509Svid, ServerRotation, WorkloadClient
from authority.clock import Clock, SystemClock
from authority.errors import InvalidArgument
from authority.httpserve import client_context
from authority.keyvault import private_key_pem
from authority.tokens import x5t_s256

log = logging.getLogger(__name__)

__all__ = [
    "ApprovalPending",
    "ApprovalRefused",
    "AuthorityRefused",
    "CallKey",
    "Gateway",
    "GatewayIdentityMismatch",
    "GatewayRefused",
    "IssuedToken",
    "StaticSvids",
    "SvidSource",
    "TokenCache",
    "ToolClient",
    "ToolClientError",
]

DEFAULT_AUDIENCE = "mcp-gateway"
DEFAULT_SAFETY_MARGIN = dt.timedelta(seconds=15)
DEFAULT_APPROVAL_DEADLINE = 300.0
# Answers to a tools/call kept as a refusal: 401/403 (RFC 6750), 503 (the gateway cannot decide).
REFUSAL_STATUSES = frozenset({401, 403, 503})
REASON_KEY = "authority-reason"  # authority.api.status.REASON_KEY: the stable reason's trailer


# --- errors ---------------------------------------------------------------------------------------


class ToolClientError(Exception):
    """Base of every refusal this library raises on purpose."""


class AuthorityRefused(ToolClientError):
    """The authority refused the Exchange (or EndTask, GetApproval): its gRPC ``code``, stable
    ``reason`` (POLICY_DENIED, BAD_TOOL_CALL, TASK_ENDED, ...) and message; for a policy denial,
    ``policy_reasons`` are the ids of the rules that decided it."""

    def __init__(
        self, code: grpc.StatusCode, reason: str, message: str, policy_reasons: Sequence[str] = ()
    ) -> None:
        super().__init__(f"{code.name} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.policy_reasons = tuple(policy_reasons)


class ApprovalPending(ToolClientError):
    """The call needs an operator's approval: ``approval_id`` names it (``authority approve``);
    call again with ``approval_id=`` to collect the token once approved."""

    def __init__(self, approval_id: str, *, state: str = "pending", expires_at: int = 0) -> None:
        super().__init__(f"approval {approval_id} is {state}")
        self.approval_id = approval_id
        self.state = state
        self.expires_at = expires_at


class ApprovalRefused(ToolClientError):
    """The approval was denied, expired, or was used already: no token will come of it."""

    def __init__(self, approval_id: str, state: str, note: str = "") -> None:
        super().__init__(f"approval {approval_id} is {state}" + (f": {note}" if note else ""))
        self.approval_id = approval_id
        self.state = state
        self.note = note


class GatewayRefused(ToolClientError):
    """The gateway answered 401 or 403 (or 503: it cannot decide now, e.g. its revocation feed
    is stale; ``error`` is then empty): ``error`` is the RFC 6750 code of its
    ``WWW-Authenticate`` (invalid_token, insufficient_scope, invalid_request), ``reason`` the
    stable reason it gave (TOKEN_EXPIRED, TOKEN_CNF_MISMATCH, ...), when it gave one."""

    def __init__(self, status: int, error: str, reason: str, description: str) -> None:
        detail = f" ({description})" if description else ""
        super().__init__(f"gateway refused the call: HTTP {status} {error or '-'} {reason}{detail}")
        self.status = status
        self.error = error
        self.reason = reason
        self.description = description


class GatewayIdentityMismatch(ToolClientError):
    """The server at a gateway's URL presented a certificate that chains to the trust bundle
    but names another SPIFFE ID (``presented``; empty: none) than the ``expected`` gateway's.
    Raised from the TLS handshake: nothing was sent on that connection."""

    def __init__(self, expected: str, presented: str) -> None:
        super().__init__(
            f"the gateway presented {presented or 'no SPIFFE ID'}, not {expected}: "
            "the connection was closed before anything was sent"
        )
        self.expected = expected
        self.presented = presented


def certificate_spiffe_id(der: bytes | None) -> str:
    """The SPIFFE ID a DER certificate names: its URI SANs (an X.509-SVID has exactly one),
    joined by ``", "`` when there are several; empty when it has none (or no certificate)."""
    if not der:
        return ""
    from cryptography import x509

    try:
        certificate = x509.load_der_x509_certificate(der)
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, x509.ExtensionNotFound):
        return ""
    return ", ".join(san.value.get_values_for_type(x509.UniformResourceIdentifier))


def check_gateway_identity(der: bytes | None, expected: str) -> None:
    """``GatewayIdentityMismatch`` unless the certificate's only URI SAN is exactly
    ``expected`` (compared as given: no case folding, no normalisation)."""
    presented = certificate_spiffe_id(der)
    if presented != expected:
        raise GatewayIdentityMismatch(expected, presented)


class _PinnedSSLObject(ssl.SSLObject):
    """An ``SSLObject`` (memory BIOs: anyio, asyncio) whose handshake, once complete, checks
    the server's SPIFFE ID (``expected``, set on a subclass per context)."""

    expected: ClassVar[str] = ""

    def do_handshake(self) -> None:
        super().do_handshake()  # raises SSLWantReadError etc. until the handshake completes
        check_gateway_identity(self.getpeercert(binary_form=True), self.expected)


class _PinnedSSLSocket(ssl.SSLSocket):
    """The same for a blocking ``SSLSocket`` (``wrap_socket``), closed on a mismatch."""

    expected: ClassVar[str] = ""

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        try:
            check_gateway_identity(self.getpeercert(binary_form=True), self.expected)
        except GatewayIdentityMismatch:
            self.close()
            raise


def pin_server_spiffe_id(context: ssl.SSLContext, expected: str) -> ssl.SSLContext:
    """Make every connection of the client ``context`` check, at the end of its TLS handshake
    and before the caller can write a byte on it, that the server's certificate names exactly
    ``expected`` (``GatewayIdentityMismatch`` otherwise). Python's ssl has no per-certificate
    verification callback; this sets the context's own ``sslobject_class`` and
    ``sslsocket_class`` (instance attributes: ``context`` stays an ``ssl.SSLContext``)."""
    if not expected:
        raise ValueError("pin_server_spiffe_id needs a SPIFFE ID")
    attrs = {"expected": expected, "__module__": __name__}
    context.sslobject_class = type("PinnedSSLObject", (_PinnedSSLObject,), attrs)
    context.sslsocket_class = type("PinnedSSLSocket", (_PinnedSSLSocket,), attrs)
    return context


def _identity_mismatch(error: BaseException | None) -> GatewayIdentityMismatch | None:
    """The ``GatewayIdentityMismatch`` behind ``error`` (its causes, contexts, groups)."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, GatewayIdentityMismatch):
            return current
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend((current.__cause__, current.__context__))
    return None


_CHALLENGE_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_refusal(status: int, www_authenticate: str, body: bytes) -> GatewayRefused:
    """A gateway's refusal as a ``GatewayRefused``: the ``Bearer`` challenge's parameters, and
    the reason from the JSON body, either a JSON-RPC error (``error.data.reason``, as the MCP
    gateway answers) or a plain object (``reason``, as ``authority.asgi`` answers)."""
    params: dict[str, str] = {}
    scheme, _, rest = www_authenticate.strip().partition(" ")
    if scheme.lower() == "bearer":
        for name, quoted, bare in _CHALLENGE_PARAM.findall(rest):
            params[name.lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted else bare
    document: dict[str, Any] = {}
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        parsed = json.loads(body) if body else {}
        if isinstance(parsed, dict):
            document = parsed
    error_member = document.get("error")
    if isinstance(error_member, dict):  # JSON-RPC: {"error": {"message", "data": {"reason"}}}
        data = error_member.get("data")
        document = {
            "reason": data.get("reason", "") if isinstance(data, dict) else "",
            "message": error_member.get("message", ""),
        }
    error = params.get("error") or str(document.get("error", "") or "")
    reason = str(document.get("reason", "") or "")
    description = params.get("error_description") or str(document.get("message", "") or "")
    return GatewayRefused(status, error, reason, description[:500])


def _refused(exc: grpc.aio.AioRpcError) -> AuthorityRefused:
    reason = ""
    trailing: Any = exc.trailing_metadata() or ()
    for key, value in trailing:
        if key == REASON_KEY:
            reason = value if isinstance(value, str) else value.decode("utf-8", "replace")
    message = exc.details() or ""
    policy_reasons: list[str] = []
    if reason == "POLICY_DENIED" and "): " in message:
        policy_reasons = [r for r in message.rpartition("): ")[2].split("; ") if r]
    return AuthorityRefused(exc.code(), reason or exc.code().name, message, policy_reasons)


# --- the token cache (no I/O) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallKey:
    """What a token is reused for: the identical call, for the same purpose and audience."""

    server: str
    tool: str
    arguments_sha256: str
    purpose: str
    audience: str


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A task token as the Exchange returned it (``value`` is never shown by ``repr``)."""

    value: str = field(repr=False)
    jti: str
    task_id: str
    expires_at: dt.datetime
    approved: bool = False  # collected with an approval: good for one call, never cached


class TokenCache:
    """Tokens by ``CallKey``, each usable until its expiry minus ``safety_margin`` (so a token is
    never sent with too little life left to be verified at the far end)."""

    def __init__(self, safety_margin: dt.timedelta = DEFAULT_SAFETY_MARGIN) -> None:
        if safety_margin < dt.timedelta(0):
            raise ValueError("safety_margin must not be negative")
        self._margin = safety_margin
        self._tokens: dict[CallKey, IssuedToken] = {}

    def get(self, key: CallKey, now: dt.datetime) -> IssuedToken | None:
        token = self._tokens.get(key)
        if token is None:
            return None
        if now >= token.expires_at - self._margin:
            del self._tokens[key]
            return None
        return token

    def put(self, key: CallKey, token: IssuedToken) -> None:
        self._tokens[key] = token

    def drop(self, key: CallKey) -> None:
        self._tokens.pop(key, None)

    def clear(self) -> None:
        self._tokens.clear()

    def __len__(self) -> int:
        return len(self._tokens)


# --- the SVID ------------------------------------------------------------------------------------


class SvidSource(Protocol):
    """Where the agent's X.509-SVIDs come from: ``authority.client.WorkloadApiClient`` (the
    SPIFFE Workload API), or ``StaticSvids``."""

    def watch_x509_svids(self) -> AsyncIterator[list[FetchedX509Svid]]: ...


class StaticSvids:
    """SVIDs held in memory (a saved SVID folder, tests): the current list, then each one
    ``push``-ed."""

    def __init__(self, svids: Sequence[FetchedX509Svid]) -> None:
        self._svids = list(svids)
        self._changed = asyncio.Event()

    def push(self, svids: Sequence[FetchedX509Svid]) -> None:
        self._svids = list(svids)
        self._changed.set()

    async def watch_x509_svids(self) -> AsyncIterator[list[FetchedX509Svid]]:
        while True:
            self._changed.clear()
            yield list(self._svids)
            await self._changed.wait()


def _leaf_der(svid: FetchedX509Svid) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificates(svid.chain_pem)[0].public_bytes(Encoding.DER)


# --- per request: the bearer header -------------------------------------------------------------


class _Armed:
    """The tokens of the calls under way on one MCP session, by (tool, argument digest)."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str], list[str]] = {}

    @contextlib.contextmanager
    def holding(self, tool: str, digest: str, token: str) -> Generator[None]:
        slot = self._tokens.setdefault((tool, digest), [])
        slot.append(token)
        try:
            yield
        finally:
            slot.remove(token)
            if not slot:
                del self._tokens[(tool, digest)]

    def token(self, tool: str, digest: str) -> str | None:
        slot = self._tokens.get((tool, digest))
        return slot[-1] if slot else None


def tool_call_of(body: bytes) -> tuple[str, str] | None:
    """(tool, argument digest) when ``body`` is one JSON-RPC ``tools/call`` request; else None
    (any other method, a notification, a response, something unparseable)."""
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(message, dict) or message.get("method") != "tools/call":
        return None
    params = message.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("name"), str):
        return None
    try:
        return params["name"], toolcall.arguments_digest(
            toolcall.check_arguments(params.get("arguments"))
        )
    except InvalidArgument:
        return None


class BearerForToolCalls(httpx2.Auth):
    """An ``httpx2.Auth`` that reads each request's JSON-RPC body and, for a ``tools/call``,
    attaches the token armed for exactly that tool and those arguments; every other request
    goes without one. A 401/403 answer to a call is kept (``refusals``) for the caller to
    raise as ``GatewayRefused``."""

    requires_request_body = True

    def __init__(self, armed: _Armed) -> None:
        self._armed = armed
        self.refusals: dict[tuple[str, str], GatewayRefused] = {}

    async def async_auth_flow(
        self, request: httpx2.Request
    ) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        await request.aread()
        call = tool_call_of(request.content) if request.method == "POST" else None
        if call is not None:
            token = self._armed.token(*call)
            if token is not None:
                request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if call is not None and response.status_code in REFUSAL_STATUSES:
            body = await response.aread()
            self.refusals[call] = parse_refusal(
                response.status_code, response.headers.get("www-authenticate", ""), body
            )

    def sync_auth_flow(
        self, request: httpx2.Request
    ) -> Generator[httpx2.Request, httpx2.Response]:  # pragma: no cover - async client only
        raise RuntimeError("BearerForToolCalls works with httpx2.AsyncClient only")


# --- one MCP session ------------------------------------------------------------------------------


class _Session:
    """One MCP session to one gateway route, its ``mcp.Client`` entered and left in a task of
    its own (anyio's task groups must be left by the task that entered them)."""

    def __init__(self, url: str, context: Any, auth: BearerForToolCalls, timeout: float) -> None:
        self.url = url
        self.auth = auth
        self.client: Client | None = None
        self.broken = False
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._error: BaseException | None = None
        self._context = context
        self._timeout = timeout
        self._task = asyncio.create_task(self._run(), name=f"mcp-session {url}")

    async def _run(self) -> None:
        try:
            async with (
                httpx2.AsyncClient(
                    verify=self._context,
                    auth=self.auth,
                    timeout=httpx2.Timeout(self._timeout, read=max(self._timeout, 300.0)),
                ) as http,
                Client(streamable_http_client(self.url, http_client=http), cache=None) as client,
            ):
                self.client = client
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:  # handed to the caller waiting on it
            self._error = exc
            self.broken = True
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self.client = None
            self._ready.set()

    async def ready(self) -> Client:
        await self._ready.wait()
        if self.client is None:
            error = self._error
            mismatch = _identity_mismatch(error)
            if mismatch is not None:  # refused at the handshake: typed, not a ConnectionError
                raise mismatch from None
            while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
                error = error.exceptions[0]  # the task group's one failure says what happened
            if isinstance(error, Exception):
                raise ConnectionError(f"MCP session to {self.url} failed: {error!r}") from error
            raise ConnectionError(f"MCP session to {self.url} is closed")
        return self.client

    async def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            async with asyncio.timeout(10):
                await asyncio.shield(self._task)
        if not self._task.done():
            self._task.cancel()


# --- one SVID and everything bound to it ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Gateway:
    """Where the tools of one MCP server are called: the gateway's URL for that server (e.g.
    ``https://gw:8443/mcp/github``), the audience its tokens must name, and ``spiffe_id``, the
    SPIFFE ID the gateway's certificate must name (e.g. ``spiffe://example.org/gateway``):
    any other server, even one with an SVID of the trust domain, is refused at the handshake
    (``GatewayIdentityMismatch``). Empty: only the chain is checked (a warning says so)."""

    url: str
    audience: str = DEFAULT_AUDIENCE
    spiffe_id: str = ""

    def __post_init__(self) -> None:
        if not self.url.startswith("https://"):
            raise ValueError(f"a gateway URL is https:// (mutual TLS): {self.url!r}")
        if self.spiffe_id and not self.spiffe_id.startswith("spiffe://"):
            raise ValueError(f"a gateway's SPIFFE ID is spiffe://...: {self.spiffe_id!r}")


class _Generation:
    """Everything bound to one SVID: the authority client, the gateway TLS context, the MCP
    sessions and the token cache. Retired when another SVID arrives; closed once idle."""

    def __init__(
        self,
        svid: FetchedX509Svid,
        servers: ServerRotation,
        authority_bundle: bytes,
        safety_margin: dt.timedelta,
        timeout: float,
    ) -> None:
        self.svid = svid
        self.thumbprint = x5t_s256(_leaf_der(svid))
        key_pem = private_key_pem(svid.key)
        self.workload = WorkloadClient(
            servers, authority_bundle, svid_chain_pem=svid.chain_pem, svid_key_pem=key_pem
        )
        self._key_pem = key_pem
        self.tls = client_context(svid.chain_pem, key_pem, svid.bundle_pem)
        self._pinned_tls: dict[str, ssl.SSLContext] = {}
        self.cache = TokenCache(safety_margin)
        self.sessions: dict[str, _Session] = {}
        self.armed: dict[str, _Armed] = {}
        self._exchanging: dict[CallKey, tuple[asyncio.Lock, int]] = {}
        self.users = 0
        self.retired = False
        self._timeout = timeout
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def exchanging(self, key: CallKey) -> AsyncIterator[None]:
        """Held while a token for ``key`` is looked up or asked for (a lock per key, kept
        while anyone waits on it)."""
        lock, waiting = self._exchanging.get(key, (asyncio.Lock(), 0))
        self._exchanging[key] = (lock, waiting + 1)
        try:
            async with lock:
                yield
        finally:
            lock, waiting = self._exchanging[key]
            if waiting == 1:
                del self._exchanging[key]
            else:
                self._exchanging[key] = (lock, waiting - 1)

    def tls_for(self, gateway: Gateway) -> ssl.SSLContext:
        """The TLS context for ``gateway``'s connections: this SVID, and the gateway's SPIFFE
        ID checked at each handshake when it names one (a context per ID)."""
        if not gateway.spiffe_id:
            return self.tls
        context = self._pinned_tls.get(gateway.spiffe_id)
        if context is None:
            context = pin_server_spiffe_id(
                client_context(self.svid.chain_pem, self._key_pem, self.svid.bundle_pem),
                gateway.spiffe_id,
            )
            self._pinned_tls[gateway.spiffe_id] = context
        return context

    async def session(self, server: str, gateway: Gateway) -> tuple[Client, _Session]:
        async with self._lock:
            session = self.sessions.get(server)
            if session is None or session.broken:
                if session is not None:
                    await session.close()
                armed = self.armed.setdefault(server, _Armed())
                session = _Session(
                    gateway.url, self.tls_for(gateway), BearerForToolCalls(armed), self._timeout
                )
                self.sessions[server] = session
        try:
            return await session.ready(), session
        except (ConnectionError, GatewayIdentityMismatch):
            async with self._lock:
                if self.sessions.get(server) is session:
                    del self.sessions[server]
            raise

    async def close(self) -> None:
        sessions, self.sessions = list(self.sessions.values()), {}
        for session in sessions:
            await session.close()
        await self.workload.close()
        self.cache.clear()


# --- the client -----------------------------------------------------------------------------------


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ToolClient:
    """Calls MCP tools through the gateway, each call with a task token for exactly it.

    ``svids`` is the SPIFFE Workload API (``WorkloadApiClient``) or a ``StaticSvids``;
    ``spiffe_id`` picks one of several SVIDs (default: the first). ``authority`` is the
    authority's server-TLS address(es) (replicas, in order) or a ``ServerRotation``;
    ``authority_bundle`` the PEM roots to verify it. ``gateways`` maps each MCP server name to
    its ``Gateway`` (or its URL, with the default audience).

    Use it as an async context manager: it follows the Workload API while open."""

    def __init__(
        self,
        svids: SvidSource,
        *,
        authority: str | Sequence[str] | ServerRotation,
        authority_bundle: bytes,
        gateways: Mapping[str, Gateway | str],
        spiffe_id: str = "",
        task_id: str = "",
        model: str = "",
        ttl_seconds: int = 0,
        safety_margin: dt.timedelta = DEFAULT_SAFETY_MARGIN,
        clock: Clock | None = None,
        timeout: float = 30.0,
        svid_timeout: float = 30.0,
    ) -> None:
        self._svids = svids
        self._servers = (
            authority if isinstance(authority, ServerRotation) else ServerRotation(authority)
        )
        self._bundle = authority_bundle
        self._gateways = {
            toolcall.check_server(name): g if isinstance(g, Gateway) else Gateway(g)
            for name, g in gateways.items()
        }
        unchecked = sorted(name for name, g in self._gateways.items() if not g.spiffe_id)
        if unchecked:
            log.warning(
                "the gateway's identity is not checked for %s (any server with a certificate "
                "of the trust bundle is trusted): give each Gateway its spiffe_id",
                ", ".join(unchecked),
            )
        self._spiffe_id = spiffe_id
        self.task_id = task_id
        self._model = model
        self._ttl = ttl_seconds
        self._margin = safety_margin
        self._clock = clock or SystemClock()
        self._timeout = timeout
        self._svid_timeout = svid_timeout
        self._latest: FetchedX509Svid | None = None
        self._have_svid = asyncio.Event()
        self._current: _Generation | None = None
        self._retired: set[_Generation] = set()
        self._watch: asyncio.Task[None] | None = None
        self._generation_lock = asyncio.Lock()
        self._task_lock = asyncio.Lock()
        self.exchanges = 0  # Exchange calls made (the tests count them; so may metrics)
        self.generations = 0

    # --- life -------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def start(self) -> None:
        if self._watch is None:
            self._watch = asyncio.create_task(self._follow(), name="toolclient-svids")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch
            self._watch = None
        generations = [*self._retired, *([self._current] if self._current else [])]
        self._retired.clear()
        self._current = None
        for generation in generations:
            await generation.close()

    async def _follow(self) -> None:
        async for svids in self._svids.watch_x509_svids():
            chosen = next(
                (s for s in svids if not self._spiffe_id or s.spiffe_id == self._spiffe_id), None
            )
            if chosen is None:
                log.warning("the Workload API holds no SVID for %s", self._spiffe_id or "us")
                continue
            self._latest = chosen
            self._have_svid.set()

    async def _first_svid(self) -> None:
        """Until the SVID source gave one: ``TimeoutError`` after ``svid_timeout``, or what
        stopped the source (the Workload API refusing the request, say)."""
        assert self._watch is not None
        waiting = asyncio.ensure_future(self._have_svid.wait())
        try:
            done, _ = await asyncio.wait(
                [waiting, self._watch], timeout=self._svid_timeout, return_when="FIRST_COMPLETED"
            )
        finally:
            waiting.cancel()
        if self._have_svid.is_set():
            return
        if self._watch in done:
            error = self._watch.exception()
            raise ConnectionError(f"the SVID source stopped: {error}") from error
        raise TimeoutError(f"no X.509-SVID from the Workload API in {self._svid_timeout:g} s")

    @property
    def spiffe_id(self) -> str:
        """The SPIFFE ID of the SVID in use (after the first call)."""
        return self._current.svid.spiffe_id if self._current else ""

    @contextlib.asynccontextmanager
    async def _pinned(self) -> AsyncIterator[_Generation]:
        """The generation of the latest SVID, held for one call (so the Exchange and the TLS
        connection that carries the token use one SVID)."""
        self.start()
        if not self._have_svid.is_set():
            await self._first_svid()
        idle: _Generation | None = None
        async with self._generation_lock:
            latest = self._latest
            assert latest is not None
            current = self._current
            if current is None or current.svid is not latest:
                if current is not None:
                    log.info(
                        "SVID renewed: new MCP sessions and tokens from now on (was x5t %s)",
                        current.thumbprint[:12],
                    )
                    current.retired = True
                    if current.users:
                        self._retired.add(current)  # closed when its last call returns
                    else:
                        idle = current
                current = _Generation(
                    latest, self._servers, self._bundle, self._margin, self._timeout
                )
                self._current = current
                self.generations += 1
            current.users += 1
        if idle is not None:
            await idle.close()
        try:
            yield current
        finally:
            current.users -= 1
            if current.retired and current.users == 0 and current in self._retired:
                self._retired.discard(current)
                await current.close()

    def _gateway(self, server: str) -> Gateway:
        gateway = self._gateways.get(server)
        if gateway is None:
            raise ValueError(f"no gateway is configured for MCP server {server!r}")
        return gateway

    # --- tools --------------------------------------------------------------------------------

    async def list_tools(self, server: str) -> list[Tool]:
        """The tools of ``server`` the gateway shows this agent (all pages)."""
        gateway = self._gateway(server)
        async with self._pinned() as generation:
            client, session = await generation.session(server, gateway)
            tools: list[Tool] = []
            cursor: str | None = None
            try:
                while True:
                    page = await client.list_tools(cursor=cursor)
                    tools.extend(page.tools)
                    cursor = page.next_cursor
                    if not cursor:
                        return tools
            except MCPError:
                raise
            except Exception as exc:
                session.broken = True
                mismatch = _identity_mismatch(exc)
                if mismatch is not None:
                    raise mismatch from None
                raise

    async def call_tool(
        self,
        server: str,
        tool: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        purpose: str,
        prompt: str | None = None,
        prompt_sha256: str = "",
        send_prompt: bool = False,
        model: str = "",
        approval_id: str = "",
        wait_for_approval: bool = False,
        approval_deadline: float = DEFAULT_APPROVAL_DEADLINE,
    ) -> CallToolResult:
        """Call ``tool`` on ``server`` with ``arguments``, authorised by a task token for exactly
        this call (see the module's docstring).

        ``purpose`` is required (the policy and the audit read it). ``prompt`` is reduced to its
        SHA-256 here unless ``send_prompt``; or give ``prompt_sha256`` directly. An approval
        required by policy raises ``ApprovalPending`` unless ``wait_for_approval`` (then polled
        up to ``approval_deadline`` seconds, raising ``ApprovalPending`` after it, or
        ``ApprovalRefused``); ``approval_id`` resumes a pending one."""
        call = toolcall.ToolCall(server, tool, dict(arguments or {}))
        gateway = self._gateway(server)
        if not purpose:
            raise ValueError("a tool call needs a purpose")
        if prompt is not None:
            prompt_sha256 = _sha256(prompt)
        if prompt_sha256 and not _HEX64.fullmatch(prompt_sha256):
            raise ValueError("prompt_sha256 is 64 lower-case hex digits")
        key = CallKey(server, tool, call.digest, purpose, gateway.audience)
        async with self._pinned() as generation:
            # The session first: a server that is not the gateway is refused at its handshake
            # before a token is even asked for.
            await generation.session(server, gateway)
            # One Exchange for concurrent identical calls: the others wait and take its token.
            async with generation.exchanging(key):
                token = generation.cache.get(key, self._clock.now())
                if token is None:
                    request = self._request(
                        call,
                        gateway,
                        purpose,
                        prompt_sha256=prompt_sha256,
                        prompt=prompt if send_prompt and prompt is not None else "",
                        model=model or self._model,
                    )
                    token = await self._obtain(
                        generation, request, approval_id, wait_for_approval, approval_deadline
                    )
                    if not token.approved:
                        generation.cache.put(key, token)
                else:
                    log.debug("reusing task token jti=%s for %s", token.jti, call.resource)
            return await self._send(generation, gateway, call, key, token)

    async def _send(
        self,
        generation: _Generation,
        gateway: Gateway,
        call: toolcall.ToolCall,
        key: CallKey,
        token: IssuedToken,
    ) -> CallToolResult:
        client, session = await generation.session(call.server, gateway)
        armed = generation.armed[call.server]
        slot = (call.tool, call.digest)
        session.auth.refusals.pop(slot, None)
        try:
            with armed.holding(call.tool, call.digest, token.value):
                result = await client.call_tool(call.tool, dict(call.arguments))
        except MCPError:
            refusal = session.auth.refusals.pop(slot, None)
            if refusal is not None:
                generation.cache.drop(key)
                log.info(
                    "gateway refused jti=%s for %s: %s %s",
                    token.jti,
                    call.resource,
                    refusal.status,
                    refusal.reason or refusal.error,
                )
                raise refusal from None
            raise
        except Exception as exc:
            session.broken = True  # the transport failed: the next call opens a new session
            mismatch = _identity_mismatch(exc)
            if mismatch is not None:  # a new connection refused at its handshake: not sent
                generation.cache.drop(key)
                raise mismatch from None
            raise
        log.debug("called %s with jti=%s", call.resource, token.jti)
        return result

    def _request(
        self,
        call: toolcall.ToolCall,
        gateway: Gateway,
        purpose: str,
        *,
        prompt_sha256: str,
        prompt: str,
        model: str,
    ) -> pb.ExchangeRequest:
        return pb.ExchangeRequest(
            intent=pb.Intent(action=toolcall.ACTION, resource=call.resource, purpose=purpose),
            audience=gateway.audience,
            ttl_seconds=self._ttl,
            context=pb.AuditContext(
                prompt_sha256=prompt_sha256,
                tool_name=call.tool,
                tool_args_sha256=call.digest,
                model=model,
                prompt=prompt,
            ),
            tool_call=pb.ToolCall(
                server=call.server, tool=call.tool, arguments_json=call.arguments_json()
            ),
        )

    # --- tokens -------------------------------------------------------------------------------

    async def _exchange(
        self, generation: _Generation, request: pb.ExchangeRequest
    ) -> pb.ExchangeResponse:
        """One Exchange under this client's task: the first one opens it (serialised, so two
        concurrent first calls do not open two tasks)."""
        async with contextlib.AsyncExitStack() as stack:
            if not self.task_id:
                await stack.enter_async_context(self._task_lock)
            request.task_id = self.task_id
            self.exchanges += 1
            try:
                response = await generation.workload.exchange(request)
            except grpc.aio.AioRpcError as exc:
                raise _refused(exc) from None
            if response.WhichOneof("result") == "token" and not self.task_id:
                self.task_id = response.token.task_id
            return response

    async def _obtain(
        self,
        generation: _Generation,
        request: pb.ExchangeRequest,
        approval_id: str,
        wait: bool,
        deadline: float,
    ) -> IssuedToken:
        if approval_id:
            request.approval_id = approval_id
        response = await self._exchange(generation, request)
        if response.WhichOneof("result") == "pending":
            pending = response.pending
            log.info(
                "approval %s pending for %s (decision %s)",
                pending.id,
                request.intent.resource,
                response.decision_id,
            )
            if not wait:
                raise ApprovalPending(pending.id, expires_at=pending.expires_at)
            await self._await_approval(generation, pending.id, deadline)
            request.approval_id = pending.id
            response = await self._exchange(generation, request)
            if response.WhichOneof("result") != "token":
                raise ApprovalPending(response.pending.id, expires_at=response.pending.expires_at)
        issued = response.token
        log.info(
            "task token issued: jti=%s task=%s for %s args_sha256=%s",
            issued.jti,
            issued.task_id,
            request.intent.resource,
            request.context.tool_args_sha256[:16],
        )
        return IssuedToken(
            issued.token,
            issued.jti,
            issued.task_id,
            dt.datetime.fromtimestamp(issued.expires_at, dt.UTC),
            approved=bool(request.approval_id),
        )

    async def _await_approval(
        self,
        generation: _Generation,
        approval_id: str,
        deadline: float,
        backoff: Backoff | None = None,
    ) -> None:
        """Until the approval is approved (return), denied/expired/used (``ApprovalRefused``) or
        ``deadline`` seconds pass (``ApprovalPending``)."""
        backoff = backoff or Backoff(0.25, 5.0)
        end = time.monotonic() + deadline
        request = pb.GetApprovalRequest(id=approval_id)
        while True:
            try:
                info = await generation.workload.call(
                    lambda s: s.GetApproval(request), mtls=True, repeatable=True
                )
            except grpc.aio.AioRpcError as exc:
                raise _refused(exc) from None
            if info.state == "approved":
                return
            if info.state != "pending":
                raise ApprovalRefused(approval_id, info.state, info.note)
            left = end - time.monotonic()
            if left <= 0:
                raise ApprovalPending(approval_id, expires_at=info.expires_at)
            # Full jitter, at least a tenth of a second: never a busy loop on the authority.
            await asyncio.sleep(min(left, max(0.1, backoff.next_delay())))

    # --- the task -----------------------------------------------------------------------------

    async def end_task(self, reason: str = "done") -> list[str]:
        """End this client's task (``EndTask``): every token issued under it is revoked, the
        cache is emptied, and the next call opens a new task. The jtis revoked."""
        if not self.task_id:
            return []
        async with self._pinned() as generation:
            request = pb.EndTaskRequest(task_id=self.task_id, reason=reason)
            try:
                ended = await generation.workload.end_task(request)
            except grpc.aio.AioRpcError as exc:
                raise _refused(exc) from None
            for held in (generation, *self._retired):
                held.cache.clear()
            log.info("task %s ended: %d tokens revoked", self.task_id, len(ended.revoked_jtis))
            self.task_id = ""
            return list(ended.revoked_jtis)


def describe(result: CallToolResult) -> str:
    """A tool result as text: its text contents joined, or its structured content as JSON."""
    texts = [c.text for c in result.content if getattr(c, "type", "") == "text"]  # type: ignore[union-attr]
    if texts:
        return "\n".join(texts)
    return json.dumps(result.structured_content or {}, sort_keys=True)
