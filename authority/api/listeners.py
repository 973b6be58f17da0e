"""What guards the grpcio listeners: channel options from ``Limits``, the file-descriptor budget
checked at start, and an interceptor for undecodable requests and calls per peer.

Measured on grpcio 1.85 (tests/security/test_exhaustion.py holds the attacks):

- ``grpc.max_allowed_incoming_connections`` caps each listener (each port of a server, the admin
  socket too) on its own; a connection beyond it is accepted and closed at once, so it holds no
  descriptor.
- ``grpc.server_handshake_timeout_ms`` closes a connection that has not finished its handshake:
  a TLS ClientHello that never comes, and on the plaintext admin socket an HTTP/2 preface that
  never comes.
- ``grpc.max_connection_idle_ms`` sends GOAWAY to a connection with no call in flight; clients
  reconnect on their next call.
- ``grpc.max_connection_age_ms`` is not used: it ends every connection, streams included (the
  revocation feed, an agent's sync), once its age and grace have passed.

grpcio has no cap on connections per peer: its listeners do not expose the accepted socket, and a
connection that never finishes its handshake reaches no Python code. Calls are what Python sees,
so ``RequestGuard`` caps the calls one peer address has in flight; the connections one address
holds are bounded by the listener cap and the two timeouts, and per-address connection limits
belong in front of the process (nftables ``ct count``, a proxy).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import logging
import resource
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from authority.api.status import abort
from authority.api.workload import peer_host
from authority.config import Limits
from authority.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from authority.logs import RateLimitedLog

log = logging.getLogger(__name__)

TCP_LISTENERS = 2  # server-TLS and mutual-TLS
MIN_CONNECTIONS_PER_LISTENER = 32  # below this a TCP listener is not worth starting
MALFORMED_LOG_INTERVAL = 10.0  # seconds between two log lines about undecodable requests
MAX_CACHED_HANDLERS = 512  # wrapped handlers kept per server (ours number about 60)

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]


def _ms(value: dt.timedelta) -> int:
    return max(1, round(value.total_seconds() * 1000))


def _options(limits: Limits, max_connections: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
        # Calls not yet accepted beyond this are refused (CANCELLED): a reconnect storm of
        # revocation subscribers needs room (grpc's default is 1000, its hard limit 3000).
        ("grpc.server.max_pending_requests", 3000),
        ("grpc.server.max_pending_requests_hard_limit", 3000),
        # Keep idle subscriber connections alive through middleboxes; notice dead peers.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
        # Exhaustion: each listener holds at most this many connections; a handshake and an
        # idle connection (no call in flight) are ended after their timeouts.
        ("grpc.max_allowed_incoming_connections", max_connections),
        ("grpc.server_handshake_timeout_ms", _ms(limits.handshake_timeout)),
        ("grpc.max_connection_idle_ms", _ms(limits.connection_idle_timeout)),
    ]


def workload_options(limits: Limits, per_listener: int) -> list[tuple[str, int]]:
    """Channel options of the workload server (its two TCP listeners), each listener holding at
    most ``per_listener`` connections (``FdBudget.per_listener``)."""
    return _options(limits, per_listener)


def admin_options(limits: Limits) -> list[tuple[str, int]]:
    """Channel options of the admin server (the Unix socket)."""
    return _options(limits, limits.max_admin_connections)


# --- file descriptors ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FdBudget:
    needed: int  # what the caps can hold at once, with the reserve
    soft: int  # RLIMIT_NOFILE once raised
    hard: int
    per_listener: int  # the connection cap of each TCP listener, fitted to the limit
    per_local_socket: int  # the connection cap of each grpclib Unix socket, fitted likewise


def fd_needed(
    limits: Limits,
    local_sockets: int,
    per_listener: int | None = None,
    per_local_socket: int | None = None,
) -> int:
    if per_listener is None:
        per_listener = limits.max_connections_per_listener
    if per_local_socket is None:
        per_local_socket = limits.max_local_connections
    return (
        TCP_LISTENERS * per_listener
        + local_sockets * per_local_socket
        + limits.max_admin_connections
        + limits.fd_reserve
    )


def ensure_fd_limit(limits: Limits, local_sockets: int) -> FdBudget:
    """Raise the soft RLIMIT_NOFILE to the hard limit, and fit the connection caps to it.

    Every listener full at once (each TCP listener at ``max_connections_per_listener``, each of
    the ``local_sockets`` grpclib Unix sockets at ``max_local_connections``) must leave the
    admin socket's and the reserve's descriptors. When even the hard limit cannot hold that, the
    TCP and Unix caps are lowered in proportion (and the server says so), so full public ports
    still leave the admin socket usable; refused (FailedPrecondition) only when a cap would fall
    under ``MIN_CONNECTIONS_PER_LISTENER``. Logs what the process supports in one line."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_listener = limits.max_connections_per_listener
    per_local = limits.max_local_connections
    if hard != resource.RLIM_INFINITY and hard < fd_needed(limits, local_sockets):
        room = hard - limits.max_admin_connections - limits.fd_reserve
        share = max(room, 0) / (TCP_LISTENERS * per_listener + local_sockets * per_local)
        fitted, fitted_local = int(per_listener * share), int(per_local * share)
        if min(fitted, fitted_local) < MIN_CONNECTIONS_PER_LISTENER:
            raise FailedPrecondition(
                f"RLIMIT_NOFILE hard limit {hard} leaves {fitted} connections per TCP "
                f"listener and {fitted_local} per Unix socket (at least "
                f"{MIN_CONNECTIONS_PER_LISTENER} needed) after limits.max_admin_connections "
                f"{limits.max_admin_connections} and limits.fd_reserve {limits.fd_reserve}; "
                "raise the limit (ulimit -n) or lower those",
                reason="FD_LIMIT_TOO_LOW",
            )
        log.warning(
            "RLIMIT_NOFILE hard limit %d cannot hold limits.max_connections_per_listener %d "
            "and limits.max_local_connections %d: each TCP listener takes at most %d "
            "connections and each Unix socket %d (raise the limit for more)",
            hard,
            per_listener,
            per_local,
            fitted,
            fitted_local,
        )
        per_listener, per_local = fitted, fitted_local
    needed = fd_needed(limits, local_sockets, per_listener, per_local)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            # RLIM_INFINITY as a soft limit is refused on some kernels; the budget is enough.
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
            soft = max(soft, needed)
    log.info(
        "file descriptors: limit=%d (hard %s), caps need %d: %d per TCP listener x %d, "
        "%d per Unix socket x %d, admin %d, reserve %d",
        soft,
        "unlimited" if hard == resource.RLIM_INFINITY else hard,
        needed,
        per_listener,
        TCP_LISTENERS,
        per_local,
        local_sockets,
        limits.max_admin_connections,
        limits.fd_reserve,
    )
    return FdBudget(needed, soft, hard, per_listener, per_local)


