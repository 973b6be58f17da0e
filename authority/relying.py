"""The relying-service side: verify task tokens where they are used.

A relying service (the API or tool an agent acts on) checks every task token locally, with no
call to the authority on the request path:

- ``TaskTokenVerifier`` checks one token for one operation: the signature against the
  authority's task-token keys (algorithm allow-list, ``typ`` ``task+jwt``), the issuer, that the
  audience is this service, the time window (with a small leeway), that the token is bound to the
  certificate of the mutual-TLS peer presenting it (``cnf`` ``x5t#S256``), that its scope names
  exactly the action being performed (nothing is implied: ``read`` does not cover ``write``) and
  that the resource acted on lies within the token's. A ``RevocationView`` is consulted last;
  when it is not fresh the verifier fails closed.
- ``TaskKeySource`` keeps the task-token keys from the authority's ``GetTaskKeys`` RPC: cached,
  refreshed periodically and when a token names a key id it does not know (rate limited), so a
  rotation of the task-token keys is followed without a restart.
- ``TaskTokenInterceptor`` enforces a verifier per gRPC method on a ``grpc.aio`` server: the
  token from ``authorization: Bearer <token>``, the peer certificate from the TLS auth context;
  the handler reads the verified token with ``current_task_token()``. Methods it does not know
  are refused unless declared public.

Every refusal is an ``authority.errors`` error with a stable reason; the interceptor turns it into
a gRPC status (UNAUTHENTICATED for a missing or invalid token, PERMISSION_DENIED for a refused
scope, resource or binding, UNAVAILABLE when keys or the revocation feed are unavailable) with
the reason in the trailing metadata key ``authority-reason``. Tokens are never logged: only a
jti or a digest prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import grpc
import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from jwt.algorithms import ECAlgorithm
from jwt.exceptions import InvalidKeyError

from authority import tokens
from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority.api.status import abort
from authority.audit import digest
from authority.backoff import Backoff, LinkState
from authority.clock import Clock, SystemClock
from authority.errors import (
    AuthorityError,
    Internal,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from authority.ids import TrustDomain
from authority.tokens import TaskToken

log = logging.getLogger(__name__)

PublicKeys = Mapping[str, ec.EllipticCurvePublicKey]
Context = grpc.aio.ServicerContext[Any, Any]

MAX_TOKEN_CHARS = 8192  # checked before anything is parsed
MAX_LEEWAY = dt.timedelta(seconds=60)
DEFAULT_LEEWAY = tokens.DEFAULT_LEEWAY
DEFAULT_REFRESH_INTERVAL = dt.timedelta(minutes=5)
DEFAULT_MIN_REFRESH_INTERVAL = dt.timedelta(seconds=30)
DEFAULT_FETCH_TIMEOUT = 5.0
_CURVE_FOR_ALG = {"ES256": "secp256r1", "ES384": "secp384r1"}


# --- revocation ----------------------------------------------------------------------------------


class RevocationView(Protocol):
    """What the verifier knows of revocations (fed by the authority's revocation stream)."""

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
        """True when the token, its task, its subject, its holder, any actor of its delegation
        chain, or the key that signed it has been revoked."""
        ...

    def fresh(self) -> bool:
        """False when the view may be missing revocations (its feed is older than allowed):
        the verifier then refuses every token (fail closed)."""
        ...


class NoRevocations:
    """A view that revokes nothing and is always fresh: the default until a feed is plugged in."""

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
        return False

    def fresh(self) -> bool:
        return True


# --- keys ----------------------------------------------------------------------------------------


class KeySource(Protocol):
    """Where a verifier gets the task-token public keys, by ``kid``."""

    async def keys(self) -> PublicKeys:
        """The keys to verify with now."""
        ...

    async def refresh_for(self, kid: str) -> PublicKeys:
        """A token names ``kid``, which ``keys()`` lacks: fetch again if allowed now, and return
        the keys then held."""
        ...


class StaticKeys:
    """A fixed set of keys (tests, or a service configured with pinned keys)."""

    def __init__(self, keys: PublicKeys) -> None:
        self._keys = dict(keys)

    async def keys(self) -> PublicKeys:
        return self._keys

    async def refresh_for(self, kid: str) -> PublicKeys:
        return self._keys


def parse_task_jwks(data: bytes) -> dict[str, ec.EllipticCurvePublicKey]:
    """The task-token JWK Set (``GetTaskKeys``) -> public keys by kid.

    Each key must be a public EC key with a unique ``kid``, an ``alg`` of the allow-list whose
    curve it has, and ``use`` "sig" when ``use`` is given; anything else refuses the whole set."""
    try:
        doc = json.loads(data)
        entries = doc["keys"]
        if not isinstance(entries, list):
            raise TypeError("keys is not a list")
        out: dict[str, ec.EllipticCurvePublicKey] = {}
        for jwk in entries:
            kid, alg = jwk["kid"], jwk["alg"]
            if not isinstance(kid, str) or not kid or kid in out:
                raise ValueError("each key needs a kid of its own")
            if alg not in tokens.ALGORITHMS:
                raise ValueError(f"algorithm {alg!r} is not allowed")
            if jwk.get("use", "sig") != "sig" or "d" in jwk:
                raise ValueError(f"key {kid} is not a public signing key")
            key = ECAlgorithm.from_jwk(jwk)
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise ValueError(f"key {kid} is not a public EC key")
            if key.curve.name != _CURVE_FOR_ALG[alg]:
                raise ValueError(f"key {kid} is not on the curve of {alg}")
            out[kid] = key
        return out
    except (ValueError, KeyError, TypeError, AttributeError, InvalidKeyError) as exc:
        raise InvalidArgument(
            f"not a task-token JWK Set: {exc}", reason="TASK_KEYS_MALFORMED"
        ) from None


@runtime_checkable
class TaskKeysOrigin(Protocol):
    """Where ``TaskKeySource`` asks for the keys: ``authority.client.WorkloadClient``, which
    moves between the authority's servers (replicas) when one cannot be reached."""

    async def get_task_keys(self, *, timeout: float) -> pb.TaskKeys:  # noqa: ASYNC109
        ...


class TaskKeySource:
    """Task-token keys from the authority's ``GetTaskKeys`` RPC, cached.

    Fetched on first use, again every ``refresh_interval`` (when asked for keys after that), and
    when a token names an unknown ``kid`` — at most once per ``min_refresh_interval``, so
    tokens with made-up key ids cannot turn the service into a flood of calls to the authority.
    A failed fetch keeps the keys already held; with none held, verification is UNAVAILABLE.
    After a failure the next attempt waits a ``Backoff`` delay (full jitter, doubling from
    ``backoff.initial`` up to its cap), besides ``min_refresh_interval`` while keys are held; the
    loss and the recovery are logged once each (with the outage's duration), not every retry.
    The authority must answer for ``issuer``: keys of another trust domain are refused.

    ``stub`` is a ``TaskKeysOrigin``, typically a ``WorkloadClient`` given the addresses of
    the authority's servers (a fetch moves to the next server when one cannot be reached: a
    read, safe to make again), or any one Workload stub, such as ``WorkloadClient.tls_stub``
    (server TLS: the keys are public, no SVID is needed to fetch them)."""

    def __init__(
        self,
        stub: pb_grpc.WorkloadAsyncStub | TaskKeysOrigin,
        *,
        issuer: TrustDomain | str,
        clock: Clock | None = None,
        refresh_interval: dt.timedelta = DEFAULT_REFRESH_INTERVAL,
        min_refresh_interval: dt.timedelta = DEFAULT_MIN_REFRESH_INTERVAL,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
        backoff: Backoff | None = None,
    ) -> None:
        if not dt.timedelta(0) <= min_refresh_interval <= refresh_interval:
            raise InvalidArgument("need 0 <= min_refresh_interval <= refresh_interval")
        if fetch_timeout <= 0:
            raise InvalidArgument("fetch_timeout must be positive")
        self._stub = stub
        self._issuer = _issuer_uri(issuer)
        self._clock = clock or SystemClock()
        self._refresh_interval = refresh_interval
        self._min_interval = min_refresh_interval
        self._timeout = fetch_timeout
        self._keys: dict[str, ec.EllipticCurvePublicKey] | None = None
        self._fetched_at: dt.datetime | None = None  # last successful fetch
        self._attempted_at: dt.datetime | None = None  # last attempt, successful or not
        self._unknown_at: dt.datetime | None = None  # last fetch caused by an unknown kid
        self._backoff = backoff or Backoff()
        self._retry_gap = dt.timedelta(0)  # after a failure: the backoff's delay
        self._link = LinkState(
            "task-token keys from the authority", log, monotonic=self._clock_seconds
        )
        self._lock = asyncio.Lock()
        self.fetches = 0  # successful fetches, for operators' metrics

    async def keys(self) -> PublicKeys:
        now = self._clock.now()
        # Without keys, retry after the backoff only; with keys, on schedule, never more often
        # than min_refresh_interval, and after a failure not before the backoff's delay.
        retry = max(self._retry_gap, dt.timedelta(0) if self._keys is None else self._min_interval)
        if self._due(now) and _since(self._attempted_at, now) >= retry:
            await self._refresh(reason="periodic", only_if=lambda: self._due(now))
        elif self._keys is None:
            async with self._lock:  # the first fetch may be under way
                pass
        return self._held()

    async def refresh_for(self, kid: str) -> PublicKeys:
        now = self._clock.now()
        if _since(self._unknown_at, now) >= self._min_interval:
            self._unknown_at = now
            await self._refresh(reason="unknown kid", only_if=lambda: kid not in (self._keys or {}))
        else:
            async with self._lock:  # a fetch under way may bring the key
                pass
        return self._held()

    async def refresh(self) -> PublicKeys:
        """Fetch now, whatever the schedule (an operator announced a rotation, say)."""
        await self._refresh(reason="explicit", only_if=lambda: True)
        return self._held()

    def _clock_seconds(self) -> float:
        return self._clock.now().timestamp()

    def _due(self, now: dt.datetime) -> bool:
        return self._keys is None or _since(self._fetched_at, now) >= self._refresh_interval

    def _held(self) -> PublicKeys:
        if self._keys is None:
            raise Unavailable(
                "the task-token keys could not be fetched from the authority",
                reason="TASK_KEYS_UNAVAILABLE",
            )
        return self._keys

    async def _refresh(self, *, reason: str, only_if: Callable[[], bool]) -> None:
        async with self._lock:
            if not only_if():  # another caller fetched while this one waited
                return
            self._attempted_at = self._clock.now()
            try:
                if isinstance(self._stub, TaskKeysOrigin):
                    reply = await self._stub.get_task_keys(timeout=self._timeout)
                else:
                    reply = await self._stub.GetTaskKeys(
                        pb.GetTaskKeysRequest(), timeout=self._timeout
                    )
                if reply.issuer != self._issuer:
                    raise InvalidArgument(
                        f"the authority answered for {reply.issuer!r}, not {self._issuer!r}",
                        reason="TASK_KEYS_ISSUER",
                    )
                keys = parse_task_jwks(reply.jwks_json)
            except (grpc.aio.AioRpcError, InvalidArgument) as exc:
                detail = (
                    f"{exc.code().name}: {exc.details()}"
                    if isinstance(exc, grpc.aio.AioRpcError)
                    else exc.message
                )
                self._retry_gap = dt.timedelta(seconds=self._backoff.next_delay())
                self._link.lost(f"{reason} refresh: {detail}")
                return
            self._link.restored()
            self._backoff.reset()
            self._retry_gap = dt.timedelta(0)
            added = sorted(set(keys) - set(self._keys or {}))
            self._keys, self._fetched_at = keys, self._clock.now()
            self.fetches += 1
            log.info(
                "task-token keys fetched (%s): %d keys, new: %s",
                reason,
                len(keys),
                ",".join(k[:12] for k in added) or "none",
            )


def _since(when: dt.datetime | None, now: dt.datetime) -> dt.timedelta:
    return dt.timedelta.max if when is None else now - when


def _issuer_uri(issuer: TrustDomain | str) -> str:
    domain = issuer if isinstance(issuer, TrustDomain) else TrustDomain.parse(issuer)
    return domain.id.uri


# --- the verifier --------------------------------------------------------------------------------


class TaskTokenVerifier:
    """Checks task tokens for one relying service (one audience) of one trust domain.

    ``issuer`` is the trust domain (``example.org`` or its ID ``spiffe://example.org``: the
    ``iss`` of task tokens); ``audience`` is this service's own name, as agents ask for it."""

    def __init__(
        self,
        *,
        issuer: TrustDomain | str,
        audience: str,
        keys: KeySource,
        clock: Clock | None = None,
        leeway: dt.timedelta = DEFAULT_LEEWAY,
        revocations: RevocationView | None = None,
    ) -> None:
        if not audience or len(audience) > 256 or any(c.isspace() for c in audience):
            raise InvalidArgument("audience must be one name without spaces", reason="BAD_AUDIENCE")
        if not dt.timedelta(0) <= leeway <= MAX_LEEWAY:
            raise InvalidArgument(f"leeway must be between 0 and {MAX_LEEWAY}")
        self.issuer = _issuer_uri(issuer)
        self.audience = audience
        self._keys = keys
        self._clock = clock or SystemClock()
        self._leeway = leeway
        self._revocations: RevocationView = revocations or NoRevocations()

    async def verify(
        self,
        token: str,
        *,
        action: str,
        resource: str | None = None,
        peer_cert_der: bytes | None,
    ) -> TaskToken:
        """The token's claims, if it allows ``action`` (on ``resource``, when given) for the
        peer whose certificate (DER) presented it; else an ``AuthorityError``:

        - ``Unauthenticated``: TOKEN_MALFORMED, TOKEN_TYPE, TOKEN_ALGORITHM, TOKEN_UNKNOWN_KEY,
          TOKEN_SIGNATURE, TOKEN_ISSUER, TOKEN_AUDIENCE, TOKEN_EXPIRED, TOKEN_NOT_YET_VALID,
          TOKEN_LIFETIME, TOKEN_REVOKED, TOKEN_UNBOUND (no peer certificate);
        - ``PermissionDenied``: TOKEN_CNF_MISMATCH, TOKEN_SCOPE, TOKEN_RESOURCE;
        - ``InvalidArgument``: BAD_RESOURCE (the resource acted on is not a valid name);
        - ``Unavailable``: REVOCATION_FEED_STALE, TASK_KEYS_UNAVAILABLE.
        """
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated(
                f"a task token is 1..{MAX_TOKEN_CHARS} characters", reason="TOKEN_MALFORMED"
            )
        parsed = await self._signed(token)
        if not self._revocations.fresh():
            raise Unavailable(
                "the revocation feed is stale; refusing until it catches up",
                reason="REVOCATION_FEED_STALE",
            )
        if self.is_revoked(parsed):
            raise Unauthenticated("the token was revoked", reason="TOKEN_REVOKED")
        tokens.check_binding(parsed, peer_cert_der)
        self.check_action(parsed, action, resource)
        return parsed

    def check_action(self, token: TaskToken, action: str, resource: str | None = None) -> None:
        """The token grants exactly ``action`` and covers ``resource`` (when given)."""
        if resource is not None:
            try:
                tokens.check_resource(resource)
            except InvalidArgument:
                raise InvalidArgument(
                    f"resource {resource!r} is not a valid resource name", reason="BAD_RESOURCE"
                ) from None
        tokens.check_scope(token, action, resource)

    def is_revoked(self, token: TaskToken) -> bool:
        """The revocation hook: the token, its task, its subject, its holder, an actor of its
        delegation chain, or its signing key revoked."""
        return self._revocations.is_revoked(
            token.jti,
            token.task_id,
            token.subject,
            token.holder,
            actors=token.actors,
            key_id=token.key_id,
        )

    async def _signed(self, token: str) -> TaskToken:
        keys = await self._keys.keys()
        try:
            return self._decode(token, keys)
        except Unauthenticated as exc:
            if exc.reason != "TOKEN_UNKNOWN_KEY":
                raise
        kid = jwt.get_unverified_header(token).get("kid")  # it parsed a moment ago
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("the token's key is unknown", reason="TOKEN_UNKNOWN_KEY")
        return self._decode(token, await self._keys.refresh_for(kid))

    def _decode(self, token: str, keys: PublicKeys) -> TaskToken:
        return tokens.verify(
            token,
            keys=keys,
            issuer=self.issuer,
            audience=self.audience,
            now=self._clock.now(),
            leeway=self._leeway,
        )


# --- the gRPC interceptor ------------------------------------------------------------------------

ResourceFn = Callable[[Any], str]
"""From a request message, the resource the call acts on (checked within the token's)."""

MethodRule = tuple[str, ResourceFn | None]
"""(the action the method performs, how to find its resource, or None for no resource check)."""

_CURRENT: contextvars.ContextVar[TaskToken | None] = contextvars.ContextVar(
    "authority_task_token", default=None
)


def current_task_token() -> TaskToken:
    """The task token verified for the call being handled (inside a protected handler)."""
    token = _CURRENT.get()
    if token is None:
        raise Unauthenticated("no verified task token for this call", reason="TOKEN_MISSING")
    return token


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of the one ``authorization: Bearer <token>`` header."""
    values = [v for k, v in metadata or () if k.lower() == "authorization"]
    if not values:
        raise Unauthenticated("the call carries no task token", reason="TOKEN_MISSING")
    if len(values) > 1:
        raise Unauthenticated(
            "the call carries several authorization headers", reason="TOKEN_MALFORMED"
        )
    value = values[0]
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    scheme, _, token = text.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated(
            "authorization must be 'Bearer <task token>'", reason="TOKEN_MALFORMED"
        )
    return token.strip()


def peer_certificate_der(context: Context) -> bytes | None:
    """The mutual-TLS peer's leaf certificate (DER) as gRPC verified it; None without one."""
    certs = list(context.auth_context().get("x509_pem_cert", ()))
    if not certs:
        return None
    try:
        return x509.load_pem_x509_certificate(certs[0]).public_bytes(Encoding.DER)
    except ValueError:
        return None


def _token_ref(token: str) -> str:
    """How a token appears in logs: a digest prefix, never the token."""
    return digest(token)[:16]


class _Gate:
    """One protected method: admits a call whose token the verifier accepts."""

    def __init__(
        self, verifier: TaskTokenVerifier, method: str, action: str, resource: ResourceFn | None
    ) -> None:
        self.verifier = verifier
        self.method = method
        self.action = action
        self.resource = resource

    def resource_of(self, request: object) -> str:
        assert self.resource is not None
        try:
            resource = self.resource(request)
        except AuthorityError:
            raise
        except Exception:
            log.exception("resource function of %s failed", self.method)
            raise InvalidArgument(
                "the request does not name a resource", reason="BAD_RESOURCE"
            ) from None
        if not isinstance(resource, str) or not resource:
            raise InvalidArgument("the request does not name a resource", reason="BAD_RESOURCE")
        return resource

    async def admit(self, context: Context, request: object | None, unary: bool) -> TaskToken:
        """Verify the call's token (and the unary request's resource) or abort the call."""
        ref = "-"
        try:
            text = bearer_token(context.invocation_metadata())
            ref = _token_ref(text)
            resource = self.resource_of(request) if unary and self.resource else None
            token = await self.verifier.verify(
                text,
                action=self.action,
                resource=resource,
                peer_cert_der=peer_certificate_der(context),
            )
        except AuthorityError as exc:
            self._refused(exc, ref)
            await abort(context, exc)
        log.debug(
            "task token accepted: method=%s jti=%s holder=%s", self.method, token.jti, token.holder
        )
        return token

    def check_message(self, token: TaskToken, message: object) -> None:
        """A streamed request message must act within the token, like a unary one."""
        if self.resource is not None:
            self.verifier.check_action(token, self.action, self.resource_of(message))

    def _refused(self, exc: AuthorityError, ref: str) -> None:
        log.info(
            "task token refused: method=%s reason=%s token_sha256=%s", self.method, exc.reason, ref
        )

    async def refuse(self, context: Context, exc: AuthorityError) -> None:
        self._refused(exc, "-")
        await abort(context, exc)


class TaskTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Enforces task tokens per method on a ``grpc.aio`` server.

    ``methods`` maps a full method name (``/pkg.Service/Method``) to its rule: the action it
    performs and, optionally, a function giving the resource from the request message (for a
    streamed request, every message is checked as it is read). ``public`` methods (health
    checks, say) pass without a token; any other method is refused with PERMISSION_DENIED
    (METHOD_NOT_ALLOWED). Handlers must be ``async`` (coroutines or async generators), as
    ``grpc.aio`` servicers are."""

    def __init__(
        self,
        verifier: TaskTokenVerifier,
        methods: Mapping[str, MethodRule],
        *,
        public: Iterable[str] = (),
    ) -> None:
        self._verifier = verifier
        self._public = frozenset(public)
        self._gates: dict[str, _Gate] = {}
        for method, (action, resource) in methods.items():
            _check_method_name(method)
            tokens.check_action(action)
            if method in self._public:
                raise InvalidArgument(f"{method} is both public and protected")
            self._gates[method] = _Gate(verifier, method, action, resource)
        for method in self._public:
            _check_method_name(method)

    async def intercept_service(  # type: ignore[override]  # grpc: None for no such method
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method in self._public:
            return handler
        gate = self._gates.get(method)
        if gate is None:
            return _refusing(
                handler,
                _Gate(self._verifier, method, "none", None),
                PermissionDenied(
                    f"{method} is not open to task tokens", reason="METHOD_NOT_ALLOWED"
                ),
            )
        return _guarded(handler, gate)


def _check_method_name(method: str) -> None:
    service, sep, name = method.removeprefix("/").partition("/")
    if not method.startswith("/") or not sep or not service or not name or "/" in name:
        raise InvalidArgument(f"{method!r} is not a full method name (/package.Service/Method)")


def _rebuild(handler: grpc.RpcMethodHandler[Any, Any], behavior: Any) -> Any:
    """A handler of the same shape and serializers as ``handler``, running ``behavior``."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _inner(handler: grpc.RpcMethodHandler[Any, Any]) -> Any:
    return {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }[(handler.request_streaming, handler.response_streaming)]


def _refusing(
    handler: grpc.RpcMethodHandler[Any, Any], gate: _Gate, error: AuthorityError
) -> grpc.RpcMethodHandler[Any, Any]:
    async def refuse(request: object, context: Context) -> None:
        await gate.refuse(context, error)

    handler_out: grpc.RpcMethodHandler[Any, Any] = _rebuild(handler, refuse)
    return handler_out


def _guarded(
    handler: grpc.RpcMethodHandler[Any, Any], gate: _Gate
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` behind ``gate``: the call runs only once its token is verified, with the
    token in ``current_task_token()``; a streamed request is checked message by message."""
    inner = _inner(handler)
    streaming_in = handler.request_streaming

    async def enter(request: Any, context: Context) -> tuple[TaskToken, Any, _Watch]:
        token = await gate.admit(context, request, unary=not streaming_in)
        watch = _Watch()
        if streaming_in:
            request = _checked_stream(request, gate, token, watch)
        return token, request, watch

    if inspect.isasyncgenfunction(inner):

        async def stream_out(request: Any, context: Context) -> AsyncIterator[Any]:
            token, request, watch = await enter(request, context)
            reset = _CURRENT.set(token)
            try:
                async for item in inner(request, context):
                    yield item
            except AuthorityError as exc:
                if exc is not watch.refused:
                    raise
            finally:
                with contextlib.suppress(ValueError):  # closed from another context
                    _CURRENT.reset(reset)
            if watch.refused is not None:  # even if the handler swallowed it
                await gate.refuse(context, watch.refused)

        behavior: Any = stream_out
    elif inspect.iscoroutinefunction(inner):

        async def call(request: Any, context: Context) -> Any:
            token, request, watch = await enter(request, context)
            reset = _CURRENT.set(token)
            result = None
            try:
                result = await inner(request, context)
            except AuthorityError as exc:
                if exc is not watch.refused:
                    raise
            finally:
                _CURRENT.reset(reset)
            if watch.refused is not None:
                await gate.refuse(context, watch.refused)
            return result

        behavior = call
    else:
        error = Internal(
            f"{gate.method}: TaskTokenInterceptor protects async handlers only",
            reason="HANDLER_NOT_ASYNC",
        )
        return _refusing(handler, gate, error)
    guarded: grpc.RpcMethodHandler[Any, Any] = _rebuild(handler, behavior)
    return guarded


class _Watch:
    """The first refusal met in a streamed request, if any."""

    refused: AuthorityError | None = None


async def _checked_stream(
    requests: AsyncIterator[Any], gate: _Gate, token: TaskToken, watch: _Watch
) -> AsyncIterator[Any]:
    """The request stream, refusing (raising into the handler) at the first message whose
    resource the token does not cover; nothing after it is read."""
    async for message in requests:
        try:
            gate.check_message(token, message)
        except AuthorityError as exc:
            watch.refused = exc
            raise
        yield message