# --- undecodable requests and calls per peer -----------------------------------------------


class _Malformed:
    """What a guarded deserializer returns for bytes that do not decode."""


MALFORMED = _Malformed()


NO_MESSAGE = "the request holds no complete message"


class MalformedRequest(InvalidArgument):
    reason = "MALFORMED_REQUEST"

    def __init__(self, message: str = "the request message could not be decoded") -> None:
        super().__init__(message)


def _guarded(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # DecodeError, and whatever else a parser raises on hostile bytes
            return MALFORMED

    return decode


class _Throttled:
    """Lines about undecodable requests: at most one per interval, the others counted into one
    summary line (``authority.logs.RateLimitedLog`` under one key)."""

    def __init__(self, interval: float) -> None:
        self._lines = RateLimitedLog(
            log, burst=1, window=interval, summary="undecodable requests refused"
        )

    def note(self, context: Context, method: str) -> None:
        if self._lines.admit("grpc ports"):
            log.warning("undecodable request refused: peer=%s method=%s", context.peer(), method)


class RequestGuard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every handler of a server: a request that does not decode gets INVALID_ARGUMENT
    (MALFORMED_REQUEST) and one throttled log line instead of UNKNOWN and a traceback; with
    ``max_calls_per_peer``, a peer address with that many calls in flight gets
    RESOURCE_EXHAUSTED (PEER_CALL_LIMIT).

    Handlers read their requests as arguments or through the request iterator (none of ours
    calls ``context.read()``, which would hand them the marker)."""

    def __init__(
        self, max_calls_per_peer: int | None = None, log_interval: float = MALFORMED_LOG_INTERVAL
    ) -> None:
        self._max = max_calls_per_peer
        self._calls: dict[str, int] = {}
        self._log = _Throttled(log_interval)
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        # Bounded: a handler made per name (RefuseAdminHandler answers any Admin method name)
        # must not let a caller grow the cache with names of its choosing.
        if len(self._wrapped) < MAX_CACHED_HANDLERS:
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    @contextlib.contextmanager
    def _counted(self, context: Context) -> Iterator[None]:
        if self._max is None:
            yield
            return
        peer = peer_host(context)
        count = self._calls.get(peer, 0)
        if count >= self._max:
            raise ResourceExhausted(
                f"{self._max} calls from this address are in flight already",
                reason="PEER_CALL_LIMIT",
            )
        self._calls[peer] = count + 1
        try:
            yield
        finally:
            left = self._calls[peer] - 1
            if left:
                self._calls[peer] = left
            else:
                del self._calls[peer]

    def _checked(
        self, requests: AsyncIterator[Any], context: Context, method: str
    ) -> AsyncIterator[Any]:
        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                if request is MALFORMED:
                    self._log.note(context, method)
                    raise MalformedRequest()
                yield request

        return checked()

    def _wrap(self, handler: Handler, method: str) -> Handler:
        deserializer = handler.request_deserializer
        guarded = _guarded(deserializer) if deserializer is not None else None
        serializer = handler.response_serializer
        if handler.request_streaming:
            inner = handler.stream_stream if handler.response_streaming else handler.stream_unary
        else:
            inner = handler.unary_stream if handler.response_streaming else handler.unary_unary
        assert inner is not None
        if not inspect.iscoroutinefunction(inner) and not inspect.isasyncgenfunction(inner):
            return handler  # a synchronous handler: grpc.aio runs it as it is
        guard = self
        behave: Callable[..., Any] = inner  # typed by grpc-stubs for the sync API

        async def enter(request: Any, context: Context) -> Any:
            """The request, or its checking iterator; refuses what must be refused."""
            if handler.request_streaming:
                return guard._checked(request, context, method)
            # A single-request method is served as a request stream (see _single): here
            # ``request`` is that stream, and the method gets its first message.
            first = await anext(aiter(request), None)
            if first is None:
                guard._log.note(context, method)
                await abort(context, MalformedRequest(NO_MESSAGE))
            if first is MALFORMED:
                guard._log.note(context, method)
                await abort(context, MalformedRequest())
            return first

        if inspect.isasyncgenfunction(inner):
            generator = behave

            async def streamed(request: Any, context: Context) -> AsyncIterator[Any]:
                request = await enter(request, context)
                try:
                    with guard._counted(context):
                        async for response in generator(request, context):
                            yield response
                except (MalformedRequest, ResourceExhausted) as exc:
                    await abort(context, exc)

            behavior: Callable[..., Any] = streamed
        else:
            coroutine = behave

            async def called(request: Any, context: Context) -> Any:
                request = await enter(request, context)
                try:
                    with guard._counted(context):
                        return await coroutine(request, context)
                except (MalformedRequest, ResourceExhausted) as exc:
                    await abort(context, exc)

            behavior = called

        # Every method is registered request-streaming. grpc core never answers a call to a
        # single-request handler whose body holds no complete message (none, a cut length
        # prefix, a length that lies): the call waits until the client gives up. As a request
        # stream, the end of the body reaches Python and is refused (INVALID_ARGUMENT).
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(behavior, guarded, serializer)
        return grpc.stream_unary_rpc_method_handler(behavior, guarded, serializer)


__all__ = [
    "FdBudget",
    "MalformedRequest",
    "RequestGuard",
    "admin_options",
    "ensure_fd_limit",
    "fd_needed",
    "workload_options",
]
